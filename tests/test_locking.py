"""Folder locks: a second process is refused naming the holder; a killed holder's lock is taken over."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import sparseslice
from sparseslice.cli import app
from sparseslice.errors import UserError
from sparseslice.locking import LOCK_FILE, hold
from sparseslice.study.orchestrate import run_study
from sparseslice.study.results import read_results
from sparseslice.study.spec import parse_spec
from study_fakes import CASES, ENGINE_SPEC, fake_run

TESTS = Path(__file__).resolve().parent
#: The subprocesses import this checkout's sparseslice, whatever the environment installs.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(sparseslice.__file__).parents[1]), str(TESTS)])}
SPEC = ENGINE_SPEC
#: The ``sparseslice`` command, as installed (``sparseslice.cli:app``).
CLI = [sys.executable, "-c", "from sparseslice.cli import app; app(prog_name='sparseslice')"]
RUN_IDS = {r.run_id for r in parse_spec(SPEC).runs()}


def start_holder(folder: Path, *, name: str = LOCK_FILE) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` (until killed)."""
    script = textwrap.dedent(f"""
        import time
        from sparseslice.locking import hold
        with hold({str(folder)!r}, what="folder", name={name!r}):
            print("locked", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_is_taken_over(tmp_path):
    folder = tmp_path / "study"
    holder = start_holder(folder)
    try:
        with pytest.raises(UserError, match=rf"in use by pid {holder.pid} on host {socket.gethostname()}") as err:
            with hold(folder, what="study folder"):
                pass
        assert "\n" not in str(err.value) and str(folder) in str(err.value)
    finally:
        kill(holder)
    stale = json.loads((folder / LOCK_FILE).read_text())  # SIGKILL left the file; the kernel dropped the lock
    assert stale["pid"] == holder.pid
    with hold(folder, what="study folder") as lock:
        assert lock.previous is not None and lock.previous.pid == holder.pid  # taken over
        assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (folder / LOCK_FILE).exists() and folder.is_dir()


def test_the_lock_is_per_holder_even_in_one_process_and_leaves_no_trace(tmp_path):
    folder = tmp_path / "new" / "run"
    with hold(folder, what="run folder") as lock:
        assert lock.previous is None and folder.is_dir()
        with pytest.raises(UserError, match=rf"run folder '{folder}' is in use by pid {os.getpid()}"):
            with hold(folder, what="run folder"):
                pass
    assert not (tmp_path / "new").exists()  # the folders it made for nothing are gone again
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="must be a folder"):
        with hold(tmp_path / "file"):
            pass


def test_killed_study_leaves_a_stale_lock_and_a_rerun_takes_over_and_runs_each_run_once(tmp_path):
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import time
        from study_fakes import fake_run
        from sparseslice.study.orchestrate import run_study
        from sparseslice.study.spec import parse_spec
        def slow(run, config, run_dir):
            time.sleep(0.2)
            return fake_run(run, config, run_dir)
        run_study(parse_spec({SPEC!r}), {str(out)!r}, run_fn=slow, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, env=ENV)
    deadline = time.time() + 30
    while time.time() < deadline and len(list(out.glob("runs/*/done.json"))) < 2:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in out.glob("runs/*/done.json")}
    assert 2 <= len(finished) < len(RUN_IDS)
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == proc.pid  # stale, left by kill -9
    summary = run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False)
    assert summary.ok and set(summary.skipped) == finished and set(summary.ran) == RUN_IDS - finished
    runs = pd.read_csv(out / "runs.csv")
    assert runs.run_id.is_unique and set(runs.run_id) == RUN_IDS and runs.status.eq("done").all()
    assert not [d for d in (out / "runs").iterdir() if (d / "done.json").exists() and (d / "error.json").exists()]
    assert len(read_results(out)) == len(RUN_IDS) * len(CASES) * 9
    assert not list(out.rglob("*.lock"))  # every lock released


def test_a_run_another_process_still_writes_is_left_alone(tmp_path):
    """A worker of a killed study may still write its run: the rerun skips that run untouched."""
    out = tmp_path / "s"
    busy = "2d_full_seed0"
    (out / "runs" / busy).mkdir(parents=True)
    (out / "runs" / busy / "half.txt").write_text("being written")
    holder = start_holder(out / "runs", name=f".{busy}.lock")
    try:
        summary = run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False, force=True)
    finally:
        kill(holder)
    assert set(summary.failed) == {busy} and f"pid {holder.pid}" in summary.failed[busy]
    assert [p.name for p in (out / "runs" / busy).iterdir()] == ["half.txt"]  # not emptied, no error.json
    again = run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False)
    assert again.ran == [busy] and again.ok


def test_cli_two_study_runs_on_one_folder_one_proceeds_the_other_exits_2_in_one_line(tmp_path):
    spec, out, go = tmp_path / "spec.yaml", tmp_path / "s", tmp_path / "go"
    spec.write_text(yaml.safe_dump(SPEC))
    slow_cli = textwrap.dedent(f"""
        import pathlib, time
        from study_fakes import fake_run
        from sparseslice.study import pipeline as runner
        def slow(run, config, run_dir):  # the first run waits for the test's go
            deadline = time.time() + 30
            while not pathlib.Path({str(go)!r}).exists() and time.time() < deadline:
                time.sleep(0.02)
            return fake_run(run, config, run_dir)
        runner.run_pipeline, runner.preflight = slow, lambda spec: None
        from sparseslice.cli import app
        app(["study", "run", {str(spec)!r}, "-o", {str(out)!r}, "--no-report", "--no-progress"])
    """)
    first = subprocess.Popen([sys.executable, "-c", slow_cli], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=ENV)
    deadline = time.time() + 30
    while time.time() < deadline and not list(out.glob("runs/*/config.json")):
        time.sleep(0.02)  # the first is running its first run
    second = subprocess.run([*CLI, "study", "run", str(spec), "-o", str(out), "--no-report", "--no-progress"],
                            capture_output=True, text=True, env=ENV, timeout=60)
    go.touch()
    stdout, stderr = first.communicate(timeout=60)
    assert first.returncode == 0, stderr
    assert "9 runs finished, 0 already done, 0 failed" in stdout
    assert second.returncode == 2 and not second.stdout
    assert second.stderr.strip().count("\n") == 0 and "Traceback" not in second.stderr
    assert f"study folder '{out}' is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr
    runs = pd.read_csv(out / "runs.csv")
    assert runs.run_id.is_unique and set(runs.run_id) == RUN_IDS and runs.status.eq("done").all()
    assert not list(out.rglob("error.json")) and not list(out.rglob("*.lock"))


def test_a_training_run_folder_is_locked(tmp_path):
    run_dir = tmp_path / "run"
    holder = start_holder(run_dir)
    try:
        result = CliRunner().invoke(app, ["train", str(tmp_path / "data"), "-o", str(run_dir), "--no-progress"])
    finally:
        kill(holder)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert f"run folder '{run_dir}' is in use by pid {holder.pid}" in " ".join(result.output.split())
    assert os.listdir(run_dir) == [LOCK_FILE]  # nothing else written


def test_a_finished_run_with_a_stale_lock_gets_the_lock_removed_on_rerun(tmp_path):
    """The kill point of the flaky killed-study test: done.json written, the run's lock file not yet removed."""
    out = tmp_path / "s"
    assert run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False).ok
    stale, held = sorted(RUN_IDS)[:2]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / "runs" / f".{stale}.lock").write_text(json.dumps(
        {"pid": int(dead.stdout), "host": socket.gethostname(), "started": time.time(), "command": "killed"}))
    holder = start_holder(out / "runs", name=f".{held}.lock")  # a live holder's lock is not touched
    try:
        again = run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False)
        assert again.ok and set(again.skipped) == RUN_IDS and not again.ran
        assert not (out / "runs" / f".{stale}.lock").exists()
        assert json.loads((out / "runs" / f".{held}.lock").read_text())["pid"] == holder.pid
    finally:
        kill(holder)
    run_study(parse_spec(SPEC), out, run_fn=fake_run, progress=False)  # the holder is gone: its file too
    assert not list(out.rglob("*.lock"))
