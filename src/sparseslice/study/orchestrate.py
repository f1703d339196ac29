"""A whole study: expand the grid, skip finished runs, hand the rest to an executor, collect results.

One run is :mod:`sparseslice.study.pipeline`; where runs execute is :mod:`sparseslice.study.executors`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseslice.errors import UserError
from sparseslice.locking import holds, remove_stale
from sparseslice.study.executors import (
    EXECUTORS,
    Outcome,
    RunFunction,
    Task,
    run_local,
    run_lock_name,
    run_ray,
    threads_per_worker,
)
from sparseslice.study.results import check_results_format, write_results
from sparseslice.study.spec import StudySpec, run_config
from sparseslice.study.store import StudyStore


@dataclass
class StudySummary:
    """What one ``run_study`` call did."""

    root: Path
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed


@holds("out", what="study folder")
def run_study(spec: StudySpec, out: str | os.PathLike[str], *, run_fn: RunFunction | None = None,
              executor: str = "local", workers: int = 1, address: str | None = None, force: bool = False,
              results_format: str = "csv", progress: bool = True) -> StudySummary:
    """Run every unfinished run of ``spec`` into the study folder ``out``.

    Parameters
    ----------
    spec : StudySpec
        The study (see :func:`~sparseslice.study.spec.load_spec`).
    out : path
        Study folder. Finished runs found there are skipped; interrupted or failed runs are
        redone. A folder holding another study is refused unless ``force``. The folder is
        locked while the study runs (:mod:`sparseslice.locking`): a second process is refused,
        naming the holder; the lock a killed process left is taken over.
    run_fn : callable, optional
        ``run_fn(run, config, run_dir) -> RunOutput``; defaults to the full pipeline
        (:func:`~sparseslice.study.pipeline.run_pipeline`), after checking the spec against the
        dataset. Tests pass a fast fake.
    executor : {"local", "ray"}
        Where runs execute.
    workers : int
        Local worker processes (torch threads are split among them).
    address : str, optional
        Ray cluster address (``executor="ray"``); none starts a local Ray instance.
    force : bool
        Replace the spec of a folder that holds another study.
    results_format : {"csv", "parquet"}
        Format of the study's tidy results table.
    progress : bool
        Show a progress bar.

    Returns
    -------
    StudySummary
        Runs executed, skipped (already finished) and failed (with their error line). Failed
        runs do not stop the grid.
    """
    if executor not in EXECUTORS:
        raise UserError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}; e.g. --workers 2")
    if address is not None and executor != "ray":
        raise UserError(f"address only applies to --executor ray, got address {address!r}; add --executor ray")
    check_results_format(results_format)
    if run_fn is None:
        from sparseslice.study.pipeline import preflight, run_pipeline

        preflight(spec)
        run_fn = run_pipeline
    store = StudyStore.open(out, spec, force=force)
    threads = int(spec.resources["cpus"]) if executor == "ray" else threads_per_worker(workers)
    summary = StudySummary(store.root)
    tasks = []
    for run in spec.runs():
        config = run_config(spec, run, threads=threads, executor=executor)
        if store.is_done(run.run_id, config):
            summary.skipped.append(run.run_id)
            # a worker killed after done.json but before removing its lock left the file: remove it (if not held)
            remove_stale(store.root / "runs", name=run_lock_name(run.run_id))
        else:
            tasks.append(Task(run, config, store.root))
    if executor == "ray":
        outcomes = run_ray(tasks, run_fn, address=address, cpus=spec.resources["cpus"],
                           gpus=spec.resources["gpus"])
    else:
        outcomes = run_local(tasks, run_fn, workers=workers)
    try:
        _consume(outcomes, summary, total=len(tasks), progress=progress)
    finally:
        write_results(store, spec, format=results_format)
    return summary


def _consume(outcomes: Any, summary: StudySummary, *, total: int, progress: bool) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("[bold]study[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, disable=not progress, transient=False) as bar:
        job = bar.add_task("", total=total)
        for outcome in outcomes:
            _record(outcome, summary)
            note = "" if outcome.status == "done" else f"[red]{outcome.run_id} failed[/red]"
            bar.update(job, advance=1, description=note or outcome.run_id)


def _record(outcome: Outcome, summary: StudySummary) -> None:
    summary.ran.append(outcome.run_id)
    if outcome.status != "done":
        summary.failed[outcome.run_id] = outcome.message
