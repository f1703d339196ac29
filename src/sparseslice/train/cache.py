"""An on-disk cache of preprocessed training cases, memory-mapped when read (nnU-Net's preprocessed arrays).

A case is read once: its image decoded and normalised, both arrays resampled in-plane, and only
the slices training reads kept (:func:`sparseslice.train.data.load_cases`). For data that does
not fit in memory, the result is written to ``CACHE/<key>/`` and later runs map it from disk
(``np.load(..., mmap_mode="r")``): the 3D sampler reads blocks of the image straight from the
page cache.

- The key is the SHA-256 of the content of every file the case is built from (image channels,
  the voxel files of detached ``.mhd`` / ``.nhdr`` headers, the label and its ``.sparse.json``
  sidecar) and of every setting that changes the arrays (:data:`CACHE_FORMAT` too). Changing a
  file or a setting is a miss; nothing is ever stale. Label values are cached as read (the
  run's label list maps them to classes after the cache).
- An entry (``image.npy``, ``label.npy``, ``partial.npy`` when the case has partly labelled
  slices, ``meta.json``, ``writer.json``) is written in a temporary sibling folder, each file
  synced, then renamed into place: an entry exists only when complete. A process killed while
  writing leaves a ``.tmp-*`` folder that is never read, and that the next writer removes once
  the process recorded in its ``writer.json`` is gone (:class:`sparseslice.locking.Holder`); no
  other file is ever deleted. Of two processes that write the same entry, the second discards
  its copy.
- An entry is trusted as renamed, but read defensively: arrays whose shape or dtype differ from
  ``meta.json`` (or files that cannot be read) are a miss, and the entry is rebuilt.

Arrays are mapped read-only: nothing may write into them (samplers copy what they draw).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sparseslice.atomic import sha256_of
from sparseslice.datasets import Case
from sparseslice.io import DETACHED_SUFFIXES, volume_suffix
from sparseslice.locking import Holder, read_holder
from sparseslice.sparse import sidecar_path

#: Raised whenever what an entry holds, or how it is built, changes: old entries are then misses.
CACHE_FORMAT = 2
#: Prefix of the folders entries are written in before they are renamed to their key.
TMP_PREFIX = ".tmp-"
#: The file in a temporary folder naming the process that writes it (a :class:`~sparseslice.locking.Holder`).
WRITER = "writer.json"
META = "meta.json"
_ARRAYS = ("image", "label", "partial")


@dataclass
class PreparedCase:
    """One case preprocessed for training, before its label values become class indices.

    ``axis`` is the slice axis, ``image`` ``(C, X, Y, Z)`` float32 (normalised, resampled, kept
    slices only), ``label`` the label values as read, ``weight`` one float32 per kept slice,
    ``interpolated`` one bool per kept slice, ``partial`` the known voxels of partly labelled slices (None when none),
    ``full_shape`` the case's shape before slices were dropped (None: none dropped), ``found``
    the label values of its known voxels and ``border`` one bool per kept slice, the border slices
    (None when there are none).
    """

    case_id: str
    axis: int
    image: np.ndarray
    label: np.ndarray
    weight: np.ndarray
    interpolated: np.ndarray
    partial: np.ndarray | None
    full_shape: tuple[int, ...] | None
    found: set[int]
    border: np.ndarray | None = None


def cached_case(root: str | os.PathLike[str], case: Case, *, params: dict[str, Any],
                build: Callable[[], PreparedCase]) -> PreparedCase:
    """``case`` preprocessed: read from the cache under ``root`` when there, else ``build()`` and stored.

    Parameters
    ----------
    root : path
        The cache folder (created when missing; shared between runs and processes).
    case : Case
        The case, for the files its key hashes.
    params : dict
        Every setting that changes the arrays (JSON-able after :func:`_plain`).
    build : callable
        Preprocesses the case (no argument); called on a miss only.

    Returns
    -------
    PreparedCase
        Arrays mapped from the entry (read-only), or, when the entry cannot be read back, those
        ``build`` returned.
    """
    try:
        key = case_key(case, params)
    except OSError:  # a missing or unreadable file: the reader names it, as without a cache
        key = None
    if key is None:  # or a file layout the key cannot cover (multi-file voxel data): never cached
        return build()
    root = Path(root)
    entry = root / key
    if entry.is_dir():
        found = read_entry(entry, case_id=case.case_id)
        if found is not None:
            return found
        _discard(entry, root)  # unreadable or inconsistent: rebuilt below
    prepared = build()
    clean_stale(root)
    written = write_entry(root, key, prepared)
    return read_entry(written, case_id=case.case_id) or prepared


def case_key(case: Case, params: dict[str, Any]) -> str | None:
    """The entry name of ``case`` preprocessed with ``params``: SHA-256 (hex) of its files' content
    and the settings; None when a file's voxel data cannot be listed (``LIST`` or pattern headers)."""
    files = source_files(case)
    if files is None:
        return None
    record = {"format": CACHE_FORMAT, "params": _plain(params),
              "files": [[role, sha256_of(path)] for role, path in files]}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def source_files(case: Case) -> list[tuple[str, Path]] | None:
    """``(role, path)`` of every file ``case`` is built from, in a fixed order; None when unknown."""
    files: list[tuple[str, Path]] = []
    named = [(f"image{n}", p) for n, p in enumerate(case.images)]
    if case.label is not None:
        named.append(("label", Path(case.label)))
    for role, path in named:
        data = detached_data_files(path)
        if data is None:
            return None
        files.append((role, Path(path)))
        files.extend((f"{role}-data", p) for p in data)
    if case.label is not None and sidecar_path(case.label).is_file():
        files.append(("sidecar", sidecar_path(case.label)))
    return files


