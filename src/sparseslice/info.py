"""``sparseslice info``: what a dataset holds, read fast (headers for images, labels in full).

:func:`describe_dataset` reads image headers only: what that leaves unchecked is
:data:`NOT_CHECKED`, and ``info`` says so. :func:`check_dataset` (``info --check``) reads
everything, as nnU-Net's ``--verify_dataset_integrity`` does, and lists every problem found.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparseslice.datasets import Case, Dataset, dataset_slice_axis, discover_dataset
from sparseslice.errors import UserError
from sparseslice.io import (
    Volume,
    check_axis,
    check_same_space,
    default_slice_axis,
    read_header,
    read_label,
    read_volume,
    strip_suffix,
    volume_suffix,
)
from sparseslice.progress import track
from sparseslice.sparse import fewest_partial_axis, known_slices, read_sidecar, structure_slices


@dataclass(frozen=True)
class CaseDescription:
    case_id: str
    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    channels: int
    dtype: str
    labels: tuple[int, ...] | None
    axis: int
    structure_slices: int | None
    per_axis_slices: tuple[int, ...] | None = None
    annotated: tuple[int, ...] | None = None
    """With a declared ignore value: the slices along ``axis`` free of it (None otherwise)."""
    partial: tuple[int, ...] | None = None
    """With a declared ignore value: the slices along ``axis`` that hold it on some voxels only."""
    per_axis_known: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] | None = None
    sidecar_annotated: int | None = None
    """With a sparse-label sidecar (written by ``simulate``): the annotated slices it lists."""


@dataclass(frozen=True)
class DatasetDescription:
    root: Path
    layout: str
    axis: int
    cases: tuple[CaseDescription, ...]
    label_names: dict[int, str]
    ignore_value: int | None = None
    """nnU-Net's ignore label from dataset.json: its voxels are unknown, not a class."""
    checked: bool = False
    """Whether :func:`check_dataset` read everything and found no problem (else headers only)."""

    @property
    def label_values(self) -> tuple[int, ...]:
        values: set[int] = set()
        for c in self.cases:
            values.update(c.labels or ())
        return tuple(sorted(values))


def describe_case(case: Case, *, axis: int | None = None, ignore_value: int | None = None) -> CaseDescription:
    """Header facts of a case plus, when labelled, its label values and structure slices.

    The label is read once; structure slices are counted along every axis so that the
    dataset's axis can be chosen afterwards without reading it again. With ``ignore_value``
    (nnU-Net's declared ignore label) its voxels are unknown: not a label value, not
    structure, and the slices free of it are the annotated ones (``annotated``; ``partial``
    lists the slices it covers only in part).
    """
    head = read_header(case.images[0])
    shape3 = head.shape[:3]
    case_axis = default_slice_axis(head.spacing, shape3) if axis is None else check_axis(axis)
    labels = per_axis = known = sidecar = None
    if case.label is not None:
        label = read_label(case.label)
        check_same_space(head, label, name=case.case_id)
        array = label.array
        if ignore_value is not None:
            ignored = array == ignore_value
            array = np.where(ignored, 0, array)
            known = tuple(_known_slices(ignored, axis=a) for a in range(3))
            labels = tuple(int(v) for v in np.unique(label.array[~ignored]))
        else:
            labels = tuple(int(v) for v in np.unique(array))
        per_axis = tuple(structure_slices(array, axis=a) for a in range(3))
        sidecar = _sidecar_annotated(case.label)
    channels = len(case.images) if len(case.images) > 1 else (head.shape[3] if len(head.shape) > 3 else 1)
    return CaseDescription(case.case_id, shape3, tuple(round(s, 4) for s in head.spacing),
                           channels, str(head.dtype), labels, case_axis,
                           None if per_axis is None else per_axis[case_axis], per_axis,
                           *(known[case_axis] if known else (None, None)), known, sidecar)


def _sidecar_annotated(label_path: Path) -> int | None:
    """Annotated slices listed by a sparse label's sidecar (None: no sidecar)."""
    record = read_sidecar(label_path)
    return None if record is None else len(record.get("annotated", []))


