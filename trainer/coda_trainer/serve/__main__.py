"""`python -m coda_trainer.serve --checkpoint PATH`: serve a checkpoint over HTTP.

The checkpoint is a Hugging Face folder (a stage's `final/`, local or gs://). The tokenizer comes
from `--tokenizer`, else the checkpoint's `tokenizer/` subfolder, else tokenizer files in the
checkpoint folder itself (the trainer's final export copies them there), else the project tokenizer.

Auth: with `--api-key` (or env CODA_API_KEY) every /v1 route needs `Authorization: Bearer <key>`.
Binding a non-loopback host without a key is refused unless `--insecure-no-auth` is given.
SIGTERM/SIGINT shut down gracefully: no new connections, in-flight requests finish (up to
`--graceful-timeout` seconds), queued work drains, then the process ends (uvicorn re-raises the
signal after its shutdown, so the exit status is that of SIGTERM).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys

EXIT_USAGE = 2


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(x) for x in text.split(",") if x.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m coda_trainer.serve", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--checkpoint", required=True, help="HF folder (local or gs://), e.g. <ckpt>/sft/final"
    )
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or 'project' (default: see above)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--api-key", default=None, help="bearer token required on /v1 (default: env CODA_API_KEY)"
    )
    p.add_argument(
        "--insecure-no-auth", action="store_true", help="allow a non-loopback host without a key"
    )
    p.add_argument(
        "--model-name", default=None, help="id reported by /v1/models (default: checkpoint folder)"
    )
    g = p.add_argument_group("batching and shapes")
    g.add_argument("--max-batch", type=int, default=8)
    g.add_argument("--max-wait-ms", type=float, default=10.0)
    g.add_argument("--max-queue", type=int, default=1024)
    g.add_argument("--prompt-buckets", type=_ints, default=(128, 512, 1024))
    g.add_argument("--gen-buckets", type=_ints, default=(64, 128, 256, 512))
    g.add_argument(
        "--batch-buckets", type=_ints, default=None, help="default: powers of two up to --max-batch"
    )
    g.add_argument("--default-max-tokens", type=int, default=128)
    g.add_argument("--max-steps", type=int, default=1024)
    g.add_argument(
        "--no-warmup", action="store_true", help="mark ready without compiling the buckets first"
    )
    s = p.add_argument_group("sampling defaults (a request may override each)")
    s.add_argument("--steps", type=int, default=None, help="default: one per generated token")
    s.add_argument(
        "--alg", default="entropy", choices=["origin", "maskgit_plus", "topk_margin", "entropy"]
    )
    s.add_argument("--alg-temp", type=float, default=None)
    s.add_argument("--block-length", type=int, default=None)
    s.add_argument("--threshold", type=float, default=None)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--cache", default="none", choices=["none", "prefix", "dual"])
    m = p.add_argument_group("model")
    m.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype override"
    )
    m.add_argument("--attention", default=None, choices=["auto", "xla", "cudnn", "splash"])
    p.add_argument("--graceful-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_tokenizer_path(checkpoint: str, explicit: str | None) -> str:
    from coda_trainer import storage

    if explicit:
        return explicit
    sub = storage.join(checkpoint, "tokenizer")
    if storage.exists(storage.join(sub, "tokenizer.json")) or storage.exists(
        storage.join(sub, "vocab.json")
    ):
        return sub
    if storage.exists(storage.join(checkpoint, "tokenizer.json")) or storage.exists(
        storage.join(checkpoint, "vocab.json")
    ):
        return checkpoint
    return "project"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("coda.serve")
    api_key = args.api_key or os.environ.get("CODA_API_KEY") or None
    if not api_key and not is_loopback(args.host) and not args.insecure_no_auth:
        print(
            f"error: refusing to serve on non-loopback host {args.host!r} without an API key; "
            "set --api-key or CODA_API_KEY, or pass --insecure-no-auth",
            file=sys.stderr,
        )
        return EXIT_USAGE

    # Heavy imports only after the cheap checks.
    import uvicorn

    from coda_trainer import hf
    from coda_trainer.serve.app import create_app
    from coda_trainer.serve.engine import Engine, SamplerGenerator, SamplingDefaults, ServeSettings
    from coda_trainer.tokenizer import load_tokenizer

    try:
        settings = ServeSettings(
            model_name=args.model_name or args.checkpoint.rstrip("/").split("/")[-1] or "coda",
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            prompt_buckets=args.prompt_buckets,
            gen_buckets=args.gen_buckets,
            batch_buckets=args.batch_buckets,
            default_max_tokens=min(args.default_max_tokens, args.gen_buckets[-1]),
            max_steps=args.max_steps,
            warmup=not args.no_warmup,
            defaults=SamplingDefaults(
                steps=args.steps,
                alg=args.alg,
                alg_temp=args.alg_temp,
                block_length=args.block_length,
                threshold=args.threshold,
                temperature=args.temperature,
                top_p=args.top_p,
                top_k=args.top_k,
                cache=args.cache,
            ),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE

    overrides = {k: v for k, v in (("dtype", args.dtype), ("attention", args.attention)) if v}
    log.info("loading %s", args.checkpoint)
    model_config, model = hf.load_pretrained(args.checkpoint, config_overrides=overrides or None)
    tok_path = resolve_tokenizer_path(args.checkpoint, args.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    tokenizer.check_model(model_config)
    log.info("model %s, tokenizer %s", args.checkpoint, tok_path)
    engine = Engine(SamplerGenerator(model, model_config), tokenizer, settings)
    app = create_app(engine, api_key=api_key)
    uvicorn.run(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout,
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
