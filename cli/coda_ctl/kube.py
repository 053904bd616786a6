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

# Seconds before a request to an unreachable API server gives up (scripts want a quick exit 5).
CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Target:
    """Where to talk to: kubeconfig file, context and namespace as given on the command line."""

    kubeconfig: str | None = None
    context: str | None = None
    namespace: str | None = None


def _kubeconfig_files(kubeconfig: str | None) -> list[str]:
    if kubeconfig:
        return [kubeconfig]
    env = os.environ.get("KUBECONFIG")
    if env:
        return [p for p in env.split(os.pathsep) if p]
    default = Path.home() / ".kube" / "config"
    return [str(default)] if default.exists() else []


class Cluster:
    """A connection to one API server and one namespace."""

    def __init__(self, target: Target) -> None:
        from kubernetes import client, config

        self._client_mod = client
        files = _kubeconfig_files(target.kubeconfig)
        namespace = target.namespace
        try:
            if files:
                missing = [f for f in files if not Path(f).exists()]
                if missing:
                    raise CtlError(f"kubeconfig {missing[0]} does not exist", Exit.NO_CLUSTER)
                contexts, active = config.list_kube_config_contexts(config_file=files[0])
                chosen = active
                if target.context:
                    chosen = next((c for c in contexts if c["name"] == target.context), None)
                    if chosen is None:
                        names = ", ".join(c["name"] for c in contexts) or "none"
                        raise CtlError(
                            f"context {target.context!r} not found in {files[0]} (have: {names})",
                            Exit.NO_CLUSTER,
                        )
                if namespace is None and chosen:
                    namespace = chosen.get("context", {}).get("namespace")
                self.api = config.new_client_from_config(
                    config_file=files[0], context=target.context
                )
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                config.load_incluster_config()
                self.api = client.ApiClient()
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
        except Exception as e:  # malformed kubeconfig, missing credentials plugin, ...
            raise CtlError(f"cannot load kubeconfig: {e}", Exit.NO_CLUSTER) from e
        # Fail fast on an unreachable server instead of urllib3's default retries.
        self.api.configuration.retries = 0
        self.namespace = namespace or "default"
        self.server = self.api.configuration.host
        self.custom = client.CustomObjectsApi(self.api)
        self.core = client.CoreV1Api(self.api)

    # ---------------------------------------------------------------- error translation

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError as Urllib3Error

        try:
            yield
        except ApiException as e:
            message = _status_message(e)
            if e.status == 404:
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
            raise CtlError(
                f"cannot reach the API server at {self.server}: {type(e).__name__}", Exit.NO_CLUSTER
            ) from e

    def _timeout(self, read: float = 30.0) -> tuple[float, float]:
        return (CONNECT_TIMEOUT_S, read)

    # ---------------------------------------------------------------- CodaTrainingRuns

    def list_runs(self, all_namespaces: bool = False) -> list[dict[str, Any]]:
        with self._errors("codatrainingruns"):
            if all_namespaces:
                out = _json(
                    self.custom.list_cluster_custom_object(
                        GROUP,
                        VERSION,
                        PLURAL,
                        _request_timeout=self._timeout(),
                        _preload_content=False,
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
                    )
                )
        items = list(out.get("items", []))
        return sorted(
            items, key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"])
        )

    def get_run(self, name: str) -> dict[str, Any]:
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"'):
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

    def create_run(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("metadata", {}).get("name", "?")
        namespace = body.get("metadata", {}).get("namespace") or self.namespace
        body = {**body, "metadata": {**body["metadata"], "namespace": namespace}}
        with self._errors(f'codatrainingrun "{name}" in namespace "{namespace}"'):
            return _json(
                self.custom.create_namespaced_custom_object(
                    GROUP,
                    VERSION,
                    namespace,
                    PLURAL,
                    body,
                    _request_timeout=self._timeout(),
                    _preload_content=False,
                )
            )

    def patch_run(self, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"'):
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
        with self._errors(f'codatrainingrun "{name}" in namespace "{self.namespace}"'):
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name, _request_timeout=self._timeout()
            )

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
    ) -> Iterator[bytes]:
        kwargs: dict[str, Any] = {"follow": follow, "_preload_content": False}
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