def _known_slices(ignored: np.ndarray, *, axis: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(annotated, partial) slice indices along ``axis`` of an ignore-value mask."""
    annotated, partial = known_slices(ignored, axis=axis)
    return tuple(np.flatnonzero(annotated).tolist()), tuple(partial.tolist())


def describe_dataset(data: str | os.PathLike[str], *, axis: int | None = None,
                     require_labels: bool = False, workers: int = 4, progress: bool = False) -> DatasetDescription:
    """Describe every case of a dataset (threads overlap file decompression)."""
    ds = discover_dataset(data, require_labels=require_labels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        cases = list(track(pool.map(lambda c: describe_case(c, axis=axis, ignore_value=ds.ignore_value), ds.cases),
                           "reading cases", progress=progress, total=len(ds.cases)))
    chosen = axis if axis is not None else dataset_slice_axis([c.shape for c in cases],
                                                              [c.spacing for c in cases])
    known = [c.per_axis_known for c in cases if c.per_axis_known is not None]
    if axis is None and known:  # a declared ignore label: the axis along which its slices are whole
        chosen = fewest_partial_axis([sum(len(k[a][1]) for k in known) for a in range(3)], default=chosen)
    cases = [replace(c, axis=chosen,
                     structure_slices=None if c.per_axis_slices is None else c.per_axis_slices[chosen],
                     annotated=None if c.per_axis_known is None else c.per_axis_known[chosen][0],
                     partial=None if c.per_axis_known is None else c.per_axis_known[chosen][1])
             for c in cases]
    return DatasetDescription(Path(data), ds.layout, chosen, tuple(cases), ds.label_names, ds.ignore_value)


def description_record(desc: DatasetDescription) -> dict:
    """The description as plain data: what ``info --json`` prints and ``info``'s summary shows.

    Keys (stable): ``root``, ``layout``, ``slice_axis``, ``ignore_value`` (dataset.json's, or
    None), ``n_cases``, ``n_labelled``, ``n_sparse`` (cases with known annotated slices: a
    sidecar or a declared ignore value), ``labels`` (value -> name, values present),
    ``shape_min``/``shape_max`` (per axis), ``structure_slices`` and ``annotated_slices``
    (``min``/``max``/``median``/``total`` per case along the slice axis, or None), and
    ``cases``: one dict per case with ``case``, ``shape``, ``spacing`` (mm), ``channels``,
    ``dtype``, ``labels``, ``structure_slices``, ``annotated_slices`` (count, or None when
    fully annotated), ``annotated`` and ``partial`` (slice indices; with an ignore value only),
    ``checked`` (``"everything"`` after :func:`check_dataset` passed, else ``"headers"``) and
    ``not_checked`` (what was not, :data:`NOT_CHECKED`; empty after a check).
    """
    shapes = np.array([c.shape for c in desc.cases])

    def stats(values: list[int]) -> dict | None:
        return None if not values else {"min": int(min(values)), "max": int(max(values)),
                                        "median": float(np.median(values)), "total": int(sum(values))}

    cases = [{"case": c.case_id, "shape": list(c.shape), "spacing": list(c.spacing), "channels": c.channels,
              "dtype": c.dtype, "labels": None if c.labels is None else list(c.labels),
              "structure_slices": c.structure_slices,
              "annotated_slices": len(c.annotated) if c.annotated is not None else c.sidecar_annotated,
              "annotated": None if c.annotated is None else list(c.annotated),
              "partial": None if c.partial is None else list(c.partial)} for c in desc.cases]
    return {
        "root": str(desc.root), "layout": desc.layout, "slice_axis": int(desc.axis),
        "ignore_value": desc.ignore_value,
        "n_cases": len(cases), "n_labelled": sum(c["labels"] is not None for c in cases),
        "n_sparse": sum(c["annotated_slices"] is not None for c in cases),
        "labels": {str(v): desc.label_names.get(v, "?") for v in desc.label_values},
        "shape_min": shapes.min(axis=0).tolist(), "shape_max": shapes.max(axis=0).tolist(),
        "structure_slices": stats([c["structure_slices"] for c in cases if c["structure_slices"] is not None]),
        "annotated_slices": stats([c["annotated_slices"] for c in cases if c["annotated_slices"] is not None]),
        "checked": "everything" if desc.checked else "headers",
        "not_checked": [] if desc.checked else list(NOT_CHECKED),
        "cases": cases,
    }


def render_description(desc: DatasetDescription, console: Console, *, rows: int = 0) -> None:
    """Print the per-case table and a summary (the summary's numbers are :func:`description_record`'s)."""
    rec = description_record(desc)
    console.print(escape(f"{rec['root']} ({rec['layout']} layout)"), soft_wrap=True)  # a title would wrap
    table = Table(show_lines=False)
    width = max((len(c.case_id) for c in desc.cases), default=4)
    for col in ("case", "shape", "spacing (mm)", "ch", "dtype", "labels", "axis", "structure slices"):
        table.add_column(col, justify="right" if col in ("ch", "axis", "structure slices") else "left",
                         no_wrap=col == "case", min_width=width if col == "case" else None)
    shown = rec["cases"] if rows <= 0 else rec["cases"][:rows]
    for c in shown:
        table.add_row(c["case"], "x".join(map(str, c["shape"])), "x".join(f"{s:g}" for s in c["spacing"]),
                      str(c["channels"]), c["dtype"],
                      "-" if c["labels"] is None else ",".join(map(str, c["labels"])), str(rec["slice_axis"]),
                      "-" if c["structure_slices"] is None else str(c["structure_slices"]))
    console.print(table)
    if len(shown) < rec["n_cases"]:
        console.print(f"... {rec['n_cases'] - len(shown)} more cases (--rows 0 shows all)")
    names = ", ".join(f"{v}={name}" for v, name in rec["labels"].items())
    lines = [
        f"[bold]{rec['n_cases']} cases ({rec['n_labelled']} labelled)[/bold], {rec['layout']} layout",
        f"shapes {'x'.join(map(str, rec['shape_min']))} to {'x'.join(map(str, rec['shape_max']))}"
        " (per-axis min to max)",
        escape(f"labels {{{', '.join(rec['labels'])}}} ({names})"),
        f"slice axis {rec['slice_axis']}",
    ]
    if (st := rec["structure_slices"]) is not None:
        lines.append(f"structure slices per case {st['min']}-{st['max']} (median {int(st['median'])})")
    if desc.ignore_value is not None:
        lines.extend(_ignore_lines(desc, rows=rows))
    elif (st := rec["annotated_slices"]) is not None:
        lines.append(f"annotated slices (sidecars) per case {st['min']}-{st['max']} (median {int(st['median'])})")
    if desc.checked:
        lines.append(f"checked everything: {', '.join(CHECKED)}; no problem found")
    else:
        lines.append(escape(f"read image headers only (labels in full); not checked: {'; '.join(NOT_CHECKED)} "
                            "(info --check reads everything)"))
    for line in lines:
        console.print(line, soft_wrap=True)


def _ignore_lines(desc: DatasetDescription, *, rows: int) -> list[str]:
    """Summary lines for a declared ignore label: which slices of each case are annotated."""
    known = [c for c in desc.cases if c.annotated is not None]
    lines = [f"ignore value {desc.ignore_value} (dataset.json): its voxels are unknown, not a class"]
    if not known:
        return lines
    counts = [len(c.annotated) for c in known]
    lines.append(f"annotated slices (free of {desc.ignore_value}) along axis {desc.axis} per case "
                 f"{min(counts)}-{max(counts)}; partly labelled slices (voxel-level unknown) "
                 f"{sum(len(c.partial) for c in known)} in all")
    for c in known if rows <= 0 else known[:rows]:
        part = f"; partly labelled {_ranges(c.partial)}" if c.partial else ""
        lines.append(f"  {c.case_id}: annotated {_ranges(c.annotated) or 'none'}{part}")
    return lines


def _ranges(indices: tuple[int, ...]) -> str:
    """``(1, 2, 3, 7)`` -> ``"1-3,7"``."""
    out, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            out.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(out)


# --- info --check: read everything -------------------------------------------------------

#: What :func:`describe_dataset` does not check (it reads image headers; labels in full).
NOT_CHECKED = (
    "image voxels (a truncated or corrupt image passes)",
    "non-finite intensities (NaN, inf)",
    "channel counts equal across cases",
    "labels dataset.json lists that are missing (those cases count as unlabelled)",
    "label values against dataset.json's labels",
    "label files without an image",
)
#: What :func:`check_dataset` checks, for the message of a dataset that passes.
CHECKED = ("every file dataset.json lists exists", "every image and label decodes in full",
           "channel counts are equal", "each label lies on its image's grid (shape, spacing, origin, direction)",
           "label values are declared", "intensities are finite")
#: Tolerance (mm for spacing and origin, cosines for direction) within which grids are equal,
#: as training and prediction accept them (:func:`sparseslice.io.check_same_space`).
GRID_ATOL = 1e-3


def check_dataset(data: str | os.PathLike[str], *, workers: int = 4, progress: bool = False) -> list[str]:
    """Read everything in a dataset, as nnU-Net's ``--verify_dataset_integrity`` does; one line per problem.

    Checked: every file ``dataset.json`` lists exists (and ``numTraining`` counts them), every
    image and label decodes in full (truncated files are caught), every case has the same
    number of image channels (dataset.json's ``channel_names``/``modality`` when declared),
    every label and channel file lies on its image's grid (shape, spacing, origin, direction
    within :data:`GRID_ATOL`), label values are among dataset.json's labels (plus its ignore
    value), intensities are finite, and no label file is without an image.

    Returns
    -------
    list of str
        The problems found, each naming the case or file (empty: the dataset passed).
    """
    root = Path(data)
    problems = _listing_problems(root)
    try:
        ds = discover_dataset(root)
    except UserError as exc:
        return problems or [" ".join(str(exc).split())]
    declared = {0, *ds.label_names} if ds.label_names else None
    if declared is not None and ds.ignore_value is not None:
        declared.add(ds.ignore_value)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        found = list(track(pool.map(lambda c: _check_case(c, declared=declared), ds.cases), "checking cases",
                           progress=progress, total=len(ds.cases)))
    for _, case_problems in found:
        problems.extend(case_problems)
    problems.extend(_channel_problems(ds, [channels for channels, _ in found]))
    problems.extend(_orphan_labels(ds))
    return [" ".join(p.split()) for p in problems]  # one line each, whatever a decoder's message held


def _listing_problems(root: Path) -> list[str]:
    """Files ``root/dataset.json`` lists that do not exist, and a ``numTraining`` that miscounts."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return []
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return [f"file {str(meta_path)!r} is not valid JSON ({exc}); fix or remove it"]
    training = meta.get("training") if isinstance(meta, dict) else None
    if not isinstance(training, list):
        return []
    problems = []
    for n, entry in enumerate(training):
        if not isinstance(entry, dict):
            continue
        images = entry.get("image") if isinstance(entry.get("image"), list) else [entry.get("image")]
        for kind, listed in [*(("image", i) for i in images), ("label", entry.get("label"))]:
            if not listed:
                continue
            path = Path(str(listed).strip())
            path = path if path.is_absolute() else root / path
            sibling = path.parent / f"{strip_suffix(path)}_0000{volume_suffix(path) or '.nii.gz'}"  # nnU-Net v1
            if not path.exists() and not (kind == "image" and sibling.exists()):
                problems.append(f"dataset.json training entry {n} lists {kind} {str(listed)!r}, which does not "
                                f"exist ({str(path)!r})")
    count = meta.get("numTraining")
    if isinstance(count, int) and count != len(training):
        problems.append(f"dataset.json numTraining is {count}, but its training list has {len(training)} entries")
    return problems


