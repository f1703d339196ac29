"""Planning speed on the whole hippocampus set (260 volumes, budget 1000).

Run: ``.venv/bin/python bench/plan.py [DATA]``. Prints wall time per strategy and its ratio
to a reference measured in the same run: reading every image once (the I/O floor that
``ual`` and ``diverse`` cannot avoid). Timings on a shared machine are noisy; the target is
``ual`` under 20 s.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from sparseslice.datasets import discover_dataset, load_image
from sparseslice.select import make_plan

DEFAULT = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"


def main(data: Path = DEFAULT) -> None:
    ds = discover_dataset(data)
    t0 = time.perf_counter()
    for case in ds.cases:
        load_image(case)
    read = time.perf_counter() - t0
    print(f"{len(ds.cases)} volumes; reference: reading every image once takes {read:.2f} s")
    print(f"{'run':<28}{'seconds':>9}{'x read':>9}{'volumes':>9}{'slices':>8}{'hours':>8}")
    runs = [("random", {}), ("interval", {}), ("block", {}), ("ual", {}),
            ("random rho=0.2", {"rho": 0.2}), ("random diverse s=100", {"volumes": 100, "volume_selection": "diverse"})]
    for name, kw in runs:
        strategy = name.split()[0]
        t0 = time.perf_counter()
        plan = make_plan(ds, budget=1000, strategy=strategy, seed=0, **kw)
        sec = time.perf_counter() - t0
        print(f"{name:<28}{sec:>9.2f}{sec / read:>9.2f}{plan.volumes:>9}{plan.budget:>8}{plan.hours:>8.1f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT)
