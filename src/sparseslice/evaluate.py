"""Evaluate a folder of predicted label maps against references: tidy per-case metrics.

``evaluate_folder`` returns one row per case, label and metric (columns ``case, label,
region, metric, value, note``); ``summarize`` turns that into the per-label table the CLI prints.
References may be sparse: a label file with a ``.sparse.json`` sidecar, or one holding the
ignore value (the one nnU-Net's ``dataset.json`` declares as ``"ignore"``, else 255), is
scored on its annotated slices only (see :func:`sparseslice.metrics.mask_metrics` for what
that means for each metric). A slice with some ignored voxels is not annotated, so it is not
scored at all: per-slice metrics (``assd2d``) need whole slices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.datasets import discover_dataset, slice_axis_of
from sparseslice.errors import UserError
from sparseslice.io import Volume, check_axis, read_label, strip_suffix, volume_suffix
from sparseslice.metrics import METRICS, REGION_FOREGROUND, label_metrics
from sparseslice.progress import track
from sparseslice.sparse import ignore_axis, read_label_file

COLUMNS = ("case", "label", "region", "metric", "value", "note")
#: Keys of the summary JSON :func:`write_metrics` writes beside the table.
SUMMARY_KEYS = ("missing", "axis", "summary")


def prediction_files(pred_dir: Path) -> dict[str, Path]:
    """``{case: file}`` for the volume files directly inside ``pred_dir``."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise UserError(f"prediction folder {str(pred_dir)!r} does not exist; pass the -o folder of "
                        "sparseslice predict")
    return {strip_suffix(p): p for p in sorted(pred_dir.iterdir())
            if p.is_file() and not p.name.startswith(".") and volume_suffix(p)}


def reference_files(ref: Path) -> dict[str, Path]:
    """``{case: label file}`` of a reference: a dataset with labels, or a folder of label files."""
    ds = discover_dataset(ref)
    labelled = {c.case_id: c.label for c in ds.cases if c.label is not None}
    if labelled:
        return labelled
    # a bare folder of label maps: discover_dataset sees them as images
    return {c.case_id: c.images[0] for c in ds.cases if len(c.images) == 1}


def _reference_ignore(ref: Path) -> int | None:
    """The ignore label a reference dataset's ``dataset.json`` declares (None without one)."""
    return discover_dataset(ref).ignore_value if (Path(ref) / "dataset.json").is_file() else None


def _reference_labels(ref: Path) -> list[int]:
    meta = (Path(ref) / "dataset.json") if Path(ref).is_dir() else None
    if meta is None or not meta.is_file():
        return []
    names = discover_dataset(ref).label_names
    return sorted(v for v in names if v > 0)


def load_reference(path: Path, *, axis: int, ignore_value: int | None = None
                   ) -> tuple[Volume, np.ndarray | None, int]:
    """Read a reference label; returns (volume with unknown voxels set to 0, annotated or None, axis).

    A sidecar gives the annotated slices and axis; without one, a label holding the ignore
    value (``ignore_value``: the dataset's declared one, else 255) is decoded along ``axis``;
    otherwise the label is dense (``annotated`` is None).
    """
    sparse, vol = read_label_file(path, axis=axis, ignore_value=ignore_value)
    if sparse is None:
        return vol, None, axis
    return vol.like(sparse.label), sparse.annotated, sparse.axis


def check_pair(pred: Volume, ref: Volume, *, case: str) -> None:
    """Refuse a prediction whose shape or spacing differs from its reference (names the case)."""
    if pred.shape != ref.shape:
        raise UserError(f"case {case!r}: prediction shape must match the reference, got {pred.shape} vs "
                        f"{ref.shape}; predict on the reference's image grid (sparseslice predict does)")
    if not np.allclose(pred.spacing, ref.spacing, rtol=1e-3, atol=1e-4):
        shown = tuple(round(s, 4) for s in pred.spacing)
        raise UserError(f"case {case!r}: prediction spacing must match the reference, got {shown} vs "
                        f"{tuple(round(s, 4) for s in ref.spacing)}; resample the prediction onto the reference")


def check_declared(pred: Volume, *, case: str, declared: Sequence[int]) -> None:
    """Refuse a prediction holding a label value the reference's ``dataset.json`` does not declare.

    Such a value would be scored as nothing (a class the table has no row for) or counted into
    the foreground silently; ``declared`` are the foreground values, background 0 is implied.
    """
    allowed = {0, *(int(v) for v in declared)}
    extra = [int(v) for v in np.unique(pred.array) if int(v) not in allowed]
    if extra:
        shown = ", ".join(map(str, extra[:5])) + (" ..." if len(extra) > 5 else "")
        raise UserError(f"case {case!r}: prediction holds label value {shown}, which the reference's dataset.json "
                        f"does not declare (labels {', '.join(map(str, sorted(allowed)))}); predict with a model "
                        "trained on these labels, or pass the reference the prediction was made for")


