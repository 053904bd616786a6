"""Spec files: the examples validate against the generated CRD and the operator model, `submit`
rejects bad files with field-level reasons before touching a cluster, `render` emits only objects
that validate, and `crd` prints the CRD the chart ships."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from coda_ctl import runspec
from coda_ctl.errors import Exit
from coda_ctl.main import app
from coda_operator import api
from coda_operator import crd as crd_mod
from ctl_testkit import REPO, validate_objects
from typer.testing import CliRunner

EXAMPLES = REPO / "manifests" / "examples"
CLUSTER_EXAMPLES = ["coda-1.7b-v5p.yaml", "multislice-v6e.yaml", "gpu-a3.yaml"]
ALL_EXAMPLES = [*CLUSTER_EXAMPLES, "local-tiny.yaml"]


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def cli(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(app, list(args), input=input, catch_exceptions=False)


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_examples_validate(name: str) -> None:
    doc = load(name)
    cluster = name != "local-tiny.yaml"
    assert runspec.schema_errors(doc) == []  # jsonschema against the CRD's openAPIV3Schema
    api.parse_spec(doc["spec"], cluster=cluster)  # the operator's pydantic model


def test_local_tiny_is_the_embedded_default() -> None:
    from coda_ctl.localplan import default_run

    assert api.parse_spec(load("local-tiny.yaml")["spec"], cluster=False) == api.parse_spec(
        default_run()["spec"], cluster=False
    ), "manifests/examples/local-tiny.yaml drifted from coda_trainer.presets' embedded default"
    assert load("local-tiny.yaml")["metadata"] == default_run()["metadata"]


def test_paper_example_carries_the_paper_numbers() -> None:
    spec = api.parse_spec(load("coda-1.7b-v5p.yaml")["spec"])
    pre, mid, sft = spec.stages
    assert (pre.steps, pre.batch.sequences, pre.batch.seq_len) == (50000, 512, 8192)
    assert (pre.optimizer.name, pre.optimizer.peak_lr) == ("adafactor", 3e-4)
    assert (pre.masking.prefix_prob, pre.masking.truncate_prob, pre.masking.block_prob) == (
        0.01,
        0.01,
        0.01,
    )
    assert (mid.batch.sequences, mid.batch.seq_len, mid.optimizer.peak_lr) == (256, 8192, 2e-4)
    assert mid.masking.curriculum == "paper-table-3"
    # The paper's 50,000 steps: "roughly five epochs" of the ~21B-token mix, blocks {2, 4, 8}
    assert mid.steps == 50000 and mid.masking.block_sizes == [2, 4, 8]
    assert abs(mid.steps * mid.batch.sequences * mid.batch.seq_len - 5 * 21e9) / 105e9 < 0.01
    assert (sft.batch.seq_len, sft.optimizer.name, sft.optimizer.peak_lr) == (1024, "adamw", 2e-5)
    assert (
        sft.optimizer.schedule,
        sft.optimizer.warmup_ratio,
        sft.sft_config.prompt_ramp_fraction,
    ) == ("cosine", 0.1, 0.1)
    assert spec.model.preset == "coda-1.7b"
    assert (
        spec.stage_accelerator(0).tpu.slice.chips == 512
        and spec.stage_accelerator(1).tpu.slice.chips == 256
    )


def test_submit_dry_run_accepts_examples() -> None:
    for name in CLUSTER_EXAMPLES:
        res = cli("submit", "--dry-run=client", "-f", str(EXAMPLES / name))
        assert res.exit_code == 0, res.output
        assert "valid (dry run)" in res.stdout


BAD = [
    ("steps", lambda d: d["spec"]["stages"][0].update(steps=-5), "spec.stages[0].steps"),
    (
        "unknown field",
        lambda d: d["spec"]["stages"][1].update(learningRate=1),
        "'learningRate' was unexpected",
    ),
    (
        "tpu type",
        lambda d: d["spec"]["accelerator"]["tpu"].update(type="v9"),
        "spec.accelerator.tpu.type",
    ),
    (
        "topology",
        lambda d: d["spec"]["accelerator"]["tpu"].update(topology="3x3x3"),
        "spec.accelerator",
    ),
    (
        "duplicate stage",
        lambda d: d["spec"]["stages"][2].update(name="pretrain"),
        "duplicate stage name 'pretrain'",
    ),
    ("no stages", lambda d: d["spec"].update(stages=[]), "spec.stages"),
    (
        "bad bucket",
        lambda d: d["spec"]["checkpoints"].update(uri="gs://A_B/x"),
        "spec.checkpoints.uri",
    ),
    (
        "local checkpoints",
        lambda d: d["spec"]["checkpoints"].update(uri="/tmp/ckpt"),
        "must be a gs:// URI on a cluster",
    ),
    ("kind", lambda d: d.update(kind="TrainJob"), "kind"),
    ("name", lambda d: d["metadata"].update(name="Not_A_Name"), "metadata.name"),
    ("preset", lambda d: d["spec"]["model"].update(preset="gpt-5"), "spec.model.preset"),
]


@pytest.mark.parametrize(("what", "mutate", "needle"), BAD, ids=[b[0] for b in BAD])
def test_submit_rejects_invalid_specs(tmp_path: Path, what: str, mutate: Any, needle: str) -> None:
    doc = copy.deepcopy(load("coda-1.7b-v5p.yaml"))
    mutate(doc)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(doc))
    res = cli("--kubeconfig", str(tmp_path / "unused"), "submit", "-f", str(path))
    assert res.exit_code == Exit.INVALID, res.output  # rejected before any cluster is contacted
    assert "invalid CodaTrainingRun" in res.stderr and needle in res.stderr, res.stderr


def test_submit_file_errors(tmp_path: Path) -> None:
    res = cli("submit", "-f", str(tmp_path / "missing.yaml"))
    assert res.exit_code == Exit.NOT_FOUND and "no such file" in res.stderr
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    res = cli("submit", "-f", str(tmp_path / "broken.yaml"))
    assert res.exit_code == Exit.INVALID and "not valid YAML" in res.stderr
    res = cli("submit")
    assert res.exit_code == Exit.USAGE


def test_submit_creates_runs_in_the_emulator(kubeconfig: Path, kube_api: Any) -> None:
    from kubernetes import client

    doc = load("gpu-a3.yaml")
    doc["metadata"]["namespace"] = "submit-test"  # keep other tests' namespace untouched
    text = yaml.safe_dump(doc)
    res = cli("--kubeconfig", str(kubeconfig), "submit", "-f", "-", "-n", "elsewhere", input=text)
    assert res.exit_code == Exit.USAGE and 'does not match --namespace "elsewhere"' in res.stderr
    res = cli("--kubeconfig", str(kubeconfig), "submit", "-f", "-", input=text)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip() == "codatrainingrun.coda.dev/coda-gpu-a3 created"
    obj = client.CustomObjectsApi(kube_api).get_namespaced_custom_object(
        "coda.dev", "v1alpha1", "submit-test", "codatrainingruns", "coda-gpu-a3"
    )
    assert obj["spec"]["accelerator"]["gpu"]["nodes"] == 4
    again = cli(
        "--kubeconfig", str(kubeconfig), "submit", "-f", "-", "-n", "submit-test", input=text
    )
    assert again.exit_code == Exit.CONFLICT and "already exists" in again.stderr
    res = cli("--kubeconfig", str(kubeconfig), "get", "-n", "submit-test")
    assert res.exit_code == 0 and res.stdout.splitlines()[1].split()[:2] == [
        "coda-gpu-a3",
        "Pending",
    ]


@pytest.mark.parametrize("name", CLUSTER_EXAMPLES)
def test_render_output_validates(name: str) -> None:
    res = cli("render", "-f", str(EXAMPLES / name))
    assert res.exit_code == 0, res.output
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    spec = api.parse_spec(load(name)["spec"])
    kinds = [d["kind"] for d in docs]
    assert kinds.count("JobSet") == len(spec.stages) and kinds.count("ConfigMap") == len(
        spec.stages
    )
    assert ("Deployment" in kinds) == spec.sampler.enabled
    assert validate_objects(docs) == []
    as_json = json.loads(cli("render", "-f", str(EXAMPLES / name), "-o", "json").stdout)
    assert as_json["items"] == docs
    # Shared sub-objects (one probe for liveness and readiness) are written out, not aliased.
    assert "&id0" not in res.stdout and "*id0" not in res.stdout


def test_render_and_crd_reject_unknown_formats() -> None:
    for verb in (["render", "-f", str(EXAMPLES / "gpu-a3.yaml")], ["crd"]):
        res = cli(*verb, "-o", "xml")
        assert res.exit_code == Exit.USAGE, res.output
        assert res.stdout == "" and "unknown output format 'xml': use yaml or json" in res.stderr


def test_render_of_the_local_example_names_the_default() -> None:
    """The local example never writes checkpoints.uri; the error must say the default applies and
    that the file is meant for `coda-ctl local run`, not blame a value the user never wrote."""
    assert "uri" not in load("local-tiny.yaml")["spec"]["checkpoints"]
    res = cli("render", "-f", str(EXAMPLES / "local-tiny.yaml"))
    assert res.exit_code == Exit.INVALID
    assert "spec.checkpoints.uri (not set in the file, so its default applies): " in res.stderr
    assert "this file runs as is with `coda-ctl local run`" in res.stderr


def test_render_rejects_invalid_file(tmp_path: Path) -> None:
    doc = load("gpu-a3.yaml")
    doc["spec"]["stages"][0]["batch"]["seqLen"] = 1
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(doc))
    res = cli("render", "-f", str(tmp_path / "bad.yaml"))
    assert res.exit_code == Exit.INVALID and "spec.stages[0].batch.seqLen" in res.stderr


def test_crd_command_prints_the_shipped_crd() -> None:
    res = cli("crd")
    assert res.exit_code == 0
    printed = yaml.safe_load(res.stdout)
    assert printed == crd_mod.crd()
    shipped = yaml.safe_load(
        (REPO / "charts" / "coda-operator" / "crds" / crd_mod.CRD_FILE_NAME).read_text()
    )
    assert (
        printed
        == shipped
        == yaml.safe_load((REPO / "manifests" / "crd" / crd_mod.CRD_FILE_NAME).read_text())
    )
    assert validate_objects([printed]) == []
    # Descriptions keep their symbols (σ, ε, −) as written, not as \\u escapes.
    assert "\\u" not in res.stdout and "σ" in res.stdout
    as_json = cli("crd", "-o", "json").stdout
    assert "\\u" not in as_json and json.loads(as_json) == printed


def test_train_delegates_to_the_trainer(tmp_path: Path) -> None:
    """The container entry point: the trainer's own exit codes come back (78 = permanent)."""
    res = cli("train", "--config", str(tmp_path / "missing.yaml"))
    assert res.exit_code == 78


