"""`python -m coda_trainer.serve --checkpoint PATH`: serve a checkpoint over HTTP.

The checkpoint is a Hugging Face folder (a stage's `final/`, local or gs://). The tokenizer comes
from `--tokenizer`, else the checkpoint's `tokenizer/` subfolder, else tokenizer files in the
checkpoint folder itself (the trainer's final export copies them there), else the project tokenizer.

Auth: with `--api-key` (or env CODA_API_KEY) every /v1 route needs `Authorization: Bearer <key>`;
/healthz, /readyz and /metrics stay open (kubelet probes, Prometheus). Binding a non-loopback host
(the cluster's `--host 0.0.0.0`) without a key is refused unless `--insecure-no-auth` is given.

Sampling defaults (the knobs of `coda_trainer.config.SamplerSettings`, one flag each, `--preset`
included): a flag given on the command line wins; else the JSON object in env
CODA_SAMPLER_DEFAULTS (what the operator renders from `spec.sampler.defaults`; the same keys, with
max_new_tokens meaning --default-max-tokens); else the preset's value; else the built-in default. Invalid JSON, an unknown
key or an out-of-range value there exits 2 before anything loads.

Stopping: SIGTERM or SIGINT stops the server in every state and the process exits 0:
- loading the checkpoint (before the HTTP server starts): the load runs on a worker thread that is
  abandoned, and the process exits within `stopping.POLL_S` (0.1 s) of the signal;
- warming up: new connections are refused and warm-up gives up at its next program boundary; one
  XLA compile cannot be interrupted, so the process exits without waiting for the one in flight;
- serving: new connections are refused, new requests on open ones get 503 `shutting_down`, queued
  and running requests go on; whatever is unfinished `--graceful-timeout` seconds after the signal
  gets 503 `shutting_down` (an in-band error event on a started stream), and the process exits
  right after (bound: --graceful-timeout + about 1 s). A second Ctrl-C skips the drain.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
from typing import Any

from pydantic import ValidationError

from coda_trainer import storage
from coda_trainer.config import (
    SAMPLER_BUILTIN,
    SAMPLER_PRESET_KNOBS,
    SamplerSettings,
    add_sampler_flags,
    resolve_sampler_settings,
    sampler_settings_from_args,
)
from coda_trainer.contract import ENV_API_KEY, ENV_RUN_NAME, ENV_SAMPLER_DEFAULTS
from coda_trainer.stopping import Stopped, StopRequest, call_until_stopped, exit_now
from coda_trainer.tokenizer import load_tokenizer

EXIT_USAGE = 2
SAMPLER_DEFAULTS_ENV = ENV_SAMPLER_DEFAULTS
# Extra time uvicorn gives connections after our own drain deadline, so the 503s written at the
# deadline reach their clients before uvicorn cancels what is left.
SHUTDOWN_MARGIN_S = 2.0


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
    g.add_argument("--max-steps", type=int, default=1024)
    g.add_argument(
        "--max-body-bytes", type=int, default=4 * 1024 * 1024,
        help="larger request bodies get 413 (default 4 MiB)",
    )  # fmt: skip
    g.add_argument(
        "--max-request-rows", type=int, default=64,
        help="most generations one request may ask for, prompts × n (default 64)",
    )  # fmt: skip
    g.add_argument(
        "--no-warmup", action="store_true", help="mark ready without compiling the buckets first"
    )
    s = p.add_argument_group(
        "sampling defaults (a request may override each; a flag here wins over "
        f"{SAMPLER_DEFAULTS_ENV}, which wins over the built-in default)"
    )
    # One flag per knob of coda_trainer.config.SamplerSettings (--preset, --steps, ..., --cache,
    # --max-new-tokens alias --default-max-tokens: when a request gives no max_tokens, capped at
    # the largest --gen-buckets).
    add_sampler_flags(s, aliases={"max_new_tokens": ["--default-max-tokens"]})
    m = p.add_argument_group("model")
    m.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16"], help="compute dtype override"
    )
    m.add_argument("--attention", default=None, choices=["auto", "xla", "cudnn", "splash"])
    p.add_argument(
        "--graceful-timeout", type=float, default=30.0,
        help="seconds after SIGTERM/SIGINT that unfinished requests get to complete (then 503)",
    )  # fmt: skip
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


def parse_env_defaults(text: str | None) -> SamplerSettings:
    """The settings in CODA_SAMPLER_DEFAULTS (unset or blank: none), validated by the same model
    as the CRD's `spec.sampler.defaults`; ValueError names the variable and the problem."""
    if text is None or not text.strip():
        return SamplerSettings()
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{SAMPLER_DEFAULTS_ENV} is not valid JSON ({e}): {text!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(
            f"{SAMPLER_DEFAULTS_ENV} must be a JSON object, got {type(raw).__name__}: {text!r}"
        )
    try:
        return SamplerSettings.model_validate(raw)
    except ValidationError as e:
        problems = "; ".join(
            f"unknown key {'.'.join(map(str, err['loc']))!r}"
            if err["type"] == "extra_forbidden"
            else f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
            for err in e.errors()
        )
        raise ValueError(
            f"{SAMPLER_DEFAULTS_ENV}: {problems} "
            f"(known keys: {', '.join(SamplerSettings.model_fields)})"
        ) from None


def resolve_sampling_defaults(args: argparse.Namespace, env_text: str | None) -> SamplerSettings:
    """The server's defaults, knob by knob: the flag if given, else CODA_SAMPLER_DEFAULTS. A
    --preset flag replaces the env's preset and the env's values of the knobs a preset sets.
    Unset knobs stay None: the engine applies the preset and the built-in values per request
    (`coda_trainer.config.resolve_sampler_settings`)."""
    env = parse_env_defaults(env_text)
    flags = sampler_settings_from_args(args)
    if flags.preset is not None:
        env = env.model_copy(update=dict.fromkeys(SAMPLER_PRESET_KNOBS))
    return env.model_copy(update=flags.model_dump(exclude_none=True))


class _Usage(Exception):
    """A bad setting found after the heavy imports (exit 2)."""


def _build_app(args: argparse.Namespace, defaults: SamplerSettings, api_key: str | None) -> Any:
    """Import JAX, load the checkpoint and tokenizer, build the app (runs on a worker thread)."""
    log = logging.getLogger("coda.serve")
    log.info("loading %s", args.checkpoint)
    # lazy: these import JAX (+9-12 s measured), off the main thread so /healthz answers at once
    from coda_trainer import hf
    from coda_trainer.serve.app import create_app
    from coda_trainer.serve.engine import Engine, SamplerGenerator, ServeSettings

    resolved = resolve_sampler_settings(defaults)
    max_tokens = resolved.max_new_tokens or SAMPLER_BUILTIN.max_new_tokens
    assert max_tokens is not None
    if max_tokens > args.gen_buckets[-1]:
        log.info(
            "default max tokens %d capped at the largest generation bucket, %d",
            max_tokens, args.gen_buckets[-1],
        )  # fmt: skip
    try:
        settings = ServeSettings(
            model_name=args.model_name or args.checkpoint.rstrip("/").split("/")[-1] or "coda",
            model_aliases=("coda", *filter(None, [os.environ.get(ENV_RUN_NAME)])),
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            max_queue=args.max_queue,
            prompt_buckets=args.prompt_buckets,
            gen_buckets=args.gen_buckets,
            batch_buckets=args.batch_buckets,
            default_max_tokens=min(max_tokens, args.gen_buckets[-1]),
            max_steps=args.max_steps,
            max_body_bytes=args.max_body_bytes,
            max_request_rows=args.max_request_rows,
            warmup=not args.no_warmup,
            defaults=defaults,
        )
    except ValueError as e:
        raise _Usage(str(e)) from e
    log.info(
        "sampling defaults: %s",
        ", ".join(f"{k}={v}" for k, v in resolved.model_dump(exclude_none=True).items()),
    )
    overrides = {k: v for k, v in (("dtype", args.dtype), ("attention", args.attention)) if v}
    model_config, model = hf.load_pretrained(args.checkpoint, config_overrides=overrides or None)
    tok_path = resolve_tokenizer_path(args.checkpoint, args.tokenizer)
    tokenizer = load_tokenizer(tok_path)
    tokenizer.check_model(model_config)
    try:  # fail fast: a bucket the model cannot hold would never be ready
        settings.check_positions(model_config.max_position_embeddings)
    except ValueError as e:
        raise _Usage(str(e)) from e
    log.info("model %s, tokenizer %s", args.checkpoint, tok_path)
    engine = Engine(
        SamplerGenerator(model, model_config), tokenizer, settings,
        max_positions=model_config.max_position_embeddings,
    )  # fmt: skip
    return create_app(engine, api_key=api_key)


def _serve(app: Any, args: argparse.Namespace, stop: Any) -> int:
    import uvicorn

    log = logging.getLogger("coda.serve")
    service = app.state.service

    class Server(uvicorn.Server):
        # uvicorn installs its own SIGTERM/SIGINT handlers while it serves and afterwards restores
        # ours and re-raises the signal; ours only records it, so the exit status stays 0.

        async def on_tick(self, counter: int) -> bool:
            # A signal that arrived after the load but before uvicorn took over reached only us.
            return await super().on_tick(counter) or stop.requested

        async def shutdown(self, sockets: Any = None) -> None:
            service.begin_shutdown(args.graceful_timeout)
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_timeout + SHUTDOWN_MARGIN_S,
    )  # fmt: skip
    code = 0
    try:
        Server(config).run()
    except SystemExit as e:  # uvicorn's own start-up failures (port in use)
        code = e.code if isinstance(e.code, int) else 1
    if service.batcher.model_busy:
        # A warm-up compile or a batch whose requests already got their answer (or a 503) is still
        # running on the model thread. XLA cannot cancel it and the interpreter would join that
        # thread at exit, for up to the whole compile; nothing is left to save, so leave now.
        log.info("exiting without waiting for the model call in flight")
        exit_now(code)
    return code


