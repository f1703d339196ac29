"""The training loop: validation, checkpoints, early stopping, two-step schedule, resume.

A run folder holds ``config.json`` (the resolved configuration), ``split.json`` (training
and validation cases, label values), ``history.csv`` (one row per epoch), ``best.pt`` (a
:class:`sparseslice.model.Checkpoint`, loadable with ``load_checkpoint``) and ``last.pt``
(everything needed to resume: weights, optimiser, scheduler, counters, RNG states).
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseslice.atomic import atomic_path, write_json, write_text
from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.locking import holds
from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, pick_device, save_checkpoint
from sparseslice.progress import training_progress
from sparseslice.train.augment import augment_batch
from sparseslice.train.config import TrainConfig, config_difference
from sparseslice.train.data import (
    Batch,
    BlockSampler,
    CaseArrays,
    SliceSampler,
    default_patch_size,
    load_cases,
    prefetch,
    resolve_axis,
    warn_missing_classes,
)
from sparseslice.train.losses import masked_dice_scores, selective_loss
from sparseslice.train.schedule import make_optimizer, make_scheduler, step_scheduler


@dataclass(frozen=True)
class TrainResult:
    """Outcome of :func:`train`.

    ``planned_steps`` is what the configuration asks for (every epoch of both steps, each of
    ``ceil(samples_per_epoch / batch_size)`` batches); ``gradient_steps`` and ``samples_seen``
    are what the run took. A run that took fewer steps is ``cut_short``, and
    ``cut_short_reason`` says why (``max_minutes``, ``early_stop``, or both).
    """

    run_dir: Path
    checkpoint: Path
    best_val_dice: float
    epochs: int
    seconds: float
    gradient_steps: int = 0
    samples_seen: int = 0
    planned_steps: int = 0
    cut_short: bool = False
    cut_short_reason: str = ""


@holds("run_dir", what="run folder")
def train(sparse_dir: str | Path, run_dir: str | Path, *, config: TrainConfig, val_dir: str | Path | None = None,
          progress: bool = True, resume: bool = False) -> TrainResult:
    """Train a 2D or 3D network on a (sparse) dataset.

    Parameters
    ----------
    sparse_dir : path
        Any dataset :func:`~sparseslice.datasets.discover_dataset` reads. Labels with a
        ``.sparse.json`` sidecar are sparse; labels without one are fully annotated, unless
        they hold the ignore value 255 (then slices free of it are annotated).
    run_dir : path
        Output folder (``config.json``, ``split.json``, ``history.csv``, ``best.pt``, ``last.pt``),
        locked while training (:mod:`sparseslice.locking`): a second process is refused.
    config : TrainConfig
        The run's settings; unset sizes are resolved from the data.
    val_dir : path, optional
        Validation cases (dense or sparse labels). Default: ``config.val_fraction`` of the
        training cases are held out (at least one when there are two cases or more); with
        ``val_fraction=0`` or a single case, the training cases are validated on.
    progress : bool
        Show a Rich progress bar with loss and validation Dice.
    resume : bool
        Continue the run in ``run_dir`` from its last finished epoch (``last.pt``); starts
        afresh when there is none. The configuration must match, except ``device``,
        ``num_threads`` and the budget keys ``epochs``, ``finetune_epochs``, ``max_minutes``
        (raise them to extend a run that reached its epoch or time budget).

    Returns
    -------
    TrainResult

    Examples
    --------
    >>> from sparseslice.synthetic import write_phantom_dataset  # doctest: +SKIP
    >>> data = write_phantom_dataset("phantoms", cases=4, seed=0)  # doctest: +SKIP
    >>> result = train(data, "run", config=TrainConfig(model="2d", epochs=5))  # doctest: +SKIP
    >>> result.best_val_dice  # doctest: +SKIP
    """
    from sparseslice.outputs import check_apart

    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    check_apart(run_dir, [sparse_dir, *([val_dir] if val_dir is not None else [])], argument="run_dir")
    last_path = run_dir / "last.pt"
    if last_path.exists() and not resume:
        raise UserError(f"run_dir already holds a run, got {str(run_dir)!r} with last.pt; pass --resume to "
                        "continue it or choose a new folder")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    _seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)

    dataset = discover_dataset(sparse_dir, require_labels=True)
    axis = resolve_axis(dataset, config.axis)
    scheme = config.normalization
    if scheme == "auto":
        scheme = "ct" if "ct" in dataset.modality.lower() else "zscore"
    norm = Normalization(scheme, window=config.ct_window)
    train_ids, val_ids, val_dataset = _split(dataset, config, val_dir)
    train_cases, labels = load_cases(dataset, train_ids, axis=axis, normalization=norm, nonfinite=config.nonfinite,
                                     interpolated_weight=config.interpolated_weight, progress=progress)
    if val_dataset is dataset and val_ids == train_ids:
        val_cases = train_cases
    else:
        val_cases, _ = load_cases(val_dataset, val_ids, axis=axis, normalization=norm, labels=labels,
                                  nonfinite=config.nonfinite,
                                  channels=train_cases[0].image.shape[0],
                                  interpolated_weight=config.interpolated_weight, progress=progress)
    warn_missing_classes(train_cases, labels, dataset.label_names)

    in_channels = train_cases[0].image.shape[0]
    spec = ModelSpec(dims=2 if config.model == "2d" else 3, in_channels=in_channels + int(config.mask_channel),
                     out_channels=len(labels), channels=config.channels, strides=config.strides,
                     num_res_units=config.num_res_units, arch=config.arch, mask_channel=config.mask_channel,
                     dropout=config.dropout)
    patch = config.patch_size or default_patch_size(train_cases, model=config.model, axis=axis,
                                                    divisor=spec.divisor)
    if spec.dims == 2:
        sampler: SliceSampler | BlockSampler = SliceSampler(train_cases, patch_size=patch)
        batch_size = config.batch_size or 16
        samples = config.samples_per_epoch or min(len(sampler), 100 * batch_size)
    else:
        sampler = BlockSampler(train_cases, patch_size=patch)
        batch_size = config.batch_size or 2
        samples = config.samples_per_epoch or min(4 * len(train_cases), 100 * batch_size)
    resolved = config.updated(axis=axis, normalization=scheme, patch_size=tuple(patch), batch_size=batch_size,
                              samples_per_epoch=samples, device=str(device))
    steps = max(1, -(-samples // batch_size))

    model = build_model(spec).to(device)
    memory = (torch.channels_last if spec.dims == 2 else torch.channels_last_3d) if config.channels_last else None
    if memory is not None:
        model = model.to(memory_format=memory)
    optimizer = make_optimizer(model, resolved)
    scheduler = make_scheduler(optimizer, resolved, phase=1)
    gen = torch.Generator().manual_seed(config.seed)
    state: dict[str, Any] = {"epoch": 0, "phase": 1, "phase_start": 0, "best_dice": -1.0, "best_epoch": 0,
                             "bad_epochs": 0, "elapsed": 0.0, "history": [], "steps": 0, "samples_seen": 0,
                             "cut_short": []}
    if resume and last_path.exists():
        # on the CPU: the RNG states must stay CPU tensors; weights and optimiser state are copied to the
        # model's device by load_state_dict
        saved = torch.load(last_path, map_location="cpu", weights_only=False)
        key = config_difference(saved["config"], resolved.to_dict())
        if key is not None:
            raise UserError(f"config {key} differs from the run being resumed, got {resolved.to_dict().get(key)!r} "
                            f"vs {saved['config'].get(key)!r} in {str(run_dir / 'config.json')!r}; use the same "
                            "config or a new run folder")
        model.load_state_dict(saved["model"])
        if saved["state"]["phase"] == 2:
            optimizer = make_optimizer(model, resolved)
            scheduler = make_scheduler(optimizer, resolved, phase=2)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        done = saved["state"]["history"]  # a last.pt written before steps were counted: count them from history
        state = {"steps": sum(-(-int(h["samples"]) // batch_size) for h in done),
                 "samples_seen": sum(int(h["samples"]) for h in done), "cut_short": [], **saved["state"]}
        torch.set_rng_state(saved["rng"]["torch"])
        rng.bit_generator.state = saved["rng"]["numpy"]
        random.setstate(saved["rng"]["python"])
        gen.set_state(saved["rng"]["augment"])
    else:
        write_json(run_dir / "config.json", resolved.to_dict())
        write_json(run_dir / "split.json", {"train": train_ids, "val": val_ids, "labels": list(labels),
                                            "label_names": {str(k): v for k, v in dataset.label_names.items()},
                                            "val_dir": str(val_dir) if val_dir is not None else None})

    def save_best(epoch: int, dice: float, per_class: dict[str, float]) -> None:
        ckpt = Checkpoint(spec=spec, normalization=norm, axis=axis, labels=labels, patch_size=tuple(patch),
                          state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, epoch=epoch,
                          metrics={"val_dice": dice, **per_class},
                          extra={"config": resolved.to_dict(), "model": config.model,
                                 "label_names": {str(k): v for k, v in dataset.label_names.items()}})
        save_checkpoint(run_dir / "best.pt", ckpt)

    budget = resolved.max_minutes * 60 if resolved.max_minutes else math.inf
    phase1_budget = budget * 0.7 if resolved.schedule == "two-step" and resolved.finetune_epochs else budget
    t_start = time.perf_counter() - state["elapsed"]
    total = resolved.epochs + (resolved.finetune_epochs if resolved.schedule == "two-step" else 0)
    planned_steps = total * steps
    fg_names = [str(v) for v in labels[1:]]
    threads = torch.get_num_threads()

    def prepare(batch: Batch) -> Batch:
        # to the model's device first, so a GPU also does the augmentation (no-op on the CPU)
        batch = Batch(*(t.to(device, non_blocking=True) for t in batch))
        if resolved.augment:
            # small batch ops run on one thread: with several, OpenMP barriers cost more than the
            # work whenever another process competes for the cores (measured in bench/train.py)
            torch.set_num_threads(1)
            batch = augment_batch(batch, axis=axis if spec.dims == 3 else None, gen=gen)
            torch.set_num_threads(threads)
        return batch

    with training_progress(progress) as bar:
        task = bar.add_task("train", total=total * steps, completed=state["epoch"] * steps, loss="-",
                            dice=f"{state['best_dice']:.3f}" if state["best_dice"] >= 0 else "-")
        while True:
            elapsed = time.perf_counter() - t_start
            in_phase = state["epoch"] - state["phase_start"]
            limit = resolved.epochs if state["phase"] == 1 else resolved.finetune_epochs
            phase_budget = phase1_budget if state["phase"] == 1 else budget
            # a time cap ends a phase only after its first epoch, so there is always a checkpoint
            over_time = elapsed >= phase_budget and in_phase > 0
            if in_phase >= limit or state["bad_epochs"] >= resolved.patience or over_time:
                if in_phase < limit:  # the phase ends before its epochs: say why
                    why = "early_stop" if state["bad_epochs"] >= resolved.patience else "max_minutes"
                    state["cut_short"] = list(dict.fromkeys([*state["cut_short"], why]))
                if (state["phase"] == 1 and resolved.schedule == "two-step" and resolved.finetune_epochs
                        and elapsed < budget and (run_dir / "best.pt").exists()):
                    best = torch.load(run_dir / "best.pt", map_location=device, weights_only=False)
                    model.load_state_dict(best["state_dict"])
                    optimizer = make_optimizer(model, resolved)
                    scheduler = make_scheduler(optimizer, resolved, phase=2)
                    state.update(phase=2, phase_start=state["epoch"], bad_epochs=0)
                    continue
                break
            bar.update(task, description=f"epoch {state['epoch'] + 1} (step {state['phase']})")
            model.train()
            t_epoch = time.perf_counter()
            losses, seen = [], 0
            if _prefetches(device):
                batches = prefetch(sampler.epoch(samples, batch_size, rng), transform=prepare,
                                   pin=device.type == "cuda")
            else:
                batches = map(prepare, sampler.epoch(samples, batch_size, rng))
            try:
                for batch in batches:
                    x = batch.image
                    if resolved.mask_channel:
                        x = torch.cat([x, batch.annotated.unsqueeze(1)], 1)
                    x = x.to(device, non_blocking=True)
                    if memory is not None:
                        x = x.contiguous(memory_format=memory)
                    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=resolved.bf16):
                        logits = model(x)
                    loss = selective_loss(logits, batch.label.to(device), batch.weight.to(device),
                                          dice_weight=resolved.dice_weight, ce_weight=resolved.ce_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    # one read per step: on a GPU the wait frees the GIL for the thread preparing the next batch
                    # (H100, 2D hippocampus: end-to-end / bare step 0.85 with it, 0.78 without)
                    losses.append(float(loss.detach()))
                    if not math.isfinite(losses[-1]):
                        raise _diverged(run_dir, losses[-1], epoch=state["epoch"] + 1, lr=resolved.lr)
                    seen += x.shape[0]
                    state["steps"] += 1
                    bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
                    if time.perf_counter() - t_start >= phase_budget:
                        state["cut_short"] = list(dict.fromkeys([*state["cut_short"], "max_minutes"]))
                        break
            finally:
                if hasattr(batches, "close"):  # stops the prefetch thread, also when a step fails
                    batches.close()
            train_seconds = time.perf_counter() - t_epoch
            t_val = time.perf_counter()
            dice, per_class = validate(model, val_cases, spec=spec, patch_size=tuple(patch), device=device,
                                       batch_size=batch_size, bf16=resolved.bf16)
            val_seconds = time.perf_counter() - t_val
            lr = optimizer.param_groups[0]["lr"]
            step_scheduler(scheduler, dice)
            state["epoch"] += 1
            improved = dice > state["best_dice"]
            if improved:
                state.update(best_dice=dice, best_epoch=state["epoch"], bad_epochs=0)
                save_best(state["epoch"], dice, {f"val_dice_{n}": d for n, d in zip(fg_names, per_class,
                                                                                     strict=True)})
            else:
                state["bad_epochs"] += 1
            state["elapsed"] = time.perf_counter() - t_start
            state["samples_seen"] += seen
            state["history"].append({
                "epoch": state["epoch"], "phase": state["phase"], "lr": lr, "loss": float(np.mean(losses)),
                "val_dice": dice, **{f"val_dice_{n}": d for n, d in zip(fg_names, per_class, strict=True)},
                "samples": seen, "train_seconds": train_seconds, "val_seconds": val_seconds,
                "elapsed_seconds": state["elapsed"]})
            _write_history(run_dir / "history.csv", state["history"])
            _save_last(last_path, model, optimizer, scheduler, state, resolved, rng, gen)
            bar.update(task, dice=f"{dice:.3f} (best {state['best_dice']:.3f})")
    if not (run_dir / "best.pt").exists():
        raise UserError(f"training stopped before the first epoch ended, got max_minutes={resolved.max_minutes}; "
                        "raise max_minutes")
    cut_short = int(state["steps"]) < planned_steps
    return TrainResult(run_dir=run_dir, checkpoint=run_dir / "best.pt", best_val_dice=float(state["best_dice"]),
                       epochs=int(state["epoch"]), seconds=time.perf_counter() - t0,
                       gradient_steps=int(state["steps"]), samples_seen=int(state["samples_seen"]),
                       planned_steps=planned_steps, cut_short=cut_short,
                       cut_short_reason=", ".join(state["cut_short"]) if cut_short else "")


def _diverged(run_dir: Path, loss: float, *, epoch: int, lr: float) -> UserError:
    """The error for a non-finite training loss, after removing the run's checkpoints.

    Weights that met a NaN or infinite loss are no model, and a ``best.pt`` beside a failed
    run would look like a result, so ``best.pt`` and ``last.pt`` are deleted first.
    """
    for name in ("best.pt", "last.pt"):
        (run_dir / name).unlink(missing_ok=True)
    return UserError(f"training loss is non-finite at epoch {epoch}, got {loss}; the run's checkpoints were "
                     f"removed: lower lr (got {lr:g}) or check the images for extreme intensities")


def _prefetches(device: torch.device) -> bool:
    """Whether batches are prepared in a background thread: on a GPU, whose step is bound by the
    CPU launching kernels (H100, hippocampus, end-to-end / bare step: 2D 0.77 -> 0.85-0.97,
    3D 0.61 -> 0.78; see bench/train.py); not on a CPU, whose cores the step already uses."""
    return device.type == "cuda"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - third-party code may use the global generator
    torch.manual_seed(seed)


def _split(dataset, config: TrainConfig, val_dir) -> tuple[list[str], list[str], Any]:
    ids = sorted(dataset.case_ids)
    if val_dir is not None:
        val_dataset = discover_dataset(val_dir, require_labels=True)
        return ids, sorted(val_dataset.case_ids), val_dataset
    n_val = int(round(config.val_fraction * len(ids)))
    if config.val_fraction > 0 and len(ids) >= 2:
        n_val = max(1, n_val)
    if n_val == 0:
        if config.val_fraction > 0:
            warnings.warn(f"only {len(ids)} case(s): validating on the training cases; pass val_dir for an "
                          "honest validation Dice", UserWarning, stacklevel=3)
        return ids, ids, dataset
    order = np.random.default_rng(config.seed).permutation(len(ids))
    val = sorted(ids[i] for i in order[:n_val])
    return sorted(ids[i] for i in order[n_val:]), val, dataset


@torch.no_grad()
def validate(model: torch.nn.Module, cases: list[CaseArrays], *, spec: ModelSpec, patch_size: tuple[int, ...],
             device: torch.device, batch_size: int = 16, bf16: bool = False) -> tuple[float, list[float]]:
    """Masked Dice on the validation cases' truly annotated slices.

    Inference uses MONAI's ``sliding_window_inference`` with the training patch (as
    :mod:`sparseslice.predict` does), so padding matches what the network saw in training.

    Returns the mean over cases of the mean foreground Dice, and the per-class means over
    cases (NaN for a class absent from every case). Cases with no foreground anywhere in
    prediction and reference are skipped.
    """
    model.eval()
    n_classes = spec.out_channels
    scores = []
    for c in cases:
        idx = c.validation_slices
        if idx.size == 0:
            continue
        if spec.dims == 2:
            from monai.inferers import sliding_window_inference

            img = np.moveaxis(np.take(c.image, idx, axis=1 + c.axis), 1 + c.axis, 0)
            lab = np.moveaxis(np.take(c.label, idx, axis=c.axis), c.axis, 0)
            preds = []
            for start in range(0, len(idx), max(1, batch_size * 2)):
                x = torch.from_numpy(np.ascontiguousarray(img[start:start + batch_size * 2]))
                if spec.mask_channel:
                    x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                    out = sliding_window_inference(x.to(device), roi_size=patch_size, sw_batch_size=x.shape[0],
                                                   predictor=model, overlap=0.25)
                preds.append(out.argmax(1).cpu())
            pred, ref = torch.cat(preds), torch.from_numpy(lab.astype(np.int64))
            known = torch.ones_like(ref, dtype=torch.bool)
        else:
            from monai.inferers import sliding_window_inference

            x = torch.from_numpy(c.image)[None]
            if spec.mask_channel:
                x = torch.cat([x, torch.ones_like(x[:, :1])], 1)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                out = sliding_window_inference(x.to(device), roi_size=patch_size, sw_batch_size=1,
                                               predictor=model, overlap=0.25)
            pred = out.argmax(1)[0].cpu()
            ref = torch.from_numpy(c.label.astype(np.int64))
            shape = [1, 1, 1]
            shape[c.axis] = -1
            mask = np.zeros(c.label.shape[c.axis], bool)
            mask[idx] = True
            known = torch.from_numpy(np.broadcast_to(mask.reshape(shape), c.label.shape).copy())
        d = masked_dice_scores(pred, ref, known, n_classes=n_classes)
        if not torch.isnan(d).all():
            scores.append(d.numpy())
    model.train()
    if not scores:
        return 0.0, [float("nan")] * (n_classes - 1)
    arr = np.array(scores)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        per_class = np.nanmean(arr, axis=0)
        mean = float(np.mean(np.nanmean(arr, axis=1)))
    return mean, [float(v) for v in per_class]


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _save_last(path: Path, model, optimizer, scheduler, state, config: TrainConfig, rng, gen) -> None:
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
               "scheduler": scheduler.state_dict(), "state": state, "config": config.to_dict(),
               "rng": {"torch": torch.get_rng_state(), "numpy": rng.bit_generator.state,
                       "python": random.getstate(), "augment": gen.get_state()}}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
