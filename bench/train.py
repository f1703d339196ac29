"""Training benchmarks: throughput against the bare model step, and quality on hippocampus.

Run from the repository root::

    .venv/bin/python bench/train.py throughput          # (a) a minute or two; --model 3d, --device cuda
    .venv/bin/python bench/train.py quality             # (b) two 5-minute runs + inference

(a) End-to-end training samples/s (sampling, batching, augmentation, loss, backward,
optimiser, progress bookkeeping; validation timed separately) divided by the bare model
step (forward + selective loss + backward + Adam step on one batch already in memory, same
model and batch size), both measured in the same process and both in steady state: the bare
step after 3 warm-up steps, the training run on its second epoch (its first pays oneDNN's
primitive creation and the allocator's first blocks). Goal >= 0.90. Also the cost of the
batched augmentation against MONAI's ``RandAffined`` applied sample by sample. On a GPU each
timed epoch takes 300 steps by default (40 on a CPU): 40 GPU steps last well under a second.

(b) MSD hippocampus, ``split_cases(ids, seed=0)``: a 2D model on full labels and on 10 % of
the slices of every training volume (fixed interval), each trained for at most 5 minutes
with 2 threads, validated on the val split, scored on the test split (mean foreground Dice).
Goal: full >= 0.85; sparse >= 95 % of full.

Timings on a shared CPU are noisy: ratios are measured in the same run to limit that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseslice.datasets import discover_dataset, load_image, load_label, slice_axis_of, split_cases
from sparseslice.sparse import SparseLabel, write_sparse
from sparseslice.study.pipeline import link_cases
from sparseslice.train import TrainConfig, train
from sparseslice.train.config import MODELS
from sparseslice.train.losses import selective_loss

HIPPO = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"




def interval_slices(n: int, fraction: float) -> list[int]:
    """``round(fraction * n)`` (at least 1) slices at a fixed interval, centred."""
    k = max(1, int(round(fraction * n)))
    return sorted({int((i + 0.5) * n / k) for i in range(k)})


def write_sparse_subset(src: Path, out: Path, case_ids: list[str], *, axis: int, fraction: float) -> Path:
    """Sparse dataset with ``fraction`` of the slices at fixed interval (``SparseLabel.from_slices``)."""
    ds = discover_dataset(src)
    (out / "imagesTr").mkdir(parents=True, exist_ok=True)
    for cid in case_ids:
        case = ds.case(cid)
        label = load_label(case)
        sparse = SparseLabel.from_slices(label.array, interval_slices(label.shape[axis], fraction), axis=axis)
        (out / "imagesTr" / case.images[0].name).symlink_to(case.images[0])
        write_sparse(sparse, out / "labelsTr" / case.label.name, like=label)
    record = json.loads((src / "dataset.json").read_text())
    if "training" in record:  # list the written cases only: a listing is the truth for discovery
        record["training"] = [{"image": f"./imagesTr/{ds.case(c).images[0].name}",
                               "label": f"./labelsTr/{ds.case(c).label.name}"} for c in case_ids]
        record["numTraining"] = len(case_ids)
    (out / "dataset.json").write_text(json.dumps(record, indent=2))
    return out


def test_dice(run_dir: Path, src: Path, case_ids: list[str], *, tta: bool = False) -> dict[str, float]:
    """Mean Dice per foreground label over the test cases (a label absent from both counts 1),
    with ``sparseslice.predict``'s defaults (largest component, hole filling) and flip TTA when
    ``tta``; also the per-case Dice of the mean over labels (``"cases"``) and its std."""
    from sparseslice.model import load_checkpoint
    from sparseslice.predict import predict_volume

    ds = discover_dataset(src)
    model, ckpt = load_checkpoint(run_dir)
    labels = sorted(v for v in ds.label_names if v != 0) or [1]
    scores: dict[str, list[float]] = {str(v): [] for v in labels}
    for cid in case_ids:
        case = ds.case(cid)
        pred = predict_volume(model, ckpt, load_image(case), tta=tta)
        ref = load_label(case).array
        for lab in labels:
            p, r = pred == lab, ref == lab
            denom = p.sum() + r.sum()
            scores[str(lab)].append(1.0 if denom == 0 else float(2 * (p & r).sum() / denom))
    per_case = np.mean([scores[str(v)] for v in labels], axis=0)
    out: dict[str, Any] = {k: float(np.mean(v)) for k, v in scores.items()}
    out["mean"] = float(per_case.mean())
    out["std"] = float(per_case.std())
    out["cases"] = dict(zip(case_ids, per_case.round(4).tolist(), strict=True))
    out["inference"] = f"sparseslice.predict.predict_volume(tta={tta})"
    return out


def throughput(args: argparse.Namespace) -> None:
    from sparseslice.model import pick_device

    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    ds = discover_dataset(args.data)
    split = split_cases(ds.case_ids, seed=0)
    config = TrainConfig(model=args.model, epochs=1, num_threads=args.threads, seed=0, augment=True,
                         device=str(device), **settings_from(args.set))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        train_dir = link_cases(ds, split.train[:args.cases], tmp / "train")
        val_dir = link_cases(ds, split.val[:2], tmp / "val")
        # warm-up run resolves the config (patch size, batch size) and loads the code paths
        res = train(train_dir, tmp / "warm", config=config.updated(samples_per_epoch=64), val_dir=val_dir,
                    progress=False)
        resolved = TrainConfig.from_dict(json.loads((res.run_dir / "config.json").read_text()))
        bs, patch = resolved.batch_size, resolved.patch_size
        steps = args.steps or (300 if device.type == "cuda" else 40)
        # bare model step: same model, same batch size, tensors already in memory
        from sparseslice.model import ModelSpec, build_model, memory_format

        n_classes = len(json.loads((res.run_dir / "split.json").read_text())["labels"])
        spec = ModelSpec(dims=len(patch), in_channels=1, out_channels=n_classes, channels=resolved.channels,
                         strides=resolved.strides, num_res_units=resolved.num_res_units)
        model = build_model(spec).to(device)
        fmt = memory_format(len(patch), channels_last=resolved.channels_last) or torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((bs, 1, *patch), generator=gen).to(device).contiguous(memory_format=fmt)
        y = torch.randint(0, n_classes, (bs, *patch), generator=gen).to(device)
        w = torch.ones((bs, *patch), device=device)

        def bare(n: int) -> float:
            t = time.perf_counter()
            for _ in range(n):
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved.bf16):
                    out = model(x)
                loss = selective_loss(out, y, w)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t

        bare(3)
        results = []
        for rep in range(args.repeats):  # interleave to share the noise of the shared CPU
            t_bare = bare(steps)
            # two epochs, the second timed: the first pays what the bare step's warm-up steps exclude
            # (oneDNN primitive creation, the allocator's first blocks: ~1 s of a 40-step 3D epoch)
            run = train(train_dir, tmp / f"e2e{rep}", config=config.updated(samples_per_epoch=steps * bs, epochs=2),
                        val_dir=val_dir, progress=False, prefetch={"on": True, "off": False}.get(args.prefetch))
            import csv

            row = list(csv.DictReader((run.run_dir / "history.csv").open()))[1]
            e2e = float(row["samples"]) / float(row["train_seconds"])
            results.append((steps * bs / t_bare, e2e, float(row["val_seconds"]) / float(row["train_seconds"])))
            print(f"  repeat {rep}: bare {results[-1][0]:.1f} samples/s, end-to-end {e2e:.1f} samples/s, "
                  f"ratio {e2e / results[-1][0]:.3f}; validation {results[-1][2]:.3f} of the epoch's training time")
        bare_sps = np.median([r[0] for r in results])
        e2e_sps = np.median([r[1] for r in results])
        print(f"{args.model} on {Path(args.data).name}: batch {bs}, patch {patch}, {steps} steps x {args.repeats} "
              f"repeats, {args.threads} threads, device {device}, bf16 {resolved.bf16}, channels_last "
              f"{resolved.channels_last}")
        print(f"bare model step: {bare_sps:.1f} samples/s; end-to-end training: {e2e_sps:.1f} samples/s (medians)")
        ratios = [r[1] / r[0] for r in results]
        print(f"throughput ratio, median of per-repeat ratios: {np.median(ratios):.3f} (goal >= 0.90); "
              f"range {min(ratios):.3f}-{max(ratios):.3f}; a repeat whose bare and end-to-end halves saw "
              "different CPU contention is an outlier, hence the median")
        print(f"validation / training time per epoch: median {np.median([r[2] for r in results]):.3f} (goal <= 0.20)")
        augment_cost(bs, patch)


def augment_cost(bs: int, patch: tuple[int, ...]) -> None:
    """Batched grid_sample augmentation vs MONAI RandAffined per sample (same batch)."""
    from monai.transforms import RandAffined

    from sparseslice.train.augment import augment_batch
    from sparseslice.train.data import Batch

    gen = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    axis = 0 if len(patch) == 3 else None  # hippocampus slice axis for 3D blocks
    batch = Batch(torch.randn((bs, 1, *patch)), torch.randint(0, 3, (bs, *patch)), torch.ones((bs, *patch)),
                  torch.ones((bs, *patch)))
    t = time.perf_counter()
    for _ in range(20):
        augment_batch(batch, axis=axis, gen=gen)
    ours = (time.perf_counter() - t) / 20
    torch.set_num_threads(1)
    t = time.perf_counter()
    for _ in range(20):
        augment_batch(batch, axis=axis, gen=gen)
    ours_one = (time.perf_counter() - t) / 20
    torch.set_num_threads(threads)
    tr = RandAffined(keys=["image", "label"], prob=1.0, rotate_range=0.26, scale_range=0.15,
                     mode=["bilinear", "nearest"], padding_mode="zeros")
    tr.set_random_state(0)
    t = time.perf_counter()
    for _ in range(20):
        for i in range(bs):
            tr({"image": batch.image[i], "label": batch.label[i][None].float()})
    monai = (time.perf_counter() - t) / 20
    print(f"augmentation per batch: batched grid_sample {ours * 1e3:.1f} ms with {threads} threads, "
          f"{ours_one * 1e3:.1f} ms with 1 thread (train() uses 1 for a 2D batch); MONAI RandAffined per sample "
          f"{monai * 1e3:.1f} ms (ratio {monai / ours_one:.1f}x)")


def quality_split(ds, args: argparse.Namespace) -> tuple[list[str], list[str], list[str]]:
    """Train, validation and test case ids: ``--holdout K`` keeps the last K case ids (sorted) for
    testing and the last ``--val`` of the others for validation; without it, ``split_cases(seed=0)``."""
    if args.holdout is None:
        split = split_cases(ds.case_ids, seed=0)
        return list(split.train), list(split.val), list(split.test)
    ids = sorted(ds.case_ids)
    rest, test = ids[:-args.holdout], ids[-args.holdout:]
    return rest[:-args.val], rest[-args.val:], test


def quality_config(args: argparse.Namespace) -> TrainConfig:
    """The benchmark's training configuration: fixed epochs x samples (equal steps for every arm),
    ``--minutes`` only as a safety cap, ``--set key=value`` (YAML values) for anything else."""
    settings: dict[str, Any] = {"model": args.model, "epochs": args.epochs, "num_threads": args.threads, "seed": 0,
                                "patience": args.patience, "lr": args.lr, "batch_size": args.batch_size,
                                "samples_per_epoch": args.samples_per_epoch, "max_minutes": args.minutes}
    settings.update(settings_from(args.set))
    return TrainConfig.from_dict({k: v for k, v in settings.items() if v is not None})


def settings_from(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs (YAML values) as a dict of TrainConfig settings."""
    import yaml

    return {key: yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}


