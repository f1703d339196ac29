"""``sparseslice info``: what a dataset holds, read fast (headers for images, labels in full)."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sparseslice.datasets import Case, dataset_slice_axis, discover_dataset
from sparseslice.errors import UserError
from sparseslice.io import check_axis, default_slice_axis, read_header, read_label
from sparseslice.sparse import structure_slices


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


@dataclass(frozen=True)
class DatasetDescription:
    root: Path
    layout: str
    axis: int
    cases: tuple[CaseDescription, ...]
    label_names: dict[int, str]

    @property
    def label_values(self) -> tuple[int, ...]:
        values: set[int] = set()
        for c in self.cases:
            values.update(c.labels or ())
        return tuple(sorted(values))


def describe_case(case: Case, *, axis: int | None = None) -> CaseDescription:
    """Header facts of a case plus, when labelled, its label values and structure slices."""
    head = read_header(case.images[0])
    shape3 = head.shape[:3]
    if case.label is not None:
        label = read_label(case.label)
        if label.shape != shape3:
            raise UserError(f"case {case.case_id!r}: label shape must match the image, got "
                            f"{label.shape} vs {shape3}; resample the label onto the image grid")
        if not np.allclose(label.affine, head.affine, atol=1e-3):
            raise UserError(f"case {case.case_id!r}: label affine must match the image, got "
                            f"spacing {label.spacing} vs {head.spacing}; resample the label")
    case_axis = default_slice_axis(head.spacing, shape3) if axis is None else check_axis(axis)
    labels = slices = None
    if case.label is not None:
        labels = tuple(int(v) for v in np.unique(label.array))
        slices = structure_slices(label.array, axis=case_axis)
    channels = len(case.images) if len(case.images) > 1 else (head.shape[3] if len(head.shape) > 3 else 1)
    return CaseDescription(case.case_id, shape3, tuple(round(s, 4) for s in head.spacing),
                           channels, str(head.dtype), labels, case_axis, slices)


def describe_dataset(data: str | os.PathLike[str], *, axis: int | None = None,
                     require_labels: bool = False, workers: int = 4) -> DatasetDescription:
    """Describe every case of a dataset (threads overlap file decompression)."""
    ds = discover_dataset(data, require_labels=require_labels)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        first = list(pool.map(lambda c: describe_case(c, axis=axis), ds.cases))
    chosen = axis if axis is not None else dataset_slice_axis([c.shape for c in first],
                                                              [c.spacing for c in first])
    if axis is None and any(c.axis != chosen for c in first):
        # recount structure slices along the single dataset axis
        with ThreadPoolExecutor(max_workers=workers) as pool:
            first = list(pool.map(lambda c: describe_case(c, axis=chosen), ds.cases))
    return DatasetDescription(Path(data), ds.layout, chosen, tuple(first), ds.label_names)


def render_description(desc: DatasetDescription, console: Console, *, rows: int = 0) -> None:
    """Print the per-case table and a summary."""
    table = Table(title=f"{desc.root} ({desc.layout} layout)", show_lines=False)
    width = max((len(c.case_id) for c in desc.cases), default=4)
    for col in ("case", "shape", "spacing (mm)", "ch", "dtype", "labels", "axis", "structure slices"):
        table.add_column(col, justify="right" if col in ("ch", "axis", "structure slices") else "left",
                         no_wrap=col == "case", min_width=width if col == "case" else None)
    shown = desc.cases if rows <= 0 else desc.cases[:rows]
    for c in shown:
        table.add_row(c.case_id, "x".join(map(str, c.shape)), "x".join(f"{s:g}" for s in c.spacing),
                      str(c.channels), c.dtype,
                      "-" if c.labels is None else ",".join(map(str, c.labels)), str(c.axis),
                      "-" if c.structure_slices is None else str(c.structure_slices))
    console.print(table)
    if len(shown) < len(desc.cases):
        console.print(f"... {len(desc.cases) - len(shown)} more cases (--rows 0 shows all)")
    shapes = np.array([c.shape for c in desc.cases])
    labelled = sum(c.labels is not None for c in desc.cases)
    names = ", ".join(f"{v}={desc.label_names.get(v, '?')}" for v in desc.label_values)
    sl = [c.structure_slices for c in desc.cases if c.structure_slices is not None]
    lines = [
        f"[bold]{len(desc.cases)} cases ({labelled} labelled)[/bold], {desc.layout} layout",
        f"shapes {'x'.join(map(str, shapes.min(axis=0)))} to {'x'.join(map(str, shapes.max(axis=0)))}"
        " (per-axis min to max)",
        f"labels {{{', '.join(map(str, desc.label_values))}}} ({names})",
        f"slice axis {desc.axis}",
    ]
    if sl:
        lines.append(f"structure slices per case {min(sl)}-{max(sl)} (median {int(np.median(sl))})")
    for line in lines:
        console.print(line, soft_wrap=True)
