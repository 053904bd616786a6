"""Rendered manifests: valid against the real schemas, pinned by golden files, right for TPUs.

Regenerate the golden files with `CODA_UPDATE_GOLDEN=1 pytest tests/operator/test_render.py`.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from coda_operator import api, render
from coda_trainer import contract
from coda_trainer.config import load_job_config
from coda_trainer.contract import EXIT_PERMANENT, EXIT_RETRYABLE
from crd_validation import _strict
from operator_testkit import fit_stages_to, jobset_crd_schema, run_spec

GOLDEN = Path(__file__).parent / "golden"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())


def spec_with(accelerator: dict[str, Any], **extra: Any) -> api.CodaTrainingRunSpec:
    return api.parse_spec(fit_stages_to(run_spec(**extra), accelerator))


CASES = {
    "v5p-2x2x2": {"tpu": {"type": "v5p", "topology": "2x2x2"}},
    "v6e-4x4-x2": {"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}},
    "v5e-2x4": {"tpu": {"type": "v5e", "topology": "2x4"}},
    "v5p-2x2x1-single-host": {"tpu": {"type": "v5p", "topology": "2x2x1"}},
    "v6e-4x4-x2-host-network": {"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}},
}
# spec fields besides the accelerator, per golden case
CASE_EXTRA: dict[str, dict[str, Any]] = {"v6e-4x4-x2-host-network": {"hostNetwork": True}}


@pytest.fixture(scope="module")
def jobset_validator() -> jsonschema.Draft7Validator:
    # strict: unknown fields fail, as kubectl's server-side field validation would make them fail
    return jsonschema.Draft7Validator(_strict(jobset_crd_schema()))


def validate(obj: dict[str, Any], jobset_validator: jsonschema.Draft7Validator) -> None:
    if obj["kind"] == "JobSet":
        errors = [
            f"{list(e.absolute_path)}: {e.message}" for e in jobset_validator.iter_errors(obj)
        ]
        assert not errors, errors
        # its pod template is a core/v1 PodTemplateSpec: validate that part with the Kubernetes schema too
        for rj in obj["spec"]["replicatedJobs"]:
            job = {
                "apiVersion": "batch/v1",
                "kind": "Job",
                "metadata": {"name": "x"},
                "spec": rj["template"]["spec"],
            }
            for v in K8S_VERSIONS:
                kubernetes_validate.validate(job, v, strict=True)
    else:
        for v in K8S_VERSIONS:
            kubernetes_validate.validate(obj, v, strict=True)


@pytest.mark.parametrize("case", list(CASES))
def test_jobset_golden(case: str, jobset_validator: jsonschema.Draft7Validator) -> None:
    spec = spec_with(CASES[case], **CASE_EXTRA.get(case, {}))
    objs = render.render_stage("demo", "ml", spec, 1)
    for obj in objs.all():
        validate(obj, jobset_validator)
    text = yaml.safe_dump(objs.jobset, sort_keys=True)
    path = GOLDEN / f"jobset-{case}.yaml"
    if os.environ.get("CODA_UPDATE_GOLDEN"):
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with CODA_UPDATE_GOLDEN=1"
    assert text == path.read_text(), (
        f"{path.name} changed; if intended, regenerate with CODA_UPDATE_GOLDEN=1"
    )


@pytest.mark.parametrize(
    ("accelerator", "hosts", "slices", "per_host"),
    [
        ({"tpu": {"type": "v5p", "topology": "2x2x2"}}, 2, 1, "4"),
        ({"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}}, 4, 2, "4"),
        ({"tpu": {"type": "v5e", "topology": "2x4"}}, 1, 1, "8"),
        ({"tpu": {"type": "v5e", "topology": "1x1"}}, 1, 1, "1"),
        ({"tpu": {"type": "v5p", "topology": "4x4x4", "slices": 4}}, 16, 4, "4"),
    ],
)
def test_jobset_shape(accelerator: dict[str, Any], hosts: int, slices: int, per_host: str) -> None:
    spec = spec_with(accelerator)
    js = render.render_stage("demo", "ml", spec, 0).jobset
    rj = js["spec"]["replicatedJobs"][0]
    job = rj["template"]["spec"]
    pod = job["template"]["spec"]
    assert rj["replicas"] == slices
    assert job["parallelism"] == job["completions"] == hosts
    assert job["completionMode"] == "Indexed" and job["backoffLimit"] == 0
    assert (
        js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
        == "cloud.google.com/gke-nodepool"
    )
    tpu = spec.accelerator.tpu
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": tpu.slice.accelerator,
        "cloud.google.com/gke-tpu-topology": tpu.topology,
    }
    c = pod["containers"][0]
    assert c["resources"]["limits"] == {"google.com/tpu": per_host} == c["resources"]["requests"]
    assert {"key": "google.com/tpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert js["metadata"]["labels"][render.LABEL_RUN] == "demo"
    assert js["metadata"]["labels"][render.LABEL_STAGE] == "pretrain"
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["serviceAccountName"] == "coda-trainer"
    assert js["spec"]["failurePolicy"]["maxRestarts"] == 2
    env = {e["name"] for e in c["env"]}
    assert ("MEGASCALE_COORDINATOR_ADDRESS" in env) == (slices > 1)


def _pod_env(js: dict[str, Any], slice_id: int, host: int) -> dict[str, str]:
    """Resolve the trainer container's env as the kubelet would for one pod of the JobSet."""
    rj = js["spec"]["replicatedJobs"][0]
    fields = {
        "metadata.namespace": "ml",
        "metadata.labels['jobset.sigs.k8s.io/jobset-name']": js["metadata"]["name"],
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-name']": rj["name"],
        "metadata.labels['jobset.sigs.k8s.io/job-index']": str(slice_id),
        "metadata.labels['jobset.sigs.k8s.io/replicatedjob-replicas']": str(rj["replicas"]),
        "metadata.annotations['batch.kubernetes.io/job-completion-index']": str(host),
    }
    env: dict[str, str] = {}
    for e in rj["template"]["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "valueFrom" in e:
            env[e["name"]] = fields[e["valueFrom"]["fieldRef"]["fieldPath"]]
        else:  # $(VAR) refers to variables defined earlier in the list
            env[e["name"]] = re.sub(
                r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"]
            )
    return env


@pytest.mark.parametrize(
    "accelerator",
    [
        {"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}},
        {"tpu": {"type": "v5p", "topology": "2x2x2", "slices": 3}},
        {"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 8, "nodes": 2}},
    ],
    ids=["v6e-4x4-x2", "v5p-2x2x2-x3", "gpu-2-nodes"],
)
def test_every_host_gets_a_unique_process_id_and_one_coordinator(
    accelerator: dict[str, Any],
) -> None:
    """Kubeflow Trainer #3537 gave slices duplicate JAX process ids: run the real launch line per pod."""
    js = render.render_stage("demo", "ml", spec_with(accelerator), 0).jobset
    rj = js["spec"]["replicatedJobs"][0]
    cmd = rj["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:2] == ["/bin/sh", "-c"]
    assert cmd[2].endswith("exec python -m coda_trainer.train --config /etc/coda/job.yaml")
    probe = cmd[2].replace(
        "exec python -m coda_trainer.train --config /etc/coda/job.yaml",
        'printf "%s %s %s\\n" "$JAX_PROCESS_ID" "$JAX_COORDINATOR_ADDRESS" "${MEGASCALE_SLICE_ID:-}"',
    )
    slices, hosts = rj["replicas"], rj["template"]["spec"]["completions"]
    ids, coordinators = [], set()
    for s in range(slices):
        for h in range(hosts):
            env = _pod_env(js, s, h)
            out = subprocess.run(
                ["/bin/sh", "-c", probe], env=env, capture_output=True, text=True, check=True
            ).stdout.split()
            ids.append(int(out[0]))
            coordinators.add(out[1])
            assert int(env["JAX_NUM_PROCESSES"]) == slices * hosts
            if slices > 1:
                assert out[2] == str(s) and env["MEGASCALE_NUM_SLICES"] == str(slices)
    assert sorted(ids) == list(range(slices * hosts))
    # host 0 of slice 0 is the coordinator: its pod hostname is <jobset>-<replicatedJob>-0-0 in the
    # JobSet's headless-service subdomain (network.enableDNSHostnames)
    assert coordinators == {f"demo-pretrain-slice-0-0.demo-pretrain:{render.COORDINATOR_PORT}"}
    assert js["spec"]["network"]["enableDNSHostnames"] is True


def _jobset_action(js: dict[str, Any], reason: str, message: str) -> str:
    """JobSet's failure-policy semantics: the first rule matching reason and message wins."""
    for rule in js["spec"]["failurePolicy"]["rules"]:
        reasons_ok = not rule.get("onJobFailureReasons") or reason in rule["onJobFailureReasons"]
        patterns = rule.get("onJobFailureMessagePatterns") or []
        message_ok = not patterns or any(re.search(p, message) for p in patterns)
        if reasons_ok and message_ok:
            return rule["action"]
    return "RestartJobSet"  # the default: counts against maxRestarts


def test_failure_policy_maps_trainer_exit_codes() -> None:
    js = render.render_stage("demo", "ml", spec_with(CASES["v5p-2x2x2"]), 0).jobset
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    rules = job["podFailurePolicy"]["rules"]
    assert rules[0]["onExitCodes"]["values"] == [EXIT_PERMANENT] and rules[0]["action"] == "FailJob"
    assert rules[1]["onExitCodes"]["values"] == [EXIT_RETRYABLE]
    assert rules[2]["onPodConditions"] == [{"type": "DisruptionTarget", "status": "True"}]
    # the Job controller's failure messages (k8s.io/kubernetes pkg/controller/job)
    ns_pod = "ml/demo-pretrain-slice-0-1-abcde"
    permanent = f"Container trainer for pod {ns_pod} failed with exit code {EXIT_PERMANENT} matching FailJob rule at index 0"
    retryable = f"Container trainer for pod {ns_pod} failed with exit code {EXIT_RETRYABLE} matching FailJob rule at index 1"
    disrupted = f"Pod {ns_pod} has condition DisruptionTarget matching FailJob rule at index 2"
    assert _jobset_action(js, "PodFailurePolicy", permanent) == "FailJobSet"
    assert _jobset_action(js, "PodFailurePolicy", retryable) == "RestartJobSetAndIgnoreMaxRestarts"
    assert _jobset_action(js, "PodFailurePolicy", disrupted) == "RestartJobSetAndIgnoreMaxRestarts"
    assert (
        _jobset_action(js, "BackoffLimitExceeded", "Job has reached the specified backoff limit")
        == "RestartJobSet"
    )


def test_spot_kueue_suspend_and_gpu(jobset_validator: jsonschema.Draft7Validator) -> None:
    spec = spec_with(
        {"tpu": {"type": "v5p", "topology": "2x2x2"}, "spot": True}, queueName="tpu-team"
    )
    js = render.render_stage("demo", "ml", spec, 0).jobset
    validate(js, jobset_validator)
    pod = js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    assert {
        "key": "cloud.google.com/gke-spot",
        "operator": "Equal",
        "value": "true",
        "effect": "NoSchedule",
    } in pod["tolerations"]
    assert js["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-team"
    assert js["spec"]["suspend"] is True  # Kueue admits by unsuspending

    gpu = spec_with({"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 8, "nodes": 2}})
    js = render.render_stage("demo", "ml", gpu, 0).jobset
    validate(js, jobset_validator)
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    pod = job["template"]["spec"]
    assert job["completions"] == 2 and js["spec"]["suspend"] is False
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["containers"][0]["resources"]["limits"] == {"nvidia.com/gpu": "8"}
    assert "alpha.jobset.sigs.k8s.io/exclusive-topology" not in js["metadata"]["annotations"]


def test_configmap_holds_a_trainer_job_config(tmp_path: Path) -> None:
    spec = api.parse_spec(run_spec())
    for i, stage in enumerate(spec.stages):
        cm = render.render_stage("demo", "ml", spec, i).configmap
        path = tmp_path / f"{stage.name}.yaml"
        path.write_text(cm["data"]["job.yaml"])
        job = load_job_config(path)  # exactly what `python -m coda_trainer.train --config` reads
        assert job.run == "demo" and job.stage.name == stage.name
        assert job.checkpoints.uri == "gs://coda-test/runs/demo"
        assert job.stage.init_from == (
            None if i == 0 else f"gs://coda-test/runs/demo/{spec.stages[i - 1].name}/final"
        )
        assert job.final_dir == render.stage_final(spec, i)


@pytest.mark.parametrize(
    ("shares", "span"), [("release", "generation-prompt"), ("paper", "assistant-role")]
)
def test_fidelity_options_reach_the_trainer(tmp_path: Path, shares: str, span: str) -> None:
    """masking.strategyShares and sft.promptSpan survive spec → ConfigMap dump → trainer validate,
    whether set away from their defaults or spelled out at them."""
    raw = run_spec()
    raw["stages"][1]["masking"]["strategyShares"] = shares
    raw["stages"][2]["sft"]["promptSpan"] = span
    spec = api.parse_spec(raw)
    jobs = []
    for i, stage in enumerate(spec.stages):
        path = tmp_path / f"{stage.name}.yaml"
        path.write_text(render.render_stage("demo", "ml", spec, i).configmap["data"]["job.yaml"])
        jobs.append(load_job_config(path))
    assert jobs[1].stage.masking.strategy_shares == shares
    assert jobs[2].stage.sft_config.prompt_span == span
    assert jobs[0].stage.masking.strategy_shares == "paper"  # the default where left out


def test_sampler_deployment_and_service(jobset_validator: jsonschema.Draft7Validator) -> None:
    spec = api.parse_spec(
        run_spec(
            sampler={
                "replicas": 2,
                "accelerator": {"tpu": {"type": "v6e", "topology": "1x1"}},
                "resources": {"requests": {"cpu": "4", "memory": "16Gi"}},
                "defaults": {"steps": 64, "alg": "entropy", "blockLength": 32},
            }
        )
    )
    deployment, service = render.render_sampler("demo", "ml", spec)
    validate(deployment, jobset_validator)
    validate(service, jobset_validator)
    assert deployment["metadata"]["name"] == service["metadata"]["name"] == "demo-sampler"
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] == [
        "python",
        "-m",
        "coda_trainer.serve",
        "--checkpoint",
        "gs://coda-test/runs/demo/sft/final",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    # All interfaces (Service, probes, the API server's proxy), behind the generated key.
    key_env = next(e for e in c["env"] if e["name"] == contract.ENV_API_KEY)
    assert key_env["valueFrom"] == {"secretKeyRef": {"name": "demo-sampler-key", "key": "api-key"}}
    secret = render.render_sampler_key("demo", "ml", spec)
    validate(secret, jobset_validator)
    assert secret["metadata"]["name"] == "demo-sampler-key" and "data" not in secret
    assert secret["metadata"]["annotations"] == {render.GENERATE_ANNOTATION: "api-key"}
    assert (
        c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        and c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    )
    assert c["resources"]["limits"] == {"google.com/tpu": "1"}
    assert c["resources"]["requests"] == {"cpu": "4", "memory": "16Gi", "google.com/tpu": "1"}
    assert deployment["spec"]["replicas"] == 2
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["port"] == 8000
    defaults = next(e for e in c["env"] if e["name"] == "CODA_SAMPLER_DEFAULTS")["value"]
    assert yaml.safe_load(defaults) == {"steps": 64, "alg": "entropy", "block_length": 32}


def test_sampler_uses_the_secret_the_run_names() -> None:
    spec = api.parse_spec(run_spec(sampler={"apiKeySecret": {"name": "team-key", "key": "token"}}))
    deployment, _ = render.render_sampler("demo", "ml", spec)
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    key_env = next(e for e in env if e["name"] == contract.ENV_API_KEY)
    assert key_env["valueFrom"] == {"secretKeyRef": {"name": "team-key", "key": "token"}}
    assert render.render_sampler_key("demo", "ml", spec) is None  # nothing generated


def test_rendered_sampler_command_starts_with_the_servers_own_checks() -> None:
    """What render writes, the server accepts: its argument parser and its refusal to serve a
    non-loopback address without a key (the key comes from the pod's env)."""
    from coda_trainer.serve.__main__ import is_loopback, parse_args

    deployment, _ = render.render_sampler("demo", "ml", api.parse_spec(run_spec()))
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    assert c["command"][:3] == ["python", "-m", "coda_trainer.serve"]
    args = parse_args(c["command"][3:])
    assert not is_loopback(args.host) and args.port == render.SAMPLER_PORT
    assert not args.insecure_no_auth
    assert any(
        e["name"] == contract.ENV_API_KEY and "secretKeyRef" in e["valueFrom"] for e in c["env"]
    )


def test_render_all_for_the_cli(jobset_validator: jsonschema.Draft7Validator) -> None:
    run = {
        "apiVersion": contract.API_VERSION,
        "kind": contract.KIND,
        "metadata": {"name": "demo", "namespace": "ml"},
        "spec": run_spec(queueName="tpu-team", suspend=True),
    }
    objs = render.render_all(copy.deepcopy(run))
    assert [o["kind"] for o in objs] == ["ConfigMap", "JobSet"] * 3 + [
        "Secret",
        "Deployment",
        "Service",
    ]
    for o in objs:
        validate(o, jobset_validator)
    with pytest.raises(api.InvalidSpec):
        render.render_all({**run, "spec": {**run["spec"], "stages": []}})


def test_fingerprint_ignores_fields_at_their_defaults() -> None:
    """An operator upgrade that adds an optional field must not make running stages look changed:
    a spec that spells out defaults hashes like one that leaves them out; a real change does not."""
    plain = api.parse_spec(run_spec())
    spelled = run_spec()
    spelled["stages"][0]["masking"] = {"blockSizePhases": None, "curriculum": "constant"}
    spelled["stages"][0]["seed"] = 0
    assert render.fingerprint("r", api.parse_spec(spelled), 0) == render.fingerprint("r", plain, 0)
    changed = run_spec()
    changed["stages"][0]["masking"] = {"blockSizePhases": [[2], [2, 4]]}
    diff = render.fingerprint("r", api.parse_spec(changed), 0)
    assert diff["stage"] != render.fingerprint("r", plain, 0)["stage"]


@pytest.mark.parametrize(
    ("accelerator", "host_network"),
    [
        ({"tpu": {"type": "v5p", "topology": "2x2x2"}}, True),
        ({"tpu": {"type": "v6e", "topology": "4x4", "slices": 2}}, True),
        ({"tpu": {"type": "v5p", "topology": "2x2x1"}}, False),  # one host: nothing to gain
        ({"gpu": {"type": "nvidia-h100-80gb", "gpusPerNode": 8, "nodes": 2}}, False),
    ],
)
def test_host_network_is_opt_in_for_multi_host_tpu(
    accelerator: dict[str, Any], host_network: bool, jobset_validator: jsonschema.Draft7Validator
) -> None:
    default = render.render_stage("demo", "ml", spec_with(accelerator), 0).jobset
    pod = default["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod
    spec = spec_with(accelerator, hostNetwork=True)
    objs = render.render_stage("demo", "ml", spec, 0)
    validate(objs.jobset, jobset_validator)
    pod = objs.jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert pod.get("hostNetwork", False) is host_network
    assert pod.get("dnsPolicy") == ("ClusterFirstWithHostNet" if host_network else None)
    # turning it on is a spec change the operator sees; runs without it keep their hashes
    assert "hostNetwork" in render.fingerprint("demo", spec, 0)
    assert "hostNetwork" not in render.fingerprint("demo", spec_with(accelerator), 0)
