"""Segmentation metrics on arrays: Dice, relative volume difference and surface distances.

Every distance takes ``spacing`` (millimetres per voxel along each array axis) and returns
millimetres. Surface distances follow MONAI's definitions exactly
(``monai.metrics.compute_hausdorff_distance`` and ``compute_average_surface_distance`` with
their default surface extraction):

- the *surface* (edge) of a mask is the mask minus its binary erosion by the axis-aligned
  cross (6-neighbourhood in 3D, 4 in 2D); voxels on the array border count as surface;
- a *directed distance* is the Euclidean distance (spacing-scaled) from each surface voxel
  of one mask to the nearest surface voxel of the other;
- ``hd`` is the largest directed distance; ``hd95`` is the larger of the two directed 95th
  percentiles (linear interpolation, as ``torch.quantile``); ``assd`` is the mean of both
  directed distance sets pooled together.

Speed: surfaces are extracted once, on the joint bounding box of both masks padded by one
voxel, and both directed distance arrays are shared by ``hd``, ``hd95`` and ``assd``
(:func:`surface_distances`). Surface voxels common to both masks are at distance 0 and
are not queried.

Empty masks (documented behaviour, never an exception, never ``inf``):

==================  ======  ======  ==================  ==========
case                dice    rvd     hd / hd95 / assd    note
==================  ======  ======  ==================  ==========
both empty          1.0     0.0     NaN                 ``"empty both"``
reference empty     0.0     NaN     NaN                 ``"empty ref"``
prediction empty    0.0     -1.0    NaN                 ``"empty pred"``
==================  ======  ======  ==================  ==========

``assd2d`` is NaN (note ``"no common slice"``) when no slice holds both masks.

The metrics are registered by name in ``METRIC_FUNCTIONS``, each a :data:`MetricFunction` of
one :class:`MaskPair` (which computes what several metrics share once); ``METRICS`` (the
names, in the order tables list them) and the study spec read it, so a new metric is one
function plus one entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy.spatial import cKDTree

from sparseslice.errors import UserError
from sparseslice.io import check_spacing

#: ``region`` of a tidy row: one label's voxels, or the union of every foreground label (``label`` 0).
REGION_LABEL = "label"
REGION_FOREGROUND = "foreground"


def _check_pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise UserError(f"pred shape must match ref, got {pred.shape} vs {ref.shape}; "
                        "compare masks on the same grid")
    return pred, ref


def empty_note(pred: np.ndarray, ref: np.ndarray) -> str:
    """``""``, ``"empty pred"``, ``"empty ref"`` or ``"empty both"`` for two masks."""
    p, r = bool(np.any(pred)), bool(np.any(ref))
    if p and r:
        return ""
    return "empty both" if not (p or r) else ("empty ref" if p else "empty pred")


def dice(pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Dice coefficient of two boolean masks; 1.0 when both are empty.

    ``mask`` restricts the comparison to known voxels (a sparse reference's annotated slices).

    Examples
    --------
    >>> a = np.zeros((4, 4), bool); a[:2] = True
    >>> b = np.zeros((4, 4), bool); b[1:3] = True
    >>> dice(a, b)
    0.5
    """
    pred, ref = _check_pair(pred, ref)
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    total = int(np.count_nonzero(pred)) + int(np.count_nonzero(ref))
    if total == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / total


def relative_volume_difference(pred: np.ndarray, ref: np.ndarray, *, mask: np.ndarray | None = None) -> float:
    """Signed ``(|pred| - |ref|) / |ref|``; 0.0 when both are empty, NaN when only ``ref`` is.

    Examples
    --------
    >>> a = np.zeros(10, bool); a[:3] = True
    >>> b = np.zeros(10, bool); b[:2] = True
    >>> relative_volume_difference(a, b)
    0.5
    """
    pred, ref = _check_pair(pred, ref)
    if mask is not None:
        pred, ref = pred[mask], ref[mask]
    vp, vr = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if vr == 0:
        return 0.0 if vp == 0 else math.nan
    return (vp - vr) / vr


