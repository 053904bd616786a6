"""The README and Makefile as a new user meets them: paths it cites exist where the default run
writes them, no reference to files the repository does not hold, and `make run` installs no
test-only extras."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from coda_ctl.localplan import default_run
from ctl_testkit import REPO

README = (REPO / "README.md").read_text()


def _make_dry_run(target: str, tmp_path: Path) -> str:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make not found on PATH")
    res = subprocess.run(
        [make, "-n", target, f"VENV={tmp_path / 'venv'}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_make_run_installs_no_test_only_extras(tmp_path: Path) -> None:
    installs = [ln for ln in _make_dry_run("run", tmp_path).splitlines() if "pip install" in ln]
    extras = re.search(r"\.\[([^\]]*)\]", next(ln for ln in installs if "-e" in ln))
    assert extras is not None
    assert "dev" not in extras.group(1).split(","), installs
    assert {"train", "serve", "cli"} <= set(extras.group(1).split(","))
    test_installs = _make_dry_run("test", tmp_path)
    assert re.search(r",dev[],]", test_installs)  # tests still get everything


def test_readme_paths_name_what_the_default_run_writes() -> None:
    name = default_run()["metadata"]["name"]
    cited = set(re.findall(r"runs/([a-z0-9-]+)/", README)) - {
        "name"
    }  # `runs/name/…`: a placeholder
    assert cited == {name}, f"README cites runs/{cited}/, the default run writes runs/{name}/"
    last_stage = default_run()["spec"]["stages"][-1]["name"]
    assert f"runs/{name}/{last_stage}/final" in README


def test_readme_cites_only_files_in_the_repository() -> None:
    # a bare NAME.md is a file at the repository's root; one inside a path is checked as a path
    for cited in sorted(set(re.findall(r"(?<![/\w])([A-Z][A-Z_]+\.md)\b", README))):
        assert (REPO / cited).exists(), f"README cites {cited}, which is not in the repository"
    for path in sorted(
        set(re.findall(r"`((?:charts|manifests|docker|scripts|bench|trainer)/[\w./-]+)`", README))
    ):
        assert (REPO / path.rstrip("/")).exists() or "<" in path, f"README cites missing {path}"


OFFLINE_VERBS = ("crd", "render", "local default", "submit --dry-run=client", "version --client")


def test_offline_readme_commands_run_as_written(tmp_path: Path) -> None:
    """Every `$ coda-ctl …` line of the README that needs no cluster and no training runs as
    written (in a fresh directory that has the repository's manifests/) and exits 0."""
    import os
    import sys

    commands = [
        line[2:].split("  #")[0].strip()
        for line in README.splitlines()
        if line.startswith("$ coda-ctl ") and line[len("$ coda-ctl ") :].startswith(OFFLINE_VERBS)
    ]
    assert len(commands) >= 3, commands  # crd, render, local default at least
    (tmp_path / "manifests").symlink_to(REPO / "manifests")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        res = subprocess.run(
            ["bash", "-c", command],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
        assert res.returncode == 0, f"{command}: {res.stderr[-2000:]}"