def evaluate_case(pred: Volume, ref: Volume, *, case: str, axis: int, labels: Sequence[int] | None = None,
                  annotated: np.ndarray | None = None) -> list[dict[str, object]]:
    """Tidy rows for one case; ``labels`` defaults to the foreground values in either map."""
    check_pair(pred, ref, case=case)
    if pred.array.ndim != 3:
        raise UserError(f"case {case!r}: prediction must be a 3D label map, got shape {pred.shape}; "
                        "pass label maps, not probabilities")
    if labels is None:
        labels = sorted(int(v) for v in np.union1d(np.unique(pred.array), np.unique(ref.array)) if v > 0)
    rows = label_metrics(pred.array, ref.array, spacing=ref.spacing, axis=axis, labels=labels,
                         annotated=annotated)
    return [{"case": case, **row} for row in rows]


def evaluate_folder(pred_dir: Path, ref: Path, *, cases: Sequence[str] | None = None, allow_missing: bool = False,
                    axis: int | None = None, progress: bool = True) -> pd.DataFrame:
    """Score every reference case that has a prediction; tidy DataFrame.

    Parameters
    ----------
    pred_dir : Path
        Folder of predicted label maps named ``<case>.nii.gz`` (or any volume suffix).
    ref : Path
        Reference labels: a dataset ``discover_dataset`` reads (its labels are used), or a
        folder of label files. Sidecars ``<case>.sparse.json`` mark sparse references.
    cases : sequence of str, optional
        Cases to score (default: every reference case).
    allow_missing : bool
        If False (default) a reference case without a prediction raises :class:`UserError`
        naming it before anything is computed; if True it is skipped and listed in
        ``df.attrs["missing"]``.
    axis : int, optional
        Slice axis for ``assd2d`` and for decoding sidecar-less sparse references
        (default: the dataset's slice axis, from the reference headers; with a declared
        ignore label, the axis along which its slices are whole).
    progress : bool
        Show a progress bar.

    Returns
    -------
    pandas.DataFrame
        Columns ``case, label, region, metric, value, note``; ``label`` is an integer:
        ``1``, ``2``... with ``region`` ``"label"``, and ``0`` with ``region`` ``"foreground"``
        for the union of every foreground label; ``metric`` one of :data:`sparseslice.metrics.METRICS`;
        ``note`` explains NaN values (``"empty pred"``, ``"sparse ref"``...). Labels scored
        are those of the reference's ``dataset.json`` if any, else those present in the case.

    Raises
    ------
    UserError
        A prediction holds a label value the reference's ``dataset.json`` does not declare
        (:func:`check_declared`), among the usual refusals (missing cases, mismatched grids).
    """
    refs = reference_files(Path(ref))
    preds = prediction_files(Path(pred_dir))
    if cases is not None:
        unknown = [c for c in cases if c not in refs]
        if unknown:
            raise UserError(f"case {unknown[0]!r} is not in the reference {str(ref)!r}; pick cases from "
                            f"{', '.join(sorted(refs)[:5])}{' ...' if len(refs) > 5 else ''}")
        refs = {c: refs[c] for c in cases}
    missing = [c for c in refs if c not in preds]
    if missing and not allow_missing:
        raise UserError(f"case {missing[0]!r} has no prediction in {str(pred_dir)!r} ({len(missing)} missing: "
                        f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); predict it or pass "
                        "--allow-missing")
    ignore = _reference_ignore(Path(ref))
    if axis is None:
        axis = slice_axis_of(refs.values()) if refs else 0
        if ignore is not None:
            axis = ignore_axis(refs.values(), ignore_value=ignore, default=axis)
    axis = check_axis(axis)
    labels = _reference_labels(Path(ref)) or None
    todo = [c for c in refs if c in preds]
    rows: list[dict[str, object]] = []
    for case in track(todo, "evaluating", progress=progress):
        ref_vol, annotated, case_axis = load_reference(refs[case], axis=axis, ignore_value=ignore)
        pred_vol = read_label(preds[case])
        if labels is not None:
            check_declared(pred_vol, case=case, declared=labels)
        rows.extend(evaluate_case(pred_vol, ref_vol, case=case, axis=case_axis, labels=labels, annotated=annotated))
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df.attrs["missing"] = missing
    df.attrs["axis"] = axis
    return df


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per label and metric: n (finite values), nan count, mean, std, median, 5th percentile.

    NaN values (empty masks, sparse references) are excluded from the statistics and counted
    in ``nan``; there are no infinite values to average.
    """
    order = {m: i for i, m in enumerate(METRICS)}
    out = []
    for (label, region, metric), group in df.groupby(["label", "region", "metric"], sort=False):
        v = group["value"].to_numpy(dtype=float)
        ok = v[np.isfinite(v)]
        stats = {"label": label, "region": region, "metric": metric, "n": int(ok.size), "nan": int(v.size - ok.size)}
        if ok.size:
            stats.update(mean=float(ok.mean()), std=float(ok.std(ddof=1)) if ok.size > 1 else 0.0,
                         median=float(np.median(ok)), p5=float(np.percentile(ok, 5)))
        else:
            stats.update(mean=math.nan, std=math.nan, median=math.nan, p5=math.nan)
        out.append(stats)
    table = pd.DataFrame(out, columns=["label", "region", "metric", "n", "nan", "mean", "std", "median", "p5"])
    if table.empty:
        return table
    table["_l"] = list(zip(table["region"] == REGION_FOREGROUND, table["label"], strict=True))
    table["_m"] = table["metric"].map(lambda m: order.get(m, len(order)))
    return table.sort_values(["_l", "_m"]).drop(columns=["_l", "_m"]).reset_index(drop=True)


def metrics_paths(path: str | Path) -> tuple[Path, Path]:
    """``(table, summary)``: the tidy CSV and the JSON beside it that ``-o path`` names.

    ``NAME.json`` names the pair ``NAME.csv`` + ``NAME.json`` (as ``plan -o`` does); any other
    name is the table itself, with ``<stem>.json`` beside it.
    """
    path = Path(path)
    if path.suffix.lower() == ".json":
        return path.with_suffix(".csv"), path
    return path, path.with_suffix(".json")


def is_written_metrics(path: str | Path) -> bool:
    """Whether ``path`` is a table or summary :func:`write_metrics` wrote (its header, its keys)."""
    from sparseslice.outputs import first_line_is, json_object_with

    path = Path(path)
    if path.suffix.lower() == ".json":
        return json_object_with(path, SUMMARY_KEYS)
    return first_line_is(path, ",".join(COLUMNS))


def check_metrics_out(path: str | Path, *, inputs: Sequence[str | Path]) -> None:
    """Refuse ``-o path`` before anything is scored: a folder, an input, or a file that is not an
    earlier result of ``evaluate`` (see :func:`sparseslice.outputs.check_file_output`)."""
    from sparseslice.outputs import check_file_output

    check_file_output(metrics_paths(path), command="evaluate", ours=is_written_metrics, inputs=inputs,
                      given=path, argument="--out")


def write_metrics(df: pd.DataFrame, path: Path) -> Path:
    """Write the tidy frame as CSV atomically, with the summary JSON beside it (:func:`metrics_paths`);
    returns the CSV's path.

    Both or neither: when the JSON cannot be written the CSV is removed, and so is an earlier
    JSON, which would not describe the table any more."""
    from sparseslice.atomic import atomic_path, write_text

    table, summary_path = metrics_paths(path)
    with atomic_path(table) as tmp:
        df.to_csv(tmp, index=False)
    summary = summarize(df)
    record = {"missing": list(df.attrs.get("missing", [])), "axis": df.attrs.get("axis"),
              "summary": json.loads(summary.to_json(orient="records"))}
    try:
        write_text(summary_path, json.dumps(record, indent=2) + "\n")
    except BaseException:
        table.unlink(missing_ok=True)  # the table without its summary is no result
        summary_path.unlink(missing_ok=True)
        raise
    return table


def render_summary(summary: pd.DataFrame, console: object, *, title: str = "metrics") -> None:
    """Print the summary as a Rich table (mm for distances)."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("label", "metric", "n", "nan", "mean", "std", "median", "p5"):
        table.add_column(name, justify="left" if name in ("label", "metric") else "right")
    for row in summary.itertuples(index=False):
        name = "foreground" if row.region == REGION_FOREGROUND else str(row.label)
        table.add_row(name, str(row.metric), str(row.n), str(row.nan),
                      *(_fmt(getattr(row, k)) for k in ("mean", "std", "median", "p5")))
    console.print(table)  # type: ignore[attr-defined]


def _fmt(value: float) -> str:
    return "nan" if not np.isfinite(value) else f"{value:.4f}"
