"""Filling the slices between annotated slices of a sparse label.

Methods (``METHODS``):

- ``none``: nothing is filled; unknown stays unknown.
- ``nearest``: each slice copies the nearest annotated slice (ties go to the lower one).
- ``sdf``: shape-based interpolation. On the two annotated slices around a gap, signed
  distance maps (millimetres, real in-plane spacing) of the foreground and of each label are
  interpolated linearly along the slice axis; the foreground is where the interpolated
  foreground distance is positive, and each foreground voxel takes the label with the
  largest interpolated distance. Touching labels therefore never open a hole between them
  and no voxel gets two labels.
- ``mci``: ITK's morphological contour interpolation (see :mod:`sparseslice.interpolate_mci`).

Rules shared by all methods: only slices strictly between two annotated slices are filled;
annotated slices (including empty ones and border slices) are never changed; beyond the first
and last annotated slice voxels stay unknown. A structure present on one side of a gap and
absent on the other (an annotated empty slice) ends inside the gap: for ``sdf`` it shrinks
to nothing half-way, or at the border when the empty slice is a border slice outside the
known extent.

Memory: ``sdf`` and ``nearest`` work one gap at a time on the bounding box of the two
annotated slices' foreground, so a 512x512x1000 volume needs little more than its label.
"""

from __future__ import annotations

import difflib
import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy import ndimage

from sparseslice.errors import UserError
from sparseslice.sparse import SparseLabel

METHODS = ("none", "nearest", "sdf", "mci")
_CHUNK_VALUES = 1 << 24  # float32 values held at once while filling one gap (64 MB)


@dataclass(frozen=True)
class Interpolation:
    """Result of :func:`interpolate_label`.

    Parameters
    ----------
    sparse : SparseLabel
        The label with filled slices; its ``annotated`` covers annotated and interpolated
        slices, its ``border`` and ``extent`` are those of the input.
    interpolated : numpy.ndarray
        Boolean vector over the slice axis: the slices that were filled.
    """

    sparse: SparseLabel
    interpolated: np.ndarray


