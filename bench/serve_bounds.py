"""The sampler server with default flags on a random model: seconds to ready, then server RSS before
and after a bad-input run (10 MB bodies, 3 MB prompts, 5000 prompts, malformed bodies), with the
status codes and /healthz latency meanwhile.

    PYTHONPATH=trainer JAX_PLATFORMS=cpu python bench/serve_bounds.py /tmp/serve-bounds coda-tiny
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BAD_BODIES = [
    {"prompt": "x" * 10_000_000},
    {"prompt": "def f(x): return x\n" * 150_000},
    {"prompt": ["x"] * 5000},
    {"prompt": "x", "max_tokens": "10"},
    {"prompt": "x", "logit_bias": {"1": 2}},
]


def checkpoint(work: Path, preset: str) -> Path:
    from coda_trainer import hf
    from coda_trainer.config import PROJECT_TOKENIZER_IDS, PROJECT_VOCAB_SIZE, ModelConfig
    from coda_trainer.model import Transformer
    from flax import nnx

    path = work / preset / "final"
    if not path.exists():
        config = ModelConfig.preset(preset, vocab_size=PROJECT_VOCAB_SIZE, **PROJECT_TOKENIZER_IDS)
        hf.save_pretrained(Transformer(config, rngs=nnx.Rngs(0)), str(path))
    return path


def rss_mb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmRSS")).split()[1]) // 1024


def main(work: Path, preset: str) -> None:
    work.mkdir(parents=True, exist_ok=True)
    ckpt = checkpoint(work, preset)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO / "trainer")}
    cmd = [
        sys.executable,
        "-m",
        "coda_trainer.serve",
        "--checkpoint",
        str(ckpt),
        "--port",
        str(port),
    ]
    with (work / f"serve-{preset}.log").open("wb") as log:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while time.monotonic() - start < 600:
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            print(f"{preset}: ready after {time.monotonic() - start:.1f}s (default flags)")
            body = {"prompt": "def f(x):", "max_tokens": 16}
            print("one request:", httpx.post(url + "/v1/completions", json=body, timeout=300))
            print("RSS before bad input (MB):", rss_mb(proc.pid))
            codes: dict[str, int] = {}
            probes: list[float] = []
            for _ in range(5):
                for bad in BAD_BODIES:
                    try:
                        code = str(
                            httpx.post(
                                url + "/v1/completions", content=json.dumps(bad).encode(),
                                headers={"content-type": "application/json"}, timeout=60,
                            ).status_code
                        )  # fmt: skip
                    except httpx.HTTPError as e:
                        code = type(e).__name__
                    codes[code] = codes.get(code, 0) + 1
                    t0 = time.monotonic()
                    httpx.get(url + "/healthz", timeout=5)
                    probes.append(time.monotonic() - t0)
            print("status codes:", codes, f"/healthz after each: max {max(probes):.2f}s")
            print("RSS after bad input (MB):", rss_mb(proc.pid))
        finally:
            proc.terminate()
            proc.wait(timeout=60)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "coda-tiny")
