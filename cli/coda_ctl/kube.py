"""All cluster I/O of `coda-ctl`: one small class over the official `kubernetes` client.

Commands stay thin: they call these methods and format what comes back. Every client error is
translated here into a `CtlError` with a documented exit code, so no command handles HTTP details.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coda_trainer.contract import GROUP, KIND, PLURAL, VERSION

from coda_ctl.errors import CtlError, Exit

# JobSet puts these labels on every pod; the leader of a stage is job 0, completion index 0.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"

# Seconds to open a TCP connection to the API server (an unreachable one fails this fast, exit 5).
CONNECT_TIMEOUT_S = 5.0
# Seconds a request waits for the API server's answer unless --request-timeout says otherwise; one
# attempt only (no urllib3 retries), so a hung server fails within CONNECT + this.
DEFAULT_REQUEST_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Target:
    """Where to talk to: kubeconfig file(s), context and namespace as given on the command line."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT_S


def _kubeconfig_files(kubeconfig: str | None) -> list[str]:
    """The kubeconfig files in kubectl's order: --kubeconfig (a path list is accepted too, as the
    KUBECONFIG variable), else $KUBECONFIG, else ~/.kube/config."""
    spec = kubeconfig or os.environ.get("KUBECONFIG")
    if spec:
        return [os.path.expanduser(p) for p in spec.split(os.pathsep) if p]
    default = Path.home() / ".kube" / "config"
    return [str(default)] if default.exists() else []


def merged_kubeconfig_view(files: list[str]) -> tuple[list[str], str | None]:
    """Context names and the current context of several kubeconfig files merged as kubectl merges
    them: the first file that defines a name (or sets current-context) wins; files that do not exist
    are skipped unless none exists. Pure apart from reading the files."""
    import yaml

    names: list[str] = []
    current: str | None = None
    for f in files:
        if not Path(f).exists():
            continue
        doc = yaml.safe_load(Path(f).read_text()) or {}
        if not isinstance(doc, dict):
            raise CtlError(f"kubeconfig {f} is not a YAML mapping", Exit.NO_CLUSTER)
        for ctx in doc.get("contexts") or []:
            if isinstance(ctx, dict) and ctx.get("name") and ctx["name"] not in names:
                names.append(ctx["name"])
        if current is None and doc.get("current-context"):
            current = doc["current-context"]
    return names, current


def _credential_plugin(files: list[str], context: str | None) -> str | None:
    """The `user.exec.command` of the context in use, if its user authenticates with a plugin."""
    import yaml

    docs = [yaml.safe_load(Path(f).read_text()) or {} for f in files if Path(f).exists()]

    def first(section: str, name: str | None) -> dict[str, Any]:
        for d in docs:
            for item in d.get(section) or []:
                if isinstance(item, dict) and item.get("name") == name:
                    return item
        return {}

    user = (first("contexts", context).get("context") or {}).get("user")
    return ((first("users", user).get("user") or {}).get("exec") or {}).get("command")


def _plugin_failure(plugin: str, logged: list[str]) -> CtlError:
    """One line for a failed credential plugin (the client logs its whole stderr), plus a hint."""
    detail = next((line for line in logged if line.strip()), "no output")
    detail = detail.strip().splitlines()[0] if detail.strip() else detail
    if "No such file or directory" in detail:
        what = f"credential plugin {plugin!r} is not installed or not on PATH"
    else:
        what = f"credential plugin {plugin!r} failed: {detail.removeprefix('exec: ')}"
    hint = f"run `{plugin}` yourself to see its whole output"
    if "gke-gcloud-auth-plugin" in plugin:
        hint = (
            "`gcloud auth login` (or `gcloud components install gke-gcloud-auth-plugin`), then "
            "`gcloud container clusters get-credentials CLUSTER`"
        )
    return CtlError(f"{what}\nhint: {hint}", Exit.NO_CLUSTER)


