"""The Helm chart with the real helm binary: lint, template, schema-validate every object, and check
the security properties (least-privilege RBAC, hardened Deployment) a reviewer would look for.
Also: manifests/ is what the chart renders (no second hand-kept copy) and builds with kustomize."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from ctl_testkit import REPO, helm_binary, kubectl_binary, validate_objects

CHART = REPO / "charts" / "coda-operator"
NAMESPACED_VALUES = Path(__file__).parent / "data" / "values-namespaced.yaml"
HA_VALUES = Path(__file__).parent / "data" / "values-ha.yaml"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=120)


def template(*extra: str) -> list[dict[str, Any]]:
    res = helm(
        "template", "coda", str(CHART), "--namespace", "coda-system", "--include-crds", *extra
    )
    assert res.returncode == 0, res.stderr
    return [d for d in yaml.safe_load_all(res.stdout) if d]


@pytest.fixture(scope="module")
def default_objects() -> list[dict[str, Any]]:
    return template()


@pytest.fixture(scope="module")
def namespaced_objects() -> list[dict[str, Any]]:
    return template("-f", str(NAMESPACED_VALUES))


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


OPERATOR_NAMESPACED = (
    {("coda.dev", "codatrainingruns", v) for v in ("get", "list", "watch", "patch", "update")}
    | {("coda.dev", "codatrainingruns/status", v) for v in ("get", "patch", "update")}
    | {
        (g, r, v)
        for g, r in [
            ("jobset.x-k8s.io", "jobsets"),
            ("", "configmaps"),
            ("", "services"),
            ("apps", "deployments"),
        ]
        for v in ("get", "list", "watch", "create", "patch", "update", "delete")
    }
    | {("", "pods", v) for v in ("get", "list", "watch")}
    | {("", "secrets", "create")}  # the sampler's generated API key
    | {("", "serviceaccounts", "get")}  # does the trainer's ServiceAccount exist?
    | {(g, "events", v) for g in ("", "events.k8s.io") for v in ("create", "patch")}
)
KOPF_CLUSTER = {
    ("apiextensions.k8s.io", "customresourcedefinitions", v) for v in ("get", "list", "watch")
} | {("", "namespaces", v) for v in ("list", "watch")}


@pytest.mark.parametrize(
    "values", [None, NAMESPACED_VALUES, HA_VALUES], ids=["default", "namespaced", "ha"]
)
def test_helm_lint(values: Path | None) -> None:
    res = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 chart(s) failed" in res.stdout


@pytest.mark.parametrize(
    ("typo", "key"),
    [
        ("imag.tag=1.0", "imag"),
        ("metrics.servicee.enabled=false", "servicee"),
        ("trainerServiceAccount.nmae=x", "nmae"),
        ("replicas=2", "replicas"),
    ],
)
def test_unknown_value_keys_are_rejected(typo: str, key: str) -> None:
    """A typo fails loudly (values.schema.json: additionalProperties false) in lint and template."""
    for args in (["lint", "--strict", str(CHART)], ["template", "coda", str(CHART)]):
        res = helm(*args, "--set", typo)
        assert res.returncode != 0, (args, typo)
        assert f"additional properties '{key}' not allowed" in res.stdout + res.stderr


def test_every_rendered_object_validates(
    default_objects: list[dict[str, Any]], namespaced_objects: list[dict[str, Any]]
) -> None:
    for docs in (default_objects, namespaced_objects, template("-f", str(HA_VALUES))):
        checked = [
            d for d in docs if d["kind"] != "ServiceMonitor"
        ]  # no schema offline: checked below
        assert validate_objects(checked) == []


def test_crds_ship_with_the_chart(default_objects: list[dict[str, Any]]) -> None:
    crds = {d["metadata"]["name"] for d in by_kind(default_objects, "CustomResourceDefinition")}
    assert "codatrainingruns.coda.dev" in crds, (
        "charts/coda-operator/crds/ holds no CodaTrainingRun CRD"
    )


def test_cluster_mode_rbac_is_exactly_what_the_operator_needs(
    default_objects: list[dict[str, Any]],
) -> None:
    (role,) = by_kind(default_objects, "ClusterRole")
    assert grants(role["rules"]) == OPERATOR_NAMESPACED | KOPF_CLUSTER
    assert not by_kind(default_objects, "Role") or all(
        r["metadata"]["name"].endswith("-trainer") for r in by_kind(default_objects, "Role")
    )
    (binding,) = by_kind(default_objects, "ClusterRoleBinding")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "coda-coda-operator", "namespace": "coda-system"}
    ]


def test_namespaced_mode_uses_roles(namespaced_objects: list[dict[str, Any]]) -> None:
    (cluster_role,) = by_kind(namespaced_objects, "ClusterRole")
    # Cluster-wide only the read-only discovery kopf needs; peering is per namespace here.
    assert grants(cluster_role["rules"]) == KOPF_CLUSTER
    roles = {
        (r["metadata"]["namespace"], r["metadata"]["name"]): r
        for r in by_kind(namespaced_objects, "Role")
    }
    for ns in ("ml", "research"):
        operator_role = roles[(ns, "coda-coda-operator")]
        assert grants(operator_role["rules"]) == OPERATOR_NAMESPACED | {
            ("kopf.dev", "kopfpeerings", v) for v in ("get", "list", "watch", "patch")
        }
        trainer_role = roles[(ns, "coda-coda-operator-trainer")]
        assert grants(trainer_role["rules"]) == {("coda.dev", "codatrainingruns/status", "patch")}
    bindings = {
        (b["metadata"]["namespace"], b["roleRef"]["name"]): b
        for b in by_kind(namespaced_objects, "RoleBinding")
    }
    assert bindings[("ml", "coda-coda-operator")]["subjects"][0]["namespace"] == "coda-system"
    assert bindings[("research", "coda-coda-operator-trainer")]["subjects"] == [
        {"kind": "ServiceAccount", "name": "coda-trainer", "namespace": "research"}
    ]


def test_no_wildcards_and_no_secret_reads(
    default_objects: list[dict[str, Any]], namespaced_objects: list[dict[str, Any]]
) -> None:
    for docs in (default_objects, namespaced_objects):
        for role in by_kind(docs, "ClusterRole") + by_kind(docs, "Role"):
            for g, r, v in grants(role["rules"]):
                assert "*" not in (g, r, v), role["metadata"]["name"]
                # It creates the sampler's key Secret; it never reads, lists or changes Secrets.
                assert r != "secrets" or v == "create", (role["metadata"]["name"], v)


def test_trainer_service_account_and_workload_identity(
    namespaced_objects: list[dict[str, Any]],
) -> None:
    sas = {
        (s["metadata"]["namespace"], s["metadata"]["name"]): s
        for s in by_kind(namespaced_objects, "ServiceAccount")
    }
    for ns in ("ml", "research"):
        sa = sas[(ns, "coda-trainer")]
        assert (
            sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
            == "coda-trainer@acme.iam.gserviceaccount.com"
        )
    assert ("coda-system", "coda-coda-operator") in sas


def _operator(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (dep,) = by_kind(docs, "Deployment")
    return dep


def test_deployment_is_hardened(default_objects: list[dict[str, Any]]) -> None:
    dep = _operator(default_objects)
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert (
        pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    )
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    health = next(p for p in c["ports"] if p["name"] == "health")["containerPort"]
    assert f"--liveness=http://0.0.0.0:{health}/healthz" in c["args"]
    assert (
        dep["spec"]["replicas"] == 1
        and "--standalone" in c["args"]
        and "--all-namespaces" in c["args"]
    )
    # The operator's own CLI parses these flags: check them against it, not against a guess.
    from coda_operator.__main__ import parse_args

    parsed = parse_args(c["args"])
    metrics_port = next(p for p in c["ports"] if p["name"] == "metrics")["containerPort"]
    assert parsed.all_namespaces and parsed.standalone and parsed.metrics_port == metrics_port
    assert c["image"] == "ghcr.io/coda-dev/coda-operator:0.1.0"
    assert pod["serviceAccountName"] == "coda-coda-operator"


def test_namespaced_deployment_args(namespaced_objects: list[dict[str, Any]]) -> None:
    dep = _operator(namespaced_objects)
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    assert dep["spec"]["replicas"] == 2
    assert "--standalone" not in args  # two replicas: kopf peering picks the active one
    assert (
        "--namespace=ml" in args
        and "--namespace=research" in args
        and "--all-namespaces" not in args
    )
    assert "--verbose" in args and "--metrics-port=9090" in args
    peerings = {
        (d["kind"], d["metadata"].get("namespace"))
        for d in namespaced_objects
        if d["kind"].endswith("KopfPeering")
    }
    assert peerings == {("KopfPeering", "ml"), ("KopfPeering", "research")}
    # The release's own peering name (never kopf's shared "default"), the same one the operator
    # is started with.
    assert {d["metadata"]["name"] for d in namespaced_objects if d["kind"] == "KopfPeering"} == {
        "coda-coda-operator"
    }
    from coda_operator.__main__ import parse_args

    parsed = parse_args(args)
    assert parsed.peering == "coda-coda-operator" and not parsed.standalone
    assert parsed.namespace == ["ml", "research"]


def test_cluster_wide_replicas_use_the_release_peering() -> None:
    from coda_operator.__main__ import parse_args

    docs = template("--set", "replicaCount=3")
    args = _operator(docs)["spec"]["template"]["spec"]["containers"][0]["args"]
    parsed = parse_args(args)
    assert parsed.all_namespaces and not parsed.standalone
    peering = [d for d in docs if d["kind"].endswith("KopfPeering")]
    assert [(d["kind"], d["metadata"]["name"]) for d in peering] == [
        ("ClusterKopfPeering", parsed.peering)
    ]
    assert parsed.peering == "coda-coda-operator"
    (role,) = by_kind(docs, "ClusterRole")
    assert ("kopf.dev", "clusterkopfpeerings", "patch") in grants(role["rules"])
    assert validate_objects(docs) == []


def test_peering_crds_install_before_the_peering_object() -> None:
    """Helm applies crds/ before any template: the kopf peering CRDs live there, so the peering
    object of an HA release finds its kind on the first install (CRD and object in one release's
    templates fail with "no matches for kind")."""
    crds_dir = {p.name for p in (CHART / "crds").iterdir()}
    assert {"kopfpeerings.kopf.dev.yaml", "clusterkopfpeerings.kopf.dev.yaml"} <= crds_dir
    for values in (HA_VALUES, NAMESPACED_VALUES):
        res = helm("template", "coda", str(CHART), "-n", "coda-system", "-f", str(values))
        assert res.returncode == 0, res.stderr
        templates_only = [d for d in yaml.safe_load_all(res.stdout) if d]  # no --include-crds
        assert not by_kind(templates_only, "CustomResourceDefinition")
        peering = [d for d in templates_only if d["kind"].endswith("KopfPeering")]
        assert peering
        crds = {
            (d["spec"]["group"], d["spec"]["names"]["kind"])
            for d in by_kind(template("-f", str(values)), "CustomResourceDefinition")
        }
        assert {("kopf.dev", d["kind"]) for d in peering} <= crds


def test_metrics_service_and_service_monitor(
    namespaced_objects: list[dict[str, Any]], default_objects: list[dict[str, Any]]
) -> None:
    assert not by_kind(default_objects, "ServiceMonitor")
    (svc,) = by_kind(namespaced_objects, "Service")
    (mon,) = by_kind(namespaced_objects, "ServiceMonitor")
    assert (
        mon["apiVersion"] == "monitoring.coreos.com/v1"
        and mon["metadata"]["labels"]["release"] == "prometheus"
    )
    # The monitor selects the metrics Service and scrapes its named port.
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    assert mon["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    dep = _operator(namespaced_objects)
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert "metrics" in {
        p["name"] for p in dep["spec"]["template"]["spec"]["containers"][0]["ports"]
    }


def test_bad_values_are_rejected() -> None:
    for bad in (
        ["--set", "logLevel=loud"],
        ["--set", "replicaCount=0"],
        ["--set", "watchNamespaces[0]=Not_A_Namespace"],
    ):
        res = helm("template", "coda", str(CHART), *bad)
        assert res.returncode != 0, bad
        assert (
            "values don't meet the specifications of the schema" in res.stderr
            or "must be" in res.stderr
        ), res.stderr


def test_notes_render() -> None:
    res = helm(
        "install",
        "coda",
        str(CHART),
        "--dry-run=client",
        "--namespace",
        "coda-system",
        "-f",
        str(NAMESPACED_VALUES),
    )
    assert res.returncode == 0, res.stderr
    assert "reconciles CodaTrainingRuns in: ml, research" in res.stdout
    assert 'ServiceAccount "coda-trainer", created in: ml, research.' in res.stdout
    # every command names the namespace where the trainer's ServiceAccount exists
    commands = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("coda-ctl ")]
    assert [c.split()[1] for c in commands] == ["submit", "get", "watch", "sample"]
    assert all(" -n ml" in c for c in commands), commands


def test_notes_of_a_default_install_name_the_release_namespace() -> None:
    res = helm("install", "coda", str(CHART), "--dry-run=client", "--namespace", "coda-system")
    assert res.returncode == 0, res.stderr
    assert 'ServiceAccount "coda-trainer", created in: coda-system.' in res.stdout
    commands = [ln.strip() for ln in res.stdout.splitlines() if ln.strip().startswith("coda-ctl ")]
    assert commands and all(" -n coda-system" in c for c in commands), commands


# --------------------------------------------------------------------------------- helm test


def _test_pod(*extra: str) -> dict[str, Any]:
    (pod,) = [
        d
        for d in template(*extra)
        if d["kind"] == "Pod" and d["metadata"]["annotations"].get("helm.sh/hook") == "test"
    ]
    return pod


def test_helm_test_hook_renders_and_is_left_out_of_manifests(
    default_objects: list[dict[str, Any]],
) -> None:
    pod = _test_pod()
    assert pod["spec"]["serviceAccountName"] == "coda-coda-operator"
    env = {e["name"]: e["value"] for e in pod["spec"]["containers"][0]["env"]}
    assert env["CODA_TEST_METRICS_URL"] == (
        "http://coda-coda-operator-metrics.coda-system.svc:9090/metrics"
    )
    assert env["CODA_TEST_NAMESPACE"] == ""
    ns_env = {
        e["name"]: e["value"]
        for e in _test_pod("-f", str(NAMESPACED_VALUES))["spec"]["containers"][0]["env"]
    }
    assert ns_env["CODA_TEST_NAMESPACE"] == "ml"
    assert not [d for d in template("--set", "tests.enabled=false") if d["kind"] == "Pod"]
    generated = "".join(p.read_text() for p in (REPO / "manifests").rglob("*.yaml"))
    assert "helm.sh/hook" not in generated


def test_helm_test_script_against_the_emulator(
    kubeconfig: Path, emulator: Any, tmp_path: Path
) -> None:
    """The script the test pod runs (taken from the rendered Pod), run here against kmock with a
    ServiceAccount directory of its own: passes with the CRD served, fails naming what is wrong."""
    import http.server
    import os
    import threading

    script = _test_pod()["spec"]["containers"][0]["args"][0]
    (tmp_path / "token").write_text("test-token")

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'coda_operator_runs{phase="Running"} 1.0\n'
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    metrics = f"http://127.0.0.1:{server.server_address[1]}/metrics"

    def run(api: str, metrics_url: str) -> subprocess.CompletedProcess[str]:
        env = {
            **os.environ,
            "CODA_TEST_API": api,
            "CODA_TEST_SA_DIR": str(tmp_path),
            "CODA_TEST_NAMESPACE": "ml",
            "CODA_TEST_METRICS_URL": metrics_url,
        }
        return subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
        )

    try:
        ok = run(emulator.url, metrics)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        assert (
            ok.stdout.strip() == "ok: CodaTrainingRun API served and readable, operator metrics up"
        )
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{s.getsockname()[1]}"
        bad = run(emulator.url, dead + "/metrics")
        assert bad.returncode == 1
        assert bad.stdout.startswith(f"FAIL the operator does not answer on {dead}/metrics")
        gone = run(dead, "")
        assert gone.returncode == 1 and "is not served (is the CRD installed?)" in gone.stdout
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


# --------------------------------------------------------------------------------- manifests/


def test_manifests_are_generated_from_the_chart() -> None:
    res = subprocess.run(
        [sys.executable, str(REPO / "manifests" / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        env=_path_env(),
    )
    assert res.returncode == 0, f"manifests/ is stale:\n{res.stdout}\n{res.stderr}"


def test_manifests_build_with_kustomize_and_validate() -> None:
    res = subprocess.run(
        [kubectl_binary(), "kustomize", str(REPO / "manifests")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    docs = [d for d in yaml.safe_load_all(res.stdout) if d]
    kinds = {d["kind"] for d in docs}
    assert {
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
    } <= kinds
    assert all(d["metadata"].get("namespace") in (None, "coda-system") for d in docs)
    assert validate_objects(docs) == []


def _path_env() -> dict[str, str]:
    import os

    return {
        **os.environ,
        "PATH": f"{Path(helm_binary()).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def test_the_documented_crd_upgrade_applies_exactly_the_crds() -> None:
    """README's upgrade path applies charts/coda-operator/crds/ with server-side apply before
    `helm upgrade`: that folder must hold CRDs only (every one valid), the CodaTrainingRun CRD the
    same as `coda-ctl crd` prints, and the README must give the commands as written here."""
    readme = (REPO / "README.md").read_text()
    assert "$ kubectl apply --server-side --force-conflicts -f charts/coda-operator/crds/" in readme
    assert "$ helm upgrade coda-operator charts/coda-operator -n coda-system" in readme
    docs = [
        d
        for p in sorted((CHART / "crds").iterdir())
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    assert {d["kind"] for d in docs} == {"CustomResourceDefinition"}
    assert validate_objects(docs) == []
    from coda_ctl import runspec

    ours = next(d for d in docs if d["metadata"]["name"] == "codatrainingruns.coda.dev")
    assert ours == runspec.crd()
