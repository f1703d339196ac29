"""The training loop: validation, checkpoints, early stopping, two-step schedule, resume.

A run folder holds ``config.json`` (the resolved configuration), ``split.json`` (training
and validation cases, label values), ``history.csv`` (one row per epoch), ``best.pt`` (a
:class:`sparseslice.model.Checkpoint`, loadable with ``load_checkpoint``) and ``last.pt``
(everything needed to resume: weights, optimiser, scheduler, counters, RNG states); both hold
tensors and plain data only and load with ``weights_only=True`` (:func:`sparseslice.model.load_plain`).

:func:`train` runs named steps: set up the run (data, split, resolved configuration), start
or resume (a :class:`TrainState`, fresh or from ``last.pt``), then each epoch train,
validate and save, and between the two steps of the two-step schedule move to the next phase.
"""

from __future__ import annotations

import csv
import io
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseslice.atomic import write_json, write_text
from sparseslice.datasets import Dataset, discover_dataset
from sparseslice.errors import UserError
from sparseslice.locking import hold
from sparseslice.model import (
    Checkpoint,
    ModelSpec,
    Normalization,
    build_model,
    load_plain,
    memory_format,
    native_bf16,
    pick_device,
    read_checkpoint,
    save_checkpoint,
    save_plain,
)
from sparseslice.outputs import OutputFolder, check_apart, claim_output, dataset_inputs
from sparseslice.progress import training_progress
from sparseslice.train.augment import augment_batch
from sparseslice.train.config import TrainConfig, config_difference
from sparseslice.train.data import (
    PATCH_3D_SLICES,
    Batch,
    BlockSampler,
    CaseArrays,
    SliceSampler,
    default_patch_size,
    largest_shape,
    load_cases,
    prefetch,
    resolve_axis,
    resolve_spacing,
    round_up,
    warn_missing_classes,
)
from sparseslice.train.footprint import available_bytes, check_fits_memory, data_bytes
from sparseslice.train.losses import selective_loss
from sparseslice.train.schedule import make_optimizer, make_scheduler, step_scheduler
from sparseslice.train.validation import validate, validation_subset

#: With a mask channel, the share of 3D patches whose mask input is what inference gives (ones inside
#: the volume) instead of the known-slice mask, so inference never shows the network something new.
MASK_AS_INFERENCE = 0.5


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


