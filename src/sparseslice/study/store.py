"""The study folder: one sub-folder per run, written so that a study can be resumed.

Layout::

    STUDY/study.json               the resolved spec and its fingerprint
    STUDY/runs/<run_id>/config.json    the run's resolved configuration
    STUDY/runs/<run_id>/...            what the run wrote (plan, sparse labels, checkpoint, predictions)
    STUDY/runs/<run_id>/metrics.csv    tidy table: case, label, region, metric, value
    STUDY/runs/<run_id>/result.json    facts about the run (volumes, slices, training time, gradient steps,
                                       cut_short...)
    STUDY/runs/<run_id>/error.json     only for a run that crashed: the error and its traceback
    STUDY/runs/<run_id>/done.json      written last: the run is finished

A run counts as finished only when ``done.json`` exists and records the hash of the same
configuration; anything else (no marker, an error, another configuration) is redone from an
empty folder. Every file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sparseslice.atomic import write_json, write_text
from sparseslice.errors import UserError
from sparseslice.locking import LOCK_FILE
from sparseslice.study.spec import RunSpec, StudySpec

STUDY_FILE = "study.json"
DONE_FILE = "done.json"
ERROR_FILE = "error.json"
METRICS_FILE = "metrics.csv"
RESULT_FILE = "result.json"
CONFIG_FILE = "config.json"
METRIC_COLUMNS = ["case", "label", "region", "metric", "value"]
#: Facts every finished run records about its training (``result.json``, ``done.json``, ``runs.csv``):
#: steps taken and planned, samples drawn, and whether (and why) it stopped short of its plan.
TRAINING_FACTS = ("gradient_steps", "samples_seen", "planned_steps", "cut_short", "cut_short_reason")


def tidy_labels(table: pd.DataFrame) -> pd.DataFrame:
    """``label`` as integers and a ``region`` column (see :func:`sparseslice.metrics.label_metrics`).

    Tables written before the ``region`` column (labels ``"1"``, ``"2"``... and ``"fg"`` for the
    union of foreground) are converted: ``"fg"`` becomes label 0, region ``foreground``.
    """
    from sparseslice.metrics import REGION_FOREGROUND, REGION_LABEL

    if "region" in table.columns:
        return table.astype({"label": "int64"})
    fg = table["label"].astype(str) == "fg"
    out = table.assign(region=np.where(fg, REGION_FOREGROUND, REGION_LABEL),
                       label=np.where(fg, "0", table["label"].astype(str)))
    return out.astype({"label": "int64"})


def config_hash(config: dict[str, Any]) -> str:
    """Hash of a run's configuration, leaving out how it was executed (threads, devices)."""
    kept = {k: v for k, v in config.items() if k != "execution"}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunOutput:
    """What a run function returns: the tidy metrics table and facts about the run."""

    metrics: pd.DataFrame
    info: dict[str, Any]


class StudyStore:
    """Reads and writes the files of one study folder."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    # --- the study ---------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike[str], spec: StudySpec, *, force: bool = False) -> StudyStore:
        """Create the study folder, or reopen it for the same study.

        A folder that holds another study (another fingerprint) is refused unless ``force``;
        with ``force`` the spec is replaced, and runs whose configuration did not change are
        still reused.
        """
        store = cls(root)
        if store.root.exists() and not store.root.is_dir():
            raise UserError(f"output {str(store.root)!r} is a file; pass a folder for the study")
        record = {"fingerprint": spec.fingerprint(), "spec": spec.to_dict(),
                  "runs": [r.run_id for r in spec.runs()]}
        path = store.root / STUDY_FILE
        if path.is_file():
            old = json.loads(path.read_text())
            if old.get("fingerprint") != record["fingerprint"] and not force:
                raise UserError(f"output {str(store.root)!r} holds a different study "
                                f"({old.get('spec', {}).get('name', '?')!r}, fingerprint {old.get('fingerprint')}); "
                                "pass another -o folder, or --force to replace its spec (unchanged runs are kept)")
        elif store.root.is_dir() and any(p.name != LOCK_FILE for p in store.root.iterdir()):
            if not force:
                raise UserError(f"output {str(store.root)!r} is not empty and holds no study.json; "
                                "pass an empty or new folder, or --force to use it anyway")
        write_json(path, record)
        return store

    def spec_record(self) -> dict[str, Any]:
        path = self.root / STUDY_FILE
        if not path.is_file():
            raise UserError(f"study {str(self.root)!r} has no {STUDY_FILE}; pass a folder written by "
                            "sparseslice study run")
        return json.loads(path.read_text())

    # --- runs --------------------------------------------------------------------------
    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def is_done(self, run_id: str, config: dict[str, Any]) -> bool:
        done = self.run_dir(run_id) / DONE_FILE
        if not done.is_file():
            return False
        try:
            return json.loads(done.read_text()).get("config_hash") == config_hash(config)
        except json.JSONDecodeError:
            return False

    def prepare(self, run_id: str, config: dict[str, Any]) -> Path:
        """Empty the run folder (leftovers of an interrupted or failed try) and write its config."""
        folder = self.run_dir(run_id)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        write_json(folder / CONFIG_FILE, config)
        return folder

    def finish(self, run_id: str, config: dict[str, Any], output: RunOutput, *, seconds: float) -> None:
        """Write the run's metrics and facts, then the ``done`` marker (last)."""
        folder = self.run_dir(run_id)
        table = tidy_labels(output.metrics) if "label" in output.metrics.columns else output.metrics
        missing = [c for c in METRIC_COLUMNS if c not in table.columns]
        if missing:
            raise ValueError(f"run function returned metrics without columns {missing}")
        write_text(folder / METRICS_FILE, table[METRIC_COLUMNS].to_csv(index=False))
        write_json(folder / RESULT_FILE, {**output.info, "seconds": round(seconds, 2)})
        facts = {k: output.info[k] for k in TRAINING_FACTS if k in output.info}
        write_json(folder / DONE_FILE, {"config_hash": config_hash(config), "finished": time.time(),
                                        "seconds": round(seconds, 2), **facts})

    def record_error(self, run_id: str, exc: BaseException) -> str:
        """Keep a crashed run's error beside it; returns the one-line message."""
        line = f"{type(exc).__name__}: {exc}".splitlines()[0] if str(exc) else type(exc).__name__
        write_json(self.run_dir(run_id) / ERROR_FILE, {
            "error": line, "traceback": "".join(traceback.format_exception(exc)), "time": time.time()})
        return line

    def status(self, run: RunSpec) -> str:
        """``done``, ``failed``, ``interrupted`` (started, not finished) or ``pending``."""
        folder = self.run_dir(run.run_id)
        if (folder / DONE_FILE).is_file():
            return "done"
        if (folder / ERROR_FILE).is_file():
            return "failed"
        return "interrupted" if folder.exists() else "pending"

    def error(self, run_id: str) -> str | None:
        path = self.run_dir(run_id) / ERROR_FILE
        return json.loads(path.read_text())["error"] if path.is_file() else None

    def metrics(self, run_id: str) -> pd.DataFrame:
        return tidy_labels(pd.read_csv(self.run_dir(run_id) / METRICS_FILE, dtype={"case": str, "label": str}))

    def result(self, run_id: str) -> dict[str, Any]:
        path = self.run_dir(run_id) / RESULT_FILE
        return json.loads(path.read_text()) if path.is_file() else {}
