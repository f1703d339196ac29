"""Executors: where the runs of a study execute.

``local`` runs them in N worker processes on this machine (torch threads split among the
workers); ``ray`` sends one Ray task per run with the spec's CPU/GPU request, to a local Ray
instance or a cluster (``address``). With Ray on several machines the study folder must be
on a file system every node sees.

Both call :func:`execute` for each run: it empties the run folder, calls the run function,
writes the results and the ``done`` marker, or records the error of a run that crashed so
that the grid goes on.

Locks: the process running the study holds the study folder's lock (see
:func:`~sparseslice.study.orchestrate.run_study`); each worker also holds the lock of the run it
writes (``STUDY/runs/.<run_id>.lock``) while it empties and fills that run's folder only. A
worker left running by a study process that was killed thus keeps its run: a new study
process skips it (reported as failed, its folder untouched) instead of emptying it.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparseslice.errors import UserError
from sparseslice.locking import hold
from sparseslice.study.spec import RunSpec
from sparseslice.study.store import RunOutput, StudyStore

EXECUTORS = ("local", "ray")

#: ``run_fn(run, config, run_dir) -> RunOutput``: what one run does.
RunFunction = Callable[[RunSpec, dict[str, Any], Path], RunOutput]


def run_lock_name(run_id: str) -> str:
    """The name of run ``run_id``'s lock file in ``STUDY/runs``."""
    return f".{run_id}.lock"


@dataclass(frozen=True)
class Task:
    """One run to execute: its spec, its resolved configuration, the study folder."""

    run: RunSpec
    config: dict[str, Any]
    root: Path


@dataclass(frozen=True)
class Outcome:
    run_id: str
    status: str  # "done" or "failed"
    message: str = ""
    seconds: float = 0.0


def execute(task: Task, run_fn: RunFunction) -> Outcome:
    """Run one task from an empty folder; record results or the error (never raises ``Exception``).

    ``KeyboardInterrupt`` and ``SystemExit`` still stop the study: the run keeps no
    ``done`` marker and is redone next time.
    """
    store = StudyStore(task.root)
    run_id = task.run.run_id
    try:
        with hold(store.root / "runs", what=f"run {run_id} in", name=run_lock_name(run_id),
                  fix="another process still writes this run; rerun the study once it is gone"):
            return _execute(task, run_fn, store)
    except UserError as exc:  # the run belongs to another process: leave its folder alone
        return Outcome(run_id, "failed", str(exc))


def _execute(task: Task, run_fn: RunFunction, store: StudyStore) -> Outcome:
    run_id = task.run.run_id
    start = time.perf_counter()
    try:
        folder = store.prepare(run_id, task.config)
        output = run_fn(task.run, task.config, folder)
        store.finish(run_id, task.config, output, seconds=time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - a crashed run is recorded and the grid goes on
        return Outcome(run_id, "failed", store.record_error(run_id, exc), time.perf_counter() - start)
    return Outcome(run_id, "done", "", time.perf_counter() - start)


def threads_per_worker(workers: int) -> int:
    """CPU threads each of ``workers`` local processes may use."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def run_local(tasks: Iterable[Task], run_fn: RunFunction, *, workers: int = 1) -> Iterator[Outcome]:
    """Execute tasks in this process (``workers == 1``) or in ``workers`` spawned processes.

    The run function must be importable by name (a module-level function) when
    ``workers > 1``.
    """
    tasks = list(tasks)
    if workers < 1:
        raise UserError(f"workers must be at least 1, got {workers}; e.g. --workers 2")
    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            yield execute(task, run_fn)
        return
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context)
    try:
        with _sigterm_as_exit():
            futures = {pool.submit(execute, task, run_fn): task for task in tasks}
            for future in as_completed(futures):
                task = futures[future]
                try:
                    yield future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                    yield _lost(task, exc)
    except BaseException as exc:
        # Ctrl-C reached the workers already; SIGTERM, an error or the caller closing the generator did not
        _stop_workers(pool, interrupt=not isinstance(exc, KeyboardInterrupt))
        raise
    pool.shutdown(wait=True)


#: Seconds the workers of an interrupted study get to mark their runs interrupted before they are killed.
STOP_GRACE = 10.0


@contextmanager
def _sigterm_as_exit() -> Iterator[None]:
    """While the pool runs, SIGTERM (``kill PID``, a batch scheduler's stop) raises ``SystemExit``
    in the main thread, as Ctrl-C raises ``KeyboardInterrupt``: the study then stops its workers
    instead of dying alone and leaving them running (a signal sent to one process only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_workers(pool: ProcessPoolExecutor, *, interrupt: bool) -> None:
    """Cancel what has not started and stop the workers: with ``interrupt`` they are sent SIGINT
    (each marks its run interrupted, as on Ctrl-C, which reaches them itself); any worker
    still alive after :data:`STOP_GRACE` seconds is killed. Finished runs stay finished, and the
    ones stopped are redone when the study is run again."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public handle before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    if interrupt:
        for process in processes:
            if process.is_alive() and process.pid:
                os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()


def run_ray(tasks: Iterable[Task], run_fn: RunFunction, *, address: str | None = None,
            cpus: float = 1, gpus: float = 0) -> Iterator[Outcome]:
    """Execute one Ray task per run, each asking for ``cpus`` CPUs and ``gpus`` GPUs.

    Uses the Ray instance already initialised in this process if there is one, else
    connects to ``address`` (``None``: start a local instance) and shuts it down at the end.
    """
    try:
        import ray
    except ImportError:
        raise UserError("executor is 'ray' but Ray is not installed, got executor 'ray'; "
                        "pip install 'sparseslice[ray]' or use --executor local") from None
    tasks = list(tasks)
    started = False
    if not ray.is_initialized():
        try:
            options = {"log_to_driver": False} if address else {"include_dashboard": False, "log_to_driver": False}
            ray.init(address=address, **options)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            raise UserError(f"address could not be reached, got {address!r} ({exc}); "
                            "pass a running cluster's address (ray://host:10001 or host:6379) or none") from exc
        started = True
    refs: dict[Any, Task] = {}
    try:
        remote = ray.remote(num_cpus=cpus, num_gpus=gpus, max_retries=0)(execute)
        refs = {remote.remote(task, run_fn): task for task in tasks}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    yield ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - the worker died
                    yield _lost(refs[ref], exc)
    except BaseException:
        for ref in refs:
            ray.cancel(ref, force=True)
        raise
    finally:
        if started:
            ray.shutdown()


def _lost(task: Task, exc: BaseException) -> Outcome:
    store = StudyStore(task.root)
    message = store.record_error(task.run.run_id, RuntimeError(f"worker died: {type(exc).__name__}: {exc}"))
    return Outcome(task.run.run_id, "failed", message)
