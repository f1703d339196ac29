"""``sparseslice info``: what a dataset holds, read fast (headers for images, labels in full)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparseslice.datasets import Case, dataset_slice_axis, discover_dataset
from sparseslice.io import check_axis, check_same_space, default_slice_axis, read_header, read_label
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
    fully annotated), ``annotated`` and ``partial`` (slice indices; with an ignore value only).
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
