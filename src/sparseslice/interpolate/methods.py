"""The interpolation methods: one fill function per method, registered by name in ``FILLS``.

Every method is a function with the :class:`Fill` signature; adding one is that function and
one entry in ``FILLS``. ``METHODS`` (the names, in the order help texts list them),
:func:`check_method` and the CLI's choices read from the registry. What each method does is
described in :mod:`sparseslice.interpolate`; ``sdf`` and ``mci`` are implemented in
:mod:`sparseslice.interpolate.sdf` and :mod:`sparseslice.interpolate.mci`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from sparseslice.errors import unknown_choice
from sparseslice.interpolate import mci, sdf
from sparseslice.sparse import SparseLabel

__all__ = ["FILLS", "METHODS", "Fill", "Gap", "check_available", "check_method"]

Gap = tuple[int, int]
"""Two consecutive annotated slices ``(a, b)`` with at least one slice between them."""


class Fill(Protocol):
    """The signature every method shares.

    Parameters
    ----------
    view : numpy.ndarray
        A copy of ``sparse.label`` with the slice axis first; the method writes the slices
        strictly inside each gap (``view[a + 1:b]``) and nothing else.
    gaps : list of Gap
        The gaps to fill, in slice order.
    sparse : SparseLabel
        The input label (annotated, border slices and extent along ``sparse.axis``).
    spacing : tuple of float
        Voxel size in mm along the three array axes of ``sparse.label``.

    Returns
    -------
    bool
        Whether the gaps were filled; False leaves them unknown (method ``none``).
    """

    def __call__(self, view: np.ndarray, gaps: list[Gap], *, sparse: SparseLabel,
                 spacing: tuple[float, float, float]) -> bool: ...


def _fill_none(view: np.ndarray, gaps: list[Gap], *, sparse: SparseLabel,
               spacing: tuple[float, float, float]) -> bool:
    """Fill nothing: unknown stays unknown."""
    return False


def _fill_nearest(view: np.ndarray, gaps: list[Gap], *, sparse: SparseLabel,
                  spacing: tuple[float, float, float]) -> bool:
    """Each slice copies the nearest annotated slice; ties go to the lower one."""
    for a, b in gaps:
        mid = a + (b - a) // 2  # slices a+1..mid copy a, the rest copy b
        view[a + 1:mid + 1] = view[a]
        view[mid + 1:b] = view[b]
    return True


def _fill_sdf(view: np.ndarray, gaps: list[Gap], *, sparse: SparseLabel,
              spacing: tuple[float, float, float]) -> bool:
    """Shape-based interpolation of signed distances (:func:`sparseslice.interpolate.sdf.fill_sdf`)."""
    in_plane = tuple(s for a, s in enumerate(spacing) if a != sparse.axis)
    sdf.fill_sdf(view, gaps, sampling=in_plane, border=sparse.border, extent=sparse.extent)
    return True


def _fill_mci(view: np.ndarray, gaps: list[Gap], *, sparse: SparseLabel,
              spacing: tuple[float, float, float]) -> bool:
    """ITK's morphological contour interpolation (:func:`sparseslice.interpolate.mci.mci_fill`)."""
    filled = mci.mci_fill(sparse.label, sparse.annotated, axis=sparse.axis, spacing=spacing)
    filled = np.moveaxis(filled, sparse.axis, 0)
    for a, b in gaps:
        view[a + 1:b] = filled[a + 1:b]
    return True


FILLS: dict[str, Fill] = {"none": _fill_none, "nearest": _fill_nearest, "sdf": _fill_sdf, "mci": _fill_mci}
METHODS = tuple(FILLS)


def check_method(method: str) -> str:
    """Validate a method name, suggesting the nearest valid one."""
    if method not in METHODS:
        raise unknown_choice("method", method, METHODS)
    return method


def check_available(method: str) -> str:
    """:func:`check_method`, then fail now, before anything is written, when the method needs an
    optional dependency that is not installed (``mci``: ITK)."""
    method = check_method(method)
    if method == "mci":
        mci.import_itk()
    return method