def _check_case(case: Case, *, declared: set[int] | None) -> tuple[int | None, list[str]]:
    """(image channels or None when unreadable, problems) of one case, every voxel read."""
    problems: list[str] = []
    volumes: list[Volume] = []
    for path in case.images:
        try:
            vol = read_volume(path)
        except UserError as exc:
            problems.append(f"case {case.case_id!r}: {exc}")
            continue
        if np.issubdtype(vol.array.dtype, np.floating) and (bad := int(np.count_nonzero(~np.isfinite(vol.array)))):
            problems.append(f"case {case.case_id!r}: image {path.name!r} has {bad} non-finite voxel(s) (NaN or inf)")
        if volumes:
            problems.extend(_grid_problems(volumes[0], vol, case=case.case_id, what=f"channel {path.name!r}"))
        volumes.append(vol)
    channels = None
    if len(volumes) == len(case.images):
        channels = len(volumes) if len(volumes) > 1 else (volumes[0].array.shape[3] if volumes[0].array.ndim > 3
                                                          else 1)
    if case.label is not None:
        try:
            label = read_label(case.label)
        except UserError as exc:
            problems.append(f"case {case.case_id!r}: {exc}")
        else:
            if volumes:
                problems.extend(_grid_problems(volumes[0], label, case=case.case_id, what="label"))
            values = {int(v) for v in np.unique(label.array)}
            if declared is not None and (extra := sorted(values - declared)):
                problems.append(f"case {case.case_id!r}: label holds value {', '.join(map(str, extra[:5]))}, which "
                                f"dataset.json does not declare (labels {', '.join(map(str, sorted(declared)))})")
    return channels, problems


