"""Interpolating one sparse label: :func:`interpolate_label` and its result."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np

from sparseslice.errors import UserError
from sparseslice.interpolate.methods import FILLS, check_method
from sparseslice.io import check_spacing
from sparseslice.sparse import SparseLabel

__all__ = ["Interpolation", "interpolate_label"]


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


def interpolate_label(sparse: SparseLabel, *, spacing: tuple[float, float, float], method: str) -> Interpolation:
    """Fill the slices between annotated slices of a sparse label.

    Parameters
    ----------
    sparse : SparseLabel
        Label and annotated slices (border slices count as annotated background).
    spacing : tuple of float
        Voxel size in mm along the three array axes.
    method : {"none", "nearest", "sdf", "mci"}
        Interpolation method (see :mod:`sparseslice.interpolate`; the names are ``METHODS``).

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
    fill = FILLS[check_method(method)]
    spacing = check_spacing(spacing)
    slices = np.flatnonzero(sparse.annotated)
    if slices.size == 0:
        raise UserError("sparse label has no annotated slice, got annotated=[] along axis "
                        f"{sparse.axis}; annotate at least two slices (or check the axis)")
    interpolated = np.zeros(sparse.n_slices, bool)
    if slices.size == 1:
        warnings.warn(f"only one annotated slice ({int(slices[0])} along axis {sparse.axis}): nothing can be "
                      "interpolated, the output equals the input", UserWarning, stacklevel=2)
        return Interpolation(sparse, interpolated)
    gaps = [(int(a), int(b)) for a, b in zip(slices[:-1], slices[1:], strict=True) if b - a > 1]
    if not gaps:
        return Interpolation(sparse, interpolated)
    label = sparse.label.copy()
    view = np.moveaxis(label, sparse.axis, 0)  # writes go through to ``label``
    if not fill(view, gaps, sparse=sparse, spacing=spacing):
        return Interpolation(sparse, interpolated)  # the gaps stay unknown
    for a, b in gaps:
        interpolated[a + 1:b] = True
    if sparse.partial_known is not None:  # labelled voxels of partly labelled slices win over the fill
        label[sparse.partial_known] = sparse.label[sparse.partial_known]
    out = replace(sparse, label=label, annotated=sparse.annotated | interpolated)
    return Interpolation(out, interpolated)
