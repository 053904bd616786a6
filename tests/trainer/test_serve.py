"""The sampler service, run as `python -m coda_trainer.serve` in a subprocess on a loopback port.

A tiny random model (test-micro with the project tokenizer's vocabulary) is exported as a HF
folder; its text is gibberish, so the tests check the service's behaviour: OpenAI client
compatibility, streaming = non-streaming text, infill keeps prefix and suffix, validation errors in
OpenAI's shape, batching under concurrency, auth, readiness, graceful shutdown.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from coda_trainer.config import PROJECT_TOKENIZER_IDS, PROJECT_VOCAB_SIZE, ModelConfig
from coda_trainer.serve.batcher import DynamicBatcher, QueueFull, ShuttingDown

REPO = Path(__file__).resolve().parents[2]

# Buckets kept tiny so warm-up compiles 2 programs (batch 8 × prompt 64 × gen {16, 32}).
SERVER_ARGS = [
    "--prompt-buckets", "64", "--gen-buckets", "16,32", "--batch-buckets", "8", "--max-batch", "8",
    "--max-wait-ms", "50", "--steps", "8", "--dtype", "float32", "--default-max-tokens", "16",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from coda_trainer import hf
    from coda_trainer.model import Transformer
    from flax import nnx

    config = ModelConfig.preset(
        "test-micro", vocab_size=PROJECT_VOCAB_SIZE, **PROJECT_TOKENIZER_IDS, attention="xla"
    )
    path = tmp_path_factory.mktemp("serve") / "final"
    hf.save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), str(path))
    return path


class Server:
    def __init__(
        self,
        checkpoint: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        base_args: list[str] = SERVER_ARGS,
    ):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = checkpoint.parent / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "coda_trainer.serve", "--checkpoint", str(checkpoint),
               "--port", str(self.port), "--log-level", "info", *base_args, *extra]  # fmt: skip
        full_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(str(REPO / d) for d in ("trainer", "operator", "cli")),
        }
        full_env.setdefault("JAX_PLATFORMS", "cpu")  # no accelerator probing at start-up
        for name in ("CODA_API_KEY", "CODA_SAMPLER_DEFAULTS"):
            full_env.pop(name, None)
        full_env.update(env or {})
        self._log_file = open(self.log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd, stdout=self._log_file, stderr=subprocess.STDOUT, env=full_env
        )
        self.readyz_before_ready: int | None = None

    def wait_healthy(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                if httpx.get(self.url + "/healthz", timeout=1).status_code == 200:
                    self.readyz_before_ready = httpx.get(
                        self.url + "/readyz", timeout=5
                    ).status_code
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise TimeoutError(f"server not healthy:\n{self.log.read_text()}")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = httpx.get(self.url + "/readyz", timeout=5)
            if r.status_code == 200:
                return
            time.sleep(0.2)
        raise TimeoutError(f"server not ready:\n{self.log.read_text()}")

    def wait_for_log(self, text: str, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log.read_text():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            time.sleep(0.02)
        raise TimeoutError(f"{text!r} never logged:\n{self.log.read_text()}")

    def terminate(self, timeout: float = 30.0) -> tuple[int, float]:
        """SIGTERM; (exit status, seconds from the signal to the exit). Killed after `timeout`."""
        start = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode, time.monotonic() - start

    def stop(self) -> int:
        """SIGTERM; returns 0 for a graceful shutdown (exit status 0 after the lifespan's end)."""
        rc, _ = self.terminate()
        graceful = "coda sampler stopped" in self.log.read_text()
        return 0 if rc == 0 and graceful else (rc or -1)


@pytest.fixture(scope="module")
def server(checkpoint: Path):
    srv = Server(checkpoint)
    try:
        srv.wait_healthy()
        srv.wait_ready()
        yield srv
    finally:
        rc = srv.stop()
    assert rc == 0, f"server did not shut down cleanly (exit {rc}):\n{srv.log.read_text()}"


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60
    )


# --------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------


def test_readyz_is_false_until_the_buckets_are_compiled(server: Server) -> None:
    # The fixture saw /healthz answer while warm-up was still compiling.
    assert server.readyz_before_ready == 503
    body = httpx.get(server.url + "/readyz").json()
    assert body["ready"] is True and body["warmup_seconds"] > 0
    # Ready once the default shape (gen 16) is compiled; gen 32 follows in the background.
    server.wait_for_log("warm-up compiled all 2 shape buckets")
    log = server.log.read_text()
    assert "ready: 1 default shape bucket(s) compiled" in log, log


