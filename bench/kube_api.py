"""A lean in-memory Kubernetes API server (aiohttp) for the operator benchmark.

kmock's emulator (the operator tests' API server) spent ~2.5× the operator's CPU in the benchmark
(55 s against 22 s for 200 runs): it matches each request against its reactions in Python and
keeps a per-request record. Measuring the operator needs an API server that is not the bottleneck,
so this one does only what the operator and kopf use, each in O(1) or one pass:

- discovery (/api, /apis, /api/v1, /apis/<group>/<version>) for the resources of
  tests/operator/operator_testkit.RESOURCES;
- list and watch (namespaced or all namespaces; `labelSelector` with `k` and `k=v` terms; a watch
  from an older resourceVersion replays the events it missed, 410 Gone past the kept history);
- get, create (409 on an existing name; uid, creationTimestamp, generation, resourceVersion,
  generateName, Secret stringData), JSON merge patch of the object or its /status subresource
  (status and the rest kept apart, generation bumped on spec changes), delete (finalizers respected);
- `/bench/log?since=N`: every request as (User-Agent, method, plural, action, name) with its
  arrival time on this process's clock, and `/bench/phases`: CodaTrainingRuns counted by phase.

It has no admission, validation, garbage collection or controllers: the driver plays the JobSet
controller. Not for tests of the operator's correctness (they use kmock's fuller emulator).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import itertools
import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp.web

HISTORY = 50_000  # events kept per resource for watches that start from an older resourceVersion


def _status(code: int, reason: str, message: str) -> aiohttp.web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code}
    return aiohttp.web.json_response({**body, "reason": reason, "message": message}, status=code)


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 JSON merge patch, in place."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v) if isinstance(v, dict | list) else v


def _selector(text: str | None) -> list[tuple[str, str | None]]:
    terms = []
    for term in filter(None, (text or "").split(",")):
        key, eq, value = term.partition("=")
        terms.append((key.strip(), value.strip() if eq else None))
    return terms


def _matches(obj: dict[str, Any], ns: str | None, terms: list[tuple[str, str | None]]) -> bool:
    meta = obj["metadata"]
    if ns is not None and meta.get("namespace") != ns:
        return False
    labels = meta.get("labels") or {}
    return all(k in labels if v is None else labels.get(k) == v for k, v in terms)


class Resource:
    def __init__(self, key: str, info: dict[str, Any]):
        parts = key.split("/")
        self.group, self.version, self.plural = ("", *parts) if len(parts) == 2 else parts
        self.api_version = f"{self.group}/{self.version}" if self.group else self.version
        self.kind: str = info["kind"]
        self.namespaced: bool = info["namespaced"]
        self.verbs = sorted(info.get("verbs") or ())
        self.short_names = sorted(info.get("shortnames") or ())
        self.has_status = "status" in (info.get("subresources") or ())
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.history: collections.deque[tuple[int, bytes, dict[str, Any]]] = collections.deque(
            maxlen=HISTORY
        )
        self.watchers: set[tuple[str | None, Any, asyncio.Queue[tuple[bytes, dict[str, Any]]]]] = (
            set()
        )

    def discovery(self) -> list[dict[str, Any]]:
        out = [
            {
                "name": self.plural,
                "singularName": self.kind.lower(),
                "kind": self.kind,
                "namespaced": self.namespaced,
                "verbs": self.verbs,
                "shortNames": self.short_names,
            }
        ]
        if self.has_status:
            out.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "kind": self.kind,
                    "namespaced": self.namespaced,
                    "verbs": ["get", "patch", "update"],
                }
            )
        return out


class KubeApi:
    def __init__(self, resources: dict[str, dict[str, Any]]):
        self.resources = {}
        for key, info in resources.items():
            r = Resource(key, info)
            self.resources[(r.group, r.version, r.plural)] = r
        self._rv = itertools.count(1)
        self.rv = 0
        self.log: list[tuple[str, str, str | None, str | None, str | None]] = []
        self.arrived: list[float] = []
        self.stopping = asyncio.Event()

    def resource(self, plural: str) -> Resource:
        return next(r for r in self.resources.values() if r.plural == plural)

    # ---------------------------------------------------------------------------------- storage

    def _next_rv(self) -> str:
        self.rv = next(self._rv)
        return str(self.rv)

    def _emit(self, r: Resource, type_: str, obj: dict[str, Any]) -> None:
        line = json.dumps({"type": type_, "object": obj}).encode() + b"\n"
        r.history.append((self.rv, line, obj))
        for ns, terms, queue in r.watchers:
            if _matches(obj, ns, terms):
                queue.put_nowait((line, obj))

    def create(self, r: Resource, ns: str | None, body: dict[str, Any]) -> aiohttp.web.Response:
        meta = body.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        name = meta.get("name")
        if not name:
            return _status(422, "Invalid", "metadata.name: Required value")
        ns = ns or meta.get("namespace") if r.namespaced else None
        if (ns or "", name) in r.objects:
            return _status(409, "AlreadyExists", f'{r.plural} "{name}" already exists')
        if r.plural == "secrets" and "stringData" in body:
            encoded = {
                k: base64.b64encode(v.encode()).decode() for k, v in body.pop("stringData").items()
            }
            body["data"] = {**(body.get("data") or {}), **encoded}
        if r.has_status:
            body.pop("status", None)
        if ns:
            meta["namespace"] = ns
        meta.update(
            uid=str(uuid.uuid4()),
            creationTimestamp=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            generation=1,
            resourceVersion=self._next_rv(),
        )
        body.setdefault("apiVersion", r.api_version)
        body.setdefault("kind", r.kind)
        r.objects[(ns or "", name)] = body
        self._emit(r, "ADDED", body)
        return aiohttp.web.json_response(body, status=201)

    def patch(
        self, r: Resource, ns: str | None, name: str, sub: str | None, patch: dict[str, Any]
    ) -> aiohttp.web.Response:
        obj = r.objects.get((ns or "", name))
        if obj is None:
            return _status(404, "NotFound", f'{r.plural} "{name}" not found')
        if sub == "status":
            _merge(obj, {"status": patch.get("status")} if "status" in patch else {})
        else:
            patch = dict(patch)
            if r.has_status:
                patch.pop("status", None)
            meta_patch = dict(patch.get("metadata") or {})
            for k in ("uid", "creationTimestamp", "generation", "resourceVersion", "namespace"):
                meta_patch.pop(k, None)
            patch["metadata"] = meta_patch
            spec_before = json.dumps(obj.get("spec"), sort_keys=True) if "spec" in patch else None
            _merge(obj, patch)
            if (
                spec_before is not None
                and json.dumps(obj.get("spec"), sort_keys=True) != spec_before
            ):
                obj["metadata"]["generation"] = obj["metadata"].get("generation", 1) + 1
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if obj["metadata"].get("deletionTimestamp") and not obj["metadata"].get("finalizers"):
            del r.objects[(ns or "", name)]
            self._emit(r, "DELETED", obj)
        else:
            self._emit(r, "MODIFIED", obj)
        return aiohttp.web.json_response(obj)

    def delete(self, r: Resource, ns: str | None, name: str) -> aiohttp.web.Response:
        obj = r.objects.get((ns or "", name))
        if obj is None:
            return _status(404, "NotFound", f'{r.plural} "{name}" not found')
        obj["metadata"]["resourceVersion"] = self._next_rv()
        if obj["metadata"].get("finalizers"):
            obj["metadata"].setdefault(
                "deletionTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            )
            self._emit(r, "MODIFIED", obj)
        else:
            del r.objects[(ns or "", name)]
            self._emit(r, "DELETED", obj)
        return aiohttp.web.json_response(obj)

    # ---------------------------------------------------------------------------------- HTTP

    async def handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        path = request.path.rstrip("/")
        if path.startswith("/bench/"):
            return self._bench(path, request)
        segments = path.split("/")[1:]
        if segments == ["api"]:
            return aiohttp.web.json_response({"kind": "APIVersions", "versions": ["v1"]})
        if segments == ["apis"]:
            return aiohttp.web.json_response({"kind": "APIGroupList", "groups": self._groups()})
        if segments[:1] == ["api"]:
            group, version, rest = "", segments[1] if len(segments) > 1 else "", segments[2:]
        elif segments[:1] == ["apis"] and len(segments) >= 3:
            group, version, rest = segments[1], segments[2], segments[3:]
        else:
            return _status(404, "NotFound", f"no route {path}")
        if not rest:
            resources = [
                d
                for r in self.resources.values()
                if (r.group, r.version) == (group, version)
                for d in r.discovery()
            ]
            if not resources:
                return _status(404, "NotFound", f"no group/version {group}/{version}")
            gv = f"{group}/{version}" if group else version
            return aiohttp.web.json_response(
                {"kind": "APIResourceList", "groupVersion": gv, "resources": resources}
            )
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        r = self.resources.get((group, version, rest[0]))
        if r is None:
            return _status(404, "NotFound", f"the server could not find the resource {path}")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        method = request.method
        watch = request.query.get("watch") in ("true", "1")
        action = {
            "GET": "watch" if watch else ("fetch" if name else "list"),
            "POST": "create",
            "PATCH": "update",
            "PUT": "update",
            "DELETE": "delete",
        }.get(method)
        body = await request.json() if method in ("POST", "PATCH", "PUT") else None
        if method == "POST" and isinstance(body, dict):
            name = (body.get("metadata") or {}).get("name")
        self.log.append((request.headers.get("User-Agent", ""), method, r.plural, action, name))
        self.arrived.append(time.perf_counter())
        if method == "GET" and watch:
            return await self._watch(request, r, ns)
        if method == "GET" and name is None:
            terms = _selector(request.query.get("labelSelector"))
            items = [o for o in r.objects.values() if _matches(o, ns, terms)]
            return aiohttp.web.json_response(
                {
                    "kind": f"{r.kind}List",
                    "apiVersion": r.api_version,
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )
        if method == "GET":
            obj = r.objects.get((ns or "", name))
            if obj is None:
                return _status(404, "NotFound", f'{r.plural} "{name}" not found')
            return aiohttp.web.json_response(obj)
        if method == "POST":
            return self.create(r, ns, body)
        if method == "PATCH" and name:
            if not isinstance(body, dict):  # JSON Patch (kopf's finalizer edits): not implemented
                return _status(415, "UnsupportedMediaType", "only JSON merge patches")
            return self.patch(r, ns, name, sub, body)
        if method == "DELETE" and name:
            return self.delete(r, ns, name)
        return _status(405, "MethodNotAllowed", f"{method} {path}")

    def _groups(self) -> list[dict[str, Any]]:
        groups: dict[str, list[str]] = {}
        for r in self.resources.values():
            if r.group and r.version not in groups.setdefault(r.group, []):
                groups[r.group].append(r.version)
        return [
            {
                "name": g,
                "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in versions],
                "preferredVersion": {"groupVersion": f"{g}/{versions[0]}", "version": versions[0]},
            }
            for g, versions in groups.items()
        ]

    async def _watch(
        self, request: aiohttp.web.Request, r: Resource, ns: str | None
    ) -> aiohttp.web.StreamResponse:
        terms = _selector(request.query.get("labelSelector"))
        since = int(request.query.get("resourceVersion") or 0)
        timeout = float(request.query.get("timeoutSeconds") or 3600)
        if since and r.history and r.history[0][0] > since + 1 and len(r.history) == HISTORY:
            return _status(410, "Expired", f"too old resource version: {since}")
        queue: asyncio.Queue[tuple[bytes, dict[str, Any]]] = asyncio.Queue()
        if since:  # replay what happened after the client's list
            for rv, line, obj in r.history:
                if rv > since and _matches(obj, ns, terms):
                    queue.put_nowait((line, obj))
        watcher = (ns, tuple(terms), queue)
        r.watchers.add(watcher)  # type: ignore[arg-type]
        rsp = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await rsp.prepare(request)
        deadline = time.monotonic() + timeout
        try:
            while not self.stopping.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    line, _ = await asyncio.wait_for(queue.get(), left)
                except TimeoutError:
                    break
                chunk = [line]
                while not queue.empty():  # a burst goes out as one write
                    chunk.append(queue.get_nowait()[0])
                await rsp.write(b"".join(chunk))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            r.watchers.discard(watcher)  # type: ignore[arg-type]
        return rsp

    def _bench(self, path: str, request: aiohttp.web.Request) -> aiohttp.web.Response:
        if path == "/bench/log":
            since = int(request.query.get("since", "0"))
            return aiohttp.web.json_response(
                {"log": self.log[since:], "arrived": self.arrived[since:]}
            )
        if path == "/bench/phases":
            phases: collections.Counter[str] = collections.Counter()
            for obj in self.resource("codatrainingruns").objects.values():
                phases[(obj.get("status") or {}).get("phase") or "-"] += 1
            return aiohttp.web.json_response(phases)
        return _status(404, "NotFound", path)


async def serve(api: KubeApi, port: int) -> aiohttp.web.AppRunner:
    server = aiohttp.web.Server(api.handle)  # type: ignore[arg-type]
    runner = aiohttp.web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    await aiohttp.web.TCPSite(runner, "127.0.0.1", port).start()
    return runner
