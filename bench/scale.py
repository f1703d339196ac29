"""CT-sized volumes: time, CPU time and peak memory of every stage on a synthetic CT dataset.

Builds ``--cases`` int16 volumes of ``--shape`` (default 20 x 512x512x300, an abdominal CT) with
a few structures in a temporary folder, then runs each stage in its own subprocess, so the
peak resident memory (``ru_maxrss``) of a stage is its own: ``info`` (headers), ``read``
(every image once: the I/O floor of ``ual`` and ``diverse``), ``plan`` with every strategy
(and ``diverse`` volume selection), ``simulate``, ``interpolate``, 2D training for one epoch,
and ``predict`` of one volume with and without flip TTA. ``predict`` is compared with the
bare forward passes of the same model over the same volume's whole slices, measured in the
same process (ratio goal: <= 1.25 plain, <= k + 1.25 with k flips: 4.25 for the 3 in-plane
flips). Wall and CPU seconds cover the stage's work only (imports excluded); ``rss0`` is the process after its imports.

    .venv/bin/python bench/scale.py                                # 20 x 512x512x300 (long)
    .venv/bin/python bench/scale.py --shape 256,256,150 --cases 6  # a few minutes
    .venv/bin/python bench/scale.py --steps predict,predict_tta    # some stages only

Timings on a shared machine are noisy: read the ratios, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

STRATEGIES = ("random", "interval", "block", "ual")
STEPS = ("info", "read", *(f"plan_{s}" for s in STRATEGIES), "plan_diverse", "simulate", "interpolate",
         "train2d", "predict", "predict_tta")


def ct_volume(shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """An int16 CT-like volume (HU: air, body, two lungs, a liver, two kidneys) and its uint8 label.

    Built slice by slice (axis 2) in float32, so a 512x512x300 case needs little more than its arrays.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = shape
    i, j = np.ogrid[:nx, :ny]
    u, v = (i - nx / 2) / (nx / 2), (j - ny / 2) / (ny / 2)
    image = np.empty(shape, np.int16)
    label = np.zeros(shape, np.uint8)
    liver = rng.uniform(0.3, 0.7, 2) * [nz * 0.4, nz * 0.25] + [nz * 0.3, nz * 0.2]  # centre, half-length
    kidney = rng.uniform(0.4, 0.6) * nz, rng.uniform(0.08, 0.12) * nz
    for k in range(nz):
        t = k / nz
        body = (u / 0.85) ** 2 + (v / 0.65) ** 2 < 1
        hu = np.full((nx, ny), -1000.0, np.float32)
        hu[body] = 40
        lungs = (t > 0.7) & (((u - 0.35) / 0.3) ** 2 + (v / 0.35) ** 2 < 1) | \
                (t > 0.7) & (((u + 0.35) / 0.3) ** 2 + (v / 0.35) ** 2 < 1)
        hu[lungs] = -850
        lab = np.zeros((nx, ny), np.uint8)
        r = 1 - ((k - liver[0]) / liver[1]) ** 2
        if r > 0:
            lab[((u + 0.3) / (0.35 * np.sqrt(r))) ** 2 + ((v - 0.1) / (0.3 * np.sqrt(r))) ** 2 < 1] = 1
        r = 1 - ((k - kidney[0]) / kidney[1]) ** 2
        if r > 0:
            for side in (-1, 1):
                lab[((u - side * 0.45) / (0.1 * np.sqrt(r))) ** 2 + ((v + 0.35) / (0.08 * np.sqrt(r))) ** 2 < 1] = 2
        hu[lab == 1], hu[lab == 2] = 60, 150
        hu += rng.normal(0, 12, (nx, ny)).astype(np.float32)
        image[:, :, k] = np.clip(hu, -1024, 3071).astype(np.int16)
        label[:, :, k] = lab
    return image, label


def build_dataset(root: Path, *, cases: int, shape: tuple[int, int, int]) -> Path:
    """MSD layout (CT modality, spacing 0.8 x 0.8 x 2.5 mm: slice axis 2) of ``cases`` synthetic CTs."""
    from sparseslice.atomic import write_json
    from sparseslice.io import Volume, affine_from_spacing, write_volume

    affine = affine_from_spacing((0.8, 0.8, 2.5))
    training = []
    for n in range(cases):
        image, label = ct_volume(shape, seed=n)
        cid = f"ct_{n:03d}"
        write_volume(Volume(image, affine), root / "imagesTr" / f"{cid}.nii.gz")
        write_volume(Volume(label, affine), root / "labelsTr" / f"{cid}.nii.gz")
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    write_json(root / "dataset.json", {"name": "scale", "modality": {"0": "CT"}, "training": training,
                                       "labels": {"0": "background", "1": "liver", "2": "kidney"},
                                       "numTraining": cases, "numTest": 0, "test": []})
    return root


