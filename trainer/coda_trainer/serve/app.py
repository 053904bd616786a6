"""The HTTP API: OpenAI-compatible completions and chat, infilling, health, readiness, metrics.

Errors always come back in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with
OpenAI's (and vLLM's) statuses: 400 for any invalid request (malformed body, wrong type, out of
range, an unsupported parameter, a prompt too long for this server), 404 for a `model` this server
does not serve, 401 without a valid bearer token, 503 while the queue is full or the server is
stopping, 500 if a model call fails — which fails only the requests in that batch.

Usage counts the tokens of the text returned: after the eos/max_tokens cut and after a stop
string's cut (the fewest generated tokens whose text covers what is returned).

Streaming (`stream: true`) sends server-sent events in OpenAI's chunk format and ends with
`data: [DONE]` (with `stream_options.include_usage`, a usage chunk before it). A revealed token
never changes, and block decoding (`block_length` below the generation length) finishes blocks left
to right, so after each block the row's settled text is sent as it grows: the first text arrives
after the first block, not at the end. What is sent is never taken back: text that a stop string
could still claim (its longest length − 1 characters) and a trailing incomplete UTF-8 character
are held back until they are settled, and the concatenated deltas equal the non-streamed answer.
Whole-sequence decoding (one block) reports up to 16 times inside its block instead: the leading
run of revealed tokens is final, and it is streamed as it grows.

Stopping (`begin_shutdown`, called by the server as soon as it starts shutting down): new requests
get 503 `shutting_down`, /readyz turns 503, warm-up stops at its next program boundary, queued and
running requests keep going for `drain_s` seconds and whatever is still unanswered then gets 503
`shutting_down` (an in-band error event if its stream had started).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from coda_trainer.serve import schemas as S
from coda_trainer.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown
from coda_trainer.serve.engine import Engine, EngineError, Row, WarmupAbandoned, request_seed
from coda_trainer.serve.metrics import CONTENT_TYPE_LATEST, ServeMetrics

__all__ = ["create_app"]

log = logging.getLogger("coda.serve")

_OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}


def _error(
    status: int, message: str, type_: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    body = S.ErrorResponse(error=S.ErrorBody(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = loc[0] if loc else None  # the top-level field, as OpenAI reports it
    msg = "; ".join(
        f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
        for e in errors
    )
    return _error(400, msg or "invalid request", "invalid_request_error", param, "invalid_value")


class ClientGone(Exception):
    """The client disconnected before its rows ran; nobody reads the answer."""


async def _client_gone(request: Request) -> None:
    """Returns once the client has disconnected (checked every 0.2 s)."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


class UnknownModel(EngineError):
    """`model` names something this server does not serve (HTTP 404, as OpenAI and vLLM)."""


class _TextStream:
    """What of one row's answer may be sent before the row is done (see the module docstring)."""

    def __init__(self, svc: _Service, max_tokens: int, stops: list[str] | None) -> None:
        self.svc, self.max_tokens, self.stops = svc, max_tokens, stops
        self.hold = max((len(s) for s in stops or ()), default=1) - 1
        self.sent = ""

    def delta(self, settled_ids: list[int]) -> str:
        """New sendable text, given the row's settled tokens so far."""
        text, reason, _ = self.svc.finish(settled_ids, self.max_tokens, self.stops)
        if reason != "stop":  # not cut at eos or a stop string: its end may still change
            text = text[: len(text) - self.hold].rstrip("\ufffd")
        return self._advance(text)

    def rest(self, final_text: str) -> str:
        """The part of the finished answer not sent yet."""
        if not final_text.startswith(self.sent):  # a decoder that rewrites earlier text
            log.warning("streamed text is not a prefix of the answer; sending only its tail")
            return final_text[len(self.sent) :]
        return self._advance(final_text)

    def _advance(self, text: str) -> str:
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