def main(argv: list[str] | None = None) -> int:
    # From here on SIGTERM/SIGINT only record a stop, acted on at the next check: below, or while
    # the slow start (importing JAX, loading the checkpoint, possibly from gs://) runs on a worker
    # thread, or by the HTTP server once it runs.
    stop = StopRequest().install()
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("coda.serve")
    try:
        defaults = resolve_sampling_defaults(args, os.environ.get(SAMPLER_DEFAULTS_ENV))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    api_key = args.api_key or os.environ.get(ENV_API_KEY) or None
    if not api_key and not is_loopback(args.host) and not args.insecure_no_auth:
        print(
            f"error: refusing to serve on non-loopback host {args.host!r} without an API key; "
            "set --api-key or CODA_API_KEY, or pass --insecure-no-auth",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if stop.requested:
        log.info("received %s before loading the checkpoint: exiting", stop.name)
        return 0
    try:
        app = call_until_stopped(
            lambda: _build_app(args, defaults, api_key), stop, name="coda-serve-load"
        )
    except Stopped:
        log.info("received %s while loading the checkpoint: exiting", stop.name)
        exit_now(0)  # the loader thread may be inside native code: do not join it
    except _Usage as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if stop.requested:
        log.info("received %s while loading the checkpoint: exiting", stop.name)
        return 0
    return _serve(app, args, stop)


if __name__ == "__main__":
    sys.exit(main())
