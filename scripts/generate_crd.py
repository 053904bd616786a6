#!/usr/bin/env python3
"""Write the CodaTrainingRun CRD generated from coda_operator.api.

    python scripts/generate_crd.py           # write manifests/crd/ and charts/coda-operator/crds/
    python scripts/generate_crd.py --check   # exit 1 if either file is stale

tests/operator/test_crd.py runs the same check.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer"), str(ROOT / "operator")]

from coda_operator.crd import CRD_FILE_NAME, crd_yaml  # noqa: E402

TARGETS = [
    ROOT / "manifests" / "crd" / CRD_FILE_NAME,
    ROOT / "charts" / "coda-operator" / "crds" / CRD_FILE_NAME,
]


def stale_files() -> list[Path]:
    text = crd_yaml()
    return [p for p in TARGETS if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a generated file is stale")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for p in stale:
            print(
                f"stale: {p.relative_to(ROOT)} (run python scripts/generate_crd.py)",
                file=sys.stderr,
            )
        return 1 if stale else 0
    text = crd_yaml()
    for p in stale:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        print(f"wrote {p.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