def bounding_box(mask: np.ndarray, *, pad: int = 0) -> tuple[slice, ...] | None:
    """Slices of the smallest box holding ``mask``'s True voxels, grown by ``pad`` (clipped).

    Returns None for an empty mask.
    """
    box = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - pad, 0), min(int(hit[-1]) + 1 + pad, mask.shape[axis])))
    return tuple(box)


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: ``mask`` minus its erosion by the axis cross, border voxels included.

    Same result as ``mask ^ scipy.ndimage.binary_erosion(mask)`` (MONAI's edges), faster.
    """
    mask = np.asarray(mask, dtype=bool)
    padded = np.pad(mask, 1)
    inner = padded.copy()
    for axis in range(mask.ndim):
        mid = [slice(1, -1)] * mask.ndim
        lo, hi = list(mid), list(mid)
        lo[axis], hi[axis] = slice(0, -2), slice(2, None)
        inner[(slice(1, -1),) * mask.ndim] &= padded[tuple(lo)] & padded[tuple(hi)]
    inner = inner[(slice(1, -1),) * mask.ndim]
    return mask & ~inner


@dataclass(frozen=True)
class SurfaceDistances:
    """Both directed surface-distance sets of a mask pair, in millimetres.

    ``pred_to_ref`` holds, for each surface voxel of the prediction, the distance to the
    nearest reference surface voxel; ``ref_to_pred`` the reverse. Both are empty, and
    ``note`` says why, when either mask is empty.
    """

    pred_to_ref: np.ndarray
    ref_to_pred: np.ndarray
    note: str = ""

    @property
    def defined(self) -> bool:
        return self.pred_to_ref.size > 0 and self.ref_to_pred.size > 0

    def hausdorff(self, percentile: float | None = None) -> float:
        """Hausdorff distance (max), or the larger directed ``percentile`` (e.g. 95); NaN if undefined."""
        if not self.defined:
            return math.nan
        if percentile is None:
            return float(max(self.pred_to_ref.max(), self.ref_to_pred.max()))
        if not 0 <= percentile <= 100:
            raise UserError(f"percentile must lie in [0, 100], got {percentile}; use 95 for HD95")
        return float(max(np.percentile(self.pred_to_ref, percentile), np.percentile(self.ref_to_pred, percentile)))

    def assd(self) -> float:
        """Average symmetric surface distance (mean of both sets pooled); NaN if undefined."""
        if not self.defined:
            return math.nan
        total = float(self.pred_to_ref.sum()) + float(self.ref_to_pred.sum())
        return total / (self.pred_to_ref.size + self.ref_to_pred.size)


def _directed(src: np.ndarray, dst: np.ndarray, shared: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Distances from every True voxel of ``src`` to the nearest True voxel of ``dst``."""
    out = np.zeros(int(np.count_nonzero(src)), np.float64)
    query = (src & ~shared)[src]  # positions, within src's surface voxels, not shared with dst
    if query.any():
        tree = cKDTree(np.argwhere(dst) * spacing, leafsize=32)
        out[query] = tree.query(np.argwhere(src & ~shared) * spacing, k=1)[0]
    return out


def surface_distances(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float]) -> SurfaceDistances:
    """Both directed surface-distance arrays of two boolean masks (one shared computation).

    Parameters
    ----------
    pred, ref : numpy.ndarray
        Boolean masks of the same shape (2D or 3D).
    spacing : sequence of float
        Voxel size along each axis, in millimetres.

    Examples
    --------
    >>> a = np.zeros((8, 8, 8), bool); a[2:5, 2:5, 2:5] = True
    >>> b = np.roll(a, 1, axis=2)
    >>> sd = surface_distances(a, b, spacing=(1.0, 1.0, 2.5))
    >>> sd.hausdorff(), round(sd.assd(), 4)
    (2.5, 0.9038)
    """
    pred, ref = _check_pair(pred, ref)
    sp = np.asarray(check_spacing(spacing, pred.ndim))
    note = empty_note(pred, ref)
    if note:
        return SurfaceDistances(np.zeros(0), np.zeros(0), note)
    box = bounding_box(pred | ref)
    sp_pred, sp_ref = surface(pred[box]), surface(ref[box])
    shared = sp_pred & sp_ref
    return SurfaceDistances(_directed(sp_pred, sp_ref, shared, sp), _directed(sp_ref, sp_pred, shared, sp))


