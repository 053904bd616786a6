"""`coda-ctl plan`: the per-stage report's JSON shape, the arithmetic refusal and its exit code,
every example admitted, and (slow) the deviceless compile of a multi-host slice that fits and one
that does not."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml
from coda_ctl.errors import Exit
from coda_ctl.main import app
from ctl_testkit import REPO
from typer.testing import CliRunner

EXAMPLES = REPO / "manifests" / "examples"
CLUSTER_EXAMPLES = ["coda-1.7b-v5p.yaml", "multislice-v6e.yaml", "gpu-a3.yaml"]
MICRO = REPO / "tests" / "cli" / "data" / "plan-v5p-2x2x2.yaml"
STAGE_KEYS = {"name", "fits", "peakBytesPerDevice", "hbmBytesPerDevice", "compileSeconds",
              "flopsPerStep", "idealStepSeconds", "problems"}  # fmt: skip
GIB = 1 << 30


def plan(*args: str) -> tuple[int, Any]:
    res = CliRunner().invoke(app, ["plan", *args], catch_exceptions=False)
    return res.exit_code, res.output


@pytest.mark.parametrize("name", CLUSTER_EXAMPLES)
def test_every_example_passes_the_arithmetic(name: str) -> None:
    code, out = plan("-f", str(EXAMPLES / name), "-o", "json")
    report = json.loads(out)
    assert code == 0, out
    spec = yaml.safe_load((EXAMPLES / name).read_text())["spec"]
    assert [s["name"] for s in report["stages"]] == [s["name"] for s in spec["stages"]]
    for stage in report["stages"]:
        assert stage.keys() >= STAGE_KEYS
        assert stage["problems"] == [], stage
        assert stage["fits"] is None  # memory is not known without --compile
        assert stage["flopsPerStep"] > 0 and stage["idealStepSeconds"] > 0


def test_paper_pretrain_cost_is_the_analytic_flops() -> None:
    from coda_trainer.config import PRESETS

    _, out = plan("-f", str(EXAMPLES / "coda-1.7b-v5p.yaml"), "-o", "json")
    pretrain = json.loads(out)["stages"][0]
    model = PRESETS["coda-1.7b"]
    tokens = 512 * 8192
    assert pretrain["flopsPerStep"] == pytest.approx(model.train_flops_per_token(8192) * tokens)
    # 512 v5p chips at 459 TFLOP/s, remat as the example sets it
    matmuls = 2.0 * model.num_params(include_embedding=False)
    attention = 4.0 * model.num_layers * 8192 * model.num_heads * model.head_dim
    recompute = {"none": 0.0, "minimal": matmuls, "full": matmuls + attention}
    per_token = model.train_flops_per_token(8192) + recompute[pretrain["remat"]]
    assert pretrain["idealStepSeconds"] == pytest.approx(per_token * tokens / (459e12 * 512))


def test_a_refused_stage_is_reported_and_exits_7(tmp_path: Any) -> None:
    doc = yaml.safe_load((EXAMPLES / "coda-1.7b-v5p.yaml").read_text())
    doc["spec"]["stages"][2]["batch"]["sequences"] = 170  # not a multiple of the 16 chips
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out = plan("-f", str(path), "-o", "json")
    assert code == Exit.WONT_RUN == 7
    sft = json.loads(out)["stages"][2]
    assert sft["fits"] is False
    assert len(sft["problems"]) == 1
    assert sft["problems"][0].startswith("spec.stages[2].batch.sequences: 170 sequences")
    assert "use 160 or 176 sequences" in sft["problems"][0]
    code, out = plan("-f", str(path))  # the table says it too
    assert code == 7 and "coda-1p7b/sft: spec.stages[2].batch.sequences" in out


def test_search_needs_compile() -> None:
    code, _ = plan("-f", str(MICRO), "--search")
    assert code == Exit.USAGE


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (the `preflight` extra, Linux x86_64 only)",
)
def test_compile_fits_and_runs_out_of_hbm_on_a_multi_host_slice(tmp_path: Any) -> None:
    """test-micro on v5p 2x2x2 (2 hosts): a step that fits, one that cannot (2M sequences), and a
    2-slice DCN mesh; in a fresh process, as a user runs it (~2 min on 2 busy cores)."""
    out, err = tmp_path / "plan.json", tmp_path / "plan.err"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("trainer", "operator", "cli")),
    }
    env.pop("JAX_PLATFORMS", None)  # the CLI sets it for the compile path
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "coda_ctl.main", "plan", "-f", str(MICRO), "--compile", "-o", "json"],
            stdout=stdout, stderr=stderr, env=env, timeout=800, check=False,
        )  # fmt: skip
    assert proc.returncode == Exit.WONT_RUN, err.read_text()[-3000:]
    fits, oom, multislice = json.loads(out.read_text())["stages"]

    hbm = fits["hbmBytesPerDevice"]
    assert 90 * GIB < hbm < 100 * GIB  # v5p: 95.74 GiB usable, as the compiler reports it
    assert fits["fits"] is True and fits["problems"] == []
    assert 0 < fits["peakBytesPerDevice"] < 0.9 * hbm
    assert fits["evalPeakBytesPerDevice"] > 0  # the eval step was compiled too
    assert fits["compileSeconds"] > 0

    assert oom["fits"] is False
    assert oom["peakBytesPerDevice"] > hbm
    assert len(oom["problems"]) == 1 and "out of HBM" in oom["problems"][0]

    assert multislice["fits"] is True and multislice["hbmBytesPerDevice"] == hbm
    assert multislice["accelerator"] == "2 × v5p 2x2x2 (16 chips)"
