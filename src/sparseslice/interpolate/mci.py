"""ITK's morphological contour interpolation (3D Slicer's "Fill between slices").

A thin wrapper over ``itk.MorphologicalContourInterpolator`` (Albu et al., IEEE TBME 2008)
from the optional ``itk`` extra. The filter is told the annotated slices explicitly
(``SetUseCustomSlicePositions`` + ``SetLabeledSliceIndices`` for every label), so an
annotated slice where a label is absent ends that label there; by itself the filter only
sees the slices that contain each label and would bridge across an annotated empty slice.
"""

from __future__ import annotations

import numpy as np

from sparseslice.errors import UserError

INSTALL_HINT = 'pip install -c constraints.txt "sparseslice[itk]"'


def import_itk():  # noqa: ANN201 - returns the itk module
    """Import ITK with its contour-interpolation module, or say how to install it."""
    try:
        import itk

        _ = itk.MorphologicalContourInterpolator
    except (ImportError, AttributeError) as exc:
        raise UserError(f"method 'mci' needs ITK's MorphologicalContourInterpolation, got "
                        f"{type(exc).__name__}: {exc}; install it with {INSTALL_HINT}") from None
    # With ITK's default thread pool, processes that ran the filter abort at exit about half
    # the time ("malloc_consolidate(): unaligned fastbin chunk", itk 5.4.7 + MCI 2.1.2);
    # one thread never did in our trials, and keeps timings comparable with ``sdf``.
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(1)
    itk.MultiThreaderBase.SetGlobalMaximumNumberOfThreads(1)
    return itk


def mci_fill(label: np.ndarray, annotated: np.ndarray, *, axis: int,
             spacing: tuple[float, float, float]) -> np.ndarray:
    """Run the ITK filter on the annotated slices of ``label``; return the filled volume.

    Parameters
    ----------
    label : numpy.ndarray
        Integer labels indexed ``[i, j, k]``; only annotated slices are read.
    annotated : numpy.ndarray
        Boolean vector over ``axis``.
    axis : int
        The slice axis.
    spacing : tuple of float
        Voxel size in mm (passed to ITK, used by its distance transforms).

    Returns
    -------
    numpy.ndarray
        Same shape and dtype as ``label``. Only the slices strictly between two annotated
        slices are meaningful; callers keep their own annotated slices.
    """
    itk = import_itk()
    top = int(label.max(initial=0))
    if top > np.iinfo(np.uint16).max:
        raise UserError(f"label values must fit 16 bits for method 'mci', got {top}; "
                        "renumber the labels or use method 'sdf'")
    dtype = np.uint8 if top <= 255 else np.uint16
    work = np.zeros(label.shape, dtype)
    index = [slice(None)] * 3
    index[axis] = annotated
    work[tuple(index)] = label[tuple(index)]
    # A C-ordered [i, j, k] array is what ITK calls [z, y, x]: ITK axis = 2 - axis.
    image = itk.image_from_array(np.ascontiguousarray(work))
    image.SetSpacing([float(s) for s in reversed(spacing)])
    itk_axis = 2 - axis
    slices = [int(i) for i in np.flatnonzero(annotated)]
    filt = itk.MorphologicalContourInterpolator.New(image)
    filt.SetAxis(itk_axis)
    filt.SetUseCustomSlicePositions(True)
    for value in np.unique(work):
        if value:
            filt.SetLabeledSliceIndices(itk_axis, int(value), slices)
    filt.Update()
    out = itk.array_from_image(filt.GetOutput())
    return np.asarray(out).astype(label.dtype, copy=False)
