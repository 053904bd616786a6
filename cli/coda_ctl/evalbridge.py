"""`coda-ctl eval` and `local run --eval`: delegate to the eval harness (`coda_trainer.api.evaluate`)."""

from __future__ import annotations


def eval_argv(
    benchmark: str | list[str],
    *,
    url: str | None,
    checkpoint: str | None,
    limit: int | None,
    out: str | None,
    max_new_tokens: int | None = None,
) -> list[str]:
    names = [benchmark] if isinstance(benchmark, str) else benchmark
    argv = [arg for name in names for arg in ("--benchmark", name)]
    argv += ["--url", url] if url else ["--checkpoint", str(checkpoint)]
    if limit is not None:
        argv += ["--limit", str(limit)]
    if out:
        argv += ["--out", out]
    if max_new_tokens is not None:
        argv += ["--max-new-tokens", str(max_new_tokens)]
    return argv


def run_eval(
    benchmark: str | list[str],
    *,
    url: str | None,
    checkpoint: str | None,
    limit: int | None,
    out: str | None,
    max_new_tokens: int | None = None,
) -> int:
    """Run the harness in this process; it prints the pass@k table. Returns its exit status."""
    from coda_trainer import api as trainer

    from coda_ctl.errors import CtlError

    argv = eval_argv(
        benchmark,
        url=url,
        checkpoint=checkpoint,
        limit=limit,
        out=out,
        max_new_tokens=max_new_tokens,
    )
    try:
        return trainer.evaluate(argv)
    except (
        Exception
    ) as e:  # the harness's own errors (unreachable server, bad checkpoint): one line
        where = url or checkpoint
        names = [benchmark] if isinstance(benchmark, str) else benchmark
        raise CtlError(
            f"evaluation of {', '.join(names)} against {where} failed: {type(e).__name__}: {e}"
        ) from e