@contextlib.contextmanager
def _captured_client_logs() -> Iterator[list[str]]:
    """Collect what the kubernetes client logs while loading a kubeconfig (it reports a failed
    credential plugin with `logging.error` and carries on) instead of letting it reach the user."""
    import logging

    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    root = logging.getLogger()
    handler, saved = Collect(level=logging.WARNING), root.handlers[:]
    root.handlers = [handler]
    try:
        yield lines
    finally:
        root.handlers = saved


class Cluster:
    """A connection to one API server and one namespace."""

    def __init__(self, target: Target) -> None:
        from kubernetes import client, config

        self._client_mod = client
        self.request_timeout = target.request_timeout
        files = _kubeconfig_files(target.kubeconfig)
        namespace = target.namespace
        # Timeouts and retries live on the Configuration *before* the ApiClient exists: the client
        # builds its urllib3 pool from them once, so setting them afterwards changes nothing.
        cfg = client.Configuration()
        cfg.retries = 0
        self.context: str | None = None
        try:
            if files:
                existing = [f for f in files if Path(f).exists()]
                if not existing:
                    raise CtlError(f"kubeconfig {files[0]} does not exist", Exit.NO_CLUSTER)
                contexts, current = merged_kubeconfig_view(existing)
                chosen = target.context or current
                if chosen is None or chosen not in contexts:
                    names = ", ".join(contexts) or "none"
                    where = ":".join(existing)
                    what = f"context {chosen!r} not found" if chosen else "no current context"
                    raise CtlError(f"{what} in {where} (have: {names})", Exit.NO_CLUSTER)
                self.context = chosen
                with _captured_client_logs() as logged:
                    # The client merges a path list like kubectl (first definition wins), but its
                    # current-context is the last file's: pass the kubectl one explicitly.
                    config.load_kube_config(
                        config_file=os.pathsep.join(existing),
                        context=chosen,
                        client_configuration=cfg,
                        persist_config=False,
                    )
                plugin = _credential_plugin(existing, chosen)
                if plugin and any("exec:" in m or "No such file" in m for m in logged):
                    raise _plugin_failure(plugin, logged)
                if namespace is None:
                    namespace = _context_namespace(existing, chosen)
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config(client_configuration=cfg)
                sa_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
                if namespace is None and sa_ns.exists():
                    namespace = sa_ns.read_text().strip()
            else:
                raise CtlError(
                    "no cluster configured: pass --kubeconfig, set KUBECONFIG, or create ~/.kube/config",
                    Exit.NO_CLUSTER,
                )
        except CtlError:
            raise
        except Exception as e:  # malformed kubeconfig, missing certificate file, ...
            first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CtlError(f"cannot load kubeconfig: {first_line}", Exit.NO_CLUSTER) from e
        self.api = client.ApiClient(cfg)
        self.namespace = namespace or "default"
        self.server = cfg.host
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    # ---------------------------------------------------------------- error translation

    @contextlib.contextmanager
    def _errors(self, what: str, custom: bool = False) -> Iterator[None]:
        """Translate client errors into CtlErrors. `custom`: the request was for a
        CodaTrainingRun, so a 404 may mean the CRD (or the whole API) is missing, not the object."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, ReadTimeoutError
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            yield
        except ApiException as e:
            message = _status_message(e)
            if e.status == 404:
                if custom:
                    missing = self._missing_api()
                    if missing:
                        raise CtlError(missing, Exit.NO_CLUSTER) from e
                raise CtlError(f"{what} not found{message}", Exit.NOT_FOUND) from e
            if e.status == 409:
                raise CtlError(f"{what} already exists{message}", Exit.CONFLICT) from e
            if e.status == 422:
                raise CtlError(
                    f"{what} was rejected by the API server{message}", Exit.INVALID
                ) from e
            if e.status in (401, 403):
                raise CtlError(f"{what}: not allowed ({e.status}){message}", Exit.ERROR) from e
            if e.status == 0 or e.status is None:
                raise CtlError(
                    f"cannot reach the API server at {self.server}: {e.reason}", Exit.NO_CLUSTER
                ) from e
            raise CtlError(f"{what}: API server answered {e.status}{message}", Exit.ERROR) from e
        except (Urllib3Error, OSError) as e:
            cause = e.reason if isinstance(e, MaxRetryError) and e.reason is not None else e
            if isinstance(cause, ReadTimeoutError):
                why = f"no answer within {self.request_timeout:g}s (--request-timeout)"
            elif isinstance(cause, ConnectTimeoutError):
                why = f"no connection within {CONNECT_TIMEOUT_S:g}s"
            else:
                why = _short_reason(cause)
            raise CtlError(
                f"cannot reach the API server at {self.server}: {why}", Exit.NO_CLUSTER
            ) from e

    def _timeout(self, read: float | None = None) -> tuple[float, float]:
        return (CONNECT_TIMEOUT_S, self.request_timeout if read is None else read)

    def _get_path(self, path: str, query: dict[str, str] | None = None) -> tuple[int, Any]:
        """GET a raw API path; (status, decoded JSON or None). Never raises for an HTTP status."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        method, url, headers, _, _ = self.api.param_serialize(
            "GET",
            path,
            query_params=list((query or {}).items()),
            header_params={"Accept": "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            resp = self.api.call_api(method, url, headers, _request_timeout=self._timeout())
            resp.read()
            status, data = resp.status, resp.data
        except ApiException as e:
            status, data = e.status, e.body
        except (Urllib3Error, OSError):
            return 0, None
        try:
            return status, json.loads(data or b"null")
        except (TypeError, ValueError):
            return status, None

    def _missing_api(self) -> str | None:
        """Why CodaTrainingRuns cannot be served here, or None when they can (a 404 then means
        the object is missing). Asks API discovery, as kubectl does before naming a resource."""
        status, body = self._get_path(f"/apis/{GROUP}/{VERSION}")
        if status == 0:  # the server went away meanwhile: report the 404 as it came
            return None
        resources = (body.get("resources") if isinstance(body, dict) else None) or []
        if status == 200 and any(r.get("name") == PLURAL for r in resources):
            return None
        where = f"the cluster at {self.server}" + (
            f" (context {self.context!r})" if self.context else ""
        )
        core_status, core = self._get_path("/api")
        if core_status != 200 or not isinstance(core, dict) or "versions" not in core:
            return (
                f"{self.server} does not answer like a Kubernetes API server (GET /api: "
                f"{core_status}): check --kubeconfig and --context"
            )
        _, group = self._get_path(f"/apis/{GROUP}")
        served = [
            v.get("version") for v in (group or {}).get("versions") or [] if isinstance(v, dict)
        ]
        if served:
            return (
                f"{where} serves {GROUP} versions {', '.join(map(str, served))}, but this "
                f"coda-ctl needs {VERSION}: upgrade the CRD "
                "(`coda-ctl crd | kubectl apply --server-side -f -`)"
            )
        return (
            f"the {KIND} CRD ({PLURAL}.{GROUP}) is not installed in {where}: install it with "
            "`coda-ctl crd | kubectl apply --server-side -f -` or the Helm chart "
            "(charts/coda-operator), or pick the right cluster with --context"
        )

    # ---------------------------------------------------------------- CodaTrainingRuns

    def list_runs(
        self, all_namespaces: bool = False, selector: str | None = None
    ) -> list[dict[str, Any]]:
        extra: dict[str, Any] = {"label_selector": selector} if selector else {}
        with self._errors("codatrainingruns", custom=True):
            if all_namespaces:
                out = _json(
                    self.custom.list_cluster_custom_object(
                        GROUP,
                        VERSION,
                        PLURAL,
                        _request_timeout=self._timeout(),
                        _preload_content=False,
                        **extra,
                    )
                )
            else:
                out = _json(
                    self.custom.list_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        self.namespace,
                        PLURAL,
                        _request_timeout=self._timeout(),
                        _preload_content=False,
                        **extra,
                    )
                )
        items = list(out.get("items", []))
        if selector:  # the selector is a server-side optimisation; the answer is checked here
            match = label_matcher(selector)
            items = [i for i in items if match((i.get("metadata") or {}).get("labels") or {})]
        return sorted(
            items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def get_run(self, name: str) -> dict[str, Any]:
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"', custom=True):
            return _json(
                self.custom.get_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    name,
                    _request_timeout=self._timeout(),
                    _preload_content=False,
                )
            )

    def create_run(self, body: dict[str, Any], *, server_dry_run: bool = False) -> dict[str, Any]:
        """Create a run with strict server-side field validation: a field this CLI knows and the
        cluster's (older) CRD does not is an error, never silently pruned."""
        name = body.get("metadata", {}).get("name", "?")
        namespace = body.get("metadata", {}).get("namespace") or self.namespace
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        with self._errors(f'codatrainingrun "{name}" in namespace "{namespace}"', custom=True):
            return _json(
                self.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    body,
                    field_validation="Strict",
                    _request_timeout=self._timeout(),
                    _preload_content=False,
                    **({"dry_run": "All"} if server_dry_run else {}),
                )
            )

    def patch_run(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"', custom=True):
            return _json(
                self.custom.patch_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    self.namespace,
                    PLURAL,
                    name,
                    patch,
                    _request_timeout=self._timeout(),
                    _preload_content=False,
                )
            )

    def delete_run(self, name: str) -> None:
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"', custom=True):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=self._timeout()
            )

    def _optional_list(
        self, path: str, kind: str, unavailable: dict[str, str], selector: str | None = None
    ) -> list[dict[str, Any]]:
        """Items of a list that may not exist here (JobSet or Kueue not installed) or may not be
        readable (RBAC): the reason goes into `unavailable` instead of failing the command."""
        status, body = self._get_path(path, {"labelSelector": selector} if selector else None)
        if status == 0:
            raise CtlError(f"cannot reach the API server at {self.server}", Exit.NO_CLUSTER)
        if status == 404:
            unavailable[kind] = "API not installed in this cluster"
            return []
        if status in (401, 403):
            unavailable[kind] = f"not allowed to list {kind} ({status})"
            return []
        if status != 200 or not isinstance(body, dict):
            unavailable[kind] = f"API server answered {status}"
            return []
        items = [i for i in body.get("items") or [] if isinstance(i, dict)]
        if selector:  # the selector is a server-side optimisation; the answer is checked here
            match = label_matcher(selector)
            items = [i for i in items if match((i.get("metadata") or {}).get("labels") or {})]
        return sorted(items, key=lambda i: (i.get("metadata") or {}).get("name", ""))

    def snapshot(self, run: dict[str, Any]) -> Any:
        """The run with its JobSets, Jobs, trainer pods, their events and Kueue Workloads."""
        from coda_trainer.contract import LABEL_RUN

        from coda_ctl.diagnose import Snapshot
        from coda_ctl.runstatus import status_of

        ns, name = self.namespace, run["metadata"]["name"]
        selector = f"{LABEL_RUN}={name}"
        missing: dict[str, str] = {}
        jobsets = self._optional_list(
            f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/{ns}/jobsets", "jobsets", missing, selector
        )
        jobs = self._optional_list(
            f"/apis/batch/v1/namespaces/{ns}/jobs", "jobs", missing, selector
        )
        pods = [
            p
            for p in self._optional_list(f"/api/v1/namespaces/{ns}/pods", "pods", missing, selector)
            if (p.get("metadata") or {}).get("labels", {}).get("app.kubernetes.io/component")
            != "sampler"
        ]
        jobset_names = {j["metadata"]["name"] for j in jobsets} | {
            s.job_set for s in status_of(run).stages if s.job_set
        }
        workloads = [
            w
            for w in self._optional_list(
                f"/apis/kueue.x-k8s.io/v1beta1/namespaces/{ns}/workloads", "workloads", missing
            )
            if any(
                o.get("name") in jobset_names
                for o in (w.get("metadata") or {}).get("ownerReferences") or []
            )
        ]
        involved = {
            (kind, o["metadata"]["name"])
            for kind, objs in (
                ("Pod", pods),
                ("Job", jobs),
                ("JobSet", jobsets),
                ("Workload", workloads),
            )
            for o in objs
        }
        events = [
            e
            for e in self._optional_list(f"/api/v1/namespaces/{ns}/events", "events", missing)
            if (
                (e.get("involvedObject") or {}).get("kind"),
                (e.get("involvedObject") or {}).get("name"),
            )
            in involved
        ]
        return Snapshot(run, jobsets, jobs, pods, events, workloads, missing)

    def served_versions(self) -> tuple[list[str], str | None]:
        """The coda.dev versions this cluster serves and its preferred one (API discovery)."""
        status, group = self._get_path(f"/apis/{GROUP}")
        if status == 0:
            raise CtlError(f"cannot reach the API server at {self.server}", Exit.NO_CLUSTER)
        if status != 200 or not isinstance(group, dict):
            return [], None
        versions = [v.get("version") for v in group.get("versions") or [] if isinstance(v, dict)]
        preferred = (group.get("preferredVersion") or {}).get("version")
        return [str(v) for v in versions if v], preferred

    def server_version(self) -> str | None:
        status, body = self._get_path("/version")
        return body.get("gitVersion") if status == 200 and isinstance(body, dict) else None

    # ---------------------------------------------------------------- events, pods, logs

    def events_for(self, run: dict[str, Any]) -> list[dict[str, Any]]:
        """Events whose involved object is the run (by name and kind), oldest first."""
        name = run["metadata"]["name"]
        selector = f"involvedObject.name={name},involvedObject.kind={KIND}"
        with self._errors(f'events of "{name}"'):
            resp = self.core.list_namespaced_event(
                self.namespace,
                field_selector=selector,
                _preload_content=False,
                _request_timeout=self._timeout(),
            )
        items = json.loads(resp.data or b"{}").get("items", [])
        # Filter here too: the selector is a server-side optimisation, not a guarantee we rely on.
        mine = [
            e
            for e in items
            if e.get("involvedObject", {}).get("name") == name
            and e.get("involvedObject", {}).get("kind", KIND) == KIND
        ]
        return sorted(mine, key=_event_time)

    def pods(self, labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        with self._errors(f"pods with labels {selector}"):
            resp = self.core.list_namespaced_pod(
                self.namespace,
                label_selector=selector,
                _preload_content=False,
                _request_timeout=self._timeout(),
            )
        items = json.loads(resp.data or b"{}").get("items", [])
        match = lambda p: all(  # noqa: E731
            p.get("metadata", {}).get("labels", {}).get(k) == v for k, v in labels.items()
        )
        return sorted((p for p in items if match(p)), key=lambda p: p["metadata"]["name"])

    def stream_logs(
        self,
        pod: str,
        *,
        container: str | None = None,
        follow: bool = False,
        tail: int | None = None,
        previous: bool = False,
    ) -> Iterator[bytes]:
        kwargs: dict[str, Any] = {"follow": follow, "_preload_content": False}
        if previous:
            kwargs["previous"] = True
        if container:
            kwargs["container"] = container
        if tail is not None:
            kwargs["tail_lines"] = tail
        if not follow:
            kwargs["_request_timeout"] = self._timeout()
        with self._errors(f'logs of pod "{pod}"'):
            resp = self.core.read_namespaced_pod_log(pod, self.namespace, **kwargs)
            try:
                yield from resp.stream(4096)
            finally:
                resp.release_conn()

    # ---------------------------------------------------------------- service proxy

    def secret_value(self, name: str, key: str) -> str:
        """One key of a Secret in the namespace, decoded."""
        import base64

        with self._errors(f'secret "{name}" in namespace "{self.namespace}"'):
            secret = self.core.read_namespaced_secret(name, self.namespace)
        data = (secret.data or {}).get(key)
        if data is None:
            raise CtlError(f'secret "{name}" has no key {key!r}', Exit.NOT_FOUND)
        return base64.b64decode(data).decode()

    def service_post(
        self,
        service: str,
        port: int | str,
        path: str,
        body: dict[str, Any],
        timeout: float = 600.0,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """POST JSON to a Service through the API server's service proxy; returns the JSON reply.

        The API server strips `Authorization` before proxying (it carries the user's cluster
        credentials), so the service's own key travels in the `api-key` header.
        """
        resource = f"/api/v1/namespaces/{self.namespace}/services/{service}:{port}/proxy/{path.lstrip('/')}"
        header_params = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            header_params["api-key"] = api_key
        method, url, headers, _, _ = self.api.param_serialize(
            "POST", resource, header_params=header_params, auth_settings=["BearerToken"]
        )
        with self._errors(f'service "{service}" in namespace "{self.namespace}"'):
            resp = self.api.call_api(
                method, url, headers, body, _request_timeout=(CONNECT_TIMEOUT_S, timeout)
            )
            resp.read()
            if resp.status >= 400:
                raise CtlError(
                    f"sampler answered {resp.status} through the service proxy: {resp.data[:500]!r}"
                )
            return json.loads(resp.data)


def _json(resp: Any) -> dict[str, Any]:
    """Decode a raw (unpreloaded) response: the client's typed decoding depends on exact status
    codes (201 vs 200 on create), the JSON body does not."""
    return json.loads(resp.data or b"{}")


def label_matcher(selector: str) -> Any:
    """A predicate over a labels dict for kubectl's equality-based selectors:
    `k=v`, `k==v`, `k!=v`, `k` (exists), `!k` (absent), comma-separated (all must hold)."""
    tests = []
    for term in (t.strip() for t in selector.split(",")):
        if not term:
            continue
        if "!=" in term:
            k, v = (x.strip() for x in term.split("!=", 1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) != v)
        elif "=" in term:
            k, v = (x.strip() for x in term.replace("==", "=").split("=", 1))
            tests.append(lambda labels, k=k, v=v: labels.get(k) == v)
        elif term.startswith("!"):
            absent = term[1:].strip()
            tests.append(lambda labels, k=absent: k not in labels)
        elif " " in term or "(" in term:
            raise CtlError(f"unsupported selector {term!r}: use k=v, k!=v, k or !k", Exit.USAGE)
        else:
            tests.append(lambda labels, k=term: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def _context_namespace(files: list[str], context: str) -> str | None:
    """The namespace of `context` in the first file that defines it (kubectl's merge rule)."""
    import yaml

    for f in files:
        for ctx in (yaml.safe_load(Path(f).read_text()) or {}).get("contexts") or []:
            if isinstance(ctx, dict) and ctx.get("name") == context:
                return (ctx.get("context") or {}).get("namespace")
    return None


def _short_reason(e: BaseException) -> str:
    """A connection error in a few words (urllib3 wraps the useful part in long reprs)."""
    text = str(e)
    for marker in ("Connection refused", "Name or service not known", "No route to host",
                   "certificate verify failed", "Connection reset"):  # fmt: skip
        if marker in text:
            return marker
    return type(e).__name__


def _status_message(e: Any) -> str:
    """The `message` of a Kubernetes Status body, if the error carries one."""
    try:
        body = json.loads(e.body or "{}")
    except (TypeError, ValueError):
        return ""
    message = body.get("message") if isinstance(body, dict) else None
    return f": {message}" if message else ""


def _event_time(event: dict[str, Any]) -> str:
    return (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or event.get("metadata", {}).get("creationTimestamp")
        or ""
    )
