"""Training data in memory: cases with known-slice weights, 2D slice and 3D block samplers.

Every case is read once: normalised float32 image ``(C, X, Y, Z)``, label as class indices,
and one weight per slice along the slice axis (0 unknown, 1 annotated or border,
``interpolated_weight`` for interpolated slices), plus the known voxels of partly labelled
slices (nnU-Net's ignore label, weight 1 per voxel). Samplers only draw known data: the 2D
sampler keeps annotated slices only; the 3D sampler draws blocks around an annotated slice,
so every sample holds known voxels.
"""

from __future__ import annotations

import functools
import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from sparseslice.datasets import Dataset, load_image, slice_axis_of
from sparseslice.errors import UserError
from sparseslice.io import Volume, check_same_space, read_header
from sparseslice.model import Normalization, normalize
from sparseslice.resample import (
    check_target,
    default_spacing,
    needs_resampling,
    resample_image,
    resample_label,
    resampled_shape,
)
from sparseslice.sparse import ignore_axis, read_label_file, read_sidecar
from sparseslice.train.cache import PreparedCase, cached_case


@dataclass
class CaseArrays:
    """One case in memory.

    ``image`` is ``(C, X, Y, Z)`` float32, ``label`` ``(X, Y, Z)`` uint8 class indices
    (positions in the run's label list), ``slice_weight`` one float per slice along ``axis``,
    ``partial`` (optional, ``(X, Y, Z)`` bool) the known voxels of slices labelled only in
    part (weight 1 there; the rest of such a slice is unknown).
    """

    case_id: str
    image: np.ndarray
    label: np.ndarray
    slice_weight: np.ndarray
    axis: int
    interpolated: np.ndarray | None = None
    partial: np.ndarray | None = None
    #: The case's shape before :func:`load_cases` kept only some of its slices (None: nothing dropped).
    full_shape: tuple[int, int, int] | None = None
    #: One bool per slice: border slices (annotated background outside the structure's extent; None: none).
    border: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, int, int]:
        """The whole case's shape at the training spacing (also when only some slices are kept)."""
        return tuple(self.full_shape or self.label.shape)  # type: ignore[return-value]

    @property
    def validation_slices(self) -> np.ndarray:
        """Slices with a true (drawn or border) annotation: known and not interpolated."""
        interp = self.interpolated if self.interpolated is not None else np.zeros(self.slice_weight.shape, bool)
        return np.flatnonzero((self.slice_weight > 0) & ~interp)

    @property
    def known_slices(self) -> np.ndarray:
        """Slices holding any known voxel (annotated, interpolated or partly labelled)."""
        return np.flatnonzero((self.slice_weight > 0) | _partial_slices(self.partial, self.axis))

    @property
    def anchor_slices(self) -> np.ndarray:
        """Known slices a 3D block is drawn around: all but the border slices, which weigh in only where a
        block drawn around a drawn slice covers them (all known slices when only border slices are known).

        Border slices come free and can outnumber the drawn ones (a 20 % block of the structure, and
        every slice outside its extent): blocks drawn around them would mostly hold background.
        """
        known = self.known_slices
        if self.border is None:
            return known
        drawn = known[~self.border[known]]
        return drawn if drawn.size else known

    def voxel_weight(self) -> np.ndarray:
        """Per-voxel loss weight: the slice weight, and 1 at the known voxels of partial slices."""
        shape = [1, 1, 1]
        shape[self.axis] = -1
        weight = np.broadcast_to(self.slice_weight.reshape(shape), self.label.shape)
        return weight if self.partial is None else np.where(self.partial, np.float32(1), weight)


class Batch(NamedTuple):
    """A training batch: image ``(B, C, ...)``, label ``(B, ...)`` int64, weight ``(B, ...)``
    float32 (0 at unknown voxels) and annotated ``(B, ...)`` (the annotated-slice mask)."""

    image: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    annotated: torch.Tensor


