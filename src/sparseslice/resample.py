"""In-plane resampling to a target spacing, slice by slice, so unknown stays unknown.

Training may run at a coarser in-plane spacing than the images' (Specktor-Fadida et al.
halve their MRI in-plane; nnU-Net resamples every case to one spacing). Only the two axes
across the slice axis are resampled: every slice stays one whole slice, so a sparse label's
annotated slices, its border slices and its unknown slices are the same slice numbers after
resampling, and unknown can never turn into background. Images are resampled linearly,
labels per class (each class's indicator linearly, then the most likely class: no new label
values, nnU-Net's ``order 1`` segmentation resampling), known-voxel masks of partly labelled
slices conservatively (a voxel stays known only where every voxel it is interpolated from is
known), and ``predict`` resamples class probabilities back to each image's own grid.

Grids map voxel centres as :func:`skimage.transform.resize` does (``order=1``, edges clamped),
which the tests check; the field of view is kept, so the new spacing is the old one times
``old shape / new shape`` on each in-plane axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from sparseslice.errors import UserError

#: Slices resampled per pass, which bounds the memory of per-class label resampling.
_CHUNK = 16
_SAME = 1e-6


def inplane_axes(axis: int) -> tuple[int, int]:
    """The two axes across slice axis ``axis``."""
    return tuple(a for a in range(3) if a != axis)  # type: ignore[return-value]


def resampled_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float] | None, *,
                    axis: int, name: str = "image") -> tuple[int, int, int]:
    """The grid shape of a ``shape`` volume at in-plane ``target`` spacing (the slice axis is kept).

    ``target`` holds the two in-plane spacings (mm), in axis order; None keeps the grid.
    Refuses (:class:`UserError`, naming ``name``) a target that is not positive or larger than
    the image's extent.

    Examples
    --------
    >>> resampled_shape((180, 140, 88), (0.625, 0.625, 0.625), (1.25, 1.25), axis=2)
    (90, 70, 88)
    """
    out = [int(s) for s in shape]
    if target is None:
        return tuple(out)  # type: ignore[return-value]
    check_target(target)
    for a, t in zip(inplane_axes(axis), target, strict=True):
        extent = out[a] * float(spacing[a])
        if t > extent:
            raise UserError(f"spacing is larger than {name}'s extent along axis {a}, got {t} mm for "
                            f"{extent:g} mm ({out[a]} voxels of {float(spacing[a]):g} mm); "
                            "pass a smaller spacing")
        out[a] = max(1, int(round(extent / t)))
    return tuple(out)  # type: ignore[return-value]


def check_target(target: Sequence[float]) -> tuple[float, float]:
    """``target`` as two positive in-plane spacings, else a :class:`UserError` naming ``spacing``."""
    values = tuple(float(t) for t in target)
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"spacing must be two positive in-plane spacings in mm, got {tuple(target)}; "
                        "e.g. --spacing 1.25,1.25")
    return values  # type: ignore[return-value]


def default_spacing(spacings: Sequence[Sequence[float]], shapes: Sequence[Sequence[int]], *, axis: int,
                    max_inplane: int) -> tuple[float, float]:
    """The in-plane spacing training resamples to when none is given.

    nnU-Net's choice, the median in-plane spacing of the cases, coarsened by one factor on
    both axes when needed so that the median case is at most ``max_inplane`` voxels along
    each in-plane axis (training's ``max_inplane``, :class:`sparseslice.train.TrainConfig`).

    Examples
    --------
    >>> default_spacing([(0.625, 0.625, 0.625)] * 3, [(176, 144, 88)] * 3, axis=2, max_inplane=128)
    (0.859375, 0.859375)
    >>> default_spacing([(1.0, 1.0, 1.0)], [(35, 50, 36)], axis=2, max_inplane=128)
    (1.0, 1.0)
    """
    axes = inplane_axes(axis)
    sp = np.asarray([[float(s[a]) for a in axes] for s in spacings])
    extent = np.asarray([[float(n[a]) for a in axes] for n in shapes]) * sp
    median = np.median(sp, axis=0)
    size = np.median(extent, axis=0) / median
    factor = max(1.0, float(size.max()) / max_inplane)
    return tuple(float(v) for v in median * factor)  # type: ignore[return-value]


def needs_resampling(spacing: Sequence[float], target: Sequence[float] | None, *, axis: int) -> bool:
    """Whether an image of ``spacing`` differs in-plane from ``target`` (None: never)."""
    if target is None:
        return False
    return any(abs(float(spacing[a]) - t) > _SAME * t for a, t in zip(inplane_axes(axis), target, strict=True))


def _planes(array: torch.Tensor, axis: int) -> torch.Tensor:
    """``(C, X, Y, Z)`` -> ``(slices, C, h, w)``."""
    return array.movedim(1 + axis, 0)


def resize_slices(slices: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """A float ``(N, C, h, w)`` stack of slices resized bilinearly to ``size`` (the in-plane
    resampling of every image and probability map, here and in predict's slice batches)."""
    return F.interpolate(slices, size=tuple(int(s) for s in size), mode="bilinear", align_corners=False)


def _resize(array: np.ndarray, shape: Sequence[int], *, axis: int) -> np.ndarray:
    """Bilinear in-plane resize of a ``(C, X, Y, Z)`` float array to spatial ``shape``, in slice chunks."""
    size = tuple(int(shape[a]) for a in inplane_axes(axis))
    src = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    planes = _planes(src, axis)
    out = torch.empty((planes.shape[0], planes.shape[1], *size), dtype=torch.float32)
    for i in range(0, planes.shape[0], _CHUNK):
        out[i:i + _CHUNK] = resize_slices(planes[i:i + _CHUNK], size)
    return out.movedim(0, 1 + axis).numpy()


def resample_image(image: np.ndarray, shape: Sequence[int], *, axis: int) -> np.ndarray:
    """A ``(C, X, Y, Z)`` image resampled linearly in-plane to spatial ``shape`` (float32).

    Examples
    --------
    >>> resample_image(np.ones((1, 4, 4, 3), np.float32), (2, 2, 3), axis=2).shape
    (1, 2, 2, 3)
    """
    if tuple(image.shape[1:]) == tuple(shape):
        return image
    return _resize(image, shape, axis=axis)


def resample_probabilities(prob: np.ndarray, shape: Sequence[int], *, axis: int) -> np.ndarray:
    """Class probabilities ``(K, X, Y, Z)`` resampled linearly in-plane (predict's way back to an image grid)."""
    return resample_image(prob, shape, axis=axis)


def resample_label(label: np.ndarray, shape: Sequence[int], *, axis: int,
                   known: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A label map resampled per class in-plane; returns it and the resampled ``known`` mask.

    Each class's indicator is resampled linearly and every voxel takes the most likely class,
    so the result holds only values of ``label``. ``known`` (bool, ``label``'s shape: the known
    voxels of partly labelled slices) stays known only where every voxel it is interpolated
    from is known, and only known voxels vote for a class; None (whole slices known or
    unknown, which in-plane resampling keeps) returns None.

    Examples
    --------
    >>> lab = np.zeros((4, 4, 2), np.uint8); lab[:2] = 3
    >>> np.unique(resample_label(lab, (2, 2, 2), axis=2)[0]).tolist()
    [0, 3]
    """
    if tuple(label.shape) == tuple(shape):
        return label, known
    values = np.unique(label)
    best = np.full(tuple(shape), -1.0, np.float32)
    out = np.zeros(tuple(shape), label.dtype)
    weight = None if known is None else known.astype(np.float32)
    for value in values:
        indicator = (label == value).astype(np.float32)
        if weight is not None:
            indicator *= weight
        score = _resize(indicator[None], shape, axis=axis)[0]
        better = score > best
        out[better] = value
        best[better] = score[better]
    if known is None:
        return out, None
    kept = _resize(weight[None], shape, axis=axis)[0] >= 1 - _SAME
    return np.where(kept, out, 0).astype(label.dtype), kept
