"""Validation during training: which cases and slices an epoch checks, and their masked Dice.

Validation is the training loop's model selection, so it must be cheap (at most a share of
an epoch's training, by sizes alone) and the same rule for every run. 2D validation stacks
the checked slices of all cases that share a window, so small cases do not each pay for a
part-filled pass.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from sparseslice.inference import Window, classes, model_inputs, window_size, with_mask_channel
from sparseslice.model import ModelSpec
from sparseslice.train.config import TrainConfig
from sparseslice.train.data import CaseArrays
from sparseslice.train.losses import masked_dice_scores

#: Validation forward passes a training sample costs, in that model. Calibrated on 2 CPU cores: a training
#: step (forward, backward, Adam) costs about two eval-mode passes of the same batch (hippocampus 2D: with 3,
#: the rule predicted validation at 0.19 of training time and it took 0.30).
TRAIN_PASSES = 2


def validation_subset(cases: list[CaseArrays], *, dims: int, patch: tuple[int, ...], samples: int,
                      share: float | None = TrainConfig.val_share) -> tuple[list[CaseArrays], dict[str, Any]]:
    """The validation cases and slices an epoch checks, so that validating costs at most ``share`` of training.

    The same rule for every run, from sizes only (never timings, so runs stay reproducible): an
    epoch's training costs ``TRAIN_PASSES * samples`` forward passes of the patch; validation one
    pass per voxel of every window (the image, at least the patch, times the windows' overlap of
    0.25 where it is larger). 2D: evenly spaced validation slices over all cases, every k-th for
    the smallest k that fits; 3D: the first cases that fit (at least one). What fits whole is
    kept whole. Returns the cases (others' slices zero-weighted copies, arrays shared) and a
    summary for ``split.json``. ``share=None`` keeps everything.
    """
    if share is None:
        return cases, {"share": None}
    allowed = share * TRAIN_PASSES * samples * float(np.prod(patch))

    def cost(shape: tuple[int, ...]) -> float:
        grow = any(s > p for s, p in zip(shape, patch, strict=True))
        return float(np.prod([max(s, p) for s, p in zip(shape, patch, strict=True)])) / (0.75 ** dims if grow else 1)

    if dims == 3:
        checked = [c for c in cases if c.validation_slices.size]
        costs = np.cumsum([cost(c.shape) for c in checked])
        chosen = checked[:max(1, int(np.searchsorted(costs, allowed, side="right")))]
        return chosen, {"share": share, "cases": len(chosen), "of_cases": len(costs)}
    units = [(n, int(i), cost(tuple(s for a, s in enumerate(c.shape) if a != c.axis)))
             for n, c in enumerate(cases) for i in c.validation_slices]
    total = sum(u for *_, u in units)
    if not units:
        return cases, {"share": share, "slices": 0, "of_slices": 0, "every": 1}
    step = 1 if total <= allowed else int(np.ceil(total / max(allowed, min(u for *_, u in units))))
    kept = {(n, i) for n, i, _ in units[::step]}
    out = []
    for n, c in enumerate(cases):
        drop = [i for i in c.validation_slices if (n, int(i)) not in kept]
        if drop:
            weight = c.slice_weight.copy()
            weight[drop] = 0
            c = replace(c, slice_weight=weight)
        out.append(c)
    return out, {"share": share, "slices": len(kept), "of_slices": len(units), "every": step}


@torch.no_grad()
def validate(model: torch.nn.Module, cases: list[CaseArrays], *, spec: ModelSpec, patch_size: tuple[int, ...],
             device: torch.device, batch_size: int = 16, bf16: bool = False) -> tuple[float, list[float]]:
    """Masked Dice on the validation cases' truly annotated slices.

    Inference is :mod:`sparseslice.inference`'s sliding window, as in :mod:`sparseslice.predict`,
    with the training patch (so padding matches what the network saw in training), but with
    the cheaper window an every-epoch check affords: overlap 0.25 and constant blending instead
    of prediction's 0.5 and Gaussian, ``2 * batch_size`` slices (2D, stacked across cases that
    share a window: :func:`_slice_classes`) or one window (3D) per pass.

    Returns the mean over cases of the mean foreground Dice, and the per-class means over
    cases (NaN for a class absent from every case). Cases with no foreground anywhere in
    prediction and reference are skipped.
    """
    model.eval()
    n_classes = spec.out_channels
    window = Window(overlap=0.25, blend="constant", images_per_pass=max(1, batch_size * 2))
    stacked = _slice_classes(model, cases, spec=spec, patch_size=patch_size, window=window, bf16=bf16,
                             device=device) if spec.dims == 2 else {}
    scores = []
    for n, c in enumerate(cases):
        idx = c.validation_slices
        if idx.size == 0:
            continue
        if spec.dims == 2:
            pred = stacked[n]
            ref = torch.from_numpy(np.moveaxis(np.take(c.label, idx, axis=c.axis), c.axis, 0).astype(np.int64))
            known = torch.ones_like(ref, dtype=torch.bool)
        else:
            images = with_mask_channel(model_inputs(c.image, dims=3, axis=c.axis), mask_channel=spec.mask_channel,
                                       axis=1)
            roi = window_size(patch_size, dims=3, axis=c.axis, divisor=spec.divisor, plane=images.shape[2:])
            pred = classes(model, images, roi=roi, window=window, bf16=bf16, device=device)[0]
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


def _slice_classes(model: torch.nn.Module, cases: list[CaseArrays], *, spec: ModelSpec,
                   patch_size: tuple[int, ...], window: Window, bf16: bool,
                   device: torch.device) -> dict[int, torch.Tensor]:
    """Class maps ``(k, h, w)`` of each case's validation slices (keyed by the case's position).

    A slice smaller than the window is zero-padded to it as MONAI's sliding window pads (half
    before, the rest after); slices of the same padded size and window are then one stack, so
    they share passes. The windows each slice sees are those it would see alone.
    """
    groups: dict[tuple[tuple[int, ...], tuple[int, ...]], list[tuple[int, np.ndarray]]] = {}
    for n, c in enumerate(cases):
        if c.validation_slices.size == 0:
            continue
        images = with_mask_channel(model_inputs(c.image, dims=2, axis=c.axis, slices=c.validation_slices),
                                   mask_channel=spec.mask_channel, axis=1)
        plane = images.shape[2:]
        roi = window_size(patch_size, dims=2, axis=c.axis, divisor=spec.divisor, plane=plane)
        full = tuple(max(int(s), int(r)) for s, r in zip(plane, roi, strict=True))
        groups.setdefault((full, tuple(roi)), []).append((n, images))
    out = {}
    for (full, roi), members in groups.items():
        stack = np.concatenate([np.pad(images, [(0, 0), (0, 0), *(((f - s) // 2, f - s - (f - s) // 2)
                                                                 for f, s in zip(full, images.shape[2:],
                                                                                 strict=True))])
                                for _, images in members])
        pred = classes(model, stack, roi=roi, window=window, bf16=bf16, device=device)
        start = 0
        for n, images in members:
            (h, w), k = images.shape[2:], images.shape[0]
            oy, ox = (full[0] - h) // 2, (full[1] - w) // 2
            out[n] = pred[start:start + k, oy:oy + h, ox:ox + w]
            start += k
    return out
