"""Filling the slices between annotated slices of a sparse label.

Methods (``METHODS``):

- ``none``: nothing is filled; unknown stays unknown.
- ``nearest``: each slice copies the nearest annotated slice (ties go to the lower one).
- ``sdf``: shape-based interpolation. On the two annotated slices around a gap, signed
  distance maps (millimetres, real in-plane spacing) of the foreground and of each label are
  interpolated linearly along the slice axis (slice positions are evenly spaced, so the
  weights are the same in millimetres); the foreground is where the interpolated foreground
  distance is positive, and each foreground voxel takes the label with the largest
  interpolated distance. Touching labels therefore never open a hole between them and no
  voxel gets two labels. Plain distance interpolation shrinks a shape that shifts between
  the two slices (the middle is nearly their intersection), so the foreground of each
  filled slice is the voxels with the highest interpolated distance whose number varies
  linearly between the two slices' areas. Topology changes are handled per connected
  component: a component with no overlapping counterpart on the other side ends inside the
  gap (rounded end) instead of being pulled towards a distant shape.
- ``mci``: ITK's morphological contour interpolation (see :mod:`sparseslice.interpolate.mci`).

Rules shared by all methods: only slices strictly between two annotated slices are filled;
annotated slices (including empty ones and border slices) are never changed; beyond the first
and last annotated slice voxels stay unknown. Only whole annotated slices are inputs: a partly
labelled slice (nnU-Net's ignore label on some of its voxels) is filled like an unknown one,
then keeps the voxels its annotator labelled. A structure present on one side of a gap and
absent on the other (an annotated empty slice) ends inside the gap: for ``sdf`` it shrinks
to nothing half-way (a rounded end: erosion ``depth * (1 - sqrt(1 - x))``), or at the border
when the empty slice is a border slice outside the known extent; ``mci`` ends it at the
empty slice.

Memory: ``nearest`` works one gap at a time; ``sdf`` fills runs of consecutive gaps whose
distance maps fit a fixed budget (about 64 MB of values: a whole hippocampus volume at once,
a few slices of a 512x512 CT), on the bounding box of their annotated slices' foreground, so
a 512x512x1000 volume needs little more than its label.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from sparseslice.datasets import slice_axis_of
from sparseslice.errors import UserError, unknown_choice
from sparseslice.interpolate.sdf import fill_sdf, signed_distance
from sparseslice.io import check_spacing
from sparseslice.progress import track
from sparseslice.sparse import SparseLabel

__all__ = ["METHODS", "Interpolation", "interpolate_dataset", "interpolate_label", "signed_distance"]

METHODS = ("none", "nearest", "sdf", "mci")


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
        raise unknown_choice("method", method, METHODS)
    return method


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
        from sparseslice.interpolate.mci import mci_fill

        filled = np.moveaxis(mci_fill(sparse.label, sparse.annotated, axis=axis, spacing=spacing), axis, 0)
    if method == "sdf":
        fill_sdf(view, gaps, sampling=in_plane, border=sparse.border, extent=sparse.extent)
    for a, b in gaps:
        if method == "nearest":
            mid = a + (b - a) // 2  # slices a+1..mid copy a, the rest copy b
            view[a + 1:mid + 1] = view[a]
            view[mid + 1:b] = view[b]
        elif method == "mci":
            view[a + 1:b] = filled[a + 1:b]
        interpolated[a + 1:b] = True
    if sparse.partial_known is not None:  # labelled voxels of partly labelled slices win over the fill
        label[sparse.partial_known] = sparse.label[sparse.partial_known]
    out = replace(sparse, label=label, annotated=sparse.annotated | interpolated)
    return Interpolation(out, interpolated)


# --- datasets on disk -------------------------------------------------------------------

_SIDECAR_KEYS = ("axis", "n_slices", "ignore_value", "annotated", "border", "drawn", "extent")


def interpolate_dataset(sparse_dir: Path, out: Path, *, method: str, progress: bool = True) -> Path:
    """Interpolate every label of a sparse dataset and write the result beside its images.

    Parameters
    ----------
    sparse_dir : Path
        A dataset :func:`~sparseslice.datasets.discover_dataset` finds (typically the output of
        ``sparseslice simulate``). Labels with a ``.sparse.json`` sidecar are sparse; labels
        without one are decoded with the dataset slice axis when they hold the ignore value
        (the one nnU-Net's ``dataset.json`` declares as ``"ignore"``, else 255; output labels
        keep it) and are otherwise copied through as fully annotated.
    out : Path
        Output folder; receives the same layout (relative paths) as ``sparse_dir``.
    method : {"none", "nearest", "sdf", "mci"}
        Interpolation method.
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        ``out``. Each label is written with :func:`~sparseslice.sparse.write_sparse`; its
        sidecar keeps the input's keys, lists interpolated slices under ``"annotated"`` and
        ``"interpolated"``, keeps ``"drawn"`` as the annotator's slices and adds ``"method"``.
        Images are carried over as the input holds them: a symbolic link (``simulate``'s
        default) becomes a link to the same original, a plain file is hard-linked (copied
        where the file system refuses), so no image data is duplicated and ``out`` stays valid
        if ``sparse_dir`` is deleted. ``dataset.json`` and ``plan.json`` are copied, and
        ``interpolation.json`` records the method and the filled slices per case.
    """
    from sparseslice.atomic import write_json
    from sparseslice.datasets import discover_dataset
    from sparseslice.outputs import claim_output, dataset_inputs
    from sparseslice.sparse import sidecar_path

    method = check_method(method)
    if method == "mci":
        from sparseslice.interpolate.mci import import_itk

        import_itk()  # fail before writing anything
    sparse_dir, out = Path(sparse_dir), Path(out)
    ds = discover_dataset(sparse_dir, require_labels=True)
    if not sparse_dir.is_dir():
        raise UserError(f"sparse_dir must be a dataset folder, got {str(sparse_dir)!r}; pass the "
                        "folder written by sparseslice simulate")
    if out.resolve() == sparse_dir.resolve():
        raise UserError(f"out must differ from sparse_dir, got {str(out)!r} for both; pick a new folder")
    folder = claim_output(out, command="interpolate", inputs=[sparse_dir, *dataset_inputs(ds)], argument="out")
    folder.path("dataset.json").unlink(missing_ok=True)  # a rerun cut short must not look complete
    root = Path(os.path.abspath(sparse_dir))  # not resolve(): images may be symlinks
    axis = slice_axis_of(c.label for c in ds.cases)  # for labels without a sidecar (headers only)
    if ds.ignore_value is not None:  # nnU-Net's ignore label: the axis along which its slices are whole
        from sparseslice.sparse import ignore_axis

        axis = ignore_axis((c.label for c in ds.cases), ignore_value=ds.ignore_value, default=axis)
    counts, single = {}, []
    for case in track(ds.cases, f"interpolate ({method})", progress=progress):
        for image in case.images:
            _carry(image, folder.path(Path(os.path.abspath(image)).relative_to(root)))
        target = folder.path(Path(os.path.abspath(case.label)).relative_to(root))
        folder.path(sidecar_path(target).relative_to(out))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", UserWarning)
                counts[case.case_id] = _interpolate_file(case.label, target, method=method,
                                                         axis=axis, ignore_value=ds.ignore_value)
        except UserError as exc:
            raise UserError(f"case {case.case_id!r}: {exc}") from None
        if any("only one annotated slice" in str(w.message) for w in caught):
            single.append(case.case_id)
    if single:
        warnings.warn(f"{len(single)} case(s) have only one annotated slice ({', '.join(single[:5])}"
                      f"{' ...' if len(single) > 5 else ''}): nothing can be interpolated there, written unchanged",
                      UserWarning, stacklevel=2)
    for name in ("plan.json", "plan.csv"):
        if (sparse_dir / name).is_file():
            _carry(sparse_dir / name, folder.path(name), link=False)
    write_json(folder.path("interpolation.json"), {"method": method, "source": str(root),
                                            "interpolated_slices": counts})
    if (sparse_dir / "dataset.json").is_file():  # last, as simulate does: the folder is complete
        _carry(sparse_dir / "dataset.json", folder.path("dataset.json"), link=False)
    return out


def _interpolate_file(path: Path, target: Path, *, method: str, axis: int, ignore_value: int | None = None) -> int:
    """Interpolate one label file into ``target``; returns the number of filled slices.

    ``ignore_value`` is the dataset's declared ignore label (None: the sidecar's, else 255).
    """
    from sparseslice.sparse import DEFAULT_IGNORE_VALUE, read_label_file, write_sparse

    sparse, volume = read_label_file(path, axis=axis, ignore_value=ignore_value)
    if sparse is None:
        _carry(path, target, link=False)  # fully annotated: nothing to fill
        return 0
    result = interpolate_label(sparse, spacing=volume.spacing, method=method)
    meta = sparse.meta
    extra = {k: v for k, v in meta.items() if k not in _SIDECAR_KEYS}
    extra.update(drawn=np.flatnonzero(sparse.drawn).tolist(),
                 interpolated=np.flatnonzero(result.interpolated).tolist(), method=method)
    write_sparse(result.sparse, target, like=volume,
                 ignore_value=int(meta.get("ignore_value", DEFAULT_IGNORE_VALUE if ignore_value is None
                                           else ignore_value)), extra=extra)
    return int(result.interpolated.sum())


def _carry(src: Path, dst: Path, *, link: bool = True) -> None:
    """Carry ``src`` over to ``dst`` atomically the way the input holds it.

    A symbolic link (what ``simulate`` writes) becomes an absolute link to the same original;
    a plain file is hard-linked, or copied where the file system refuses; ``link=False``
    always copies.
    """
    import shutil

    from sparseslice.atomic import atomic_path

    with atomic_path(dst) as tmp:
        if link:
            tmp.unlink()
            try:
                if src.is_symlink():
                    os.symlink(src.resolve(), tmp)
                else:
                    os.link(src, tmp)
                return
            except OSError:
                pass
        shutil.copyfile(src, tmp)