def quality(args: argparse.Namespace) -> None:
    src = Path(args.data)
    ds = discover_dataset(src)
    train_ids, val_ids, test_ids = quality_split(ds, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"data {src} ({len(train_ids)} train, {len(val_ids)} val, {len(test_ids)} test: {test_ids[0]}.."
          f"{test_ids[-1]}), cores visible: {os.cpu_count()}, torch threads: {args.threads}, load average at "
          f"start: {os.getloadavg()}")
    train_dir = link_cases(ds, train_ids, out / "full") if not (out / "full").exists() else out / "full"
    val_dir = link_cases(ds, val_ids, out / "val") if not (out / "val").exists() else out / "val"
    sparse_dir = out / "sparse10"
    axis = slice_axis_of(ds.case(c).images[0] for c in train_ids)
    if "interval10" in args.runs and not sparse_dir.exists():
        write_sparse_subset(src, sparse_dir, train_ids, axis=axis, fraction=0.1)
    config = quality_config(args)
    print(f"config: {config.to_dict()}")
    report: dict[str, Any] = {"config": config.to_dict(), "train": train_ids, "val": val_ids, "test": test_ids}
    for name, data in (("full", train_dir), ("interval10", sparse_dir)):
        if name not in args.runs:
            continue
        t = time.perf_counter()
        res = train(data, out / f"run_{name}_{args.model}", config=config, val_dir=val_dir, progress=False,
                    resume=True)
        wall = time.perf_counter() - t
        import csv

        rows = list(csv.DictReader((res.run_dir / "history.csv").open()))
        loop = float(rows[-1]["elapsed_seconds"])  # the training loop, across resumes
        samples = sum(int(r["samples"]) for r in rows)
        curve = [round(float(r["val_dice"]), 4) for r in rows]
        report[name] = {"best_val_dice": res.best_val_dice, "epochs": res.epochs, "this_call_wall_s": wall,
                        "training_loop_s": loop, "samples": samples, "load_average": os.getloadavg(),
                        "val_curve": curve}
        print(f"{name}: val Dice {res.best_val_dice:.4f}, {res.epochs} epochs, {samples} samples, training loop "
              f"{loop:.0f} s ({samples / loop:.1f} samples/s incl. validation), this call {wall:.0f} s wall "
              f"(run folder {res.run_dir}), load {os.getloadavg()[0]:.1f}")
        print(f"  validation curve (per epoch): {curve}")
        for tta in args.tta:
            t = time.perf_counter()
            scores = test_dice(res.run_dir, src, test_ids, tta=bool(tta))
            report[name][f"test_dice_tta{tta}"] = scores
            per_label = " ".join(f"label{k} {v:.4f}" for k, v in scores.items() if k.isdigit())
            print(f"  test Dice {per_label} mean {scores['mean']:.4f} std {scores['std']:.4f} "
                  f"({scores['inference']}, {time.perf_counter() - t:.0f} s)")
        sys.stdout.flush()
    if "full" in report and "interval10" in report:
        for tta in args.tta:
            key = f"test_dice_tta{tta}"
            ratio = report["interval10"][key]["mean"] / report["full"][key]["mean"]
            report[f"ratio_tta{tta}"] = ratio
            print(f"10% interval / full mean Dice (tta={bool(tta)}): {ratio:.3f} (goal >= 0.95)")
    (out / f"report_{args.model}.json").write_text(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    a = sub.add_parser("throughput")
    a.add_argument("--threads", type=int, default=2)
    a.add_argument("--steps", type=int, default=None, help="steps per timed run (default: 40 on CPU, 300 on CUDA)")
    a.add_argument("--repeats", type=int, default=5)
    a.add_argument("--cases", type=int, default=40)
    a.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present)")
    a.add_argument("--model", choices=MODELS, default="2d")
    a.add_argument("--data", default=str(HIPPO), help="dataset (default: MSD hippocampus in ../shared)")
    a.add_argument("--set", action="append", default=[], help="any TrainConfig key=value (YAML value)")
    a.add_argument("--prefetch", choices=["default", "on", "off"], default="default",
                   help="train(prefetch=): batches prepared in a background thread (default: the trainer's choice)")
    b = sub.add_parser("quality")
    b.add_argument("--data", default=str(HIPPO), help="dataset (default: MSD hippocampus in ../shared)")
    b.add_argument("--holdout", type=int, default=None,
                   help="test on the last K case ids (e.g. 15 for left atrium: la_045..la_059); default split_cases")
    b.add_argument("--val", type=int, default=5, help="with --holdout: validation cases, the last of the others")
    b.add_argument("--model", choices=MODELS, default="2d")
    b.add_argument("--epochs", type=int, default=200)
    b.add_argument("--samples-per-epoch", type=int, default=None)
    b.add_argument("--patience", type=int, default=15)
    b.add_argument("--minutes", type=float, default=5.0, help="wall-clock cap of each run (0: none)")
    b.add_argument("--out", default="/tmp/sparseslice-bench-train")
    b.add_argument("--runs", nargs="+", default=["full", "interval10"])
    b.add_argument("--threads", type=int, default=2)
    b.add_argument("--lr", type=float, default=1e-3)
    b.add_argument("--batch-size", type=int, default=None, help="default: the trainer's (16 for 2D)")
    b.add_argument("--tta", type=int, nargs="+", default=[0, 1], help="test with TTA off (0) and/or on (1)")
    b.add_argument("--set", action="append", default=[], help="any TrainConfig key=value (YAML value)")
    args = parser.parse_args()
    if args.what == "quality":
        args.minutes = args.minutes or None
        if not Path(args.data).is_dir():
            sys.exit(f"data not found at {args.data}")
    throughput(args) if args.what == "throughput" else quality(args)


if __name__ == "__main__":
    main()
