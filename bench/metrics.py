"""Benchmark: HD95 + ASSD, ours vs MONAI (and DeepMind's surface-distance if installed).

Run:  .venv/bin/python bench/metrics.py            (add --quick to skip 512x512x300)

For each set of mask pairs it times, in the same process and on one thread:

- ours: one ``surface_distances`` call, then ``hausdorff(95)`` and ``assd()`` from it;
- MONAI: ``compute_hausdorff_distance(percentile=95)`` + ``compute_average_surface_distance
  (symmetric=True)`` (inputs already tensors, outside the timing);
- DeepMind ``surface_distance`` (optional: ``pip install -c constraints.txt surface-distance``):
  ``compute_surface_distances`` + robust HD95 + average distance. Its surface is made of
  surfels weighted by area, so its values differ from MONAI's by definition; they are shown
  for scale only.

It prints times, the ratio ours/MONAI (the goal is <= 0.5 on the large masks) and the largest
relative value difference against MONAI. Timings on a shared machine are noisy: the ratio,
measured in the same run, is the figure to read.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from sparseslice.metrics import surface_distances

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"


def ours(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    sd = surface_distances(a, b, spacing=spacing)
    return sd.hausdorff(95), sd.assd()


def monai(ta: torch.Tensor, tb: torch.Tensor, spacing) -> tuple[float, float]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    hd95 = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=spacing)
    assd = compute_average_surface_distance(ta, tb, include_background=True, symmetric=True, spacing=spacing)
    return float(hd95.item()), float(assd.item())


def deepmind(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float]:
    import surface_distance as sdm

    sd = sdm.compute_surface_distances(b, a, tuple(float(s) for s in spacing))
    ab, ba = sdm.compute_average_surface_distance(sd)
    n_ab, n_ba = sd["surfel_areas_gt"].sum(), sd["surfel_areas_pred"].sum()
    return float(sdm.compute_robust_hausdorff(sd, 95)), float((ab * n_ab + ba * n_ba) / (n_ab + n_ba))


def timed(fn, pairs) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    values = [fn(*p) for p in pairs]
    return time.perf_counter() - start, np.asarray(values, dtype=float)


def hippocampus_pairs(n: int) -> list[tuple[np.ndarray, np.ndarray, tuple[float, ...]]]:
    """Reference masks of real cases vs. a plausible error: shifted one voxel and eroded in part."""
    from sparseslice.io import read_label

    files = sorted((HIPPOCAMPUS / "labelsTr").glob("*.nii.gz"))[:n]
    pairs = []
    for f in files:
        ref = read_label(f)
        for value in (1, 2):
            r = ref.array == value
            p = np.roll(r, 1, axis=int(hash(f.name) % 3))
            p[: p.shape[0] // 2] = ndimage.binary_erosion(p[: p.shape[0] // 2])
            pairs.append((p, r, ref.spacing))
    return pairs


def synthetic_pair(shape, spacing, seed: int = 0) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """Two overlapping warped ellipsoids filling about half of each axis."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    centre = np.asarray(shape) / 2
    radii = np.asarray(shape) * 0.3
    dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True))
    small = tuple(max(s // 8, 4) for s in shape)
    warp = ndimage.zoom(rng.normal(size=small), [s / t for s, t in zip(shape, small, strict=True)], order=1)
    ref = dist < 1.0
    pred = dist + 0.15 * warp[: shape[0], : shape[1], : shape[2]] < 1.0
    return pred, ref, spacing


def run(name: str, pairs, *, with_deepmind: bool) -> None:
    tensors = [(torch.from_numpy(p[None, None]).float(), torch.from_numpy(r[None, None]).float(), sp)
               for p, r, sp in pairs]
    t_ours, v_ours = timed(ours, pairs)
    t_monai, v_monai = timed(monai, tensors)
    rel = np.abs(v_ours - v_monai) / np.maximum(np.abs(v_monai), 1e-12)
    line = (f"{name:<34} {len(pairs):>5} {t_ours:>9.3f} {t_monai:>9.3f} {t_ours / t_monai:>7.3f} "
            f"{rel[:, 0].max():>10.2e} {rel[:, 1].max():>10.2e}")
    if with_deepmind:
        t_dm, v_dm = timed(deepmind, pairs)
        diff = np.abs(v_dm - v_monai) / np.maximum(np.abs(v_monai), 1e-12)
        line += f" {t_dm:>9.3f} {t_ours / t_dm:>7.3f} {diff.max():>9.2e}"
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 512x512x300 masks")
    parser.add_argument("--cases", type=int, default=60, help="hippocampus cases (2 labels each)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    try:
        import surface_distance  # noqa: F401

        with_deepmind = True
    except ImportError:
        with_deepmind = False
        print("DeepMind surface-distance not installed: its columns are skipped")
    header = (f"{'masks':<34} {'pairs':>5} {'ours s':>9} {'monai s':>9} {'ratio':>7} "
              f"{'hd95 rel':>10} {'assd rel':>10}")
    if with_deepmind:
        header += f" {'dm s':>9} {'ours/dm':>7} {'dm-monai':>9}"
    print(header)
    if (HIPPOCAMPUS / "labelsTr").is_dir():
        run(f"hippocampus x{args.cases} (1 mm iso)", hippocampus_pairs(args.cases), with_deepmind=with_deepmind)
    else:
        print(f"hippocampus skipped: {HIPPOCAMPUS} not found")
    sizes = [((256, 256, 100), (0.8, 0.8, 2.5))]
    if not args.quick:
        sizes.append(((512, 512, 300), (0.7, 0.7, 1.0)))
    for shape, spacing in sizes:
        pair = synthetic_pair(shape, spacing)
        run(f"synthetic {'x'.join(map(str, shape))} sp {spacing}", [pair], with_deepmind=with_deepmind)


if __name__ == "__main__":
    main()
