"""Will the examples fit? `python bench/preflight.py [--example NAME] [--stage NAME]`.

Compiles every TPU stage of every cluster example in manifests/examples/ for its slice, deviceless
(`coda-ctl plan --compile`, libtpu from the `preflight` extra), and prints per stage: peak GiB per
chip against the compiler's usable HBM, whether it fits (peak ≤ 90% of HBM), the compile time and
the ideal (100% MFU) step and stage times. GPU stages get the arithmetic only (a GPU program
cannot be compiled without the GPU). Slow on a small machine: the 1.7B stages on 256-512 chips
take minutes each to compile.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for part in ("trainer", "operator", "cli"):
    sys.path.insert(0, str(REPO / part))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

EXAMPLES = ["coda-1.7b-v5p.yaml", "multislice-v6e.yaml", "gpu-a3.yaml"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--example", action="append", help="file name in manifests/examples (repeatable)"
    )
    p.add_argument("--stage", action="append", help="only these stage names (repeatable)")
    args = p.parse_args(argv)

    from coda_ctl.plan import TABLE_HEADERS, load_spec_docs, plan_run, table_rows
    from coda_ctl.views import plain_table
    from coda_trainer.preflight import versions

    start = time.perf_counter()
    rows, problems = [], []
    for name in args.example or EXAMPLES:
        for doc in load_spec_docs(str(REPO / "manifests" / "examples" / name)):
            if args.stage:
                doc["spec"]["stages"] = [
                    s for s in doc["spec"]["stages"] if s["name"] in args.stage
                ]
                if not doc["spec"]["stages"]:
                    continue
            plan = plan_run(doc, compile=True)
            rows += table_rows(plan)
            problems += [
                f"{plan['name']}/{s['name']}: {x}" for s in plan["stages"] for x in s["problems"]
            ]
            problems += [
                f"{plan['name']}/{s['name']}: {s['note']}" for s in plan["stages"] if "note" in s
            ]
    print(plain_table(TABLE_HEADERS, rows))
    for line in problems:
        print(line)
    v = versions()
    print(
        f"jax {v['jax']}, libtpu {v['libtpu']}; {time.perf_counter() - start:.0f}s on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
