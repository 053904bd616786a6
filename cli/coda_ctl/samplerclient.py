"""HTTP calls to a sampler service (`python -m coda_trainer.serve`): direct URL or service proxy."""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlparse

from coda_ctl.errors import CtlError, Exit

DEFAULT_PORT = 8000


def post(
    url: str, path: str, body: dict[str, Any], timeout: float = 600.0, api_key: str | None = None
) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    target = url.rstrip("/") + "/" + path.lstrip("/")
    try:
        resp = httpx.post(
            target, json=body, timeout=httpx.Timeout(timeout, connect=5.0), headers=headers
        )
    except httpx.HTTPError as e:
        raise CtlError(f"cannot reach the sampler at {url}: {e}", Exit.ERROR) from e
    if resp.status_code >= 400:
        raise CtlError(
            f"sampler at {url} answered {resp.status_code}: {resp.text[:500]}", Exit.ERROR
        )
    return resp.json()


def wait_ready(url: str, timeout: float, is_alive: Any = None) -> None:
    """Poll `/readyz` until it answers 200; `is_alive()` returning False aborts (server died)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_alive is not None and not is_alive():
            raise CtlError(f"the sampler at {url} exited before it was ready", Exit.ERROR)
        try:
            if httpx.get(url.rstrip("/") + "/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise CtlError(f"the sampler at {url} was not ready after {timeout:.0f}s", Exit.ERROR)


def completion_body(
    prompt: str, max_tokens: int | None, steps: int | None, temperature: float | None, model: str
) -> dict[str, Any]:
    """Only what the user set: the rest is the server's default (`spec.sampler.defaults`)."""
    body: dict[str, Any] = {"model": model, "prompt": prompt}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if steps is not None:
        body["steps"] = steps
    if temperature is not None:
        body["temperature"] = temperature
    return body


def completion_text(reply: dict[str, Any]) -> str:
    try:
        return reply["choices"][0]["text"]
    except (KeyError, IndexError, TypeError):
        raise CtlError(f"unexpected reply from the sampler: {str(reply)[:300]}") from None


def chat_text(reply: dict[str, Any]) -> str:
    """The assistant's answer in a /v1/chat/completions reply."""
    try:
        return reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CtlError(f"unexpected reply from the sampler: {str(reply)[:300]}") from None


def infill_text(reply: dict[str, Any]) -> str:
    """The generated middle of a /v1/infill reply (`choices[0].infill`; `text` is the whole file)."""
    choices = reply.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0].get("infill"), str):
        return choices[0]["infill"]
    raise CtlError(f"unexpected reply from the sampler: {str(reply)[:300]}")


def service_of(run: dict[str, Any]) -> tuple[str, int]:
    """(service name, port) of a run's sampler, from status.sampler.endpoint or the naming contract."""
    from coda_ctl.runstatus import status_of  # the typed status, imported when needed

    name = run["metadata"]["name"]
    sampler = status_of(run).sampler
    endpoint = sampler.endpoint if sampler is not None else None
    if endpoint:
        parsed = urlparse(endpoint)
        host = (parsed.hostname or "").split(".")[0]
        return host or f"{name}-sampler", parsed.port or DEFAULT_PORT
    return f"{name}-sampler", DEFAULT_PORT
