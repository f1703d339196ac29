"""Sparse labels: a label volume plus which slices of it are trustworthy.

Voxels in slices that are not annotated are *unknown*, never background. On disk a sparse
label is one volume whose unknown voxels hold the ignore value (255 by default, nnU-Net v2's
convention) plus a JSON sidecar (``<case>.sparse.json``) recording the axis, the annotated
and border slices and the extent.

An nnU-Net v2 dataset may instead declare its ignore value in ``dataset.json``
(``"labels": {"ignore": K}``) and carry no sidecar. Then a slice is annotated when none of
its voxels is ``K``; a slice holding both ``K`` and real values is *partly labelled*: it is
not annotated (interpolation does not start from it, evaluation does not score it), and its
non-``K`` voxels are kept as voxel-level known (``partial_known``), which the training loss
uses (its weight is per voxel).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sparseslice.atomic import write_json
from sparseslice.errors import UserError
from sparseslice.io import Volume, check_axis, read_label, strip_suffix, write_volume

DEFAULT_IGNORE_VALUE = 255
SIDECAR_SUFFIX = ".sparse.json"


@dataclass(frozen=True)
class SparseLabel:
    """A label array whose annotated slices along ``axis`` are known.

    Parameters
    ----------
    label : numpy.ndarray
        Integer labels; values in unannotated slices are meaningless.
    annotated : numpy.ndarray
        Boolean vector, one entry per slice along ``axis``.
    axis : int
        The slice axis.
    border : numpy.ndarray, optional
        Boolean vector of annotated slices that are border slices (known background outside
        the extent, free of drawing cost). Defaults to none.
    extent : tuple of int, optional
        First and last slice containing the structure, when known.
    partial_known : numpy.ndarray, optional
        Boolean voxel mask: the known voxels of slices labelled only in part (nnU-Net's
        ignore label marks single voxels unknown). Such slices are not annotated; the mask
        is cleared on annotated slices. None (default) when annotation is per whole slice.

    Examples
    --------
    >>> lab = np.zeros((4, 4, 6), np.uint8); lab[1:3, 1:3, 2:4] = 1
    >>> sp = SparseLabel.from_slices(lab, [0, 3], axis=2)
    >>> sp.annotated.astype(int).tolist()
    [1, 0, 0, 1, 0, 0]
    >>> int(sp.known_mask().sum())
    32
    """

    label: np.ndarray
    annotated: np.ndarray
    axis: int
    border: np.ndarray | None = None
    extent: tuple[int, int] | None = None
    meta: dict = field(default_factory=dict, compare=False)
    partial_known: np.ndarray | None = None

    def __post_init__(self) -> None:
        axis = check_axis(self.axis, self.label.ndim)
        object.__setattr__(self, "axis", axis)
        annotated = np.asarray(self.annotated, dtype=bool)
        n = self.label.shape[axis]
        if annotated.shape != (n,):
            raise UserError(f"annotated must have one entry per slice ({n} along axis {axis}), "
                            f"got shape {annotated.shape}; pass a boolean vector over the slice axis")
        object.__setattr__(self, "annotated", annotated)
        border = np.zeros(n, bool) if self.border is None else np.asarray(self.border, bool)
        if border.shape != (n,):
            raise UserError(f"border must have shape ({n},), got {border.shape}; "
                            "pass a boolean vector over the slice axis")
        if np.any(border & ~annotated):
            raise UserError("border slices must be annotated, got border slices "
                            f"{np.flatnonzero(border & ~annotated).tolist()} that are not; "
                            "use with_border_slices() to add them")
        object.__setattr__(self, "border", border)
        if self.extent is not None:
            object.__setattr__(self, "extent", check_extent(self.extent, n))
        if self.partial_known is not None:
            part = np.asarray(self.partial_known, bool)
            if part.shape != self.label.shape:
                raise UserError(f"partial_known must have the label's shape {self.label.shape}, got {part.shape}; "
                                "pass a boolean voxel mask")
            part = part & ~self._slice_mask(annotated)
            object.__setattr__(self, "partial_known", part if part.any() else None)

    def _slice_mask(self, per_slice: np.ndarray) -> np.ndarray:
        shape = [1] * self.label.ndim
        shape[self.axis] = self.label.shape[self.axis]
        return np.broadcast_to(np.asarray(per_slice).reshape(shape), self.label.shape)

    @classmethod
    def from_slices(cls, label: np.ndarray, slices: list[int] | np.ndarray, *, axis: int) -> SparseLabel:
        """Sparse label keeping ``slices`` (indices along ``axis``) of a full label."""
        axis = check_axis(axis, label.ndim)
        n = label.shape[axis]
        idx = np.asarray(list(slices), dtype=int)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise UserError(f"slices must lie in [0, {n - 1}] along axis {axis}, got "
                            f"{idx[(idx < 0) | (idx >= n)].tolist()}; pick slices inside the volume")
        annotated = np.zeros(n, bool)
        annotated[idx] = True
        return cls(label, annotated, axis)

    @property
    def n_slices(self) -> int:
        return int(self.label.shape[self.axis])

    @property
    def annotated_indices(self) -> list[int]:
        return np.flatnonzero(self.annotated).tolist()

    @property
    def drawn(self) -> np.ndarray:
        """Annotated slices an annotator had to draw (annotated and not border)."""
        return self.annotated & ~self.border

    @property
    def partial_slices(self) -> list[int]:
        """Slices labelled only in part (some voxels known; not annotated)."""
        if self.partial_known is None:
            return []
        other = tuple(a for a in range(self.label.ndim) if a != self.axis)
        return np.flatnonzero(np.any(self.partial_known, axis=other)).tolist()

    def known_mask(self) -> np.ndarray:
        """Boolean voxel mask, True where the label is known (annotated slices, plus the known
        voxels of partly labelled slices)."""
        known = self._slice_mask(self.annotated)
        return known if self.partial_known is None else known | self.partial_known

    def with_border_slices(self, extent: tuple[int, int] | None = None) -> SparseLabel:
        """Mark every slice outside ``extent`` as annotated background (border slices).

        ``extent`` defaults to the stored extent. Labels in those slices are set to 0.
        """
        extent = check_extent(extent if extent is not None else self.extent, self.n_slices)
        if extent is None:
            raise UserError("extent is None; pass (first, last) slice of the structure or use "
                            "extent_of() on a full label")
        first, last = extent
        outside = np.ones(self.n_slices, bool)
        outside[first:last + 1] = False
        label = self.label.copy()
        index = [slice(None)] * label.ndim
        index[self.axis] = outside
        label[tuple(index)] = 0
        return replace(self, label=label, annotated=self.annotated | outside,
                       border=self.border | (outside & ~self.annotated), extent=extent)


def check_extent(extent: tuple[int, int] | None, n_slices: int) -> tuple[int, int] | None:
    """Validate an extent (first, last) against a number of slices."""
    if extent is None:
        return None
    try:
        first, last = (int(v) for v in extent)
    except (TypeError, ValueError):
        raise UserError(f"extent must be (first, last), got {extent!r}; pass two slice indices") from None
    if not 0 <= first <= last < n_slices:
        raise UserError(f"extent must satisfy 0 <= first <= last < {n_slices}, got ({first}, {last}); "
                        "give the first and last slice that contain the structure")
    return first, last


def extent_of(label: np.ndarray, *, axis: int, ignore_value: int | None = None) -> tuple[int, int] | None:
    """First and last slice along ``axis`` containing any foreground, or None if empty.

    Voxels equal to ``ignore_value`` (nnU-Net's declared ignore label) are unknown, not foreground.
    """
    axis = check_axis(axis, label.ndim)
    other = tuple(a for a in range(label.ndim) if a != axis)
    foreground = label > 0 if ignore_value is None else (label > 0) & (label != ignore_value)
    present = np.flatnonzero(np.any(foreground, axis=other))
    if present.size == 0:
        return None
    return int(present[0]), int(present[-1])


def structure_slices(label: np.ndarray, *, axis: int) -> int:
    """Number of slices along ``axis`` that contain any foreground."""
    other = tuple(a for a in range(label.ndim) if a != check_axis(axis, label.ndim))
    return int(np.count_nonzero(np.any(label > 0, axis=other)))


def encode(sparse: SparseLabel, *, ignore_value: int = DEFAULT_IGNORE_VALUE) -> np.ndarray:
    """One volume: true labels in annotated slices, ``ignore_value`` everywhere else.

    Raises if a real label equals ``ignore_value`` (the two would be indistinguishable).
    """
    known = sparse.known_mask()
    present = np.unique(sparse.label[known]) if known.any() else np.array([], int)
    if np.any(present == ignore_value):
        raise UserError(f"ignore_value collides with a real label, got {ignore_value}; "
                        f"pass an ignore value above {int(present.max())}")
    dtype = np.uint8 if max(ignore_value, int(present.max(initial=0))) <= 255 else np.uint16
    out = np.full(sparse.label.shape, ignore_value, dtype=dtype)
    out[known] = sparse.label[known]
    return out


def decode(volume: np.ndarray, *, axis: int, ignore_value: int = DEFAULT_IGNORE_VALUE,
           border: np.ndarray | None = None, extent: tuple[int, int] | None = None,
           partial: bool = False) -> SparseLabel:
    """Inverse of :func:`encode`: a slice is annotated when none of its voxels is ignored.

    A slice holding both ignore and real values is refused (annotation is per whole slice),
    unless ``partial``: then it is not annotated and its other voxels are ``partial_known``
    (nnU-Net's ignore label may mark any voxel unknown). Ignored voxels read 0.
    """
    axis = check_axis(axis, volume.ndim)
    ignored = volume == ignore_value
    annotated, part = known_slices(ignored, axis=axis)
    if part.size and not partial:
        raise UserError(f"slice {int(part[0])} along axis {axis} is partly ignored (value "
                        f"{ignore_value}); annotated slices must be complete: check the axis or "
                        "the ignore value")
    label = np.where(ignored, 0, volume).astype(volume.dtype)
    return SparseLabel(label, annotated, axis, border=border, extent=extent,
                       partial_known=~ignored if part.size else None)


def known_slices(ignored: np.ndarray, *, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """Slices of an ignored-voxel mask along ``axis``: annotated (bool vector: no voxel ignored)
    and partial (indices of slices ignored in part only)."""
    other = tuple(a for a in range(ignored.ndim) if a != axis)
    any_ignored, all_ignored = np.any(ignored, axis=other), np.all(ignored, axis=other)
    return ~any_ignored, np.flatnonzero(any_ignored & ~all_ignored)


def read_sidecar(label_path: str | os.PathLike[str]) -> dict | None:
    """The sidecar record of a sparse label file, or None when it has none."""
    side = sidecar_path(label_path)
    return json.loads(side.read_text()) if side.is_file() else None


# what write_sparse writes from the label itself; a rewrite passes the other entries on as extra
_LABEL_ENTRIES = ("axis", "n_slices", "ignore_value", "annotated", "border", "drawn", "extent", "partial")


def sidecar_extra(record: dict) -> dict:
    """The entries of a sidecar record that :func:`write_sparse` does not write from the label
    (those a later stage added, such as ``interpolated`` and ``method``): ``extra`` for a rewrite
    that keeps them.

    ``partial`` is not among them: :func:`write_sparse` writes it from the label it is given
    (its partly labelled slices, absent when there are none), so a slice that the rewritten
    label no longer holds in part (an interpolation filled it) is not listed from the old record.
    """
    return {k: v for k, v in record.items() if k not in _LABEL_ENTRIES}


def sidecar_ignore_value(record: dict, *, default: int | None = None) -> int:
    """The ignore value a sidecar record declares; else ``default``, else 255 (:data:`DEFAULT_IGNORE_VALUE`)."""
    return int(record.get("ignore_value", DEFAULT_IGNORE_VALUE if default is None else default))


def sidecar_path(label_path: str | os.PathLike[str]) -> Path:
    """``labels/case.nii.gz`` -> ``labels/case.sparse.json``."""
    p = Path(label_path)
    return p.with_name(strip_suffix(p) + SIDECAR_SUFFIX)


def write_sparse(sparse: SparseLabel, path: str | os.PathLike[str], *, like: Volume,
                 ignore_value: int = DEFAULT_IGNORE_VALUE, extra: dict | None = None) -> Path:
    """Write the encoded volume (in ``like``'s space) and its JSON sidecar, both atomically.

    The sidecar is written last, so its presence means the pair is complete. ``extra`` adds
    entries to the record (or replaces those taken from the label, as ``interpolate`` does with
    ``drawn``), except ``partial``: the partly labelled slices are always those of ``sparse``.
    """
    if extra and "partial" in extra:
        raise ValueError("extra must not hold 'partial': write_sparse writes it from the label's partial_known")
    write_volume(like.like(encode(sparse, ignore_value=ignore_value)), path)
    record = {
        "axis": sparse.axis,
        "n_slices": sparse.n_slices,
        "ignore_value": ignore_value,
        "annotated": sparse.annotated_indices,
        "border": np.flatnonzero(sparse.border).tolist(),
        "drawn": np.flatnonzero(sparse.drawn).tolist(),
        "extent": list(sparse.extent) if sparse.extent is not None else None,
        **({"partial": sparse.partial_slices} if sparse.partial_known is not None else {}),
        **(extra or {}),
    }
    write_json(sidecar_path(path), record)
    return Path(path)


def read_sparse(path: str | os.PathLike[str], *, axis: int | None = None,
                ignore_value: int | None = None) -> tuple[SparseLabel, Volume]:
    """Read a sparse label volume and its sidecar; returns the label and its volume (space).

    Without a sidecar, ``axis`` is required and annotated slices are the slices free of the
    ignore value. With one, the sidecar's annotated slices must agree with the volume.
    """
    side = sidecar_path(path)
    record = read_sidecar(path) or {}
    ignore = int(ignore_value if ignore_value is not None
                 else record.get("ignore_value", DEFAULT_IGNORE_VALUE))
    vol = read_label(path)
    if axis is None:
        if "axis" not in record:
            raise UserError(f"file {str(path)!r} has no sidecar {side.name}; pass axis=")
        axis = int(record["axis"])
    n = vol.shape[check_axis(axis)]
    border = np.zeros(n, bool)
    border[record.get("border", [])] = True
    extent = tuple(record["extent"]) if record.get("extent") is not None else None
    sparse = decode(vol.array, axis=axis, ignore_value=ignore, border=border, extent=extent,
                    partial=bool(record.get("partial")))
    if "annotated" in record and sorted(record["annotated"]) != sparse.annotated_indices:
        raise UserError(f"file {str(path)!r} disagrees with its sidecar: volume has annotated "
                        f"slices {sparse.annotated_indices[:8]}, sidecar {record['annotated'][:8]}; "
                        "rewrite both with sparseslice simulate")
    return replace(sparse, meta=record), vol


def read_label_file(path: str | os.PathLike[str], *, axis: int,
                    ignore_value: int | None = None) -> tuple[SparseLabel | None, Volume]:
    """Read any label file and say whether it is sparse: the one rule every stage follows.

    With a sidecar the label is sparse (the sidecar's axis is used); without one, a label
    holding the ignore value is decoded along ``axis``; otherwise it is fully annotated and
    the first element is None. ``ignore_value`` is the dataset's declared ignore label
    (nnU-Net's ``dataset.json`` ``"ignore"``, see ``Dataset.ignore_value``): it replaces the
    default 255 for sidecar-less files, and partly labelled slices are then allowed (their
    known voxels are ``partial_known``).

    Returns
    -------
    (SparseLabel or None, Volume)
        The sparse label (None when fully annotated) and the label volume as read.
    """
    if sidecar_path(path).is_file():
        return read_sparse(path)
    vol = read_label(path)
    ignore = DEFAULT_IGNORE_VALUE if ignore_value is None else int(ignore_value)
    if np.any(vol.array == ignore):
        return decode(vol.array, axis=axis, ignore_value=ignore, partial=ignore_value is not None), vol
    return None, vol



def ignore_axis(paths: Iterable[str | os.PathLike[str]], *, ignore_value: int, default: int,
                sample: int = 3) -> int:
    """The slice axis of sidecar-less labels whose unknown voxels hold ``ignore_value``.

    nnU-Net's ignore label says which voxels are unknown, not along which axis the annotator
    drew; the axis along which the labels' slices are whole (fewest partly ignored slices, over
    the first ``sample`` files holding the value) is that axis. ``default`` (the dataset's
    axis from its headers) wins ties and is returned when no file holds the value.

    Examples
    --------
    >>> import tempfile
    >>> from sparseslice.io import Volume, write_volume
    >>> lab = np.full((4, 5, 6), 3, np.uint8); lab[:, 2, :] = 1  # one whole slice along axis 1
    >>> path = write_volume(Volume(lab), Path(tempfile.mkdtemp()) / "a.nii.gz")
    >>> ignore_axis([path], ignore_value=3, default=2)
    1
    """
    partial = np.zeros(3, int)
    seen = 0
    for path in paths:
        if seen == sample:
            break
        ignored = read_label(path).array == ignore_value
        if not ignored.any():
            continue
        seen += 1
        for a in range(3):
            other = tuple(b for b in range(3) if b != a)
            partial[a] += int(np.count_nonzero(np.any(ignored, axis=other) & ~np.all(ignored, axis=other)))
    return fewest_partial_axis(partial.tolist(), default=default) if seen else default


def fewest_partial_axis(partial: list[int], *, default: int) -> int:
    """The axis with the fewest partly ignored slices (``partial[a]`` along axis ``a``);
    ``default`` wins ties, then the lowest axis."""
    best = [a for a in range(len(partial)) if partial[a] == min(partial)]
    return default if default in best else best[0]