def _grid_problems(image: Volume, other: Volume, *, case: str, what: str) -> list[str]:
    """How ``other`` (a label or channel file) lies off ``image``'s grid: shape, spacing, origin, direction."""
    if image.shape[:3] != other.shape[:3]:
        return [f"case {case!r}: {what} shape {other.shape[:3]} differs from the image's {image.shape[:3]}"]
    facts = []
    for vol in (image, other):
        spacing = np.linalg.norm(vol.affine[:3, :3], axis=0)
        facts.append({"spacing": spacing, "origin": vol.affine[:3, 3], "direction": vol.affine[:3, :3] / spacing})
    return [f"case {case!r}: {what} {name} {tuple(np.round(facts[1][name], 4).ravel().tolist())} differs from the "
            f"image's {tuple(np.round(facts[0][name], 4).ravel().tolist())}"
            for name in ("spacing", "origin", "direction")
            if not np.allclose(facts[0][name], facts[1][name], atol=GRID_ATOL)]


def _channel_problems(ds: Dataset, counts: list[int | None]) -> list[str]:
    """Cases whose channel count differs from dataset.json's declared channels, else from most cases'."""
    known = [c for c in counts if c is not None]
    if not known:
        return []
    meta_path = Path(ds.root) / "dataset.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    names = (meta.get("channel_names") or meta.get("modality")) if isinstance(meta, dict) else None
    expected, source = (len(names), "dataset.json declares") if isinstance(names, dict) and names else \
        (Counter(known).most_common(1)[0][0], "most cases have")
    return [f"case {case.case_id!r}: {n} image channel(s), but {source} {expected}"
            for case, n in zip(ds.cases, counts, strict=True) if n is not None and n != expected]


def _orphan_labels(ds: Dataset) -> list[str]:
    """Label files in a labels folder (apart from the images) that no case uses."""
    used = {Path(c.label).resolve() for c in ds.cases if c.label is not None}
    image_dirs = {Path(p).parent.resolve() for c in ds.cases for p in c.images}
    folders = {p.parent for p in used} - image_dirs
    return [f"label {str(path)!r} has no image (no case {strip_suffix(path)!r}); add its image or remove it"
            for folder in sorted(folders) for path in sorted(folder.iterdir())
            if path.is_file() and volume_suffix(path) and not path.name.startswith(".") and path.resolve() not in used]