@dataclass
class TrainState:
    """Where a run stands after its last finished epoch: what ``last.pt`` saves and resume restores.

    ``phase`` is the optimisation step (1, or 2 when fine-tuning) that began at epoch
    ``phase_start``; ``bad_epochs`` counts epochs since the best validation Dice (early
    stopping); ``elapsed`` is wall-clock seconds of training so far (over resumes);
    ``history`` holds one row per epoch (``history.csv``); ``cut_short`` the reasons a phase
    ended before its epochs (``early_stop``, ``max_minutes``).
    """

    epoch: int = 0
    phase: int = 1
    phase_start: int = 0
    best_dice: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    elapsed: float = 0.0
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    samples_seen: int = 0
    cut_short: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (saved in ``last.pt``)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, batch_size: int) -> TrainState:
        """The state saved by :meth:`to_dict`; a ``last.pt`` written before steps were counted gets them
        counted from its history."""
        done = data["history"]
        counted = {"steps": sum(-(-int(h["samples"]) // batch_size) for h in done),
                   "samples_seen": sum(int(h["samples"]) for h in done)}
        known = {f.name for f in fields(cls)}
        return cls(**{**counted, **{k: v for k, v in data.items() if k in known}})

    def note_cut_short(self, why: str) -> None:
        """Record why a phase ended early (each reason once, in order)."""
        self.cut_short = list(dict.fromkeys([*self.cut_short, why]))


@dataclass(frozen=True)
class _Run:
    """What a run fixes when it starts: its folder, resolved configuration, data and network shape."""

    output: OutputFolder  # the claimed run folder: every file written there is registered first
    config: TrainConfig  # resolved: axis, normalization, patch, batch and epoch sizes, device are set
    spec: ModelSpec
    normalization: Normalization
    labels: tuple[int, ...]
    label_names: dict[str, str]
    split: dict[str, Any]  # split.json
    sampler: SliceSampler | BlockSampler
    val_cases: list[CaseArrays]
    device: torch.device
    prefetch: bool  # batches prepared ahead in a background thread (:func:`_epoch_batches`)

    @property
    def run_dir(self) -> Path:
        return self.output.root

    def file(self, name: str) -> Path:
        """The path of ``name`` in the run folder, registered as this run's output before it is written."""
        return self.output.path(name)

    @property
    def axis(self) -> int:
        return int(self.config.axis)

    @property
    def patch(self) -> tuple[int, ...]:
        return tuple(self.config.patch_size)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, -(-self.config.samples_per_epoch // self.config.batch_size))

    @property
    def total_epochs(self) -> int:
        return self.config.epochs + (self.config.finetune_epochs if self.config.schedule == "two-step" else 0)

    @property
    def fine_tunes(self) -> bool:
        return self.config.schedule == "two-step" and bool(self.config.finetune_epochs)

    @property
    def memory(self) -> torch.memory_format | None:
        return memory_format(self.spec.dims, channels_last=self.config.channels_last)

    def dice_columns(self, per_class: list[float]) -> dict[str, float]:
        """``val_dice_<label>`` for each foreground label."""
        return {f"val_dice_{v}": d for v, d in zip(self.labels[1:], per_class, strict=True)}


@dataclass
class _Learner:
    """The network and what moves with its training: optimiser, schedule, random generators."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    rng: np.random.Generator  # sampling
    gen: torch.Generator  # augmentation


@dataclass(frozen=True)
class _Clock:
    """The run's wall-clock budget: ``start`` is when its elapsed time was 0 (earlier when resumed)."""

    start: float
    budget: float  # seconds of the whole run
    phase1: float  # seconds of step 1 (70 % of the budget when a fine-tuning step follows)

    @classmethod
    def of(cls, run: _Run, state: TrainState) -> _Clock:
        budget = run.config.max_minutes * 60 if run.config.max_minutes else math.inf
        return cls(time.perf_counter() - state.elapsed, budget, budget * 0.7 if run.fine_tunes else budget)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def phase_budget(self, phase: int) -> float:
        return self.phase1 if phase == 1 else self.budget


def train(sparse_dir: str | Path, run_dir: str | Path, *, config: TrainConfig, val_dir: str | Path | None = None,
          progress: bool = True, resume: bool = False, prefetch: bool | None = None) -> TrainResult:
    """Train a 2D or 3D network on a (sparse) dataset.

    Parameters
    ----------
    sparse_dir : path
        Any dataset :func:`~sparseslice.datasets.discover_dataset` reads. Labels with a
        ``.sparse.json`` sidecar are sparse; labels without one are fully annotated, unless
        they hold the ignore value 255 (then slices free of it are annotated).
    run_dir : path
        Output folder (``config.json``, ``split.json``, ``history.csv``, ``best.pt``, ``last.pt``),
        locked while training (:mod:`sparseslice.locking`): a second process is refused. It is
        claimed as :mod:`sparseslice.outputs` claims every output folder: new, empty, or an earlier
        run folder of ``train`` (its marker lists the files it wrote, the only ones a new run
        replaces); a folder that is, holds or lies inside an input is refused before anything
        is touched.
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
    prefetch : bool, optional
        Prepare (move to the device, augment) the next batches in a background thread while
        the current one trains. Default: on a GPU only, whose step is bound by the CPU
        launching kernels; a CPU step already uses the cores. The batches, their order and
        the trained weights are the same either way.

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
    run_dir = Path(run_dir)
    inputs = [Path(sparse_dir), *([Path(val_dir)] if val_dir is not None else [])]
    check_apart(run_dir, inputs, argument="run_dir")  # before the lock makes the folder
    if config.cache is not None:  # a cache is written beside the data, never inside it
        check_apart(config.cache, inputs, argument="cache", fix="choose a cache folder")
    with hold(run_dir, what="run folder"):
        dataset = discover_dataset(sparse_dir, require_labels=True)
        output = claim_output(run_dir, command="train", inputs=[*inputs, *dataset_inputs(dataset)],
                              argument="run_dir")
        try:
            return _train_claimed(dataset, output, config=config, val_dir=val_dir, progress=progress,
                                  resume=resume, prefetch=prefetch)
        except BaseException:
            output.forget_if_unused()  # a run that wrote nothing leaves no trace (the lock removes the folder)
            raise


def _train_claimed(dataset: Dataset, output: OutputFolder, *, config: TrainConfig, val_dir: str | Path | None,
                   progress: bool, resume: bool, prefetch: bool | None) -> TrainResult:
    """:func:`train` in its locked, claimed run folder."""
    t0 = time.perf_counter()
    run_dir = output.root
    if (run_dir / "last.pt").exists() and not resume:
        raise UserError(f"run_dir already holds a run, got {str(run_dir)!r} with last.pt; pass --resume to "
                        "continue it or choose a new folder")
    if not (run_dir / "last.pt").exists():  # a fresh start: nothing an earlier run left may pass for this one's
        output.clear()
    if config.num_threads:  # once, for the whole run (the thread that trains)
        torch.set_num_threads(config.num_threads)
    device = pick_device(config.device)
    _seed_everything(config.seed)
    rng = np.random.default_rng(config.seed)
    run = _set_up(dataset, output, config, val_dir=val_dir, device=device, progress=progress,
                  prefetch=_prefetches(device) if prefetch is None else prefetch)
    learner = _new_learner(run, rng)
    state = _start_or_resume(run, learner, resume=resume)
    _train_loop(run, learner, state, progress=progress)
    if not (run_dir / "best.pt").exists():
        raise UserError(f"training stopped before the first epoch ended, got max_minutes={run.config.max_minutes}; "
                        "raise max_minutes")
    planned_steps = run.total_epochs * run.steps_per_epoch
    cut_short = state.steps < planned_steps
    return TrainResult(run_dir=run_dir, checkpoint=run_dir / "best.pt", best_val_dice=float(state.best_dice),
                       epochs=int(state.epoch), seconds=time.perf_counter() - t0,
                       gradient_steps=int(state.steps), samples_seen=int(state.samples_seen),
                       planned_steps=planned_steps, cut_short=cut_short,
                       cut_short_reason=", ".join(state.cut_short) if cut_short else "")


def _set_up(dataset: Dataset, output: OutputFolder, config: TrainConfig, *, val_dir: str | Path | None,
            device: torch.device, progress: bool, prefetch: bool) -> _Run:
    """Read the data, split it, and resolve what the configuration leaves to the data."""
    axis = resolve_axis(dataset, config.axis)
    scheme = config.normalization
    if scheme == "auto":
        scheme = "ct" if "ct" in dataset.modality.lower() else "zscore"
    norm = Normalization(scheme, window=config.ct_window)
    train_ids, val_ids, val_dataset = _split(dataset, config, val_dir)
    spacing = resolve_spacing(dataset, train_ids, axis=axis, spacing=config.spacing, max_inplane=config.max_inplane)
    validates_on_training = val_dataset is dataset and val_ids == train_ids
    # 2D validation reads the annotated slices only; 3D validation predicts whole volumes
    val_keep = 0 if config.model == "2d" else None
    cache = None if config.cache is None else Path(config.cache)
    train_keep = val_keep if validates_on_training else _kept(config, axis)
    if cache is None:  # refuse before minutes of reading what the system would kill
        _check_memory(dataset, train_ids, *(() if validates_on_training else (val_dataset, val_ids)), axis=axis,
                      spacing=spacing, keeps=(train_keep, val_keep))
    train_cases, labels = load_cases(dataset, train_ids, axis=axis, normalization=norm, nonfinite=config.nonfinite,
                                     interpolated_weight=config.interpolated_weight, progress=progress,
                                     spacing=spacing, keep=train_keep, cache=cache)
    if validates_on_training:
        val_cases = train_cases
    else:
        val_cases, _ = load_cases(val_dataset, val_ids, axis=axis, normalization=norm, labels=labels,
                                  nonfinite=config.nonfinite, keep=val_keep,
                                  channels=train_cases[0].image.shape[0], spacing=spacing,
                                  interpolated_weight=config.interpolated_weight, progress=progress,
                                  cache=cache)
    warn_missing_classes(train_cases, labels, dataset.label_names)
    channels, strides = config.network(tuple(s for a, s in enumerate(largest_shape(train_cases)) if a != axis))
    spec = ModelSpec(dims=2 if config.model == "2d" else 3,
                     in_channels=train_cases[0].image.shape[0] + int(config.mask_channel),
                     out_channels=len(labels), channels=channels, strides=strides,
                     num_res_units=config.num_res_units, arch=config.arch, mask_channel=config.mask_channel,
                     dropout=config.dropout)
    patch = config.patch_size or default_patch_size(train_cases, model=config.model, axis=axis,
                                                    divisor=spec.divisor)
    _warn_if_patch_exceeds(train_cases, patch, model=config.model, axis=axis, divisor=spec.divisor)
    if spec.dims == 2:
        sampler: SliceSampler | BlockSampler = SliceSampler(train_cases, patch_size=patch)
        batch_size = config.batch_size or 16
        samples = config.samples_per_epoch or min(len(sampler), 100 * batch_size)
    else:
        sampler = BlockSampler(train_cases, patch_size=patch, foreground=config.foreground_fraction,
                               mask_as_inference=MASK_AS_INFERENCE if config.mask_channel else 0.0)
        batch_size = config.batch_size or 2
        samples = config.samples_per_epoch or min(4 * len(train_cases), 100 * batch_size)
    resolved = config.updated(axis=axis, normalization=scheme, patch_size=tuple(patch), batch_size=batch_size,
                              channels=channels, strides=strides,
                              samples_per_epoch=samples, device=str(device), spacing=spacing,
                              bf16=native_bf16(device) if config.bf16 is None else config.bf16)
    label_names = {str(k): v for k, v in dataset.label_names.items()}
    val_cases, checked = validation_subset(val_cases, dims=spec.dims, patch=tuple(patch), samples=samples,
                                           share=config.val_share)
    split = {"train": train_ids, "val": val_ids, "labels": list(labels), "label_names": label_names,
             "val_dir": str(val_dir) if val_dir is not None else None, "validated": checked}
    return _Run(output=output, config=resolved, spec=spec, normalization=norm, labels=labels,
                label_names=label_names, split=split, sampler=sampler, val_cases=val_cases, device=device,
                prefetch=prefetch)


def _check_memory(dataset: Dataset, train_ids: list[str], val_dataset: Dataset | None = None,
                  val_ids: list[str] | None = None, *, axis: int, spacing: tuple[float, float] | None,
                  keeps: tuple[int | None, int | None]) -> None:
    """Refuse training (and separate validation) data that would not fit in memory (:mod:`.footprint`)."""
    needed = data_bytes(dataset, train_ids, axis=axis, spacing=spacing, keep=keeps[0])
    if val_dataset is not None and val_ids:
        needed += data_bytes(val_dataset, val_ids, axis=axis, spacing=spacing, keep=keeps[1])
    check_fits_memory(needed, cases=len(train_ids) + len(val_ids or []), available=available_bytes())


def _kept(config: TrainConfig, axis: int) -> int:
    """Slices a training case keeps around its known ones (:func:`~sparseslice.train.data.kept_slices`): none
    for 2D, which reads the known slices only; for 3D one patch depth less one, so every block the sampler
    can draw lies in what is kept (the default depth is at most :data:`PATCH_3D_SLICES`)."""
    if config.model == "2d":
        return 0
    depth = config.patch_size[axis] if config.patch_size and len(config.patch_size) == 3 else PATCH_3D_SLICES
    return int(depth) - 1


def _warn_if_patch_exceeds(cases: list[CaseArrays], patch: tuple[int, ...], *, model: str, axis: int,
                           divisor: int) -> None:
    """Say once when the patch is larger than every training case along an axis, beyond rounding up to the
    network's divisor (cases are padded)."""
    shapes = np.array([c.shape for c in cases])
    if model == "2d":
        shapes = shapes[:, [a for a in range(3) if a != axis]]
    largest = shapes.max(axis=0)
    over = [a for a, (p, n) in enumerate(zip(patch, largest, strict=True)) if p > round_up(int(n), divisor)]
    if over:
        warnings.warn(f"patch_size {tuple(patch)} is larger than every training case along patch axis "
                      f"{', '.join(map(str, over))} (largest case {tuple(int(n) for n in largest)} at the training "
                      "spacing); cases are padded with unknown voxels there: a smaller patch trains faster",
                      UserWarning, stacklevel=3)


def _new_learner(run: _Run, rng: np.random.Generator) -> _Learner:
    """A freshly initialised network (from the seeded global generator) with its step-1 optimiser."""
    model = build_model(run.spec).to(run.device)
    if run.memory is not None:
        model = model.to(memory_format=run.memory)
    optimizer = make_optimizer(model, run.config)
    scheduler = make_scheduler(optimizer, run.config, phase=1)
    return _Learner(model, optimizer, scheduler, rng, torch.Generator().manual_seed(run.config.seed))


def _start_or_resume(run: _Run, learner: _Learner, *, resume: bool) -> TrainState:
    """Continue from ``last.pt`` when resuming a run that has one; else write the run's
    ``config.json`` and ``split.json`` and start at epoch 0."""
    last_path = run.run_dir / "last.pt"
    if resume and last_path.exists():
        return _resume(run, learner, last_path)
    write_json(run.file("config.json"), run.config.to_dict())
    write_json(run.file("split.json"), run.split)
    return TrainState()


def _resume(run: _Run, learner: _Learner, last_path: Path) -> TrainState:
    """Restore weights, optimiser, schedule, counters and random generators from ``last.pt``."""
    # on the CPU: the RNG states must stay CPU tensors; weights and optimiser state are copied to the
    # model's device by load_state_dict
    saved = load_plain(last_path, map_location="cpu")
    current = run.config.to_dict()
    key = config_difference(saved["config"], current)
    if key is not None:
        raise UserError(f"config {key} differs from the run being resumed, got {current.get(key)!r} "
                        f"vs {saved['config'].get(key)!r} in {str(run.run_dir / 'config.json')!r}; use the same "
                        "config or a new run folder")
    learner.model.load_state_dict(saved["model"])
    if saved["state"]["phase"] == 2:
        learner.optimizer = make_optimizer(learner.model, run.config)
        learner.scheduler = make_scheduler(learner.optimizer, run.config, phase=2)
    learner.optimizer.load_state_dict(saved["optimizer"])
    learner.scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["rng"]["torch"])
    learner.rng.bit_generator.state = saved["rng"]["numpy"]
    random.setstate(saved["rng"]["python"])
    learner.gen.set_state(saved["rng"]["augment"])
    return TrainState.from_dict(saved["state"], batch_size=run.config.batch_size)


def _train_loop(run: _Run, learner: _Learner, state: TrainState, *, progress: bool) -> None:
    """Epochs until both steps are done: train, validate, save; between steps, move to fine-tuning."""
    clock = _Clock.of(run, state)
    steps = run.steps_per_epoch
    with training_progress(progress) as bar:
        task = bar.add_task("train", total=run.total_epochs * steps, completed=state.epoch * steps, loss="-",
                            dice=f"{state.best_dice:.3f}" if state.best_dice >= 0 else "-")
        while True:
            elapsed = clock.elapsed()
            if _phase_ends(run, state, clock, elapsed=elapsed):
                if state.phase == 1 and run.fine_tunes and elapsed < clock.budget \
                        and (run.run_dir / "best.pt").exists():
                    _next_phase(run, learner, state)
                    continue
                break
            bar.update(task, description=f"epoch {state.epoch + 1} (step {state.phase})")
            t_epoch = time.perf_counter()
            losses, seen = _train_epoch(run, learner, state, clock, bar=bar, task=task)
            dice = _validate_and_save(run, learner, state, clock, losses=losses, seen=seen,
                                      train_seconds=time.perf_counter() - t_epoch)
            bar.update(task, dice=f"{dice:.3f} (best {state.best_dice:.3f})")


def _phase_ends(run: _Run, state: TrainState, clock: _Clock, *, elapsed: float) -> bool:
    """Whether the current step is over (its epochs, early stopping, or its time); records why when early.

    A time cap ends a phase only after its first epoch, so there is always a checkpoint.
    """
    in_phase = state.epoch - state.phase_start
    limit = run.config.epochs if state.phase == 1 else run.config.finetune_epochs
    over_time = elapsed >= clock.phase_budget(state.phase) and in_phase > 0
    stopped = state.bad_epochs >= run.config.patience
    if not (in_phase >= limit or stopped or over_time):
        return False
    if in_phase < limit:  # the phase ends before its epochs: say why
        state.note_cut_short("early_stop" if stopped else "max_minutes")
    return True


def _next_phase(run: _Run, learner: _Learner, state: TrainState) -> None:
    """Step 2 of the two-step schedule: from the best weights, with a fresh optimiser and restarts."""
    best = read_checkpoint(run.run_dir / "best.pt", device=run.device)
    learner.model.load_state_dict(best.state_dict)
    learner.optimizer = make_optimizer(learner.model, run.config)
    learner.scheduler = make_scheduler(learner.optimizer, run.config, phase=2)
    state.phase, state.phase_start, state.bad_epochs = 2, state.epoch, 0


def _train_epoch(run: _Run, learner: _Learner, state: TrainState, clock: _Clock, *, bar: Any,
                 task: Any) -> tuple[list[float], int]:
    """One epoch of gradient steps; returns the losses and the number of samples seen.

    Stops early when the phase's time is up (noting ``max_minutes``); a non-finite loss ends the run.
    """
    learner.model.train()
    phase_budget = clock.phase_budget(state.phase)
    losses, seen = [], 0
    batches = _epoch_batches(run, learner)
    try:
        for batch in batches:
            losses.append(_step(run, learner, batch))
            if not math.isfinite(losses[-1]):
                raise _diverged(run.run_dir, losses[-1], epoch=state.epoch + 1, lr=run.config.lr)
            seen += batch.image.shape[0]
            state.steps += 1
            bar.update(task, advance=1, loss=f"{losses[-1]:.3f}")
            if clock.elapsed() >= phase_budget:
                state.note_cut_short("max_minutes")
                break
    finally:
        if hasattr(batches, "close"):  # stops the prefetch thread, also when a step fails
            batches.close()
    return losses, seen


def _epoch_batches(run: _Run, learner: _Learner) -> Iterator[Batch]:
    """The epoch's batches, on the model's device and augmented.

    Augmentation runs on one thread: small batch ops on several cost more in OpenMP barriers than
    the work whenever another process competes for the cores (bench/train.py's ``augment_cost``:
    7 ms instead of 42 ms per 2D batch of 16 on two busy cores). When the run prefetches (on a GPU
    by default, :func:`_prefetches`) the batches are prepared ahead in the prefetch thread, whose
    count :func:`prefetch` sets once when it starts; inline (CPU), the training thread augments on
    one thread (on ``num_threads`` from :data:`AUGMENT_THREADED_VOXELS` voxels a batch: 3D) and trains
    on ``num_threads``.
    """
    config = run.config
    drawn = run.sampler.epoch(config.samples_per_epoch, config.batch_size, learner.rng)
    prepare = partial(_prepare_batch, device=run.device, axis=run.axis if run.spec.dims == 3 else None,
                      gen=learner.gen if config.augment else None)
    if run.prefetch:
        return prefetch(drawn, transform=prepare, pin=run.device.type == "cuda", threads=1)
    if not config.augment:
        return map(prepare, drawn)
    return (_on_one_thread(prepare, batch) if batch.image.numel() < AUGMENT_THREADED_VOXELS else prepare(batch)
            for batch in drawn)


#: Voxels of a batch from which inline (CPU) augmentation uses the run's threads rather than one: a 3D
#: left-atrium batch (2 x 128x112x48) augments in 17 ms on 2 threads, 25 ms on one; a 2D batch of
#: 16 slices 160x112 gains nothing from a second thread and loses much when the cores are busy.
AUGMENT_THREADED_VOXELS = 1 << 20


def _prepare_batch(batch: Batch, *, device: torch.device, axis: int | None, gen: torch.Generator | None) -> Batch:
    """``batch`` on ``device``, augmented with ``gen`` unless it is None."""
    # to the model's device first, so a GPU also does the augmentation (no-op on the CPU)
    batch = Batch(*(t.to(device, non_blocking=True) for t in batch))
    return batch if gen is None else augment_batch(batch, axis=axis, gen=gen)


def _on_one_thread(prepare: Callable[[Batch], Batch], batch: Batch) -> Batch:
    """``prepare(batch)`` with one intra-op thread, then back to the calling thread's count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return prepare(batch)
    finally:
        torch.set_num_threads(threads)


def _step(run: _Run, learner: _Learner, batch: Batch) -> float:
    """One gradient step on ``batch``; returns its loss."""
    config, device = run.config, run.device
    x = batch.image
    if config.mask_channel:
        x = torch.cat([x, batch.annotated.unsqueeze(1)], 1)
    x = x.to(device, non_blocking=True)
    if run.memory is not None:
        x = x.contiguous(memory_format=run.memory)
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=config.bf16):
        logits = learner.model(x)
    loss = selective_loss(logits, batch.label.to(device), batch.weight.to(device),
                          dice_weight=config.dice_weight, ce_weight=config.ce_weight)
    learner.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    learner.optimizer.step()
    # one read per step: on a GPU the wait frees the GIL for the thread preparing the next batch
    # (H100, 2D hippocampus: end-to-end / bare step 0.85 with it, 0.78 without)
    return float(loss.detach())


def _validate_and_save(run: _Run, learner: _Learner, state: TrainState, clock: _Clock, *, losses: list[float],
                       seen: int, train_seconds: float) -> float:
    """Validate after an epoch, step the schedule, count the epoch, save ``best.pt`` when it is the best
    so far, then ``history.csv`` and ``last.pt``; returns the validation Dice."""
    t_val = time.perf_counter()
    dice, per_class = validate(learner.model, run.val_cases, spec=run.spec, patch_size=run.patch,
                               device=run.device, batch_size=run.config.batch_size, bf16=run.config.bf16)
    val_seconds = time.perf_counter() - t_val
    lr = learner.optimizer.param_groups[0]["lr"]
    step_scheduler(learner.scheduler, dice)
    state.epoch += 1
    if dice > state.best_dice:
        state.best_dice, state.best_epoch, state.bad_epochs = dice, state.epoch, 0
        _save_best(run, learner.model, epoch=state.epoch, dice=dice, per_class=per_class)
    else:
        state.bad_epochs += 1
    state.elapsed = clock.elapsed()
    state.samples_seen += seen
    state.history.append({
        "epoch": state.epoch, "phase": state.phase, "lr": lr, "loss": float(np.mean(losses)), "val_dice": dice,
        **run.dice_columns(per_class), "samples": seen, "train_seconds": train_seconds,
        "val_seconds": val_seconds, "elapsed_seconds": state.elapsed})
    _write_history(run.file("history.csv"), state.history)
    _save_last(run, learner, state)
    return dice


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
    """Whether batches are prepared in a background thread when ``train(prefetch=)`` is not given: on
    a GPU, whose step is bound by the CPU launching kernels (H100, hippocampus, end-to-end / bare
    step: 2D 0.77 -> 0.85-0.97, 3D 0.61 -> 0.78; see bench/train.py); not on a CPU, whose cores
    the step already uses."""
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


def _write_history(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def _save_best(run: _Run, model: torch.nn.Module, *, epoch: int, dice: float, per_class: list[float]) -> None:
    """``best.pt``: what inference needs (:class:`~sparseslice.model.Checkpoint`), plain data only."""
    ckpt = Checkpoint(spec=run.spec, normalization=run.normalization, axis=run.axis, labels=run.labels,
                      patch_size=run.patch, spacing=run.config.spacing,
                      state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}, epoch=epoch,
                      metrics={"val_dice": dice, **run.dice_columns(per_class)},
                      extra={"config": run.config.to_dict(), "model": run.config.model,
                             "label_names": run.label_names})
    save_checkpoint(run.file("best.pt"), ckpt)


def _save_last(run: _Run, learner: _Learner, state: TrainState) -> None:
    """``last.pt``: everything resuming needs (weights, optimiser, schedule, counters, random states),
    tensors and plain data only, so it loads with ``weights_only``."""
    save_plain(run.file("last.pt"), {
        "model": learner.model.state_dict(), "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(), "state": state.to_dict(), "config": run.config.to_dict(),
        "rng": {"torch": torch.get_rng_state(), "numpy": learner.rng.bit_generator.state,
                "python": random.getstate(), "augment": learner.gen.get_state()}})
