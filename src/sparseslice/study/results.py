"""The study's tables: every run x case x label x metric, and one row per run.

``results.csv`` (or ``.parquet``) is tidy: columns ``run_id``, the run's factors (``model,
budget, rho, volumes, strategy, block_fraction, interpolation, border_slices, schedule,
mask_channel, seed, baseline``), then ``case, label, region, metric, value`` (``label`` an integer; ``region``
``label`` or ``foreground``, the union of labels, with ``label`` 0). ``runs.csv`` has one
row per run of the spec with its status (``done, failed, interrupted, pending``), its error
line and the facts the run recorded (volumes annotated, slices per volume, training time), among
them :data:`~sparseslice.study.store.TRAINING_FACTS`: ``gradient_steps``, ``samples_seen``,
``planned_steps``, ``cut_short`` and ``cut_short_reason``. A run that stopped short of its planned
steps (a ``max_minutes`` cap, early stopping), or did not finish (``interrupted``, ``failed``:
the reason is its status), has ``cut_short`` true and is not to be compared with the others.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pandas as pd

from sparseslice.atomic import atomic_path, write_text
from sparseslice.errors import UserError
from sparseslice.study.spec import RunSpec, StudySpec, parse_spec
from sparseslice.study.store import METRIC_COLUMNS, TRAINING_FACTS, StudyStore

FACTOR_COLUMNS = ["model", "budget", "rho", "volumes", "strategy", "block_fraction", "interpolation",
                  "border_slices", "schedule", "mask_channel", "seed", "baseline"]
RESULT_COLUMNS = ["run_id", *FACTOR_COLUMNS, *METRIC_COLUMNS]


def load_study(root: str | os.PathLike[str]) -> tuple[StudyStore, StudySpec]:
    """Open an existing study folder and its spec."""
    store = StudyStore(root)
    if not store.root.is_dir():
        raise UserError(f"study {str(store.root)!r} does not exist; pass the -o folder of sparseslice study run")
    record = store.spec_record()
    return store, parse_spec(record["spec"])


def _factors(run: RunSpec) -> dict[str, object]:
    d = run.to_dict()
    return {**{k: d[k] for k in FACTOR_COLUMNS if k in d}, "baseline": run.baseline}


def collect_results(store: StudyStore, spec: StudySpec) -> pd.DataFrame:
    """Tidy table of every finished run of ``spec``: factors, case, label, metric, value."""
    frames = []
    for run in spec.runs():
        if store.status(run) != "done":
            continue
        table = store.metrics(run.run_id)
        for key, value in _factors(run).items():
            table[key] = value
        table["run_id"] = run.run_id
        frames.append(table)
    if not frames:
        return pd.DataFrame(columns=RESULT_COLUMNS)
    return pd.concat(frames, ignore_index=True)[RESULT_COLUMNS]


def run_table(store: StudyStore, spec: StudySpec) -> pd.DataFrame:
    """One row per run: factors, status, error line and the facts the run recorded."""
    rows = []
    for run in spec.runs():
        status = store.status(run)
        info = store.result(run.run_id) if status == "done" else {}
        info = {k: v for k, v in info.items() if not isinstance(v, dict | list)}
        if status in ("interrupted", "failed"):
            info.update(cut_short=True, cut_short_reason=status)
        elif status == "pending":
            info.update(cut_short=False, cut_short_reason="")
        rows.append({"run_id": run.run_id, **_factors(run), "status": status,
                     "error": store.error(run.run_id) or "", **info})
    table = pd.DataFrame(rows)
    for column in TRAINING_FACTS:  # always there, so a reader can filter on cut_short
        if column not in table:
            table[column] = pd.NA
    return table


#: Formats of the tidy results table (``write_results``).
RESULTS_FORMATS = ("csv", "parquet")


def check_results_format(format: str) -> str:
    """``csv``, or ``parquet`` when pyarrow is installed."""
    if format not in RESULTS_FORMATS:
        raise UserError(f"results format must be {' or '.join(RESULTS_FORMATS)}, got {format!r}")
    if format == "parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise UserError("results format is parquet but pyarrow is not installed, got 'parquet'; "
                            "pip install pyarrow or use csv") from None
    return format


def write_results(store: StudyStore, spec: StudySpec, *, format: str = "csv") -> Path:
    """Write ``results.csv`` (or ``results.parquet``) and ``runs.csv`` atomically."""
    check_results_format(format)
    table = collect_results(store, spec)
    write_text(store.root / "runs.csv", run_table(store, spec).to_csv(index=False))
    if format == "parquet":
        path = store.root / "results.parquet"
        with atomic_path(path) as tmp:
            table.to_parquet(tmp, index=False)
        return path
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    return write_text(store.root / "results.csv", buffer.getvalue())


def read_results(root: str | os.PathLike[str]) -> pd.DataFrame:
    """The tidy results of a study folder (parquet if present, else CSV)."""
    root = Path(root)
    if (root / "results.parquet").is_file():
        return pd.read_parquet(root / "results.parquet")
    if (root / "results.csv").is_file():
        return pd.read_csv(root / "results.csv", dtype={"case": str, "label": "int64"})
    raise UserError(f"study {str(root)!r} has no results table; run sparseslice study run first")
