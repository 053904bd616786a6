"""A small async Kubernetes REST client for the handlers (aiohttp, the same stack kopf uses).

It authenticates with the `kopf.ConnectionInfo` the operator logged in with, so the handlers and
kopf's watches talk to the same API server with the same identity. Only what the operator needs:
get, create-if-absent, merge-patch, delete, and Events.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import kopf

__all__ = ["ApiError", "Kube", "plural_of"]

_PLURALS = {
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "ServiceAccount": "serviceaccounts",
    "Service": "services",
    "Event": "events",
    "Deployment": "deployments",
    "JobSet": "jobsets",
    "Job": "jobs",
    "CodaTrainingRun": "codatrainingruns",
    "CustomResourceDefinition": "customresourcedefinitions",
}


def plural_of(kind: str) -> str:
    return _PLURALS[kind]


class ApiError(Exception):
    def __init__(self, status: int, reason: str, message: str):
        self.status, self.reason, self.message = status, reason, message
        super().__init__(f"{status} {reason}: {message}")


def _path(
    api_version: str,
    plural: str,
    namespace: str | None,
    name: str | None = None,
    sub: str | None = None,
) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    if name:
        path += f"/{name}"
    if sub:
        path += f"/{sub}"
    return path


class Kube:
    """One aiohttp session per operator; re-login (via `relogin`) once on HTTP 401."""

    def __init__(
        self,
        info: kopf.ConnectionInfo,
        relogin: Callable[[], Awaitable[kopf.ConnectionInfo]] | None = None,
    ):
        self._info = info
        self._relogin = relogin
        self._session: aiohttp.ClientSession | None = None
        self.requests = 0  # counted for the benchmark and the metrics
        self._names = itertools.count()

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            info = self._info
            insecure = bool(info.insecure)
            ssl: Any = (
                False if insecure or info.server.startswith("http://") else info.as_ssl_context()
            )
            self._session = aiohttp.ClientSession(
                base_url=info.server.rstrip("/") + "/",
                headers={"User-Agent": "coda-operator", **info.as_http_headers()},
                connector=aiohttp.TCPConnector(ssl=ssl, limit=64),
                timeout=aiohttp.ClientTimeout(total=30),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        _retry: bool = True,
    ) -> Any:
        session = self._open()
        self.requests += 1
        headers = {"Content-Type": content_type} if body is not None else {}
        async with session.request(method, path.lstrip("/"), json=body, headers=headers) as rsp:
            if rsp.status == 401 and _retry and self._relogin is not None:
                self._info = await self._relogin()
                await self.close()
                return await self.request(
                    method, path, body=body, content_type=content_type, _retry=False
                )
            if rsp.status >= 400:
                try:
                    data = await rsp.json(content_type=None)
                except (aiohttp.ContentTypeError, ValueError):
                    data = {}
                data = data if isinstance(data, dict) else {}
                raise ApiError(
                    rsp.status,
                    str(data.get("reason") or rsp.reason),
                    str(data.get("message") or ""),
                )
            return await rsp.json(content_type=None)

    # ---- verbs ----

    async def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> dict[str, Any] | None:
        try:
            return await self.request("GET", _path(api_version, plural_of(kind), namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def create(self, obj: dict[str, Any]) -> dict[str, Any] | None:
        """Create if absent: the created object as the server returned it, or None when it
        already exists (HTTP 409)."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], plural_of(obj["kind"]), meta.get("namespace"))
        try:
            created = await self.request("POST", path, body=obj)
        except ApiError as e:
            if e.status == 409:
                return None
            raise
        return created if isinstance(created, dict) else dict(obj)

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        patch: dict[str, Any],
        *,
        status: bool = False,
    ) -> dict[str, Any] | None:
        path = _path(api_version, plural_of(kind), namespace, name, "status" if status else None)
        try:
            return await self.request(
                "PATCH", path, body=patch, content_type="application/merge-patch+json"
            )
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def delete(
        self, api_version: str, kind: str, namespace: str, name: str, *, background: bool = True
    ) -> bool:
        path = _path(api_version, plural_of(kind), namespace, name)
        body = {
            "kind": "DeleteOptions",
            "apiVersion": "v1",
            "propagationPolicy": "Background" if background else "Orphan",
        }
        try:
            await self.request("DELETE", path, body=body)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def post_event(
        self, involved: dict[str, Any], type_: str, reason: str, message: str
    ) -> None:
        """A core/v1 Event on `involved` (an object body); `kubectl describe ctr` shows them."""
        meta = involved["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                # Unique without the server's generateName support (the emulator in tests lacks it).
                "name": f"{meta['name']}.{datetime.now(UTC).strftime('%Y%m%d%H%M%S%f')}{next(self._names):04d}",
                "namespace": meta["namespace"],
            },
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": "coda-operator"},
            "reportingComponent": "coda-operator",
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        event["involvedObject"] = {
            k: v for k, v in event["involvedObject"].items() if v is not None
        }
        await self.create(event)


async def gather_limited(coros: list[Awaitable[Any]], limit: int = 8) -> list[Any]:
    sem = asyncio.Semaphore(limit)

    async def one(c: Awaitable[Any]) -> Any:
        async with sem:
            return await c

    return await asyncio.gather(*(one(c) for c in coros), return_exceptions=True)