def check_method(method: str) -> str:
    """Validate a method name, suggesting the nearest valid one."""
    if method not in METHODS:
        near = difflib.get_close_matches(str(method), METHODS, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise UserError(f"method must be one of {', '.join(METHODS)}, got {method!r}; {hint}"
                        "pick one of those")
    return method


def check_spacing(spacing: tuple[float, ...]) -> tuple[float, float, float]:
    """Validate a voxel spacing: three positive finite millimetre values."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"spacing must be 3 positive values in mm, got {spacing!r}; "
                        "pass the volume's spacing (Volume.spacing)")
    return values  # type: ignore[return-value]


def interpolate_label(sparse: SparseLabel, *, spacing: tuple[float, float, float], method: str) -> Interpolation:
    """Fill the slices between annotated slices of a sparse label.

    Parameters
    ----------
    sparse : SparseLabel
        Label and annotated slices (border slices count as annotated background).
    spacing : tuple of float
        Voxel size in mm along the three array axes.
    method : {"none", "nearest", "sdf", "mci"}
        Interpolation method (see the module docstring).

    Returns
    -------
    Interpolation
        The filled sparse label and the boolean vector of filled slices.

    Raises
    ------
    UserError
        No annotated slice, bad spacing or method, or ``mci`` without ITK installed.

    Examples
    --------
    >>> from sparseslice.sparse import SparseLabel
    >>> lab = np.zeros((9, 9, 5), np.uint8); lab[2:7, 2:7, :] = 1
    >>> sp = SparseLabel.from_slices(lab, [0, 4], axis=2)
    >>> res = interpolate_label(sp, spacing=(1.0, 1.0, 3.0), method="sdf")
    >>> res.interpolated.astype(int).tolist()
    [0, 1, 1, 1, 0]
    >>> bool((res.sparse.label == lab).all())
    True
    """
    method = check_method(method)
    spacing = check_spacing(spacing)
    axis = sparse.axis
    slices = np.flatnonzero(sparse.annotated)
    if slices.size == 0:
        raise UserError("sparse label has no annotated slice, got annotated=[] along axis "
                        f"{axis}; annotate at least two slices (or check the axis)")
    interpolated = np.zeros(sparse.n_slices, bool)
    if slices.size == 1:
        warnings.warn(f"only one annotated slice ({int(slices[0])} along axis {axis}): nothing can be "
                      "interpolated, the output equals the input", UserWarning, stacklevel=2)
        return Interpolation(sparse, interpolated)
    gaps = [(int(a), int(b)) for a, b in zip(slices[:-1], slices[1:], strict=True) if b - a > 1]
    if method == "none" or not gaps:
        return Interpolation(sparse, interpolated)
    label = sparse.label.copy()
    view = np.moveaxis(label, axis, 0)  # writes go through to ``label``
    in_plane = tuple(s for a, s in enumerate(spacing) if a != axis)
    if method == "mci":
        from sparseslice.interpolate_mci import mci_fill

        filled = np.moveaxis(mci_fill(sparse.label, sparse.annotated, axis=axis, spacing=spacing), axis, 0)
    for a, b in gaps:
        if method == "nearest":
            mid = a + (b - a) // 2  # slices a+1..mid copy a, the rest copy b
            view[a + 1:mid + 1] = view[a]
            view[mid + 1:b] = view[b]
        elif method == "sdf":
            ends = _end_fractions(a, b, border=sparse.border, extent=sparse.extent)
            _fill_gap_sdf(view, a, b, sampling=in_plane, ends=ends)
        else:  # mci
            view[a + 1:b] = filled[a + 1:b]
        interpolated[a + 1:b] = True
    out = replace(sparse, label=label, annotated=sparse.annotated | interpolated)
    return Interpolation(out, interpolated)


def _end_fractions(a: int, b: int, *, border: np.ndarray, extent: tuple[int, int] | None) -> tuple[float, float]:
    """Where, as a fraction of the gap from each side, a structure missing on the other side ends.

    Half-way by default. When the empty side is a border slice outside a known extent, the
    structure is known to reach the slice next to the border, so it ends half a slice short
    of the border slice.
    """
    from_a = from_b = 0.5
    if extent is not None:
        if border[b] and b > extent[1]:
            from_a = (b - 0.5 - a) / (b - a)
        if border[a] and a < extent[0]:
            from_b = (b - a - 0.5) / (b - a)
    return from_a, from_b


def signed_distance(mask: np.ndarray, *, sampling: tuple[float, ...]) -> np.ndarray:
    """Signed Euclidean distance in mm: positive inside ``mask``, negative outside.

    Inside voxels hold the distance to the nearest outside voxel and vice versa
    (``edt(mask) - edt(~mask)``), so the zero level lies between the two and an interpolation
    of two identical maps returns the same mask. ``mask`` must hold both values.

    Examples
    --------
    >>> signed_distance(np.array([[0, 1, 1, 1, 0]], bool), sampling=(1.0, 2.0)).tolist()
    [[-2.0, 2.0, 4.0, 2.0, -2.0]]
    """
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return (inside - outside).astype(np.float32)


def _pair_distances(mask_a: np.ndarray, mask_b: np.ndarray, *, sampling: tuple[float, ...],
                    ends: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Signed distances of a class on both sides of a gap; a missing side is synthesised.

    When the class is absent on one side, that side's map is the present side's map lowered
    by ``depth / end`` inside each connected component (``depth``: the component's deepest
    distance), so along the gap each component shrinks and vanishes at fraction ``end``.
    """
    has_a, has_b = bool(mask_a.any()), bool(mask_b.any())
    if has_a and has_b:
        return signed_distance(mask_a, sampling=sampling), signed_distance(mask_b, sampling=sampling)
    present, end = (mask_a, ends[0]) if has_a else (mask_b, ends[1])
    dist = signed_distance(present, sampling=sampling)
    components, n = ndimage.label(present)
    depth = np.asarray(ndimage.maximum(dist, components, np.arange(1, n + 1)), np.float32)
    drop = np.concatenate([[depth.max()], depth])[components] / np.float32(end)
    missing = dist - drop
    return (dist, missing) if has_a else (missing, dist)


def _fill_gap_sdf(view: np.ndarray, a: int, b: int, *, sampling: tuple[float, ...],
                  ends: tuple[float, float]) -> None:
    """Fill slices ``a+1 .. b-1`` of ``view`` (slice axis first) by shape-based interpolation."""
    lab_a, lab_b = view[a], view[b]
    union = (lab_a > 0) | (lab_b > 0)
    view[a + 1:b] = 0
    if not union.any():
        return
    # The interpolated shape lies inside the union of both slices' foreground, and distances
    # inside that box are exact when the box keeps one voxel of background around it.
    lo = [max(int(np.flatnonzero(union.any(axis=1 - d))[0]) - 1, 0) for d in range(2)]
    hi = [min(int(np.flatnonzero(union.any(axis=1 - d))[-1]) + 2, union.shape[d]) for d in range(2)]
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]))
    crop_a = np.pad(lab_a[box], 1)
    crop_b = np.pad(lab_b[box], 1)
    fg = _pair_distances(crop_a > 0, crop_b > 0, sampling=sampling, ends=ends)
    values = np.union1d(np.unique(crop_a), np.unique(crop_b))
    values = values[values > 0]
    per_label = [_pair_distances(crop_a == v, crop_b == v, sampling=sampling, ends=ends)
                 for v in values] if values.size > 1 else []
    t_all = (np.arange(a + 1, b, dtype=np.float32) - a) / np.float32(b - a)
    step = max(1, _CHUNK_VALUES // (crop_a.size * (len(per_label) + 1)))
    for start in range(0, t_all.size, step):
        t = t_all[start:start + step, None, None]
        inside = (1 - t) * fg[0] + t * fg[1] > 0
        if per_label:
            scores = np.stack([(1 - t) * da + t * db for da, db in per_label])
            chosen = values[np.argmax(scores, axis=0)]
        else:
            chosen = values[0]
        filled = np.where(inside, chosen, 0).astype(view.dtype)[:, 1:-1, 1:-1]
        z0 = a + 1 + start
        view[z0:z0 + filled.shape[0], box[0], box[1]] = filled