def detached_data_files(path: str | os.PathLike[str]) -> list[Path] | None:
    """The voxel file a detached header (``.mhd``, ``.nhdr``) names; ``[]`` for other files and
    embedded data; None for a list or pattern of files (not cached)."""
    path = Path(path)
    if volume_suffix(path) not in DETACHED_SUFFIXES:
        return []
    with open(path, "rb") as fh:
        text = fh.read(1 << 16).decode("latin-1")
    for line in text.splitlines():
        name, sep, value = line.partition("=" if path.suffix.lower() == ".mhd" else ":")
        if not sep or name.strip().lower().replace(" ", "") not in ("elementdatafile", "datafile"):
            continue
        value = value.strip()
        if value.upper() == "LOCAL":
            return []
        if value.upper().startswith("LIST") or "%" in value or " " in value:
            return None
        return [path.parent / value]
    return []


def _plain(value: Any) -> Any:
    """``value`` as JSON types (dataclasses as dicts, tuples as lists, NumPy scalars as numbers)."""
    if hasattr(value, "__dataclass_fields__"):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"cache key setting must be plain data, got {type(value).__name__}")


def read_entry(entry: Path, *, case_id: str) -> PreparedCase | None:
    """The case stored in ``entry``, its arrays mapped read-only; None when it is missing, unreadable
    or disagrees with its ``meta.json`` (shape, dtype, slice count)."""
    try:
        meta = json.loads((entry / META).read_text())
        if meta.get("format") != CACHE_FORMAT:
            return None
        arrays: dict[str, np.ndarray | None] = {}
        for name in _ARRAYS:
            want = meta["arrays"].get(name)
            if want is None:
                arrays[name] = None
                continue
            array = np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False)
            if list(array.shape) != want["shape"] or array.dtype.str != want["dtype"]:
                return None
            arrays[name] = array
        axis = int(meta["axis"])
        weight = np.asarray(meta["weight"], np.float32)
        interpolated = np.zeros(weight.size, bool)
        interpolated[meta["interpolated"]] = True
        if weight.size != arrays["label"].shape[axis]:
            return None
        full = None if meta["full_shape"] is None else tuple(int(s) for s in meta["full_shape"])
        border = None
        if meta["border"] is not None:
            border = np.zeros(weight.size, bool)
            border[meta["border"]] = True
        return PreparedCase(case_id, axis, arrays["image"], arrays["label"], weight, interpolated, arrays["partial"],
                            full, {int(v) for v in meta["found"]}, border)
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def write_entry(root: Path, key: str, prepared: PreparedCase, *,
                after_file: Callable[[str], None] | None = None) -> Path:
    """Write ``prepared`` as the entry ``root / key`` (atomically: a synced temporary folder renamed).

    ``after_file(name)`` runs after each file is written and synced (a test seam: a writer that
    blocks there can be killed mid-entry). Returns the entry; when another process renamed its
    copy first, that one stays and this copy is discarded.
    """
    tmp = _temp_folder(root, key[:16])
    try:
        arrays = {"image": prepared.image, "label": prepared.label, "partial": prepared.partial}
        for name, array in arrays.items():
            if array is None:
                continue
            with open(tmp / f"{name}.npy", "wb") as fh:
                np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
                fh.flush()
                os.fsync(fh.fileno())
            if after_file is not None:
                after_file(name)
        _write_synced(tmp / META, (json.dumps(_meta(prepared), indent=1) + "\n").encode())
        _fsync_folder(tmp)
        try:
            os.rename(tmp, root / key)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (root / key).is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process was first: its entry is the same
        else:
            _fsync_folder(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root / key


def _meta(prepared: PreparedCase) -> dict[str, Any]:
    arrays = {name: None if a is None else {"shape": list(a.shape), "dtype": a.dtype.str}
              for name, a in (("image", prepared.image), ("label", prepared.label), ("partial", prepared.partial))}
    return {"format": CACHE_FORMAT, "case_id": prepared.case_id, "axis": prepared.axis, "arrays": arrays,
            "weight": [float(w) for w in np.asarray(prepared.weight, np.float32)],
            "interpolated": np.flatnonzero(prepared.interpolated).tolist(),
            "full_shape": None if prepared.full_shape is None else [int(s) for s in prepared.full_shape],
            "found": sorted(int(v) for v in prepared.found),
            "border": None if prepared.border is None else np.flatnonzero(prepared.border).tolist()}


def _temp_folder(root: Path, tag: str) -> Path:
    """A new ``.tmp-*`` folder in ``root`` naming this process as its writer (for :func:`clean_stale`)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{tag}.{os.getpid()}.{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its folders are private (0700), an entry is for every run the umask allows
    try:
        _write_synced(tmp / WRITER, json.dumps(asdict(Holder.me())).encode())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def clean_stale(root: Path) -> list[Path]:
    """Remove the temporary folders of writers that are gone (killed mid-entry); returns them.

    Only folders named ``.tmp-*`` whose ``writer.json`` names a process of this host that no
    longer runs; anything else (a live writer, another host's, an unnamed folder) is left.
    """
    removed = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for folder in root.iterdir():
            if not folder.name.startswith(TMP_PREFIX) or not folder.is_dir() or folder.is_symlink():
                continue
            holder = read_holder(folder / WRITER, tries=1)
            if holder is not None and holder.running() is False:
                shutil.rmtree(folder, ignore_errors=True)
                removed.append(folder)
    return removed


def _discard(entry: Path, root: Path) -> None:
    """Move an unreadable entry out of the way (renamed first, so no reader sees it half removed)."""
    trash = _temp_folder(root, "discard")
    try:
        os.rename(entry, trash / entry.name)
    except FileNotFoundError:  # another process discarded it first
        pass
    shutil.rmtree(trash, ignore_errors=True)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _fsync_folder(folder: Path) -> None:
    """Sync a folder's entries (the names of the files in it), where the system allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)