def test_models_lists_the_checkpoint(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == ["final"]


# --------------------------------------------------------------------------------------------------
# OpenAI client: completions, chat, streaming
# --------------------------------------------------------------------------------------------------


def test_completions_with_the_openai_client(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="final", prompt=["def add(a, b):", "import os"], max_tokens=10, n=2
    )
    assert r.object == "text_completion" and len(r.choices) == 4
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") and isinstance(c.text, str) for c in r.choices)
    # Greedy decoding: the n copies of one prompt agree, and batch-mates do not change a row.
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert 0 < r.usage.completion_tokens <= 40 and r.usage.prompt_tokens > 0


def test_chat_with_the_openai_client(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="final", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        max_tokens=12,
    )  # fmt: skip
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and isinstance(
        r.choices[0].message.content, str
    )
    assert r.usage.completion_tokens <= 12


def test_streamed_completion_equals_the_plain_one(client: openai.OpenAI) -> None:
    kwargs = dict(model="final", prompt="class Stack:", max_tokens=16)
    plain = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert len(chunks) >= 2
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def _sse_events(url: str, body: dict) -> list[tuple[float, dict]]:
    """(arrival seconds, event) of a streamed request, read as it arrives."""
    out = []
    start = time.monotonic()
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append((time.monotonic() - start, json.loads(line[6:])))
    return out


@pytest.mark.parametrize("block_length", [4, None], ids=["blocks", "whole-sequence"])
@pytest.mark.parametrize("stop", [None, ["\n\n"]])
def test_decoding_streams_its_settled_text_as_it_grows(server: Server, stop, block_length) -> None:
    """Four blocks of 4 tokens (text arrives block by block), or one 16-token block (the leading
    revealed run, reported every step): never taken back, and adds up to the non-streamed answer
    (stop strings held back until settled)."""
    body = {"prompt": "def add(a, b):", "max_tokens": 16, "block_length": block_length,
            "steps": 16, "seed": 1, "stop": stop}  # fmt: skip
    plain = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()
    events = _sse_events(
        server.url + "/v1/completions",
        {**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    texts = [(t, e["choices"][0]["text"]) for t, e in events if e["choices"]]
    content = [(t, x) for t, x in texts if x]
    assert "".join(x for _, x in content) == plain["choices"][0]["text"]
    assert events[-1][1]["usage"] == plain["usage"]
    assert events[-2][1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    # the (greedy, seeded) answer spans more than two blocks, so it comes in several pieces
    assert plain["usage"]["completion_tokens"] > 8, plain
    assert len(content) >= 2, events
    assert content[0][0] <= content[-1][0]


def test_a_client_leaving_mid_stream_does_not_disturb_the_server(server: Server) -> None:
    """The reader goes away after its first piece of text: no error in the log, the next
    request is served."""
    log_before = len(server.log.read_text())
    body = {"prompt": "def add(a, b):", "max_tokens": 32, "block_length": 4, "steps": 32,
            "seed": 1, "stream": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                break  # leave with the rest unread: the connection closes here
    after = httpx.post(
        server.url + "/v1/completions", json={"prompt": "x = ", "max_tokens": 8}, timeout=60
    )
    assert after.status_code == 200, after.text
    time.sleep(0.5)
    new_log = server.log.read_text()[log_before:]
    assert "Traceback" not in new_log and "ERROR" not in new_log, new_log


def test_streamed_chat_equals_the_plain_one(client: openai.OpenAI) -> None:
    kwargs = dict(
        model="final", messages=[{"role": "user", "content": "Write a loop."}], max_tokens=16
    )
    plain = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert (
        chunks[-1].usage is not None
        and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    )


# --------------------------------------------------------------------------------------------------
# Per-request randomness
# --------------------------------------------------------------------------------------------------

SEEDED = {"prompt": "def add(a, b):", "max_tokens": 16, "temperature": 1.0, "seed": 7}


def _texts(responses: list[httpx.Response]) -> list[str]:
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json()["choices"][0]["text"] for r in responses]


def test_a_seeded_request_gets_the_same_text_alone_in_copies_and_in_a_mixed_batch(
    server: Server,
) -> None:
    async def batch(bodies: list[dict]) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
            return list(await asyncio.gather(*(c.post("/v1/completions", json=b) for b in bodies)))

    alone = _texts([httpx.post(server.url + "/v1/completions", json=SEEDED, timeout=60)])[0]
    copies = _texts(asyncio.run(batch([SEEDED] * 8)))
    # Other prompts and seeds around it, the seeded request at row 5 of the batch.
    others = [{**SEEDED, "prompt": f"import m{i}", "seed": 100 + i} for i in range(7)]
    mixed = _texts(asyncio.run(batch([*others[:5], SEEDED, *others[5:]])))
    assert copies == [alone] * 8
    assert mixed[5] == alone
    assert len(set(mixed)) > 1  # the batch-mates did draw their own text


def test_unseeded_requests_draw_fresh_randomness_and_n_choices_differ(server: Server) -> None:
    unseeded = {k: v for k, v in SEEDED.items() if k != "seed"}
    texts = _texts(
        [httpx.post(server.url + "/v1/completions", json=unseeded, timeout=60) for _ in range(2)]
    )
    assert texts[0] != texts[1]
    r = httpx.post(server.url + "/v1/completions", json={**SEEDED, "n": 2}, timeout=60)
    a, b = (c["text"] for c in r.json()["choices"])
    assert a != b  # each choice draws from its own stream of the request's seed


def test_raw_sse_ends_with_done(server: Server) -> None:
    with httpx.stream(
        "POST",
        server.url + "/v1/completions",
        json={"prompt": "x = ", "max_tokens": 8, "stream": True},
        timeout=60,
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_stop_sequence_cuts_the_text(client: openai.OpenAI) -> None:
    text = (
        client.completions.create(model="final", prompt="for i in", max_tokens=16).choices[0].text
    )
    assert len(text) >= 6, "the random model should produce some text"
    stop = text[3:6]
    r = client.completions.create(model="final", prompt="for i in", max_tokens=16, stop=[stop])
    assert r.choices[0].text == text[: text.find(stop)]
    assert r.choices[0].finish_reason == "stop"
    # Usage counts the generated tokens that make up the text returned (the fewest whose text
    # covers it), not those generated before the cut.
    full = client.completions.create(model="final", prompt="for i in", max_tokens=16)
    assert (1 if r.choices[0].text else 0) <= r.usage.completion_tokens
    assert r.usage.completion_tokens < full.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_eval_harness_scores_the_endpoint(server: Server) -> None:
    """run_eval against the live server through OpenAISource (short prompts: the test buckets are tiny)."""
    from coda_trainer.evaluate.datasets import load_benchmark
    from coda_trainer.evaluate.runner import OpenAISource, run_eval

    source = OpenAISource(
        server.url, model="final", max_tokens=16, render=lambda p: f"def {p.entry_point}("
    )
    report = run_eval(load_benchmark("humaneval", limit=4), source)
    assert report.n_problems == 4 and report.pass_at_k["pass@1"] == 0.0  # gibberish fails
    assert all(isinstance(p.samples[0].response, str) for p in report.problems)


# --------------------------------------------------------------------------------------------------
# Raw HTTP: infill and bad inputs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "suffix"),
    [
        ("def add(a, b):\n    ", "\n    return c\n"),
        ("", "print('x')"),
        ("# ünïcode → ", ""),
        ("x", "y"),
    ],
)
def test_infill_keeps_prefix_and_suffix_exactly(server: Server, prefix: str, suffix: str) -> None:
    r = httpx.post(
        server.url + "/v1/infill",
        json={"prefix": prefix, "suffix": suffix, "max_tokens": 8},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == prefix + choice["infill"] + suffix
    assert choice["text"].startswith(prefix) and choice["text"].endswith(suffix)
    assert r.json()["usage"]["completion_tokens"] <= 8


BAD_REQUESTS = [
    # (route, body, status, param)
    ("/v1/completions", {"prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "steps": 0}, 400, "steps"),
    ("/v1/completions", {"prompt": "x", "steps": 10**7}, 400, "steps"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 9.0}, 400, "temperature"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [999999]]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "n": 1000}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "alg": "magic"}, 400, "alg"),
    ("/v1/completions", {"prompt": "x", "block_length": 5}, 400, "block_length"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages"),
    ("/v1/infill", {"prefix": "a", "suffix": "b", "max_tokens": 100_000}, 400, "max_tokens"),
    ("/v1/infill", {"prefix": "a"}, 400, "suffix"),
    # Strict types, unsupported OpenAI parameters named.
    ("/v1/completions", {"prompt": "x", "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, 400, "logit_bias"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        400,
        "tools",
    ),
    (
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_object"},
        },
        400,
        "response_format",
    ),
    # Sampler presets and knobs: an unknown preset or cache mode is named.
    ("/v1/completions", {"prompt": "x", "preset": "turbo"}, 400, "preset"),
    ("/v1/infill", {"prefix": "a", "suffix": "b", "preset": "slow"}, 400, "preset"),
    ("/v1/completions", {"prompt": "x", "cache": "all"}, 400, "cache"),
    ("/v1/completions", {"prompt": "x", "top_k": -1}, 400, "top_k"),
    # A model this server does not serve.
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "model": "x"},
        404,
        "model",
    ),
    ("/v1/infill", {"prefix": "a", "suffix": "b", "model": "x"}, 404, "model"),
]


@pytest.mark.parametrize(("route", "body", "status", "param"), BAD_REQUESTS)
def test_bad_inputs_get_openai_shaped_errors(
    server: Server, route: str, body: dict, status: int, param: str
) -> None:
    r = httpx.post(server.url + route, json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error"


def _completion_text(server: Server, body: dict) -> str:
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("name", ["quality", "balanced", "fast"])
def test_a_preset_request_gives_the_tokens_of_its_explicit_settings(
    server: Server, name: str
) -> None:
    from coda_trainer.config import SAMPLER_PRESETS

    # 32 new tokens (the fixture's largest bucket); the server's own default is --steps 8, which
    # every preset replaces (one step per token: 32).
    base = {"prompt": "def add(a, b):", "max_tokens": 32, "temperature": 0, "seed": 5}
    preset = SAMPLER_PRESETS[name]
    explicit = {"steps": preset.steps or 32, "cache": preset.cache}
    if preset.block_length is not None:
        explicit["block_length"] = preset.block_length
    if preset.threshold is not None:
        explicit["threshold"] = preset.threshold
    assert _completion_text(server, {**base, "preset": name}) == _completion_text(
        server, {**base, **explicit}
    )
    # An explicit knob beside the preset wins over it (steps 8 instead of the preset's 32), and
    # top_k 0 is accepted as "no filter".
    assert _completion_text(
        server, {**base, "preset": name, "steps": 8, "top_k": 0}
    ) == _completion_text(server, {**base, **explicit, "steps": 8})


def test_engine_applies_the_request_preset_over_the_servers_and_knobs_over_both() -> None:
    from coda_trainer.config import SamplerSettings
    from coda_trainer.serve.engine import Engine, ServeSettings
    from coda_trainer.serve.schemas import SamplingParams
    from coda_trainer.tokenizer import load_tokenizer

    defaults = SamplerSettings(preset="fast", top_k=5)
    settings = ServeSettings(gen_buckets=(64,), default_max_tokens=64, defaults=defaults)
    engine = Engine(None, load_tokenizer("project"), settings)

    def knobs(**request: Any) -> tuple:
        c = engine.sampling_config(SamplingParams(**request), 64)
        return c.steps, c.block_length, c.threshold, c.cache, c.top_k

    assert knobs() == (64, 32, 0.9, "dual", 5)  # the server's default preset
    assert knobs(preset="quality") == (64, None, None, "none", 5)
    assert knobs(preset="balanced", steps=16, cache="prefix") == (16, 32, 0.9, "prefix", 5)
    assert knobs(top_k=0) == (64, 32, 0.9, "dual", None)  # 0: no filter


def test_malformed_json_and_unknown_routes(server: Server) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and "error" in r.json()
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def _healthz_while(server: Server, send: Any) -> tuple[Any, list[float]]:
    """Run `send()` on a thread while timing /healthz every 0.1 s; (its result, probe seconds)."""
    import threading

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(send()))
    probes: list[float] = []
    thread.start()
    while thread.is_alive() or not probes:
        t0 = time.monotonic()
        assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200
        probes.append(time.monotonic() - t0)
        time.sleep(0.1)
    thread.join()
    return out[0], probes


def test_a_10_mb_body_gets_413_at_once_and_probes_stay_answered(server: Server) -> None:
    body = json.dumps({"prompt": "x" * 10_000_000, "max_tokens": 4}).encode()
    t0 = time.monotonic()
    r, probes = _healthz_while(
        server,
        lambda: httpx.post(
            server.url + "/v1/completions", content=body,
            headers={"content-type": "application/json"}, timeout=30,
        ),
    )  # fmt: skip
    seconds = time.monotonic() - t0
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text
    assert seconds < 3.0, f"413 after {seconds:.1f}s"
    assert max(probes) < 1.0, probes

    def chunks():  # no Content-Length: the limit counts the bytes as they arrive
        for _ in range(10):
            yield b" " * 1_000_000

    r = httpx.post(
        server.url + "/v1/completions", content=chunks(),
        headers={"content-type": "application/json"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 413, r.text


def test_a_long_prompt_under_the_body_cap_is_refused_before_tokenizing(server: Server) -> None:
    body = {"prompt": "def f(x): return x\n" * 150_000, "max_tokens": 4}  # 3 MB of text
    t0 = time.monotonic()
    r, probes = _healthz_while(
        server, lambda: httpx.post(server.url + "/v1/completions", json=body, timeout=30)
    )
    seconds = time.monotonic() - t0
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert seconds < 3.0 and max(probes) < 1.0, (seconds, probes)


def test_prompts_times_n_is_capped(server: Server) -> None:
    r = httpx.post(
        server.url + "/v1/completions", json={"prompt": ["x"] * 5000, "max_tokens": 4}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "n", r.text
    assert "at most 64" in r.json()["error"]["message"]


class _CountingGenerator:
    """Answers every row with the same tokens and records how many rows it ran."""

    def __init__(self) -> None:
        self.rows = 0

    def generate(self, prompts, config, shapes, seeds):
        self.rows += len(prompts)
        return [[5] * shapes.gen for _ in prompts]

    infill = None


def test_a_rejected_requests_rows_never_run() -> None:
    from coda_trainer.serve.app import create_app
    from coda_trainer.serve.engine import Engine, ServeSettings
    from coda_trainer.tokenizer import load_tokenizer
    from fastapi.testclient import TestClient

    settings = ServeSettings(
        prompt_buckets=(64,), gen_buckets=(16,), default_max_tokens=16, max_batch=1, max_queue=4
    )
    generator = _CountingGenerator()
    engine = Engine(generator, load_tokenizer("project"), settings)
    with TestClient(create_app(engine, warmup=False)) as client:
        r = client.post("/v1/completions", json={"prompt": ["a", "b", "c"], "n": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
        assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 200
    assert generator.rows == 1  # only the accepted request's row ran


def test_an_infill_too_long_for_the_model_is_a_400_before_any_model_call() -> None:
    """[prefix bucket | hole | suffix bucket] can pass the model's positions where a generation
    of the same prompt fits: 400 context_length_exceeded naming the suffix, not a 500."""
    from coda_trainer.serve.app import create_app
    from coda_trainer.serve.engine import Engine, ServeSettings
    from coda_trainer.tokenizer import load_tokenizer
    from fastapi.testclient import TestClient

    settings = ServeSettings(prompt_buckets=(64, 256), gen_buckets=(32,), default_max_tokens=32)
    settings.check_positions(512)  # generations fit: 256 + 32
    generator = _CountingGenerator()
    engine = Engine(generator, load_tokenizer("project"), settings, max_positions=512)
    with TestClient(create_app(engine, warmup=False)) as client:
        prefix = "x = 1\n" * 20  # 100 tokens: the 256 bucket, so 2 × 256 + 32 > 512
        r = client.post("/v1/infill", json={"prefix": prefix, "suffix": "\n", "max_tokens": 32})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded" and error["param"] == "suffix", error
        assert "544 positions" in error["message"], error
        short = client.post("/v1/completions", json={"prompt": prefix, "max_tokens": 32})
        assert short.status_code == 200, short.text
    assert generator.rows == 1  # only the completion ran


def test_buckets_beyond_the_models_positions_fail_at_start(checkpoint: Path) -> None:
    args = ["--prompt-buckets", "512", "--gen-buckets", "64", "--dtype", "float32"]
    srv = Server(checkpoint, base_args=args)
    try:
        rc = srv.proc.wait(timeout=90)
    finally:
        srv.terminate(timeout=5)
    log = srv.log.read_text()
    assert rc != 0 and "576 positions; the model has 512" in log, log


def test_openai_client_raises_on_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="final", prompt="word " * 400, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"


# --------------------------------------------------------------------------------------------------
# Concurrency and metrics (after the tests above: the server survived every bad request)
# --------------------------------------------------------------------------------------------------


def _metric(text: str, name: str, labels: str = "") -> float:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def test_fifty_concurrent_requests_succeed_and_are_batched(server: Server) -> None:
    before = httpx.get(server.url + "/metrics").text
    batches_before = _metric(before, "coda_batch_size_count")

    async def run() -> list:
        client = openai.AsyncOpenAI(
            base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120
        )
        jobs = [
            client.completions.create(model="final", prompt=f"def f{i}(x):", max_tokens=8)
            for i in range(50)
        ]
        try:
            return await asyncio.gather(*jobs)
        finally:
            await client.close()

    results = asyncio.run(run())
    assert len(results) == 50 and all(
        r.choices[0].finish_reason in ("stop", "length") for r in results
    )
    after = httpx.get(server.url + "/metrics").text
    batches = _metric(after, "coda_batch_size_count") - batches_before
    rows = _metric(after, "coda_batch_size_sum") - _metric(before, "coda_batch_size_sum")
    assert rows == 50
    assert batches < 50, "requests were not batched"
    # Batches of more than one row are visible in the histogram itself.
    singles = _metric(after, "coda_batch_size_bucket", '{le="1.0"}') - _metric(
        before, "coda_batch_size_bucket", '{le="1.0"}'
    )
    assert batches - singles > 0
    assert _metric(after, "coda_requests_total", '{route="/v1/completions",status="200"}') >= 50
    assert _metric(after, "coda_requests_total", '{route="/v1/completions",status="400"}') >= 1
    assert _metric(after, "coda_request_latency_seconds_count", '{route="/v1/completions"}') >= 50
    assert _metric(after, "coda_generated_tokens_total") > 0
    assert _metric(after, "coda_tokens_per_second") > 0
    assert _metric(after, "coda_queue_depth") == 0
    assert _metric(after, "coda_ready") == 1
    assert httpx.get(server.url + "/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------
# Auth
# --------------------------------------------------------------------------------------------------


def test_api_key_is_required_when_set(checkpoint: Path) -> None:
    srv = Server(checkpoint, "--no-warmup", env={"CODA_API_KEY": "s3cret"})
    try:
        srv.wait_healthy()
        assert httpx.get(srv.url + "/readyz").status_code == 200  # probes stay open
        r = httpx.get(srv.url + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert (
            httpx.get(srv.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code
            == 401
        )
        # The header that survives the Kubernetes API server's service proxy (coda-ctl sample).
        assert httpx.get(srv.url + "/v1/models", headers={"api-key": "s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/v1/models", headers={"api-key": "wrong"}).status_code == 401
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0, timeout=60)
        assert good.models.list().data[0].id == "final"
        assert isinstance(
            good.completions.create(model="final", prompt="a", max_tokens=4).choices[0].text, str
        )
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        assert srv.stop() == 0


def test_refuses_a_public_host_without_a_key(checkpoint: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer")}
    env.pop("CODA_API_KEY", None)
    r = subprocess.run(
        [sys.executable, "-m", "coda_trainer.serve", "--checkpoint", str(checkpoint), "--host", "0.0.0.0"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and "refusing to serve" in r.stderr


# --------------------------------------------------------------------------------------------------
# The cluster's command line: all interfaces, an API key and spec.sampler.defaults from the env
# --------------------------------------------------------------------------------------------------

# What the operator's sampler Deployment runs (plus small buckets): --host 0.0.0.0, CODA_API_KEY
# from a Secret, CODA_SAMPLER_DEFAULTS from spec.sampler.defaults; no sampling flags.
CLUSTER_ARGS = [
    "--host", "0.0.0.0", "--prompt-buckets", "64", "--gen-buckets", "16,32", "--batch-buckets", "1",
    "--max-batch", "1", "--dtype", "float32", "--no-warmup",
]  # fmt: skip


def test_cluster_mode_probes_open_v1_authenticated_env_defaults_applied(checkpoint: Path) -> None:
    defaults = {
        "max_new_tokens": 5, "steps": 4, "temperature": 0.0, "alg": "maskgit_plus",
        "preset": "balanced",
    }  # fmt: skip
    env = {"CODA_API_KEY": "from-a-secret", "CODA_SAMPLER_DEFAULTS": json.dumps(defaults)}
    srv = Server(checkpoint, env=env, base_args=CLUSTER_ARGS)
    try:
        srv.wait_healthy()
        # kubelet probes and Prometheus carry no token
        assert httpx.get(srv.url + "/readyz").status_code == 200
        assert httpx.get(srv.url + "/metrics").status_code == 200
        assert httpx.get(srv.url + "/v1/models").status_code == 401
        auth = {"Authorization": "Bearer from-a-secret"}
        assert httpx.get(srv.url + "/v1/models", headers=auth).json()["data"][0]["id"] == "final"
        r = httpx.post(srv.url + "/v1/completions", json={"prompt": "def add(a, b):"}, timeout=120)
        assert r.status_code == 401
        # No max_tokens in the request: spec.sampler.defaults.max_new_tokens (5) limits it,
        # not the built-in 128 (capped at the 32-token bucket here).
        r = httpx.post(
            srv.url + "/v1/completions", json={"prompt": "def add(a, b):"}, headers=auth,
            timeout=120,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] == 5, body
        assert body["choices"][0]["finish_reason"] == "length", body
        # The default preset applies to a request that names none: the same tokens as naming it
        # (with the default's steps: a request's preset would replace those too).
        named = {"prompt": "def add(a, b):", "preset": "balanced", "steps": 4}
        explicit = httpx.post(srv.url + "/v1/completions", json=named, headers=auth, timeout=120)
        assert explicit.json()["choices"][0]["text"] == body["choices"][0]["text"]
    finally:
        assert srv.stop() == 0
    log = srv.log.read_text()
    assert "Uvicorn running on http://0.0.0.0:" in log, log
    assert (
        "sampling defaults: steps=4, alg=maskgit_plus, temperature=0.0, block_length=32, "
        "threshold=0.9, cache=none, max_new_tokens=5" in log
    ), log


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"max_new_tokens": 5,', "CODA_SAMPLER_DEFAULTS is not valid JSON"),
        ('{"max_tokens": 5}', "CODA_SAMPLER_DEFAULTS: unknown key 'max_tokens'"),
        ('{"top_p": 2}', "CODA_SAMPLER_DEFAULTS: top_p: Input should be less than or equal to 1"),
        ("[5]", "CODA_SAMPLER_DEFAULTS must be a JSON object"),
    ],
)
def test_bad_sampler_defaults_env_exits_2_naming_the_variable(
    checkpoint: Path, value: str, message: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "trainer"), "CODA_SAMPLER_DEFAULTS": value}
    r = subprocess.run(
        [sys.executable, "-m", "coda_trainer.serve", "--checkpoint", str(checkpoint)],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_sampling_defaults_precedence_flag_then_env_then_builtin() -> None:
    from coda_trainer.config import SamplerSettings, resolve_sampler_settings
    from coda_trainer.serve.__main__ import parse_args, resolve_sampling_defaults

    env = json.dumps({"max_new_tokens": 5, "steps": 4, "temperature": 0.7, "top_k": 0})
    args = parse_args(["--checkpoint", "x", "--steps", "9", "--alg", "origin"])
    got = resolve_sampler_settings(resolve_sampling_defaults(args, env))
    assert got == SamplerSettings(
        steps=9, max_new_tokens=5, alg="origin", temperature=0.7, cache="none", top_k=None
    )
    builtin = resolve_sampler_settings(
        resolve_sampling_defaults(parse_args(["--checkpoint", "x"]), None)
    )
    assert (builtin.max_new_tokens, builtin.alg, builtin.temperature) == (128, "entropy", 0)
    blank = resolve_sampling_defaults(parse_args(["--checkpoint", "x"]), "  ")
    assert resolve_sampler_settings(blank) == builtin
    flag = parse_args(["--checkpoint", "x", "--default-max-tokens", "7", "--temperature", "0"])
    assert resolve_sampling_defaults(flag, env).max_new_tokens == 7
    assert resolve_sampling_defaults(flag, env).temperature == 0.0


def test_server_preset_flag_and_env_preset() -> None:
    from coda_trainer.config import resolve_sampler_settings
    from coda_trainer.serve.__main__ import parse_args, resolve_sampling_defaults

    def resolved(argv: list[str], env: dict | None) -> tuple:
        d = resolve_sampler_settings(
            resolve_sampling_defaults(
                parse_args(["--checkpoint", "x", *argv]), json.dumps(env) if env else None
            )
        )
        return d.steps, d.block_length, d.threshold, d.cache

    assert resolved([], {"preset": "fast"}) == (None, 32, 0.9, "dual")
    # the env's own knobs win over the env's preset ...
    assert resolved([], {"preset": "fast", "cache": "prefix"}) == (None, 32, 0.9, "prefix")
    # ... but a --preset flag replaces the env's preset and the knobs a preset sets
    assert resolved(["--preset", "quality"], {"preset": "fast", "cache": "prefix"}) == (
        None, None, None, "none",
    )  # fmt: skip
    assert resolved(["--preset", "balanced", "--steps", "16"], None) == (16, 32, 0.9, "none")


# --------------------------------------------------------------------------------------------------
# Stopping: SIGTERM in every state; exit 0 within a bound, no child process left behind
# --------------------------------------------------------------------------------------------------

# Bound for a busy 2-core machine. Measured there (signal → exit): loading 0.1-0.3 s, warm-up
# 0.2 s (the compile in flight is abandoned), serving idle 1.2 s (most of it interpreter teardown
# with JAX loaded).
STOP_BOUND_S = 5.0


def _stopped_cleanly(
    srv: Server, still_alive: list[int], rc: int, seconds: float, bound: float
) -> None:
    log = srv.log.read_text()
    assert rc == 0, f"exit status {rc}:\n{log}"
    assert seconds < bound, f"took {seconds:.1f}s to stop (bound {bound}s):\n{log}"
    assert not still_alive, f"child processes outlived the server: {still_alive}"
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/healthz", timeout=2)


def test_sigterm_while_loading_the_checkpoint_exits_0_at_once(checkpoint: Path, proctree) -> None:
    srv = Server(checkpoint)
    try:
        srv.wait_for_log("coda.serve: loading ")  # JAX is being imported, then the checkpoint read
        children = proctree.descendants(srv.proc.pid)
        rc, seconds = srv.terminate()
    finally:
        srv.terminate(timeout=5)
    log = srv.log.read_text()
    assert "Uvicorn running" not in log, "loading finished before the signal: nothing was tested"
    assert "received SIGTERM while loading the checkpoint" in log, log
    _stopped_cleanly(srv, [c for c in children if proctree.alive(c)], rc, seconds, STOP_BOUND_S)


# 2 prompt x 3 generation x 4 batch buckets = 24 programs to compile: warm-up outlasts the test.
WARMUP_ARGS = [
    "--prompt-buckets", "64,128", "--gen-buckets", "16,32,64", "--batch-buckets", "1,2,4,8",
    "--max-batch", "8", "--steps", "8", "--dtype", "float32",
]  # fmt: skip


def test_sigterm_during_warmup_abandons_it_and_exits_0(checkpoint: Path, proctree) -> None:
    srv = Server(checkpoint, base_args=WARMUP_ARGS)
    try:
        srv.wait_healthy()
        time.sleep(1.0)  # into the compiles
        assert httpx.get(srv.url + "/readyz").status_code == 503, "warm-up already over"
        children = proctree.descendants(srv.proc.pid)
        rc, seconds = srv.terminate()
    finally:
        srv.terminate(timeout=5)
    log = srv.log.read_text()
    assert "warm-up compiled" not in log, log
    assert "warm-up abandoned" in log, log
    _stopped_cleanly(srv, [c for c in children if proctree.alive(c)], rc, seconds, STOP_BOUND_S)


# One row per model call and 64 denoising steps each, so the queue outlasts the graceful timeout.
GRACEFUL_S = 2.0
LOAD_ARGS = [
    "--prompt-buckets", "64", "--gen-buckets", "64", "--batch-buckets", "1", "--max-batch", "1",
    "--steps", "64", "--dtype", "float32", "--graceful-timeout", str(GRACEFUL_S),
]  # fmt: skip


def test_sigterm_under_load_answers_every_accepted_request_within_the_graceful_timeout(
    checkpoint: Path, proctree
) -> None:
    n = 16
    srv = Server(checkpoint, base_args=LOAD_ARGS)

    async def scenario() -> tuple[list, float, float, BaseException | None]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            # One row per model call (max batch 1). The first one streams.
            bodies = [
                {"prompt": f"def f{i}():", "max_tokens": 64, "seed": i, "stream": i == 0}
                for i in range(n)
            ]
            jobs = [asyncio.create_task(client.post("/v1/completions", json=b)) for b in bodies]
            while _metric((await client.get("/metrics")).text, "coda_queue_depth") < n - 2:
                await asyncio.sleep(0.02)
            signalled = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            refused: BaseException | None = None
            try:
                await client.post("/v1/completions", json={"prompt": "late", "max_tokens": 4})
            except httpx.HTTPError as e:
                refused = e
            results = await asyncio.gather(*jobs, return_exceptions=True)
            return results, signalled, time.monotonic(), refused

    try:
        srv.wait_healthy()
        srv.wait_ready()
        children = proctree.descendants(srv.proc.pid)
        results, signalled, answered, refused = asyncio.run(scenario())
        rc, _ = srv.terminate(timeout=GRACEFUL_S + STOP_BOUND_S)
        seconds = time.monotonic() - signalled
    finally:
        srv.terminate(timeout=5)
    log = srv.log.read_text()
    assert all(isinstance(r, httpx.Response) for r in results), (results, log)
    codes = [r.status_code for r in results]
    assert set(codes) <= {200, 503}, codes
    assert 200 in codes and 503 in codes, f"the load did not span the graceful timeout: {codes}"
    for r in results:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "shutting_down", r.text
        elif "data: " in r.text:  # the streamed one: complete, or an in-band error, then [DONE]
            assert r.text.rstrip().endswith("data: [DONE]"), r.text
    assert answered - signalled < GRACEFUL_S + 1.5, f"last answer {answered - signalled:.1f}s"
    assert isinstance(refused, httpx.ConnectError), f"a request after the signal got {refused!r}"
    _stopped_cleanly(
        srv, [c for c in children if proctree.alive(c)], rc, seconds, GRACEFUL_S + STOP_BOUND_S
    )


# --------------------------------------------------------------------------------------------------
# The batcher on its own (no model): grouping, failure isolation, limits, shutdown
# --------------------------------------------------------------------------------------------------


def test_batcher_groups_by_key_and_isolates_failures() -> None:
    calls: list[tuple[str, list[int]]] = []

    def run(key, payloads):
        calls.append((key, list(payloads)))
        if key == "bad":
            raise RuntimeError("model exploded")
        return [p * 10 for p in payloads]

    async def main() -> None:
        b = DynamicBatcher(run, max_batch=4, max_wait_s=0.05)
        await b.start()
        good = [b.submit("a", i) for i in range(6)] + [b.submit("b", 100)]
        bad = b.submit("bad", 1)
        results = await asyncio.gather(*good, bad, return_exceptions=True)
        assert results[:7] == [0, 10, 20, 30, 40, 50, 1000]
        assert isinstance(results[7], RuntimeError)
        assert await b.submit("a", 7) == 70  # the worker survived the failing batch
        await b.stop()
        with pytest.raises(ShuttingDown):
            await b.submit("a", 1)

    asyncio.run(main())
    sizes = {k: sorted(len(p) for kk, p in calls if kk == k) for k in ("a", "b", "bad")}
    assert (
        sizes["a"][-1] == 4 and sum(sizes["a"]) == 7 and sizes["b"] == [1] and sizes["bad"] == [1]
    )


def test_batcher_queue_limit_and_cancelled_requests() -> None:
    seen: list[int] = []

    def run(key, payloads):
        seen.extend(payloads)
        time.sleep(0.05)
        return payloads

    async def main() -> None:
        b = DynamicBatcher(run, max_batch=2, max_wait_s=0.2, max_queue=3)
        await b.start()
        tasks = [asyncio.create_task(b.submit("k", i)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await b.submit("k", 99)
        tasks[0].cancel()  # the caller went away before its batch left
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert done[1:] == [1, 2]
        await b.stop()

    asyncio.run(main())
    assert 0 not in seen and 99 not in seen


class _FailingGenerator:
    """A model call that breaks after the stream's headers are out (e.g. a device error)."""

    def generate(self, prompts, config, shapes, seeds):
        raise RuntimeError("device fell over")

    def infill(self, prefixes, suffixes, config, shapes, seeds):
        raise RuntimeError("device fell over")


@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
def test_stream_reports_a_failed_batch_in_band_and_the_server_stays_up(route):
    from coda_trainer.serve.app import create_app
    from coda_trainer.serve.engine import Engine, ServeSettings
    from coda_trainer.tokenizer import load_tokenizer
    from fastapi.testclient import TestClient

    settings = ServeSettings(prompt_buckets=(64,), gen_buckets=(16,), default_max_tokens=16)
    engine = Engine(_FailingGenerator(), load_tokenizer("project"), settings)
    body = (
        {"prompt": "def f():", "stream": True, "max_tokens": 8}
        if route == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}
    )
    with TestClient(create_app(engine, warmup=False)) as client:
        res = client.post(route, json={"model": "coda", **body})
        events = [line for line in res.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[-2].removeprefix("data: "))["error"]
        assert error["type"] == "server_error" and "device fell over" in error["message"]
        assert client.get("/healthz").status_code == 200


# --------------------------------------------------------------------------------------------------
# Compile keys: a finite set, whatever clients send
# --------------------------------------------------------------------------------------------------


def test_requests_steps_map_to_few_compiled_step_counts() -> None:
    import random

    from coda_trainer.serve.engine import Engine, ServeSettings
    from coda_trainer.serve.schemas import SamplingParams
    from coda_trainer.tokenizer import load_tokenizer

    engine = Engine(None, load_tokenizer("project"), ServeSettings(gen_buckets=(64, 256)))
    rnd = random.Random(0)
    seen = set()
    for _ in range(500):
        gen = rnd.choice((64, 256))
        block = rnd.choice((None, 8, 32))
        p = SamplingParams(
            steps=rnd.randint(1, 1024), top_k=rnd.randint(1, 5000), block_length=block
        )
        c = engine.sampling_config(p, gen)
        assert c.steps >= min(p.steps, gen)  # rounded up, never down (up to one per token)
        seen.add((gen, block, c.steps_per_block))
    # steps per block: powers of two up to the block's tokens (1..64, 1..256, 1..8, 1..32)
    assert len(seen) <= 7 + 9 + 2 * (4 + 6), sorted(seen)


def test_random_top_k_and_steps_do_not_add_compiles(checkpoint: Path) -> None:
    import random

    from coda_trainer import hf
    from coda_trainer.sampling.decode import decode
    from coda_trainer.serve.engine import Engine, Row, SamplerGenerator, ServeSettings
    from coda_trainer.serve.schemas import SamplingParams
    from coda_trainer.tokenizer import load_tokenizer

    model_config, model = hf.load_pretrained(str(checkpoint))
    settings = ServeSettings(
        prompt_buckets=(16,), gen_buckets=(16,), max_batch=1, default_max_tokens=16
    )
    engine = Engine(SamplerGenerator(model, model_config), load_tokenizer("project"), settings)
    rnd = random.Random(1)

    def run(top_k: int, steps: int) -> None:
        p = SamplingParams(temperature=1.0, top_k=top_k, steps=steps)
        engine.run_batch(engine.generate_key(p, 16), [Row([5, 6, 7], seed=(1, 0))])

    run(top_k=3, steps=9)  # 9 steps → 16 per block: one compile
    compiled = decode._cache_size()
    for _ in range(4):
        run(top_k=rnd.randint(1, 4000), steps=rnd.randint(9, 16))
    assert decode._cache_size() == compiled


@pytest.mark.slow
def test_a_disconnected_clients_queued_rows_never_run(checkpoint: Path) -> None:
    """Batch 1, 64 steps: a 4-row request keeps the model busy while a second client gives up
    waiting; its row leaves the queue unrun."""
    srv = Server(checkpoint, base_args=LOAD_ARGS)

    def batches() -> float:
        return _metric(httpx.get(srv.url + "/metrics").text, "coda_batch_size_count")

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120) as client:
            busy = asyncio.create_task(
                client.post("/v1/completions", json={"prompt": "def f():", "n": 4})
            )
            await asyncio.sleep(0.3)
            with pytest.raises(httpx.ReadTimeout):
                await client.post("/v1/completions", json={"prompt": "x = "}, timeout=0.5)
            assert (await busy).status_code == 200

    try:
        srv.wait_healthy()
        srv.wait_ready()
        before = batches()
        asyncio.run(scenario())
        time.sleep(2.0)  # time for the abandoned row to run, were it still queued
        ran = batches() - before
    finally:
        srv.terminate(timeout=30)
    assert ran == 4, f"{ran} model calls: the abandoned request's row ran"
