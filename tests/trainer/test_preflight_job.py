"""`python -m coda_trainer.preflight` as the operator's pre-flight Job runs it: the rendered Job's
own command and env in a subprocess, its report merge-patched into a real HTTP server standing in
for the API server's status subresource, and the exit codes of the training contract (0 fits,
78 does not fit or cannot run, 75 the report could not be delivered)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from coda_trainer.contract import EXIT_PERMANENT, EXIT_RETRYABLE

REPO = Path(__file__).resolve().parents[2]
STATUS_PATH = "/apis/coda.dev/v1alpha1/namespaces/ml/codatrainingruns/demo/status"


def rendered_job(tpu: dict[str, Any]) -> tuple[list[str], dict[str, str], str]:
    """The operator's pre-flight Job for stage 0 of a one-stage test-micro run on `tpu`."""
    from coda_operator import api, render

    spec = api.parse_spec({
        "image": "trainer:test", "model": {"preset": "test-micro"}, "tokenizer": "project",
        "checkpoints": {"uri": "gs://coda-test/runs/demo"}, "accelerator": {"tpu": tpu},
        "stages": [{"name": "sft", "kind": "sft", "steps": 10,
                    "batch": {"sequences": 8, "seqLen": 128},
                    "data": [{"uri": "gs://coda-data/sft/*.jsonl", "format": "chat"}]}],
    })  # fmt: skip
    key = render.preflight_key("demo", spec, 0)
    (container,) = render.render_preflight_job("demo", "ml", spec, 0, key)["spec"]["template"][
        "spec"
    ]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env["CODA_RUN_NAMESPACE"] = "ml"  # the downward API's metadata.namespace
    return container["command"], env, key


def run_job(
    tmp_path: Path, command: list[str], env: dict[str, str], server: str
) -> tuple[int, str]:
    full_env = {**os.environ, **env, "CODA_PROGRESS_SERVER": server,
                "PYTHONPATH": str(REPO / "trainer")}  # fmt: skip
    full_env.pop("JAX_PLATFORMS", None)
    full_env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS", "cpu")
    log = tmp_path / "job.log"
    with log.open("wb") as out:
        proc = subprocess.run(
            [sys.executable, *command[1:]], stdout=out, stderr=subprocess.STDOUT, env=full_env,
            timeout=900, check=False,
        )  # fmt: skip
    return proc.returncode, log.read_text()


def test_a_config_that_cannot_run_exits_78_and_says_why_in_status(
    tmp_path: Path, status_server: Any
) -> None:
    from coda_operator.api import PreflightStatus

    command, env, key = rendered_job({"type": "v5p", "topology": "2x2x1"})
    env["CODA_PREFLIGHT_CONFIG"] = "run: demo\nstage: {}\n"  # not a stage job config
    rc, log = run_job(tmp_path, command, env, status_server.url)
    assert rc == EXIT_PERMANENT, log
    ((path, body),) = status_server.patches
    assert path == STATUS_PATH
    pf = PreflightStatus.model_validate(body["status"]["preflight"]["sft"])  # the operator's view
    assert pf.report_key == key and pf.report is not None and pf.report.fits is False
    assert pf.report.problems[0].startswith("pre-flight cannot run:")


def test_an_undeliverable_report_exits_75(tmp_path: Path) -> None:
    command, env, _ = rendered_job({"type": "v5p", "topology": "2x2x1"})
    env["CODA_PREFLIGHT_CONFIG"] = "not: a config\n"
    rc, log = run_job(tmp_path, command, env, "http://127.0.0.1:9")  # nothing listens there
    assert rc == EXIT_RETRYABLE, log


def test_report_key_outside_the_operators_pod_env_is_refused(tmp_path: Path) -> None:
    command, env, _ = rendered_job({"type": "v5p", "topology": "2x2x1"})
    env.pop("CODA_PROGRESS")
    rc, log = run_job(tmp_path, command, env, "")
    assert rc == EXIT_PERMANENT and "--report-key needs" in log


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (the `preflight` extra, Linux x86_64 only)",
)
def test_the_rendered_job_compiles_the_stage_and_reports_it_fits(
    tmp_path: Path, status_server: Any
) -> None:
    """The real compile, deviceless, of test-micro on v5p 2x2x1 as the Job runs it."""
    from coda_operator.api import PreflightStatus

    command, env, key = rendered_job({"type": "v5p", "topology": "2x2x1"})
    rc, log = run_job(tmp_path, command, env, status_server.url)
    assert rc == 0, log[-3000:]
    ((_, body),) = status_server.patches
    pf = PreflightStatus.model_validate(body["status"]["preflight"]["sft"])
    assert pf.report_key == key and pf.report is not None and pf.report.fits is True
    assert 0 < (pf.report.peak_bytes_per_device or 0) < 0.9 * (pf.report.hbm_bytes_per_device or 0)
    assert pf.report.versions and pf.report.versions.get("libtpu")