def resolve_axis(dataset: Dataset, axis: int | None) -> int:
    """The slice axis: ``axis`` if given, else the sidecars' axis, else the dataset's axis
    (for a declared ignore label, the axis along which its slices are whole)."""
    side_axes = set()
    for case in dataset.labelled:
        record = read_sidecar(case.label)
        if record is not None:
            side_axes.add(int(record["axis"]))
    if len(side_axes) > 1:
        raise UserError(f"sidecar axis must be the same for all cases, got {sorted(side_axes)}; "
                        "simulate the sparse dataset again with one axis")
    if side_axes:
        found = side_axes.pop()
        if axis is not None and axis != found:
            raise UserError(f"axis disagrees with the sparse labels, got {axis} vs {found} in the sidecars; "
                            "leave axis unset or pass the sidecars' axis")
        return found
    if axis is not None:
        return axis
    default = slice_axis_of(c.images[0] for c in dataset.labelled)
    if dataset.ignore_value is None:
        return default
    return ignore_axis((c.label for c in dataset.labelled), ignore_value=dataset.ignore_value, default=default)


def resolve_spacing(dataset: Dataset, case_ids: list[str], *, axis: int,
                    spacing: tuple[float, float] | None, max_inplane: int) -> tuple[float, float]:
    """The in-plane spacing training runs at: ``spacing`` if given (checked against every case),
    else :func:`sparseslice.resample.default_spacing` of the cases' headers."""
    heads = [(cid, read_header(dataset.case(cid).images[0])) for cid in case_ids]
    if spacing is None:
        spacing = default_spacing([h.spacing for _, h in heads], [h.shape[:3] for _, h in heads], axis=axis,
                                  max_inplane=max_inplane)
    target = check_target(spacing)
    for cid, head in heads:
        resampled_shape(head.shape[:3], head.spacing, target, axis=axis, name=f"case {cid!r}")
    return target


def read_case_label(case_label: object, *, axis: int, ignore_value: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Volume, np.ndarray | None, np.ndarray | None]:
    """Read a label file as ``(label, annotated, interpolated, volume, partial, border)``.

    With a sidecar it is sparse; without one it is fully annotated, unless it holds the ignore
    value (the dataset's ``ignore_value`` from nnU-Net's dataset.json, else 255), in which
    case slices free of it are annotated. ``volume`` is the file as read (its grid, for
    checking it against the image); ``partial`` the known voxels of partly labelled slices
    and ``border`` one bool per slice, the border slices (each None when there are none).
    """
    sparse, vol = read_label_file(case_label, axis=axis, ignore_value=ignore_value)
    if sparse is None:
        n = vol.shape[axis]
        return vol.array, np.ones(n, bool), np.zeros(n, bool), vol, None, None
    interpolated = np.zeros(sparse.n_slices, bool)
    interpolated[sparse.meta.get("interpolated", [])] = True
    border = sparse.border if sparse.border.any() else None
    return sparse.label, sparse.annotated, interpolated & sparse.annotated, vol, sparse.partial_known, border


