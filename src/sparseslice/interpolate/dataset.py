"""Interpolating a sparse dataset on disk: :func:`interpolate_dataset`."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import numpy as np

from sparseslice.atomic import atomic_path, write_json
from sparseslice.datasets import Dataset, discover_dataset, slice_axis_of
from sparseslice.errors import UserError
from sparseslice.interpolate.label import interpolate_label
from sparseslice.interpolate.methods import check_available
from sparseslice.outputs import claim_output, dataset_inputs
from sparseslice.progress import track
from sparseslice.sparse import (
    ignore_axis,
    read_label_file,
    sidecar_extra,
    sidecar_ignore_value,
    sidecar_path,
    write_sparse,
)

__all__ = ["interpolate_dataset"]


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
        ``"interpolated"``, keeps ``"drawn"`` as the annotator's slices and adds ``"method"``;
        ``"partial"`` lists the output's partly labelled slices (none once filled).
        Images are carried over as the input holds them: a symbolic link (``simulate``'s
        default) becomes a link to the same original, a plain file is hard-linked (copied
        where the file system refuses), so no image data is duplicated and ``out`` stays valid
        if ``sparse_dir`` is deleted. ``dataset.json`` and ``plan.json`` are copied, and
        ``interpolation.json`` records the method and the filled slices per case.
    """
    method = check_available(method)  # fail before writing anything
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
    axis = _axis_without_sidecar(ds)
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
    _warn_single(single)
    for name in ("plan.json", "plan.csv"):
        if (sparse_dir / name).is_file():
            _carry(sparse_dir / name, folder.path(name), link=False)
    write_json(folder.path("interpolation.json"), {"method": method, "source": str(root),
                                            "interpolated_slices": counts})
    if (sparse_dir / "dataset.json").is_file():  # last, as simulate does: the folder is complete
        _carry(sparse_dir / "dataset.json", folder.path("dataset.json"), link=False)
    return out


def _axis_without_sidecar(ds: Dataset) -> int:
    """The slice axis of the dataset's labels that have no sidecar: the axis from the headers or,
    with nnU-Net's ignore label, the axis along which the labels' slices are whole."""
    axis = slice_axis_of(c.label for c in ds.cases)  # headers only
    if ds.ignore_value is not None:
        axis = ignore_axis((c.label for c in ds.cases), ignore_value=ds.ignore_value, default=axis)
    return axis


def _warn_single(single: list[str]) -> None:
    """One warning for all the cases with a single annotated slice (written unchanged)."""
    if single:
        warnings.warn(f"{len(single)} case(s) have only one annotated slice ({', '.join(single[:5])}"
                      f"{' ...' if len(single) > 5 else ''}): nothing can be interpolated there, written unchanged",
                      UserWarning, stacklevel=3)


def _interpolate_file(path: Path, target: Path, *, method: str, axis: int, ignore_value: int | None = None) -> int:
    """Interpolate one label file into ``target``; returns the number of filled slices.

    ``ignore_value`` is the dataset's declared ignore label (None: the sidecar's, else 255).
    """
    sparse, volume = read_label_file(path, axis=axis, ignore_value=ignore_value)
    if sparse is None:
        _carry(path, target, link=False)  # fully annotated: nothing to fill
        return 0
    result = interpolate_label(sparse, spacing=volume.spacing, method=method)
    extra = sidecar_extra(sparse.meta)
    extra.update(drawn=np.flatnonzero(sparse.drawn).tolist(),
                 interpolated=np.flatnonzero(result.interpolated).tolist(), method=method)
    write_sparse(result.sparse, target, like=volume, extra=extra,
                 ignore_value=sidecar_ignore_value(sparse.meta, default=ignore_value))
    return int(result.interpolated.sum())


def _carry(src: Path, dst: Path, *, link: bool = True) -> None:
    """Carry ``src`` over to ``dst`` atomically the way the input holds it.

    A symbolic link (what ``simulate`` writes) becomes an absolute link to the same original;
    a plain file is hard-linked, or copied where the file system refuses; ``link=False``
    always copies.
    """
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
