"""Benchmark: interpolation accuracy and speed on MSD hippocampus, and memory on a large volume.

For each case, keep every k-th slice along the dataset slice axis (axis 0 for hippocampus), for
every phase (first kept slice 0 .. k-1, so results do not hinge on where the grid falls),
interpolate with each method and score the slices that were filled against the true label:
Dice per label (mean over cases; a label absent from both prediction and truth on the filled
slices is skipped), and time per volume. ``mci`` (ITK) is the reference measured in the same
run; ratios are printed against it. ITK runs on one thread (see sparseslice.interpolate.mci),
like the others. Timings on a shared machine are noisy.

    .venv/bin/python bench/interpolate.py                 # all 260 cases, k = 2, 4, 8
    .venv/bin/python bench/interpolate.py --cases 40      # quicker subset (first 40 by name)
    .venv/bin/python bench/interpolate.py --memory-only   # peak memory on 512x512x1000 only
    .venv/bin/python bench/interpolate.py --memory-only --memory-shape 256,256,200 --memory-every 5 \
        --memory-methods sdf,mci                          # sdf vs mci time on a larger volume
"""

from __future__ import annotations

import argparse
import resource
import time
import tracemalloc
from pathlib import Path

import numpy as np

from sparseslice.datasets import dataset_slice_axis, discover_dataset
from sparseslice.interpolate import interpolate_label
from sparseslice.io import read_label
from sparseslice.sparse import SparseLabel

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"


def dice(pred: np.ndarray, true: np.ndarray) -> float:
    total = np.count_nonzero(pred) + np.count_nonzero(true)
    return np.nan if total == 0 else 2.0 * np.count_nonzero(pred & true) / total


def accuracy(cases: int | None, ks: list[int], methods: list[str]) -> None:
    ds = discover_dataset(DATA, require_labels=True)
    chosen = ds.cases[:cases] if cases else ds.cases
    labels = [read_label(c.label) for c in chosen]
    axis = dataset_slice_axis([v.shape for v in labels], [v.spacing for v in labels])
    values = sorted({int(x) for v in labels for x in np.unique(v.array)} - {0})
    if "mci" in methods:
        from sparseslice.interpolate.mci import import_itk, mci_fill

        t0 = time.perf_counter()
        import_itk()
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        tiny = np.zeros((8, 8, 8), np.uint8)
        tiny[2:6, 2:6, ::4] = 1
        mci_fill(tiny, np.arange(8) % 4 == 0, axis=2, spacing=(1.0, 1.0, 1.0))
        t_first = time.perf_counter() - t0
        print(f"ITK one-off: import {t_import:.2f} s, first filter call {t_first:.2f} s (not in per-volume times)")
    print(f"{len(chosen)} cases, slice axis {axis}, labels {values}, all phases of each k\n")
    header = f"{'k':>2} {'method':8} " + " ".join(f"{'dice' + str(v):>7}" for v in values)
    print(header + f" {'mean':>7} {'ms/vol':>8} {'dDice vs mci':>12} {'time/mci':>9}")
    for k in ks:
        scores = {m: [] for m in methods}
        seconds = dict.fromkeys(methods, 0.0)
        for vol in labels:  # methods interleaved per volume, so load changes hit them alike
            lab = vol.array
            for phase in range(k):
                sparse = SparseLabel.from_slices(lab, range(phase, lab.shape[axis], k), axis=axis)
                for method in methods:
                    t0 = time.perf_counter()
                    res = interpolate_label(sparse, spacing=vol.spacing, method=method)
                    seconds[method] += time.perf_counter() - t0
                    index = [slice(None)] * 3
                    index[axis] = res.interpolated
                    pred, true = res.sparse.label[tuple(index)], lab[tuple(index)]
                    scores[method].append([dice(pred == v, true == v) for v in values])
        rows = {}
        for method in methods:
            per_label = np.nanmean(np.asarray(scores[method], float), axis=0)
            rows[method] = (per_label, float(per_label.mean()), 1000 * seconds[method] / (len(labels) * k))
        for method, (per_label, mean, ms) in rows.items():
            ref = rows.get("mci")
            versus = f"{mean - ref[1]:+12.4f} {ms / ref[2]:9.3f}" if ref else ""
            print(f"{k:>2} {method:8} " + " ".join(f"{d:7.4f}" for d in per_label) + f" {mean:7.4f} {ms:8.2f} "
                  + versus)
        print()


def memory(shape: tuple[int, int, int], every: int, methods: list[str]) -> None:
    """Peak memory of ``sdf`` on a large synthetic label (a bent tube, two touching labels)."""
    i, j = np.ogrid[:shape[0], :shape[1]]
    label = np.zeros(shape, np.uint8)
    for k in range(shape[2]):
        ci = shape[0] / 2 + shape[0] / 6 * np.sin(k / shape[2] * 2 * np.pi)
        r = shape[0] / 5 * (0.6 + 0.4 * np.cos(k / shape[2] * 3 * np.pi))
        disc = (i - ci) ** 2 + (j - shape[1] / 2) ** 2 < r * r
        label[:, :, k][disc] = 1
        label[:, :, k][disc & (j > shape[1] / 2)] = 2
    sparse = SparseLabel.from_slices(label, range(0, shape[2], every), axis=2)
    base = label.nbytes
    if "mci" in methods:
        from sparseslice.interpolate.mci import import_itk

        import_itk()  # one-off import kept out of the timing
    for method in methods:
        tracemalloc.start()
        t0 = time.perf_counter()
        res = interpolate_label(sparse, spacing=(0.8, 0.8, 1.5), method=method)
        seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        print(f"{method:8} {shape} every {every}: {seconds:.2f} s, peak traced {peak / 2**20:.0f} MiB "
              f"({peak / base:.2f} x the label's {base / 2**20:.0f} MiB), filled {int(res.interpolated.sum())} slices")
        del res
    print(f"process max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB "
          "(includes the input label and the interpreter)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=None, help="first N cases by name (default: all)")
    parser.add_argument("--k", default="2,4,8", help="keep every k-th slice, comma-separated")
    parser.add_argument("--methods", default="nearest,sdf,mci")
    parser.add_argument("--memory-shape", default="512,512,1000")
    parser.add_argument("--memory-every", type=int, default=10)
    parser.add_argument("--memory-methods", default="nearest,sdf", help="add mci to time it on the large volume "
                        "(its memory is ITK's, not traced)")
    parser.add_argument("--memory-only", action="store_true")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    if not args.memory_only:
        if not (DATA / "labelsTr").is_dir():
            raise SystemExit(f"hippocampus data not found at {DATA}")
        accuracy(args.cases, [int(k) for k in args.k.split(",")], args.methods.split(","))
    if not args.no_memory:
        memory(tuple(int(s) for s in args.memory_shape.split(",")), args.memory_every, args.memory_methods.split(","))


if __name__ == "__main__":
    main()
