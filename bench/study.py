"""Benchmark: a whole study on real data (default: the quick preset on MSD hippocampus).

Prints the wall time and, as ratios measured in the same run, how well the workers were
used (sum of run times / (wall time x workers)) and how much of a run is not training
(plan, simulate, predict, evaluate). Timings on a shared machine are noisy.

    .venv/bin/python bench/study.py --workers 2 --out /tmp/quick-study
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from sparseslice.study import load_spec, run_study
from sparseslice.study.report import write_report

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="quick", help="spec file or preset")
    parser.add_argument("--data", type=Path, default=HIPPOCAMPUS)
    parser.add_argument("--out", type=Path, default=Path("/tmp/sparseslice-bench-study"))
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    spec = load_spec(args.spec, data=args.data)
    start = time.perf_counter()
    summary = run_study(spec, args.out, workers=args.workers, progress=True)
    wall = time.perf_counter() - start
    report = write_report(args.out)
    runs = pd.read_csv(args.out / "runs.csv")
    done = runs[runs["status"] == "done"]
    print(f"runs: {len(summary.ran)} ran, {len(summary.skipped)} skipped, {len(summary.failed)} failed")
    print(f"wall time: {wall:.0f} s ({wall / 60:.1f} min) with {args.workers} workers")
    if len(summary.ran) and not summary.skipped:
        print(f"worker use (sum of run times / wall x workers): {done['seconds'].sum() / (wall * args.workers):.2f}")
    print(f"share of a run spent outside training: {1 - done['train_seconds'].sum() / done['seconds'].sum():.2f}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