def hausdorff_distance(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float],
                       percentile: float | None = None) -> float:
    """Symmetric Hausdorff distance in mm (``percentile=95`` for HD95); NaN if a mask is empty.

    Examples
    --------
    >>> a = np.zeros((6, 6, 6), bool); a[1:4, 1:4, 1:4] = True
    >>> hausdorff_distance(a, np.roll(a, 1, axis=0), spacing=(2.0, 1.0, 1.0))
    2.0
    """
    return surface_distances(pred, ref, spacing=spacing).hausdorff(percentile)


def average_surface_distance(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float]) -> float:
    """Average symmetric surface distance (ASSD) in mm; NaN if a mask is empty."""
    return surface_distances(pred, ref, spacing=spacing).assd()


def slice_assd(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], axis: int,
               slices: Sequence[int] | np.ndarray | None = None) -> tuple[float, int]:
    """2D slice ASSD (Specktor-Fadida et al.): mean over slices of the per-slice 2D ASSD.

    Each slice along ``axis`` where both masks are non-empty gets its own 2D ASSD (surfaces
    in 2D with the 4-neighbourhood, distances with the slice's in-plane spacing, so
    anisotropic in-plane voxels are respected). The per-slice values are combined by an
    unweighted arithmetic mean over those slices (each slice counts once, whatever its
    surface length). Slices where only one mask is present are skipped, as in the paper;
    use ``dice`` or ``hd`` to see such misses.

    Parameters
    ----------
    pred, ref : numpy.ndarray
        3D boolean masks of the same shape.
    spacing : sequence of float
        Voxel size along each of the three axes, in millimetres.
    axis : int
        The slice axis.
    slices : sequence of int, optional
        Only these slices are considered (e.g. a sparse reference's annotated slices).

    Returns
    -------
    value : float
        The mean per-slice ASSD in mm, NaN when no slice holds both masks.
    n_slices : int
        The number of slices averaged.
    """
    pred, ref = _check_pair(pred, ref)
    sp = np.asarray(check_spacing(spacing, pred.ndim))
    if pred.ndim != 3:
        raise UserError(f"pred must be 3D for slice_assd, got {pred.ndim}D; pass volumes")
    if not isinstance(axis, int | np.integer) or not 0 <= int(axis) < 3:
        raise UserError(f"axis must be 0, 1 or 2, got {axis!r}; pass the slice axis")
    other = tuple(a for a in range(3) if a != axis)
    both = np.any(pred, axis=other) & np.any(ref, axis=other)
    if slices is not None:
        keep = np.zeros_like(both)
        keep[np.asarray(list(slices), dtype=int)] = True
        both &= keep
    values = []
    for k in np.flatnonzero(both):
        index = [slice(None)] * 3
        index[axis] = int(k)
        values.append(surface_distances(pred[tuple(index)], ref[tuple(index)], spacing=sp[list(other)]).assd())
    if not values:
        return math.nan, 0
    return float(np.mean(values)), len(values)


@dataclass
class MaskPair:
    """One binary prediction / reference pair, as every metric of :data:`METRIC_FUNCTIONS` takes it.

    Build it with :meth:`of` (which checks the inputs). ``known`` marks the voxels of a sparse
    reference's annotated slices (None: the reference is dense). What several metrics share
    (the surface distances, the per-slice ASSD, the empty-mask note) is computed once, when
    first asked for.
    """

    pred: np.ndarray
    ref: np.ndarray
    spacing: np.ndarray
    axis: int
    known: np.ndarray | None = None

    @classmethod
    def of(cls, pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], axis: int,
           annotated: np.ndarray | None = None) -> MaskPair:
        """Check a mask pair (and a sparse reference's ``annotated`` vector over ``axis``)."""
        pred, ref = _check_pair(pred, ref)
        sp = np.asarray(check_spacing(spacing, pred.ndim))
        if annotated is None:
            return cls(pred, ref, sp, axis)
        annotated = np.asarray(annotated, dtype=bool)
        if annotated.shape != (pred.shape[axis],):
            raise UserError(f"annotated must have {pred.shape[axis]} entries (slices along axis {axis}), "
                            f"got shape {annotated.shape}; pass the sparse label's annotated vector")
        shape = [1, 1, 1]
        shape[axis] = -1
        return cls(pred, ref, sp, axis, np.broadcast_to(annotated.reshape(shape), pred.shape))

    @property
    def sparse(self) -> bool:
        return self.known is not None

    @cached_property
    def note(self) -> str:
        """The empty-mask note of the voxels compared (:func:`empty_note`)."""
        if self.known is None:
            return self.distances.note
        return empty_note(self.pred & self.known, self.ref & self.known)

    @cached_property
    def sparse_note(self) -> str:
        """The note of a 3D distance left undefined by a sparse reference."""
        return "sparse ref" + (f"; {self.note}" if self.note else "")

    @cached_property
    def distances(self) -> SurfaceDistances:
        """Both directed 3D surface-distance sets (dense references only)."""
        return surface_distances(self.pred, self.ref, spacing=self.spacing)

    @cached_property
    def per_slice_assd(self) -> tuple[float, int]:
        """:func:`slice_assd` over the known slices: ``(value, slices averaged)``."""
        if self.known is None:
            return slice_assd(self.pred, self.ref, spacing=self.spacing, axis=self.axis)
        return slice_assd(self.pred & self.known, self.ref & self.known, spacing=self.spacing, axis=self.axis)