def _rss_mib() -> float:
    """Resident memory of this process now, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _budget(ds: Any, rho: float) -> int:
    from sparseslice.io import read_header

    return max(1, int(round(rho * sum(read_header(c.images[0]).shape[2] for c in ds.cases))))


def _run_plan(work: Path, args: argparse.Namespace, name: str) -> dict[str, Any]:
    from sparseslice.datasets import discover_dataset
    from sparseslice.select import make_plan

    ds = discover_dataset(work / "ct")
    strategy = name.removeprefix("plan_")
    if strategy == "diverse":
        plan = make_plan(ds, budget=_budget(ds, args.rho) // 2, volumes=max(1, len(ds.cases) // 2),
                         strategy="random", volume_selection="diverse", seed=0)
    elif strategy == "block":  # blocks of 20 % of the structure's slices, volumes until the budget is spent
        plan = make_plan(ds, budget=_budget(ds, args.rho), block_fraction=0.2, strategy="block", seed=0)
    else:
        plan = make_plan(ds, budget=_budget(ds, args.rho), rho=args.rho, strategy=strategy, seed=0)
    return {"volumes": plan.volumes, "slices": plan.budget}


def _run_simulate(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from sparseslice.datasets import discover_dataset
    from sparseslice.select import make_plan
    from sparseslice.simulate import simulate

    ds = discover_dataset(work / "ct")
    plan = make_plan(ds, budget=_budget(ds, args.rho), rho=args.rho, strategy="interval", seed=0)
    simulate(ds, plan, work / "sparse")
    return {"slices": plan.budget}


def _run_train(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    import csv

    from sparseslice.train import TrainConfig, train

    spacing = None if args.spacing == "default" else (0.8, 0.8)  # native: the network sees the CT's own grid
    config = TrainConfig(model="2d", epochs=1, channels=(8, 16, 32), strides=(2, 2), num_threads=args.threads,
                         samples_per_epoch=args.samples, patch_size=(args.patch, args.patch), seed=0,
                         device="cpu", spacing=spacing)
    res = train(work / "sparse", work / "run", config=config, progress=False)
    row = next(csv.DictReader((res.run_dir / "history.csv").open()))
    train_s, val_s = float(row["train_seconds"]), float(row["val_seconds"])
    return {"train_s": round(train_s, 2), "val_s": round(val_s, 2), "val/train": round(val_s / train_s, 3)}


def bare_forward(model: Any, ckpt: Any, image: Any, *, batch: int) -> dict[str, float]:
    """Wall and CPU seconds of the model's forward passes over the whole slices of ``image``: the floor
    any 2D prediction of this volume pays.

    The batches are predict's own (:func:`sparseslice.predict.slice_batches`: gathered, normalised,
    resampled as predict prepares them) and each goes through predict's one window
    (:func:`sparseslice.inference.window_logits`, padding included); only those calls are timed
    (``wall_s``, ``cpu_s``), the preparation of the batches apart (``prep_cpu_s``).
    """
    import torch

    from sparseslice.inference import window_logits
    from sparseslice.predict import image_channels, slice_batches, slice_window

    wall = cpu = 0.0
    c0 = _cpu()
    with torch.inference_mode():
        for _, t in slice_batches(image_channels(image, ckpt), ckpt, batch_size=batch, spacing=image.spacing):
            t0, c1 = time.perf_counter(), _cpu()
            window_logits(model, t, roi=slice_window(ckpt, t.shape[2:]))
            wall, cpu = wall + time.perf_counter() - t0, cpu + _cpu() - c1
    return {"wall_s": wall, "cpu_s": cpu, "prep_cpu_s": _cpu() - c0 - cpu}


def _run_predict(work: Path, args: argparse.Namespace, *, tta: bool,
                 rss0: float) -> tuple[float, float, dict[str, Any]]:
    """predict_volume of the first case (with post-processing), then without it, and the bare passes
    (before and after, averaged: the machine's speed drifts by some percent within a run).

    Memory: ``peak_mib`` is the process's peak (image reading and the warm-up included), ``peak-rss0_mib``
    that less ``rss0`` (the process after its imports: Python, torch, the model), and ``x_volume_f32``
    that over the volume's size in float32 (goal: at most 3). The one-epoch model's map is mostly noise
    (``map_foreground``, ``map_components``): the worst case of post-processing, whose cost grows with
    the labels' bounding boxes and components; ``post_reference_cpu/bare`` is its cost on the case's
    reference labels, the map of a model that segments.
    """
    import inspect

    import numpy as np
    from scipy import ndimage

    from sparseslice.datasets import discover_dataset, load_image, load_label
    from sparseslice.model import load_checkpoint
    from sparseslice.predict import postprocess, predict_volume

    model, ckpt = load_checkpoint(work / "run")
    case = discover_dataset(work / "ct").cases[0]
    image = load_image(case)
    bare_forward(model, ckpt, image, batch=16)  # warm-up: first passes pay one-off costs
    before = bare_forward(model, ckpt, image, batch=16)
    t0, c0 = time.perf_counter(), _cpu()
    predict_volume(model, ckpt, image, tta=tta)
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    peak = _peak_mib()
    t0, c0 = time.perf_counter(), _cpu()
    raw = predict_volume(model, ckpt, image, tta=tta, fill_holes=False, largest_component=False)
    nopost = time.perf_counter() - t0, _cpu() - c0
    after = bare_forward(model, ckpt, image, batch=16)
    bare = {k: (before[k] + after[k]) / 2 for k in before}
    reference = np.asarray(load_label(case).array, np.uint8)
    c0 = _cpu()
    postprocess(reference, inplace=True)
    post_ref = _cpu() - c0
    components = sum(ndimage.label(raw == v, structure=np.ones((3, 3, 3), bool))[1] for v in np.unique(raw)[1:])
    passes = 4 if tta else 1  # two in-plane axes: 2^2 flip sets, the plain pass and 3 flips
    volume = image.array.size * 4 / 2**20
    return wall, cpu, {"bare_wall_s": round(bare["wall_s"], 2), "bare_cpu_s": round(bare["cpu_s"], 2),
                       "bare_drift": round(after["cpu_s"] / before["cpu_s"], 3),
                       "prep_cpu/bare": round(bare["prep_cpu_s"] / bare["cpu_s"], 3),
                       "wall/bare": round(wall / bare["wall_s"], 3), "cpu/bare": round(cpu / bare["cpu_s"], 3),
                       "nopost_cpu/bare": round(nopost[1] / bare["cpu_s"], 3),
                       "post_reference_cpu/bare": round(post_ref / bare["cpu_s"], 3),
                       "goal_cpu/bare": passes + 0.25, "passes": passes,
                       "map_foreground": round(float(np.mean(raw > 0)), 3), "map_components": int(components),
                       "window": inspect.signature(predict_volume).parameters["window"].default,
                       "peak_predict_mib": round(peak), "peak-rss0_mib": round(peak - rss0),
                       "volume_f32_mib": round(volume, 1), "x_volume_f32": round((peak - rss0) / volume, 2)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_step(name: str, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one stage in this process; returns its figures."""
    import torch

    torch.set_num_threads(args.threads)
    from sparseslice.datasets import discover_dataset, load_image
    from sparseslice.info import describe_dataset

    rss0 = _rss_mib()
    t0, c0 = time.perf_counter(), _cpu()
    extra: dict[str, Any] = {}
    if name == "info":
        describe_dataset(work / "ct")
    elif name == "read":
        for case in discover_dataset(work / "ct").cases:
            load_image(case)
    elif name.startswith("plan_"):
        extra = _run_plan(work, args, name)
    elif name == "simulate":
        extra = _run_simulate(work, args)
    elif name == "interpolate":
        from sparseslice.interpolate.dataset import interpolate_dataset

        interpolate_dataset(work / "sparse", work / "interpolated", method=args.method, progress=False)
    elif name == "train2d":
        extra = _run_train(work, args)
    elif name in ("predict", "predict_tta"):
        wall, cpu, extra = _run_predict(work, args, tta=name == "predict_tta", rss0=rss0)
        return {"step": name, "wall_s": wall, "cpu_s": cpu, "rss0_mib": rss0, "peak_mib": _peak_mib(), **extra}
    else:
        raise SystemExit(f"unknown step {name!r}; use one of {', '.join(STEPS)}")
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"step": name, "wall_s": wall, "cpu_s": cpu, "rss0_mib": rss0, "peak_mib": _peak_mib(), **extra}


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _child(name: str, work: Path, argv: list[str]) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, *argv, "--child", name, "--work", str(work)],
                         capture_output=True, text=True, check=False)
    if out.returncode:
        return {"step": name, "error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict[str, Any]], *, cases: int) -> None:
    """One line per stage, then the ratios measured in this run."""
    print(f"{'step':<14}{'wall s':>9}{'cpu s':>9}{'rss0 MiB':>10}{'peak MiB':>10}  extra")
    by = {r["step"]: r for r in rows}
    read = by.get("read", {}).get("wall_s")
    for r in rows:
        if "error" in r:
            print(f"{r['step']:<14} FAILED: {r['error']}")
            continue
        extra = {k: v for k, v in r.items() if k not in ("step", "wall_s", "cpu_s", "rss0_mib", "peak_mib")
                 and v is not None}
        if r["step"].startswith("plan_"):
            extra["s/volume"] = round(r["wall_s"] / cases, 2)
            if read:
                extra["x read"] = round(r["wall_s"] / read, 2)
        print(f"{r['step']:<14}{r['wall_s']:>9.2f}{r['cpu_s']:>9.2f}{r['rss0_mib']:>10.0f}{r['peak_mib']:>10.0f}  "
              + " ".join(f"{k}={v}" for k, v in extra.items()))
    for name in ("predict", "predict_tta"):
        r = by.get(name, {})
        if "cpu/bare" in r:  # the issue-14 goals, CPU seconds over the bare passes measured in the same process
            print(f"{name}: cpu/bare {r['cpu/bare']} (goal <= {r['goal_cpu/bare']}) on the one-epoch model's map "
                  f"({r['map_foreground']:.0%} foreground, {r['map_components']} components); without "
                  f"post-processing {r['nopost_cpu/bare']}, + post-processing of the reference labels "
                  f"{r['post_reference_cpu/bare']} = "
                  f"{round(r['nopost_cpu/bare'] + r['post_reference_cpu/bare'], 3)}; peak {r['peak_mib']:.0f} MiB, "
                  f"peak-rss0 {r['peak-rss0_mib']} MiB = {r['x_volume_f32']} x the volume in float32 (goal <= 3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="512,512,300", help="volume shape X,Y,Z (Z: slice axis)")
    parser.add_argument("--cases", type=int, default=20)
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of " + ", ".join(STEPS))
    parser.add_argument("--rho", type=float, default=0.05, help="annotated fraction of slices (plan, simulate)")
    parser.add_argument("--method", default="sdf", help="interpolation method")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=64, help="training samples in the one epoch")
    parser.add_argument("--patch", type=int, default=128, help="2D training patch (square)")
    parser.add_argument("--spacing", default="native", choices=("native", "default"),
                        help="train at the CT's own in-plane spacing, or at train's default (coarsened to 128 "
                        "voxels in-plane: far less to predict)")
    parser.add_argument("--data", default=None, help="keep the synthetic dataset in this folder (built when "
                        "empty), to reuse it across runs")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args, _ = parser.parse_known_args()
    if args.child:
        print(json.dumps(run_step(args.child, Path(args.work), args)))
        return
    shape = tuple(int(s) for s in args.shape.split(","))
    argv = [a for a in sys.argv[1:]]
    with tempfile.TemporaryDirectory(prefix="sparseslice-scale-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if args.data:  # a dataset built by an earlier run (same shape and cases), linked in
            Path(args.data).mkdir(parents=True, exist_ok=True)
            (work / "ct").symlink_to(Path(args.data).resolve())
            if not (work / "ct" / "dataset.json").exists():
                build_dataset(work / "ct", cases=args.cases, shape=shape)
        else:
            build_dataset(work / "ct", cases=args.cases, shape=shape)
        print(f"{args.cases} synthetic CT volumes {shape} int16 ready in {time.perf_counter() - t0:.0f} s; "
              f"{args.threads} threads; rho {args.rho}")
        rows = []
        steps = args.steps.split(",")
        if any(s in steps for s in ("interpolate", "train2d", "predict", "predict_tta")) and "simulate" not in steps:
            steps = ["simulate", *steps]
        if any(s.startswith("predict") for s in steps) and "train2d" not in steps:
            steps.insert(steps.index("simulate") + 1, "train2d")
        for name in steps:
            rows.append(_child(name, work, argv))
            print(json.dumps(rows[-1]), flush=True)
    report(rows, cases=args.cases)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
