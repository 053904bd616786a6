"""`python -m coda_operator`: run the CodaTrainingRun operator (kopf) with coda's handlers.

python -m coda_operator --namespace ml --namespace research --liveness http://0.0.0.0:8080/healthz
python -m coda_operator --all-namespaces --standalone --metrics-port 9090
python -m coda_operator --namespace ml --peering coda-operator   # several replicas, one active
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import sys

# Collector thresholds for an operator that holds thousands of objects. With Python's defaults
# (700, 10, 10), at 1,000 runs (bench/operator.py) the collector ran ~2,000 times, took ~12 % of
# the operator's CPU, and its full collections (up to 290 ms, the event loop stopped) were the
# whole of the hand-off p99. Young objects are collected 14× less often; a full collection still
# happens when the long-lived set has grown by a quarter (CPython's own rule).
GC_THRESHOLDS = (10_000, 10, 10)


def tune_gc() -> None:
    """Take what start-up allocated (modules, kopf's registry, pydantic's schemas: never garbage)
    out of every later collection's scan, then collect less often (GC_THRESHOLDS)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m coda_operator", description=__doc__.splitlines()[0])
    scope = p.add_mutually_exclusive_group(required=True)
    scope.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; globs allowed)",
    )
    scope.add_argument(
        "-A", "--all-namespaces", action="store_true", help="watch the whole cluster"
    )
    peers = p.add_mutually_exclusive_group()
    peers.add_argument(
        "--standalone", action="store_true", help="no peering: this is the only operator instance"
    )
    peers.add_argument(
        "--peering",
        metavar="NAME",
        default=None,
        help="kopf peering object to elect the active replica with (KopfPeering in each watched "
        "namespace, ClusterKopfPeering with --all-namespaces; default: kopf's 'default')",
    )
    p.add_argument(
        "--liveness", metavar="URL", help="kopf health endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument(
        "--metrics-port", type=int, default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument(
        "--resync-seconds",
        type=float,
        default=None,
        help="safety-net resync: every run reconciled once per this many seconds (default 60)",
    )
    p.add_argument(
        "--server", default=None, help=argparse.SUPPRESS
    )  # API URL without auth (emulators)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.resync_seconds is not None:
        # read when the handlers module registers its timer, so set it before importing
        os.environ["CODA_OPERATOR_RESYNC_SECONDS"] = str(args.resync_seconds)

    import kopf

    from coda_operator.handlers import OperatorConfig, run_operator

    kopf.configure(verbose=args.verbose)
    if not args.verbose:
        # kopf logs "Handler '…' succeeded." at INFO for every watch event it hands to a handler:
        # 12 lines per run, 12,000 for 1,000 runs, saying nothing the run's status and Events do
        # not. Failures are WARNING/ERROR and still show; --verbose shows everything.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    tune_gc()
    config = OperatorConfig(server=args.server, metrics_port=args.metrics_port)
    # CODA_OPERATOR_PROFILE=<file>: a cProfile of the whole run, written when the operator stops
    # (SIGTERM stops it gracefully); `python -m pstats <file>` reads it.
    profile_to = os.environ.get("CODA_OPERATOR_PROFILE")
    profiler = None
    if profile_to:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    try:
        asyncio.run(
            run_operator(
                namespaces=args.namespace,
                clusterwide=args.all_namespaces,
                standalone=args.standalone,
                peering=args.peering,
                liveness=args.liveness,
                config=config,
            )
        )
    except Exception as e:
        # A start-up refusal (kopf wraps it in its ActivityError) is a message, not a traceback.
        cause = e.__cause__
        if isinstance(cause, kopf.PermanentError):
            print(f"coda-operator: not starting: {cause}", file=sys.stderr)
            return 1
        raise
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(profile_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