#: A metric as the registry holds it: ``metric(pair) -> (value, note)``.
MetricFunction = Callable[[MaskPair], tuple[float, str]]


def _dice(pair: MaskPair) -> tuple[float, str]:
    return dice(pair.pred, pair.ref, mask=pair.known), pair.note


def _hd(pair: MaskPair) -> tuple[float, str]:
    return (math.nan, pair.sparse_note) if pair.sparse else (pair.distances.hausdorff(), pair.note)


def _hd95(pair: MaskPair) -> tuple[float, str]:
    return (math.nan, pair.sparse_note) if pair.sparse else (pair.distances.hausdorff(95), pair.note)


def _assd(pair: MaskPair) -> tuple[float, str]:
    return (math.nan, pair.sparse_note) if pair.sparse else (pair.distances.assd(), pair.note)


def _assd2d(pair: MaskPair) -> tuple[float, str]:
    value, n = pair.per_slice_assd
    return value, pair.note or ("" if n else "no common slice")


def _rvd(pair: MaskPair) -> tuple[float, str]:
    return relative_volume_difference(pair.pred, pair.ref, mask=pair.known), pair.note


#: The metrics by name (order: as tables list them).
METRIC_FUNCTIONS: dict[str, MetricFunction] = {"dice": _dice, "hd": _hd, "hd95": _hd95, "assd": _assd,
                                               "assd2d": _assd2d, "rvd": _rvd}
METRICS = tuple(METRIC_FUNCTIONS)


def mask_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], axis: int,
                 annotated: np.ndarray | None = None) -> dict[str, tuple[float, str]]:
    """All of :data:`METRICS` for one binary mask pair: ``{metric: (value, note)}``.

    With ``annotated`` (boolean vector over ``axis``: a sparse reference's known slices),
    only annotated voxels count: ``dice`` and ``rvd`` use annotated voxels only, ``assd2d``
    uses annotated slices only, and the 3D distances ``hd``, ``hd95``, ``assd`` are NaN
    with note ``"sparse ref"`` (a 3D surface through unknown slices is undefined).
    """
    pair = MaskPair.of(pred, ref, spacing=spacing, axis=axis, annotated=annotated)
    return {name: metric(pair) for name, metric in METRIC_FUNCTIONS.items()}


def label_metrics(pred: np.ndarray, ref: np.ndarray, *, spacing: Sequence[float], axis: int,
                  labels: Sequence[int], annotated: np.ndarray | None = None) -> list[dict[str, object]]:
    """Tidy rows ``{label, region, metric, value, note}`` for each label and the foreground union.

    ``pred`` and ``ref`` are integer label maps; ``labels`` the foreground values to score.
    ``label`` is always an integer: a label's rows have ``region`` :data:`REGION_LABEL`; the
    union of every foreground label has ``region`` :data:`REGION_FOREGROUND` and ``label`` 0.
    """
    pred = np.asarray(pred)
    ref = np.asarray(ref)
    rows: list[dict[str, object]] = []
    targets = [(int(v), REGION_LABEL, pred == v, ref == v) for v in labels]
    targets.append((0, REGION_FOREGROUND, pred > 0, ref > 0))
    for label, region, p, r in targets:
        for metric, (value, note) in mask_metrics(p, r, spacing=spacing, axis=axis, annotated=annotated).items():
            rows.append({"label": label, "region": region, "metric": metric, "value": float(value), "note": note})
    return rows