def kept_slices(known: np.ndarray, *, keep: int | None) -> np.ndarray | None:
    """The slices :func:`load_cases` keeps of a case whose known slices are ``known`` (None: all of them).

    ``keep=None`` keeps every slice; ``0`` only the known ones (what a 2D sampler reads); ``k > 0``
    the range from ``k`` slices before the first known slice to ``k`` after the last (a 3D block
    of depth ``k + 1`` holding a known slice lies inside it). A case without a known slice keeps all.

    Examples
    --------
    >>> kept_slices(np.array([0, 0, 1, 0, 0, 1, 0, 0, 0], bool), keep=0).tolist()
    [2, 5]
    >>> kept_slices(np.array([0, 0, 1, 0, 0, 1, 0, 0, 0], bool), keep=2).tolist()
    [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if keep is None or not known.any():
        return None
    idx = np.flatnonzero(known)
    if keep == 0:
        return idx
    return np.arange(max(0, idx[0] - keep), min(known.size, idx[-1] + keep + 1))


def load_cases(dataset: Dataset, case_ids: list[str], *, axis: int, normalization: Normalization,
               labels: tuple[int, ...] | None = None, interpolated_weight: float = 0.5,
               progress: bool = False, nonfinite: str = "error", channels: int | None = None,
               spacing: tuple[float, float] | None = None,
               keep: int | None = None, cache: Path | None = None) -> tuple[list[CaseArrays], tuple[int, ...]]:
    """Read cases into memory; returns them and the label values (index = class).

    ``labels`` defaults to the dataset's label names plus every value found in known voxels;
    ``nonfinite`` is :func:`~sparseslice.datasets.load_image`'s. Every case must have the same
    number of image channels (``channels`` when given: those of the training cases, for
    validation cases). ``spacing`` (two in-plane spacings in mm) resamples each case across
    the slice axis (:mod:`sparseslice.resample`): slice weights are those of the file.
    ``keep`` (:func:`kept_slices`) holds only the slices training reads, one case at a time:
    the image is normalised whole first, so the kept slices hold the values they would have
    in the whole case (``CaseArrays.full_shape`` keeps its shape). ``cache`` (a folder) keeps
    each preprocessed case on disk (:mod:`sparseslice.train.cache`): a later load maps its arrays
    from there (read-only) instead of reading and preprocessing the files again.
    """
    raw = []
    found: set[int] = set()
    from sparseslice.progress import track

    settings = {"axis": axis, "normalization": normalization, "interpolated_weight": interpolated_weight,
                "nonfinite": nonfinite, "spacing": spacing, "keep": keep}
    for cid in track(case_ids, "loading cases", progress=progress):
        build = functools.partial(_prepare_case, dataset, cid, **settings)
        if cache is None:
            prep = build()
        else:
            prep = cached_case(cache, dataset.case(cid), build=build,
                               params={**settings, "ignore_value": dataset.ignore_value})
        found.update(prep.found)
        raw.append((cid, prep.image, prep.label, prep.weight, prep.interpolated, prep.partial, prep.full_shape,
                    prep.border))
    _check_channels(raw, expected=channels)
    if labels is None:
        labels = tuple(sorted({0, *dataset.label_names, *found}))
    lut = np.zeros(max(max(labels), max(found, default=0)) + 1, np.int64)
    unexpected = sorted(found - set(labels))
    if unexpected:
        raise UserError(f"label value {unexpected[0]} is not one of the run's labels {list(labels)}; "
                        "check the labels or dataset.json")
    lut[list(labels)] = np.arange(len(labels))
    cases = [CaseArrays(cid, img, lut[label].astype(np.uint8), weight, axis, interp, partial, full, border)
             for cid, img, label, weight, interp, partial, full, border in raw]
    return cases, tuple(int(v) for v in labels)


def _prepare_case(dataset: Dataset, cid: str, *, axis: int, normalization: Normalization,
                  interpolated_weight: float, nonfinite: str, spacing: tuple[float, float] | None,
                  keep: int | None) -> PreparedCase:
    """Read and preprocess one case for :func:`load_cases` (its arguments): label values as read."""
    case = dataset.case(cid)
    if case.label is None:
        raise UserError(f"case {cid!r} has no label; training needs a label (sparse or full) for each case")
    found: set[int] = set()
    image = load_image(case, nonfinite=nonfinite)
    arr = image.array if image.array.ndim == 4 else image.array[..., None]
    label, annotated, interpolated, label_volume, partial, border = read_case_label(
        case.label, axis=axis, ignore_value=dataset.ignore_value)
    check_same_space(image, label_volume, name=cid)
    weight = np.where(annotated, 1.0, 0.0).astype(np.float32)
    weight[interpolated] = interpolated_weight
    known = weight > 0
    if known.any():
        found.update(np.unique(np.compress(known, label, axis=axis)).tolist())
    if partial is not None:
        found.update(np.unique(label[partial]).tolist())
    img = normalize(np.moveaxis(arr, -1, 0), normalization)
    image_spacing = image.spacing
    del image, arr  # only the normalised copy (and soon only its kept slices) stays
    resampled = needs_resampling(image_spacing, spacing, axis=axis)
    grid = resampled_shape(label.shape, image_spacing, spacing, axis=axis, name=f"case {cid!r}") \
        if resampled else label.shape
    kept = kept_slices(known | _partial_slices(partial, axis), keep=keep)
    if kept is not None:  # resampling is in-plane, slice by slice: the same before or after
        img, label = np.take(img, kept, axis=axis + 1), np.take(label, kept, axis=axis)
        weight, interpolated = weight[kept], interpolated[kept]
        border = None if border is None else border[kept]
        partial = None if partial is None else np.take(partial, kept, axis=axis)
    if resampled:
        target = tuple(len(kept) if kept is not None and a == axis else int(g) for a, g in enumerate(grid))
        img = resample_image(img, target, axis=axis)
        label, partial = resample_label(label, target, axis=axis, known=partial)
    if keep == 0:  # 2D reads whole slices: each one contiguous in memory (same values and shapes)
        img, label = slice_major(img, axis + 1), slice_major(label, axis)
        partial = None if partial is None else slice_major(partial, axis)
    return PreparedCase(cid, axis, img, label, weight, interpolated, partial,
                        None if kept is None else tuple(grid), found, border)


def slice_major(array: np.ndarray, axis: int) -> np.ndarray:
    """A copy of ``array`` laid out with ``axis`` outermost in memory, as a view of ``array``'s shape.

    A slice across the last axis of a C-ordered case is one value per cache line: gathering a 2D
    batch of 16 left-atrium slices that way took 22 ms, longer than a quarter of the training step.

    Examples
    --------
    >>> a = np.arange(24).reshape(2, 3, 4)
    >>> b = slice_major(a, 2)
    >>> np.array_equal(a, b), slice_of(b, 1, axis=2).flags.c_contiguous
    (True, True)
    """
    return np.moveaxis(np.ascontiguousarray(np.moveaxis(array, axis, 0)), 0, axis)


def slice_of(array: np.ndarray, index: int, *, axis: int) -> np.ndarray:
    """``array``'s slice ``index`` along ``axis``, a view (:func:`numpy.take` would copy a non-C-ordered
    array whole first)."""
    where: list[Any] = [slice(None)] * array.ndim
    where[axis] = int(index)
    return array[tuple(where)]


def _partial_slices(partial: np.ndarray | None, axis: int) -> np.ndarray | bool:
    """Slices holding a known voxel of a partly labelled slice (False when there are none)."""
    if partial is None:
        return False
    return np.any(partial, axis=tuple(a for a in range(3) if a != axis))


def _check_channels(raw: list[tuple[Any, ...]], *, expected: int | None) -> None:
    """Refuse cases whose images have different channel counts (one network takes one count)."""
    counts: dict[int, list[str]] = {}
    for cid, img, *_ in raw:
        counts.setdefault(int(img.shape[0]), []).append(cid)
    if expected is not None and set(counts) - {expected}:
        other = min(set(counts) - {expected})
        raise UserError(f"validation cases must have the {expected} image channel(s) of the training cases, got "
                        f"{other} in {counts[other][0]!r}; validate on cases of the same kind")
    if len(counts) > 1:
        shown = ", ".join(f"{n} in {len(ids)} case(s) (e.g. {ids[0]!r})" for n, ids in sorted(counts.items()))
        raise UserError(f"cases must have the same number of image channels, got {shown}; train on cases "
                        "of one kind: remove or convert the others")


def warn_missing_classes(cases: list[CaseArrays], labels: tuple[int, ...], names: dict[int, str]) -> list[int]:
    """Warn (naming them) about classes with no annotated voxel; returns their values.

    Refuses (:class:`UserError`) when no foreground class has one: a model of background only
    predicts empty maps.
    """
    seen = np.zeros(len(labels), bool)
    for c in cases:
        idx = c.known_slices
        if idx.size:
            seen[np.unique(np.take(c.label, idx, axis=c.axis))] = True
    if not seen[1:].any():
        raise UserError(f"training labels must hold a foreground voxel in an annotated slice, got none in the "
                        f"{len(cases)} training case(s); check the label files (all background?) and which "
                        "slices the .sparse.json sidecars mark annotated")
    missing = [labels[i] for i in np.flatnonzero(~seen)]
    for value in missing:
        name = f" ({names[value]!r})" if value in names else ""
        warnings.warn(f"class {value}{name} has no annotated voxel in the training data; the model cannot "
                      "learn it: annotate slices that contain it", UserWarning, stacklevel=2)
    return missing


def round_up(value: int, divisor: int) -> int:
    return int(-(-value // divisor) * divisor)


def pad_end(array: np.ndarray, shape: tuple[int, ...], value: float = 0) -> np.ndarray:
    """Pad the last ``len(shape)`` axes of ``array`` at their end up to ``shape`` (never crops)."""
    lead = array.ndim - len(shape)
    pads = [(0, 0)] * lead + [(0, max(0, s - n)) for s, n in zip(shape, array.shape[lead:], strict=True)]
    return np.pad(array, pads, constant_values=value) if any(p[1] for p in pads) else array


def pad_center(array: np.ndarray, shape: tuple[int, ...], value: float = 0) -> tuple[np.ndarray, tuple[int, ...]]:
    """Pad the last ``len(shape)`` axes symmetrically up to ``shape``; returns the array and the offsets."""
    lead = array.ndim - len(shape)
    before = [max(0, s - n) // 2 for s, n in zip(shape, array.shape[lead:], strict=True)]
    pads = [(0, 0)] * lead + [(b, max(0, s - n) - b) for b, s, n in zip(before, shape, array.shape[lead:],
                                                                         strict=True)]
    return (np.pad(array, pads, constant_values=value) if any(p[0] or p[1] for p in pads) else array), tuple(before)


#: Default 3D patch caps: in-plane and along the slice axis.
PATCH_3D_INPLANE, PATCH_3D_SLICES = 128, 48


def largest_shape(cases: list[CaseArrays]) -> tuple[int, ...]:
    """The largest size of the cases along each axis."""
    return tuple(int(s) for s in np.array([c.shape for c in cases]).max(axis=0))


def default_patch_size(cases: list[CaseArrays], *, model: str, axis: int, divisor: int) -> tuple[int, ...]:
    """Largest case (in-plane for 2D) rounded up to ``divisor``, capped at 256 (2D), or at 128 in-plane and
    48 along the slice axis (3D: Specktor-Fadida et al.'s 128 x 128 x 48 blocks, about 0.2 s per patch
    and step on 2 CPU cores)."""
    top = largest_shape(cases)
    if model == "2d":
        return tuple(min(round_up(int(s), divisor), 256) for a, s in enumerate(top) if a != axis)
    return tuple(min(round_up(int(s), divisor), PATCH_3D_SLICES if a == axis else PATCH_3D_INPLANE)
                 for a, s in enumerate(top))


class SliceSampler:
    """2D samples: the known slices of every case, read from the cases' own arrays.

    Slices are padded symmetrically to the largest slice (and at least ``patch_size``), as
    sliding-window inference pads; padding is unknown. With a ``patch_size`` smaller than a
    slice, a random crop inside the slice is taken. Nothing is copied up front: a batch gathers
    its slices from the cases (memory-mapped ones stay on disk), and the per-voxel weight is
    built from one weight per slice (per voxel only for partly labelled slices).
    """

    def __init__(self, cases: list[CaseArrays], *, patch_size: tuple[int, int]) -> None:
        plane = tuple(int(p) for p in patch_size)
        planes = np.array([[s for a, s in enumerate(c.label.shape) if a != c.axis] for c in cases])
        self.store = (max(plane[0], int(planes[:, 0].max())), max(plane[1], int(planes[:, 1].max())))
        self.cases = cases
        rows, weights = [], []  # one row per sample: case index, slice index
        self.partial: dict[int, np.ndarray] = {}  # sample -> per-voxel weight of a partly labelled slice
        for i, c in enumerate(cases):
            part = _partial_slices(c.partial, c.axis)
            voxel_weight = None if part is False else c.voxel_weight()
            for s in c.known_slices:
                if voxel_weight is not None and part[s]:
                    self.partial[len(rows)] = np.take(voxel_weight, s, axis=c.axis).astype(np.float32)
                rows.append((i, int(s)))
                weights.append(c.slice_weight[s])
        if not rows:
            raise UserError("training data has no annotated slice, got 0 known slices; "
                            "check the sparse labels and their sidecars")
        self.rows = np.array(rows)
        self.slice_weight = np.array(weights, np.float32)
        self.sizes = planes[self.rows[:, 0]]
        self.offsets = (np.array(self.store) - self.sizes) // 2
        self.patch_size = plane

    def __len__(self) -> int:
        return int(self.rows.shape[0])

    def stored(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The samples at ``indices`` padded to the store's slice size: image ``(B, C, H, W)`` float32,
        label ``(B, H, W)`` uint8 and weight ``(B, H, W)`` float32 (0 in the padding)."""
        n, (hh, ww) = len(indices), self.store
        channels = self.cases[0].image.shape[0]
        img = np.zeros((n, channels, hh, ww), np.float32)
        lab = np.zeros((n, hh, ww), np.uint8)
        w = np.zeros((n, hh, ww), np.float32)
        for b, k in enumerate(indices):
            (i, s), (h, wd), (oy, ox) = self.rows[k], self.sizes[k], self.offsets[k]
            c = self.cases[i]
            img[b, :, oy:oy + h, ox:ox + wd] = slice_of(c.image, s, axis=1 + c.axis)
            lab[b, oy:oy + h, ox:ox + wd] = slice_of(c.label, s, axis=c.axis)
            w[b, oy:oy + h, ox:ox + wd] = self.partial[k] if k in self.partial else self.slice_weight[k]
        return torch.from_numpy(img), torch.from_numpy(lab), torch.from_numpy(w)

    def batch(self, indices: np.ndarray, rng: np.random.Generator) -> Batch:
        """The samples at ``indices`` (random crops when the patch is smaller than a slice)."""
        img, lab, w = self.stored(indices)
        ph, pw = self.patch_size
        if img.shape[-2:] != (ph, pw):
            crops_i, crops_l, crops_w = [], [], []
            for n, i in enumerate(indices):
                (h, wd), (oy, ox) = self.sizes[i], self.offsets[i]
                y0 = int(rng.integers(0, max(0, h - ph) + 1)) + oy if h >= ph else (img.shape[-2] - ph) // 2
                x0 = int(rng.integers(0, max(0, wd - pw) + 1)) + ox if wd >= pw else (img.shape[-1] - pw) // 2
                crops_i.append(img[n, :, y0:y0 + ph, x0:x0 + pw])
                crops_l.append(lab[n, y0:y0 + ph, x0:x0 + pw])
                crops_w.append(w[n, y0:y0 + ph, x0:x0 + pw])
            img, lab, w = torch.stack(crops_i), torch.stack(crops_l), torch.stack(crops_w)
        return Batch(img, lab.long(), w, torch.ones_like(w))

    def epoch(self, samples: int, batch_size: int, rng: np.random.Generator):
        """Yield ``ceil(samples / batch_size)`` batches drawn without replacement (cycling)."""
        n_batches = max(1, -(-samples // batch_size))
        need = n_batches * batch_size
        order = np.concatenate([rng.permutation(len(self)) for _ in range(-(-need // len(self)))])[:need]
        for b in range(n_batches):
            yield self.batch(order[b * batch_size:(b + 1) * batch_size], rng)


class BlockSampler:
    """3D samples: blocks of ``patch_size`` that contain at least one known slice.

    A case is drawn uniformly. With probability ``foreground`` the block is centred on a known
    voxel of a foreground class (class drawn uniformly among those the case's known voxels
    hold, then one of its voxels: nnU-Net's foreground oversampling, which draws a third of
    its patches so); otherwise one of the case's known slices other than border slices is
    drawn (:attr:`CaseArrays.anchor_slices`), then a block position that contains it
    (Specktor-Fadida et al.'s non-empty blocks). Along an axis where the
    volume is smaller than the block, the volume lands at a random offset inside the block
    (inference pads such volumes symmetrically; a fixed corner would teach a position);
    padding is unknown.

    The ``annotated`` map of a sample (the mask channel's input) is the known-slice mask; in a
    share ``mask_as_inference`` of samples it is what inference gives instead, ones inside the
    volume, so a network with a mask channel has seen at training the input it gets at
    inference (losses keep the true weights).
    """

    def __init__(self, cases: list[CaseArrays], *, patch_size: tuple[int, int, int], foreground: float = 0.0,
                 mask_as_inference: float = 0.0) -> None:
        self.cases = [c for c in cases if c.known_slices.size]
        if not self.cases:
            raise UserError("training data has no annotated slice, got 0 known slices; "
                            "check the sparse labels and their sidecars")
        self.patch_size = tuple(int(p) for p in patch_size)
        self.foreground, self.mask_as_inference = float(foreground), float(mask_as_inference)
        self.images, self.labels, self.slice_weights = [], [], []
        self.voxel_weights: list[np.ndarray | None] = []  # only for cases with partly labelled slices
        self.margins = []
        self.foreground_voxels = [foreground_voxels(c) for c in self.cases]
        for c in self.cases:
            margin = tuple(max(0, p - s) for p, s in zip(self.patch_size, c.label.shape, strict=True))
            shape = tuple(s + 2 * m for s, m in zip(c.label.shape, margin, strict=True))
            self.margins.append(margin)
            self.images.append(pad_center(c.image, shape)[0])
            self.labels.append(pad_center(c.label, shape)[0])
            # weights stay one value per slice (padding: unknown); blocks broadcast them on the fly
            self.slice_weights.append(pad_center(c.slice_weight.astype(np.float32), (shape[c.axis],))[0])
            self.voxel_weights.append(None if c.partial is None
                                      else pad_center(c.voxel_weight().astype(np.float32), shape)[0])

    def __len__(self) -> int:
        return len(self.cases)

    def _start(self, i: int, rng: np.random.Generator) -> tuple[list[int], np.ndarray | None]:
        """A block's corner in case ``i``'s padded arrays, and the foreground voxel it is centred on
        (None for a block drawn around a known slice)."""
        case, margins = self.cases[i], self.margins[i]
        classes = self.foreground_voxels[i]
        centred = bool(classes) and self.foreground > 0 and rng.random() < self.foreground
        if centred:
            voxels = classes[int(rng.integers(len(classes)))]
            centre = voxels[int(rng.integers(len(voxels)))].astype(int)
            s = int(centre[case.axis])
        else:
            anchors = case.anchor_slices
            s = int(anchors[rng.integers(anchors.size)])
        start = []
        for a, (p, n, m) in enumerate(zip(self.patch_size, case.label.shape, margins, strict=True)):
            lo, hi = 0, n + 2 * m - p
            if a == case.axis:
                lo, hi = max(0, s + m - p + 1), min(s + m, hi)
            if centred:
                start.append(int(np.clip(int(centre[a]) + m - p // 2, lo, hi)))
            else:
                start.append(int(rng.integers(lo, hi + 1)))
        return start, centre if centred else None

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        i = int(rng.integers(len(self.cases)))
        case = self.cases[i]
        start, _ = self._start(i, rng)
        sl = tuple(slice(b, b + p) for b, p in zip(start, self.patch_size, strict=True))
        label = self.labels[i][sl]
        inside = np.zeros(label.shape, np.float32)  # 1 inside the volume, 0 in padding
        inside[tuple(slice(max(0, m - b), n + m - b) for b, m, n in
                     zip(start, self.margins[i], case.label.shape, strict=True))] = 1
        view = [-1 if a == case.axis else 1 for a in range(3)]
        per_slice = self.slice_weights[i][sl[case.axis]].reshape(view)
        weight = inside * (per_slice if self.voxel_weights[i] is None else self.voxel_weights[i][sl])
        annotated = (weight > 0).astype(np.float32)
        if self.mask_as_inference > 0 and rng.random() < self.mask_as_inference:
            annotated = inside
        return (self.images[i][(slice(None), *sl)], label, weight, annotated)

    def epoch(self, samples: int, batch_size: int, rng: np.random.Generator):
        """Yield ``ceil(samples / batch_size)`` batches of random blocks."""
        for _ in range(max(1, -(-samples // batch_size))):
            parts = [self.sample(rng) for _ in range(batch_size)]
            img, lab, w, ann = (np.stack(p) for p in zip(*parts, strict=True))
            yield Batch(torch.from_numpy(img), torch.from_numpy(lab).long(), torch.from_numpy(w),
                        torch.from_numpy(ann))


#: At most this many voxels per foreground class and case are kept for oversampling (nnU-Net keeps 10,000).
FOREGROUND_VOXELS = 10_000


def foreground_voxels(case: CaseArrays) -> list[np.ndarray]:
    """Per foreground class present in ``case``'s known voxels, their coordinates ``(n, 3)``.

    At most :data:`FOREGROUND_VOXELS` per class, taken at an even stride (no random choice).
    """
    known = case.voxel_weight() > 0
    found = []
    for value in np.unique(case.label[known]):
        if value == 0:
            continue
        where = np.argwhere((case.label == value) & known)
        step = max(1, -(-len(where) // FOREGROUND_VOXELS))
        found.append(where[::step].astype(np.int32))
    return found


def prefetch(batches: Iterator[Batch], *, transform: Callable[[Batch], Batch] | None = None, depth: int = 2,
             pin: bool = False, threads: int | None = None) -> Iterator[Batch]:
    """Yield the batches of ``batches``, drawn (and ``transform``-ed) ahead in a background thread.

    On a GPU the training step is bound by the CPU launching its kernels, so preparing the next
    batch beside it keeps the GPU fed. The batches and their order are those of ``batches``:
    the thread is the only user of the sampler's and the transform's random generators while
    it runs. At most ``depth`` batches wait; ``pin`` puts them in page-locked memory before the
    transform, so its copy to the GPU is asynchronous. An exception in the thread is raised
    here; leaving the loop early stops the thread before returning.

    ``threads`` is the background thread's intra-op thread count, set once when it starts.
    Torch keeps that count per thread, so the caller's own count is untouched; the process
    default that threads started later inherit is set back to the caller's before the first
    batch is drawn.

    Examples
    --------
    >>> [int(b.image) for b in prefetch(iter(Batch(torch.tensor(i), None, None, None) for i in range(3)))]
    [0, 1, 2]
    """
    done = object()
    waiting: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                waiting.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    started = threading.Event()

    def work() -> None:
        if threads is not None:
            # the first query settles this thread's count from the process default; unsettled, a later
            # first op would reset it to that default, undoing the setting below
            torch.get_num_threads()
            torch.set_num_threads(threads)
        started.set()
        try:
            for batch in batches:
                if pin:
                    batch = Batch(*(t.pin_memory() for t in batch))
                if transform is not None:
                    batch = transform(batch)
                if not put(batch):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which raises it
            put(exc)

    own = torch.get_num_threads()
    thread = threading.Thread(target=work, name="sparseslice-prefetch", daemon=True)
    thread.start()
    started.wait()
    if threads is not None:
        torch.set_num_threads(own)  # the default for threads started later: the caller's count again
    try:
        while True:
            item = waiting.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