async def _progressive(
    svc: _Service, key: Any, rows: list[Row], request: Request, max_tokens: int,
    stops: list[str] | None,
) -> AsyncIterator[tuple[int, str] | list[tuple[str, str, int]]]:  # fmt: skip
    """Run a request's rows; yield (row, text delta) as blocks finish, then, last, each row's
    (rest of the text, finish reason, completion tokens)."""
    loop = asyncio.get_running_loop()
    updates: asyncio.Queue[tuple[int, list[int]]] = asyncio.Queue()

    def on_settled(i: int, ids: list[int]) -> None:  # a runtime thread
        loop.call_soon_threadsafe(updates.put_nowait, (i, ids))

    streaming = [
        dataclasses.replace(r, on_settled=functools.partial(on_settled, i))
        for i, r in enumerate(rows)
    ]
    texts = [_TextStream(svc, max_tokens, stops) for _ in rows]
    task = asyncio.ensure_future(svc.run_rows(key, streaming, request))
    try:
        while not task.done():
            getter = asyncio.ensure_future(updates.get())
            await asyncio.wait({task, getter}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                break
            i, ids = getter.result()
            if delta := texts[i].delta(ids):
                yield i, delta
        done = [svc.finish(o, max_tokens, stops) for o in task.result()]
        svc.metrics.generated_tokens.inc(sum(n for _, _, n in done))
        yield [(texts[i].rest(text), reason, n) for i, (text, reason, n) in enumerate(done)]
    finally:
        task.cancel()


class _Service:
    """Per-app state: engine, batcher, metrics, settings."""

    def __init__(self, engine: Engine, api_key: str | None):
        self.engine = engine
        self.api_key = api_key
        self.metrics = ServeMetrics()
        settings = engine.settings
        self.batcher: DynamicBatcher = DynamicBatcher(
            engine.run_batch,
            max_batch=settings.max_batch,
            max_wait_s=settings.max_wait_ms / 1000.0,
            max_queue=settings.max_queue,
            on_queue_depth=self.metrics.queue_depth.set,
        )
        engine.on_batch_tokens = lambda rows, seconds, tokens: self.metrics.observe_batch(
            rows, seconds, tokens
        )
        self.started = time.time()
        self.warmup_error: str | None = None
        self.stopping = False

    def begin_shutdown(self, drain_s: float) -> None:
        """Refuse new work now; fail what is still unanswered after `drain_s` seconds. Call it
        from the event loop's thread; a second call changes nothing."""
        if self.stopping:
            return
        self.stopping = True
        self.metrics.ready.set(0)
        self.engine.stop_warmup.set()
        self.batcher.close()
        log.info("stopping: new requests get 503; unfinished requests get 503 after %gs", drain_s)
        error = ShuttingDown(
            f"server is shutting down: this request did not finish within the {drain_s:g}s "
            "graceful timeout"
        )

        def abort() -> None:
            if failed := self.batcher.abort_pending(error):
                log.warning("graceful timeout: failed %d unfinished request(s) with 503", failed)

        asyncio.get_running_loop().call_later(drain_s, abort)

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # ---- generation helpers ----

    async def encode_prompt(self, prompt: str | list[int], param: str) -> list[int]:
        """Token ids of a prompt, tokenized off the event loop (probes stay answered) once its
        length shows it can fit."""
        if isinstance(prompt, str):
            self.engine.check_prompt_text(prompt, param)
            ids = await asyncio.to_thread(self.tokenizer.encode, prompt)
        else:
            ids = list(prompt)
        self.engine.check_prompt(ids, param)
        return ids

    def check_model(self, model: str | None) -> None:
        names = self.engine.settings.served_names
        if model is not None and model not in names:
            raise UnknownModel(
                f"the model {model!r} does not exist on this server; it serves {sorted(names)}",
                "model", "model_not_found",
            )  # fmt: skip

    def finish(
        self, ids: Sequence[int], max_tokens: int, stops: list[str] | None
    ) -> tuple[str, str, int]:
        """(text, finish_reason, completion tokens) of one generated row."""
        ids = list(ids[:max_tokens])
        kept = self.engine.cut_at_stop(ids)
        reason = "stop" if len(kept) < len(ids) else "length"
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        cut = min((i for s in stops or () if (i := text.find(s)) >= 0), default=None)
        if cut is None:
            return text, reason, len(kept)
        return text[:cut], "stop", self._tokens_covering(kept, cut)

    def _tokens_covering(self, ids: list[int], n_chars: int) -> int:
        """The fewest leading tokens of `ids` whose text is at least `n_chars` long."""
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(self.tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= n_chars:
                hi = mid
            else:
                lo = mid + 1
        return lo

    async def run_rows(self, key: Any, rows: list[Row], request: Request) -> list[list[int]]:
        """Queue every row of a request, all or none; if one fails, the request is cancelled or
        its client disconnects, its other rows leave the queue unrun."""
        self.batcher.check_room(len(rows))
        tasks = [asyncio.ensure_future(self.batcher.submit(key, r)) for r in rows]
        results = asyncio.gather(*tasks)
        watcher = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not results.done():
                raise ClientGone
            return list(results.result())
        finally:
            watcher.cancel()
            for t in tasks:
                t.cancel()  # no-op for finished ones; cancelled rows are never run
            if not results.done():
                results.cancel()


class AuthAndMetrics:
    """ASGI middleware: the API key on every path but the probes, and per-route request metrics."""

    def __init__(self, app: Any, service: _Service) -> None:
        self.app = app
        self.svc = service

    def _authorized(self, scope: Any) -> bool:
        if not self.svc.api_key or scope["path"] in _OPEN_PATHS:
            return True
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        # `api-key` too (Azure OpenAI's header): the Kubernetes API server's service proxy
        # strips `Authorization`, which carries the caller's cluster credentials.
        header = headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        token = token or headers.get("api-key", "")
        return hmac.compare_digest(token.encode(), self.svc.api_key.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 500
        started = False

        async def recording_send(message: Any) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
            await send(message)

        if not self._authorized(scope):
            response = _error(
                401, "missing or invalid API key (send Authorization: Bearer <key> or api-key: <key>)",
                "invalid_request_error", None, "invalid_api_key",
            )  # fmt: skip
            await response(scope, receive, recording_send)
        else:
            try:
                await self.app(scope, receive, recording_send)
            except Exception as e:  # errors escaping the handlers still answer in OpenAI's shape
                log.exception("unhandled error")
                if not started:
                    response = _error(500, f"internal error: {type(e).__name__}", "server_error")
                    await response(scope, receive, recording_send)
        label = getattr(scope.get("route"), "path", None) or "other"
        if scope["path"] != "/metrics":
            self.svc.metrics.requests.labels(label, str(status)).inc()
            self.svc.metrics.latency.labels(label).observe(time.monotonic() - start)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 — at once when its
    Content-Length says so (the body is never read), else as soon as the bytes received pass it."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return _error(
            413, _too_large_message(self.max_bytes), "invalid_request_error", None,
            "request_too_large",
        )  # fmt: skip

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # An HTTPException passes FastAPI's body parsing unchanged: the app's handler
                    # answers 413.
                    raise StarletteHTTPException(413, _too_large_message(self.max_bytes))
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except StarletteHTTPException as e:  # read outside a route (none today): answer here
            if e.status_code != 413 or started:
                raise
            await self._too_large()(scope, receive, send)


def _too_large_message(max_bytes: int) -> str:
    return f"the request body is larger than this server's limit, {max_bytes} bytes"


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _sse_error_and_done(e: Exception) -> str:
    """A failure after the headers went out can only be reported in-band, then the stream ends."""
    error = {"message": str(e), "type": "server_error", "param": None, "code": None}
    return _sse({"error": error}) + "data: [DONE]\n\n"


# ---- the app: state on app.state, routes and error handlers at module level ----

router = APIRouter()


def _service(request: Request) -> _Service:
    return request.app.state.service


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: _Service = app.state.service
    await svc.batcher.start()
    task = asyncio.create_task(_warm_up(svc, app.state.warmup))
    try:
        yield
    finally:
        # Warm-up runs on the model thread: cancelling the task frees the event loop, the
        # event makes the thread give up at its next program boundary.
        svc.engine.stop_warmup.set()
        task.cancel()
        await svc.batcher.stop(drain_timeout_s=0 if svc.stopping else 30.0)
        busy = " (a model call is still running; it is abandoned)" if svc.batcher.model_busy else ""
        log.info("coda sampler stopped: queue drained, batcher closed%s", busy)


# ---- errors ----


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    return _validation_error(exc)


async def _on_engine(request: Request, exc: EngineError) -> JSONResponse:
    status = 404 if isinstance(exc, UnknownModel) else 400
    return _error(status, str(exc), "invalid_request_error", exc.param, exc.code)


async def _on_gone(request: Request, exc: ClientGone) -> Response:
    return Response(status_code=499)  # nginx's "client closed request": only metrics see it


async def _on_full(request: Request, exc: QueueFull) -> JSONResponse:
    return _error(503, str(exc), "server_overloaded", None, "queue_full")


async def _on_stop(request: Request, exc: ShuttingDown) -> JSONResponse:
    return _error(503, str(exc), "server_unavailable", None, "shutting_down")


async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None
    return _error(exc.status_code, str(exc.detail), type_, None, code)


async def _on_crash(request: Request, exc: Exception) -> JSONResponse:
    log.exception("request failed")
    return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")


EXCEPTION_HANDLERS: dict[Any, Any] = {
    RequestValidationError: _on_validation,
    EngineError: _on_engine,
    ClientGone: _on_gone,
    QueueFull: _on_full,
    ShuttingDown: _on_stop,
    StarletteHTTPException: _on_http,
    Exception: _on_crash,
}


# ---- probes ----


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    svc = _service(request)
    body = {
        "ready": svc.engine.ready and not svc.stopping,
        "warmup_seconds": svc.engine.warmup_seconds,
        "error": svc.warmup_error,
        "stopping": svc.stopping,
    }
    return JSONResponse(body, status_code=200 if body["ready"] else 503)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_service(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/models")
async def models(request: Request) -> S.ModelList:
    svc = _service(request)
    model = S.ModelCard(id=svc.engine.settings.model_name, created=int(svc.started))
    return S.ModelList(data=[model])


# ---- generation ----


async def _results(
    svc: _Service, key: Any, rows: list[Row], request: Request, max_tokens: int,
    stops: list[str] | None,
) -> list[tuple[str, str, int]]:  # fmt: skip
    """Run a request's rows; each row's (text, finish reason, completion tokens)."""
    outs = await svc.run_rows(key, rows, request)
    done = [svc.finish(o, max_tokens, stops) for o in outs]
    svc.metrics.generated_tokens.inc(sum(d[2] for d in done))
    return done


@dataclasses.dataclass
class _StreamJob:
    """What a streamed generation needs: the rows to run and how to frame each chunk."""

    svc: _Service
    request: Request
    key: Any
    rows: list[Row]
    max_tokens: int
    stops: list[str] | None
    include_usage: bool
    prompt_tokens: int
    base: dict[str, Any]  # id, object, created, model of every chunk
    preamble: list[str]  # chunks sent before any text (echo, the assistant role)
    text_chunk: Callable[[int, str], str]
    end_chunk: Callable[[int, str], str]


async def _sse_events(job: _StreamJob) -> AsyncIterator[str]:
    """Server-sent events of a streamed completion or chat: text as it settles, each row's finish
    reason, the usage chunk if asked, `[DONE]`; an error after the start goes in-band."""
    for chunk in job.preamble:
        yield chunk
    done: list[tuple[str, str, int]] = []
    try:
        async for event in _progressive(
            job.svc, job.key, job.rows, job.request, job.max_tokens, job.stops
        ):
            if isinstance(event, tuple):
                yield job.text_chunk(*event)
            else:
                done = event
    except Exception as e:
        yield _sse_error_and_done(e)
        return
    for i, (rest, reason, _) in enumerate(done):
        if rest:
            yield job.text_chunk(i, rest)
        yield job.end_chunk(i, reason)
    if job.include_usage:
        ct = sum(d[2] for d in done)
        usage = {
            "prompt_tokens": job.prompt_tokens,
            "completion_tokens": ct,
            "total_tokens": job.prompt_tokens + ct,
        }
        yield _sse({**job.base, "choices": [], "usage": usage})
    yield "data: [DONE]\n\n"


@router.post("/v1/completions", response_model=None)
async def completions(req: S.CompletionRequest, request: Request) -> Any:
    svc = _service(request)
    engine, model_name = svc.engine, svc.engine.settings.model_name
    if req.suffix is not None:
        raise EngineError("use /v1/infill for prefix + suffix requests", "suffix")
    svc.check_model(req.model)
    max_tokens = req.max_tokens or engine.settings.default_max_tokens
    key = engine.generate_key(req, max_tokens)
    prompts = req.prompts()
    engine.check_rows(len(prompts) * req.n)
    ids = [await svc.encode_prompt(p, "prompt") for p in prompts]
    seed = request_seed(req.seed)
    rows = [Row(p, seed=(seed, i * req.n + j)) for i, p in enumerate(ids) for j in range(req.n)]
    svc.metrics.prompt_tokens.inc(sum(len(p) for p in ids) * req.n)
    cid, created = S.new_id("cmpl"), S.now()
    echo = [
        (p if isinstance(p, str) else svc.tokenizer.decode(p)) if req.echo else "" for p in prompts
    ]
    prompt_tokens = sum(len(p) for p in ids)
    if not req.stream:
        done = await _results(svc, key, rows, request, max_tokens, req.stop)
        choices = [
            S.CompletionChoice(index=i, text=echo[i // req.n] + text, finish_reason=reason)
            for i, (text, reason, _) in enumerate(done)
        ]
        completion_tokens = sum(d[2] for d in done)
        return S.CompletionResponse(
            id=cid, created=created, model=model_name, choices=choices,
            usage=S.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          total_tokens=prompt_tokens + completion_tokens),
        )  # fmt: skip

    base = {"id": cid, "object": "text_completion", "created": created, "model": model_name}

    def chunk(i: int, text: str, reason: str | None = None) -> str:
        choice = {"index": i, "text": text, "logprobs": None, "finish_reason": reason}
        return _sse({**base, "choices": [choice]})

    job = _StreamJob(
        svc, request, key, rows, max_tokens, req.stop, req.include_usage, prompt_tokens, base,
        preamble=[chunk(i, echo[i // req.n]) for i in range(len(rows)) if echo[i // req.n]],
        text_chunk=chunk, end_chunk=lambda i, reason: chunk(i, "", reason),
    )  # fmt: skip
    return StreamingResponse(_sse_events(job), media_type="text/event-stream")


@router.post("/v1/chat/completions", response_model=None)
async def chat(req: S.ChatCompletionRequest, request: Request) -> Any:
    svc = _service(request)
    engine, model_name = svc.engine, svc.engine.settings.model_name
    svc.check_model(req.model)
    max_tokens = req.max_new or engine.settings.default_max_tokens
    key = engine.generate_key(req, max_tokens)
    messages = [
        {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        for m in req.messages
    ]
    engine.check_rows(req.n)
    engine.check_prompt_text("".join(m["content"] for m in messages), "messages")
    try:
        ids = await asyncio.to_thread(svc.tokenizer.chat_ids, messages, add_generation_prompt=True)
    except ValueError as e:
        raise EngineError(str(e), "messages") from e
    engine.check_prompt(ids, "messages")
    seed = request_seed(req.seed)
    rows = [Row(ids, seed=(seed, j)) for j in range(req.n)]
    svc.metrics.prompt_tokens.inc(len(ids) * req.n)
    cid, created = S.new_id("chatcmpl"), S.now()

    if not req.stream:
        done = await _results(svc, key, rows, request, max_tokens, req.stop)
        ct = sum(d[2] for d in done)
        return S.ChatCompletionResponse(
            id=cid, created=created, model=model_name,
            choices=[S.ChatChoice(index=i, message=S.AssistantMessage(content=t), finish_reason=r)
                     for i, (t, r, _) in enumerate(done)],
            usage=S.Usage(prompt_tokens=len(ids), completion_tokens=ct, total_tokens=len(ids) + ct),
        )  # fmt: skip

    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model_name}

    def chunk(i: int, delta: dict[str, str], reason: str | None = None) -> str:
        choice = {"index": i, "logprobs": None, "finish_reason": reason, "delta": delta}
        return _sse({**base, "choices": [choice]})

    job = _StreamJob(
        svc, request, key, rows, max_tokens, req.stop, req.include_usage, len(ids), base,
        preamble=[chunk(i, {"role": "assistant", "content": ""}) for i in range(len(rows))],
        text_chunk=lambda i, text: chunk(i, {"content": text}),
        end_chunk=lambda i, reason: chunk(i, {}, reason),
    )  # fmt: skip
    return StreamingResponse(_sse_events(job), media_type="text/event-stream")


@router.post("/v1/infill")
async def infill(req: S.InfillRequest, request: Request) -> S.InfillResponse:
    svc = _service(request)
    engine = svc.engine
    svc.check_model(req.model)
    key = engine.infill_key(req, req.max_tokens)
    engine.check_rows(req.n)
    # The first hole token is predicted from the column before it (logit shift): an empty
    # prefix gets a bos to stand on.
    prefix = await svc.encode_prompt(req.prefix, "prefix") if req.prefix else []
    prefix = prefix or [svc.tokenizer.bos_id]
    suffix = await svc.encode_prompt(req.suffix, "suffix") if req.suffix else []
    engine.check_infill_fits(prefix, suffix, req.max_tokens)
    seed = request_seed(req.seed)
    rows = [Row(prefix, suffix, seed=(seed, j)) for j in range(req.n)]
    outs = await svc.run_rows(key, rows, request)
    choices = []
    generated = 0
    for i, o in enumerate(outs):
        middle_ids = [t for t in o if t not in engine.stop_ids and t != svc.tokenizer.mask_id]
        middle = svc.tokenizer.decode(middle_ids, skip_special_tokens=True)
        generated += len(middle_ids)
        choices.append(
            S.InfillChoice(index=i, text=req.prefix + middle + req.suffix, infill=middle)
        )
    svc.metrics.generated_tokens.inc(generated)
    pt = len(prefix) + len(suffix)
    return S.InfillResponse(
        id=S.new_id("infill"), created=S.now(), model=engine.settings.model_name, choices=choices,
        usage=S.Usage(prompt_tokens=pt, completion_tokens=generated, total_tokens=pt + generated),
    )  # fmt: skip


def create_app(
    engine: Engine, *, api_key: str | None = None, warmup: bool | None = None
) -> FastAPI:
    """The FastAPI app: the module's routes (`router`) and error handlers over one `_Service`
    (`app.state.service`). Warm-up (compiling the shape buckets) runs in the background after
    start-up; `/readyz` turns 200 when it is done."""
    svc = _Service(engine, api_key)
    app = FastAPI(title="coda sampler", lifespan=_lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.service = svc
    app.state.warmup = engine.settings.warmup if warmup is None else warmup
    # Plain ASGI middlewares (a BaseHTTPMiddleware would hide client disconnects); the last one
    # added is the outermost: AuthAndMetrics wraps BodyLimit.
    app.add_middleware(BodyLimit, max_bytes=engine.settings.max_body_bytes)
    app.add_middleware(AuthAndMetrics, service=svc)
    app.include_router(router)
    return app


async def _warm_up(svc: _Service, do_warmup: bool) -> None:
    """Compile the default shapes, turn ready, then compile the other buckets in the background
    (one program per model-thread call, so batches run between them)."""
    engine = svc.engine
    if not do_warmup:
        engine.ready = True
        svc.metrics.ready.set(1)
        return
    first, rest = engine.warmup_programs()
    start = time.monotonic()
    try:
        for shapes in first:
            await svc.batcher.run_exclusive(functools.partial(engine.compile_program, shapes))
        engine.warmup_seconds = time.monotonic() - start
        engine.ready = True
        svc.metrics.ready.set(1)
        svc.metrics.compile_seconds.set(engine.warmup_seconds)
        log.info(
            "ready: %d default shape bucket(s) compiled in %.1fs; compiling %d more in the "
            "background", len(first), engine.warmup_seconds, len(rest),
        )  # fmt: skip
        for shapes in rest:
            await svc.batcher.run_exclusive(functools.partial(engine.compile_program, shapes))
        log.info(
            "warm-up compiled all %d shape buckets in %.1fs",
            len(first) + len(rest), time.monotonic() - start,
        )  # fmt: skip
    except WarmupAbandoned as e:
        log.info("warm-up abandoned, the server is stopping: %s", e)
    except asyncio.CancelledError:
        # The lifespan cancels this task at shutdown, usually before the model thread has noticed
        # the stop event and raised WarmupAbandoned.
        log.info("warm-up abandoned, the server is stopping")
        raise
    except Exception as e:
        if engine.ready:  # a background compile: the bucket compiles on first use instead
            log.exception("background compile failed")
            return
        svc.warmup_error = f"{type(e).__name__}: {e}"  # up (healthz) but never ready
        log.exception("warm-up failed")
