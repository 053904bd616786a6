"""The operator refuses to start against a JobSet CRD that would prune what coda's JobSets rely on."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from coda_operator.jobset_support import MIN_JOBSET_VERSION, jobset_crd_problem
from operator_testkit import NS, ROOT, emulated_cluster, jobset_crd


def _v1alpha2(crd: dict[str, Any]) -> dict[str, Any]:
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1alpha2")


def _rule_schema(crd: dict[str, Any]) -> dict[str, Any]:
    spec = _v1alpha2(crd)["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec["properties"]["failurePolicy"]["properties"]["rules"]["items"]


def pre_message_patterns_crd() -> dict[str, Any]:
    """The shared (current) CRD as a JobSet release from before onJobFailureMessagePatterns."""
    crd = jobset_crd()
    del _rule_schema(crd)["properties"]["onJobFailureMessagePatterns"]
    return crd


def test_a_current_jobset_is_accepted() -> None:
    assert jobset_crd_problem(jobset_crd()) is None


def test_a_jobset_without_message_patterns_is_refused_by_name() -> None:
    problem = jobset_crd_problem(pre_message_patterns_crd())
    assert problem is not None
    assert "spec.failurePolicy.rules[0].onJobFailureMessagePatterns" in problem
    assert MIN_JOBSET_VERSION in problem


def test_an_unknown_failure_action_is_refused() -> None:
    crd = jobset_crd()
    action = _rule_schema(crd)["properties"]["action"]
    action["enum"] = [a for a in action["enum"] if a != "RestartJobSetAndIgnoreMaxRestarts"]
    problem = jobset_crd_problem(crd)
    assert problem is not None and "action=RestartJobSetAndIgnoreMaxRestarts" in problem


def test_a_missing_or_unserved_jobset_is_refused() -> None:
    assert "not installed" in (jobset_crd_problem(None) or "")
    crd = jobset_crd()
    _v1alpha2(crd)["served"] = False
    assert "does not serve v1alpha2" in (jobset_crd_problem(crd) or "")


@pytest.mark.asyncio
@pytest.mark.parametrize("jobset", ["old", None], ids=["pre-v0.10", "absent"])
async def test_the_operator_process_refuses_to_start(jobset: str | None, tmp_path: Path) -> None:
    crd = pre_message_patterns_crd() if jobset == "old" else None
    async with emulated_cluster(jobset=crd) as cluster:
        log = tmp_path / "operator.log"
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "coda_operator", "-n", NS, "--standalone",
                 "--server", cluster.url],
                stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(str(ROOT / d) for d in ("trainer", "operator"))},
            )  # fmt: skip
        try:
            code = await asyncio.wait_for(asyncio.to_thread(proc.wait), 90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        text = log.read_text()
        assert code != 0, text
        assert time.monotonic() - started < 90
        expected = "onJobFailureMessagePatterns" if jobset == "old" else "is not installed"
        assert expected in text, text
        assert "Traceback" not in text, text  # a refusal is a message
        assert not cluster.creates("jobsets")