def test_eval_accepts_every_harness_benchmark_by_its_spec_name() -> None:
    """`coda-ctl eval` takes the names spec.evaluation.benchmarks takes, several at once."""
    from typing import get_args

    from coda_operator.api import EvalBenchmark
    from coda_trainer.evaluate.datasets import BENCHMARKS

    assert set(get_args(EvalBenchmark)) == set(BENCHMARKS)
    res = cli("eval", "mbpp-plus", "--url", "http://127.0.0.1:1")
    assert res.exit_code == Exit.USAGE
    assert all(name in res.stderr for name in BENCHMARKS), res.stderr
    # Every name reaches the harness (which here finds the server unreachable for each of them).
    res = cli("eval", *BENCHMARKS, "--url", "http://127.0.0.1:1", "--limit", "1")
    assert res.exit_code == Exit.ERROR, res.output
    for name in BENCHMARKS:
        assert f"error: {name}: no sample could be generated" in res.stderr


def test_eval_argument_errors_and_unreachable_server() -> None:
    assert cli("eval", "humaneval").exit_code == Exit.USAGE
    unknown = cli("eval", "apps", "--url", "http://127.0.0.1:1")
    assert unknown.exit_code == Exit.USAGE
    assert "humaneval, humaneval-plus, mbpp, mbpp-sanitized" in unknown.stderr
    res = cli("eval", "humaneval", "--url", "http://127.0.0.1:1", "--limit", "1")
    # Unreachable is a per-sample reason (retried, then recorded); with no sample generated at
    # all the harness exits 1 and names the first reason.
    assert res.exit_code == Exit.ERROR
    assert "no sample could be generated" in res.stderr and "ConnectError" in res.stderr


def test_eval_names_are_the_harness_names() -> None:
    """One list of benchmarks: spec.evaluation, `coda-ctl eval` and the harness agree."""
    from typing import get_args

    from coda_operator.api import EvalBenchmark
    from coda_trainer.evaluate.datasets import BENCHMARKS

    assert get_args(EvalBenchmark) == BENCHMARKS


def test_eval_runs_humaneval_plus(tmp_path: Path) -> None:
    res = cli("eval", "humaneval-plus", "--url", "http://127.0.0.1:1", "--limit", "1")
    # accepted and handed to the harness, which then cannot reach the server
    assert res.exit_code == Exit.ERROR and "no sample could be generated" in res.stderr


def test_train_runs_the_stage_entry_point_and_passes_its_exit_code_on(tmp_path: Path) -> None:
    """`coda-ctl train` is the container's stage entry point (coda_trainer.api.run_stage): a job
    file that is not there is a permanent failure (78), which the JobSet must not retry."""
    from coda_trainer.contract import EXIT_PERMANENT

    res = cli("train", "--config", str(tmp_path / "missing-job.yaml"))
    assert res.exit_code == EXIT_PERMANENT, res.output
