"""Study engine: spec validation, run ids, store, resume, crashes, executors (fake run function)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.errors import UserError
from sparseslice.study.orchestrate import run_study
from sparseslice.study.results import collect_results, load_study, read_results
from sparseslice.study.spec import PRESETS, TRAINING_PRESETS, load_spec, parse_spec
from sparseslice.study.store import StudyStore
from study_fakes import CASES, ENGINE_SPEC, crashing_run, fake_run

SPEC = ENGINE_SPEC


def make_spec(**changes):
    return parse_spec({**SPEC, **changes})


# --- spec -----------------------------------------------------------------------------------

def test_spec_expands_to_stable_unique_run_ids():
    spec = make_spec()
    runs = spec.runs()
    ids = [r.run_id for r in runs]
    assert len(ids) == len(set(ids)) == 2 * 2 * 2 + 1  # grid x seeds + one baseline
    assert ids[0] == "2d_full_seed0" and runs[0].baseline
    assert "2d_b12_rho0.25_interval_interp-none_seed1" in ids
    # ids depend on values, not order: reversing the grid lists gives the same set
    rev = make_spec(grid=[{"budget": [12], "rho": [0.5, 0.25], "strategy": ["interval", "random"],
                           "model": ["2d"]}])
    assert {r.run_id for r in rev.runs()} == set(ids)
    assert rev.fingerprint() != spec.fingerprint()  # but a reordered spec is recorded as written
    assert make_spec().fingerprint() == spec.fingerprint()


@pytest.mark.parametrize("bad, message", [
    ({"seed": [0]}, "did you mean 'seeds'"),
    ({"grid": [{"budget": [12], "rho": [0.5], "stratgy": ["random"]}]}, "did you mean 'strategy'"),
    ({"grid": [{"budget": [12], "rho": [0.5], "strategy": ["randm"]}]}, "did you mean 'random'"),
    ({"grid": [{"budget": [12], "rho": [0.5], "volumes": [3], "strategy": ["random"]}]}, "both rho and volumes"),
    ({"grid": [{"budget": [12], "strategy": ["random"]}]}, "needs rho"),
    ({"grid": [{"budget": [12], "strategy": ["block"]}]}, "block_fraction is missing"),
    ({"grid": [{"budget": [12], "rho": [1.5], "strategy": ["random"]}]}, "must be a number in"),
    ({"dataset": {"path": "x", "splitt": {}}}, "did you mean 'split'"),
    ({"training": {"preset": "quick", "model": "3d"}}, "set by the grid"),
    ({"metrics": ["hd95"]}, "must include 'dice'"),
    ({"training": "quick"}, "training must be a mapping"),
])
def test_spec_rejects_bad_input_naming_the_fix(bad, message):
    with pytest.raises(UserError, match=message):
        make_spec(**bad)


def test_presets_load_and_match_the_papers_designs(tmp_path):
    for name in PRESETS:
        spec = load_spec(name, data=tmp_path)
        assert spec.dataset.path == tmp_path.resolve()
        assert spec.runs()
    quick = load_spec("quick", data=tmp_path).runs()
    grid = [r for r in quick if not r.baseline]
    assert len(grid) == 18 and {r.model for r in quick} == {"2d"}
    assert {r.strategy for r in grid} == {"random", "interval", "ual"} and len({r.rho for r in grid}) == 3
    assert len({r.budget for r in grid}) == 1 and {r.seed for r in grid} == {0, 1}
    ss = load_spec("slice-selection", data=tmp_path).runs()
    assert {r.model for r in ss} == {"2d", "3d"} and {r.interpolation for r in ss} == {"none", "sdf"}
    pa_spec = load_spec("partial-annotation", data=tmp_path)
    pa = pa_spec.runs()
    assert {r.schedule for r in pa} == {"one-step", "two-step"} and {r.border_slices for r in pa} == {False, True}
    assert {r.strategy for r in pa} == {"random", "block"} and len(pa) == 21 and {r.budget for r in pa} == {350}
    assert {r.model for r in pa} == {"2d", "3d"} and {r.mask_channel for r in pa} == {False, True}
    assert all(r.border_slices for r in pa if r.strategy == "random")  # full = the extent, border free
    samples = {}
    for r in pa:  # every arm of a model trains the same samples (two-step: both steps together)
        cfg = pa_spec.training_config(r)
        total = cfg["epochs"] + (cfg["finetune_epochs"] if r.schedule == "two-step" else 0)
        samples.setdefault(r.model, set()).add(cfg["samples_per_epoch"] * total)
    assert all(len(v) == 1 for v in samples.values()), samples


def test_the_high_resolution_check_repeats_the_presets_3d_arms(tmp_path):
    check = load_spec(Path(__file__).parents[1] / "bench" / "specs" / "partial-annotation-hires.yaml", data=tmp_path)
    preset = load_spec("partial-annotation", data=tmp_path)
    same = [r for r in preset.runs() if r.model == "3d" and r.schedule == "one-step" and r.border_slices
            and not r.mask_channel]
    assert sorted(r.run_id for r in check.runs()) == sorted(r.run_id for r in same) and len(same) == 6
    training = check.training_config(check.runs()[0])
    assert "max_inplane" not in training and "patch_size" not in training  # the 3D defaults' resolution
    assert preset.training_config(same[0])["max_inplane"] == 64


def test_spec_file_resolves_dataset_relative_to_the_file(tmp_path):
    (tmp_path / "specs").mkdir()
    path = tmp_path / "specs" / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "dataset": {"path": "../data"}}))
    assert load_spec(path).dataset.path == (tmp_path / "data").resolve()
    path.write_text("grid: [unclosed")
    with pytest.raises(UserError, match="not valid YAML"):
        load_spec(path)
    with pytest.raises(UserError, match="neither a file nor a preset"):
        load_spec("slice-selectoin")


# --- store, resume, crashes ----------------------------------------------------------------------

def test_run_study_writes_every_run_and_a_tidy_table(tmp_path):
    spec = make_spec()
    summary = run_study(spec, tmp_path / "s", run_fn=fake_run, progress=False)
    assert summary.ok and len(summary.ran) == 9 and not summary.skipped
    for run in spec.runs():
        folder = tmp_path / "s" / "runs" / run.run_id
        config = json.loads((folder / "config.json").read_text())
        assert config["run"] == run.to_dict() and config["training"]["seed"] == run.seed
        assert config["training"]["epochs"] == TRAINING_PRESETS["demo"]["epochs"]  # the preset, resolved
        assert (folder / "done.json").is_file() and (folder / "touched.txt").is_file()
    table = read_results(tmp_path / "s")
    assert len(table) == 9 * len(CASES) * 3 * 3
    assert list(table.columns[:2]) == ["run_id", "model"] and set(table.metric) == {"dice", "hd95", "assd2d"}
    assert table.groupby("run_id").size().eq(len(CASES) * 9).all()
    runs = pd.read_csv(tmp_path / "s" / "runs.csv")
    assert runs.status.eq("done").all() and "slices_per_volume" in runs.columns

    again = run_study(spec, tmp_path / "s", run_fn=_fail_if_called, progress=False)
    assert not again.ran and len(again.skipped) == 9


def _fail_if_called(run, config, run_dir):
    raise AssertionError(f"finished run {run.run_id} was run again")


def test_crashing_run_is_recorded_the_grid_continues_and_rerun_retries_it(tmp_path):
    spec = make_spec()
    summary = run_study(spec, tmp_path / "s", run_fn=crashing_run, progress=False)
    crashed = {r.run_id for r in spec.runs() if r.strategy == "interval" and r.seed == 1}
    assert set(summary.failed) == crashed and len(crashed) == 2 and not summary.ok
    assert all("simulated crash" in msg for msg in summary.failed.values())
    assert len(summary.ran) == 9
    err = json.loads((tmp_path / "s" / "runs" / next(iter(crashed)) / "error.json").read_text())
    assert "Traceback" in err["traceback"]
    runs = pd.read_csv(tmp_path / "s" / "runs.csv").set_index("run_id")
    assert (runs.loc[sorted(crashed), "status"] == "failed").all()
    assert set(collect_results(*load_study(tmp_path / "s")).run_id).isdisjoint(crashed)
    again = run_study(spec, tmp_path / "s", run_fn=fake_run, progress=False)
    assert set(again.ran) == crashed and again.ok


def test_keyboard_interrupt_keeps_finished_runs_and_rerun_does_the_rest(tmp_path):
    spec = make_spec()
    calls: list[str] = []

    def interrupted(run, config, run_dir):
        if len(calls) == 4:
            (run_dir / "partial.txt").write_text("half-written")
            raise KeyboardInterrupt
        calls.append(run.run_id)
        return fake_run(run, config, run_dir)

    with pytest.raises(KeyboardInterrupt):
        run_study(spec, tmp_path / "s", run_fn=interrupted, progress=False)
    store, _ = load_study(tmp_path / "s")
    statuses = [store.status(r) for r in spec.runs()]
    assert statuses.count("done") == 4 and statuses.count("interrupted") == 1
    rerun: list[str] = []

    def counting(run, config, run_dir):
        assert not (run_dir / "partial.txt").exists()  # interrupted run starts from an empty folder
        rerun.append(run.run_id)
        return fake_run(run, config, run_dir)

    summary = run_study(spec, tmp_path / "s", run_fn=counting, progress=False)
    assert sorted(rerun) == sorted(r.run_id for r in spec.runs() if r.run_id not in calls)
    assert len(summary.skipped) == 4 and summary.ok


def test_killed_study_process_resumes_with_the_remaining_runs_only(tmp_path):
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from study_fakes import fake_run
        from sparseslice.study.orchestrate import run_study
        from sparseslice.study.spec import parse_spec
        def slow(run, config, run_dir):
            out = fake_run(run, config, run_dir)
            time.sleep(0.4)
            return out
        run_study(parse_spec({SPEC!r}), {str(out)!r}, run_fn=slow, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(out.glob("runs/*/done.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = {p.parent.name for p in out.glob("runs/*/done.json")}
    assert 3 <= len(finished) < 9
    rerun: list[str] = []

    def counting(run, config, run_dir):
        rerun.append(run.run_id)
        return fake_run(run, config, run_dir)

    summary = run_study(make_spec(), out, run_fn=counting, progress=False)
    assert set(rerun) == {r.run_id for r in make_spec().runs()} - finished
    assert set(summary.skipped) == finished and summary.ok
    assert len(read_results(out)) == 9 * len(CASES) * 9


def test_folder_with_a_different_study_is_refused_unless_forced(tmp_path):
    run_study(make_spec(), tmp_path / "s", run_fn=fake_run, progress=False)
    bigger = make_spec(seeds=[0, 1, 2])
    with pytest.raises(UserError, match="holds a different study.*--force"):
        run_study(bigger, tmp_path / "s", run_fn=fake_run, progress=False)
    summary = run_study(bigger, tmp_path / "s", run_fn=fake_run, force=True, progress=False)
    assert len(summary.skipped) == 9 and len(summary.ran) == 4  # only the seed-2 runs are new
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        StudyStore.open(tmp_path / "other", make_spec())


def test_changed_training_redoes_runs_even_when_forced(tmp_path):
    run_study(make_spec(), tmp_path / "s", run_fn=fake_run, progress=False)
    changed = make_spec(training={"preset": "demo", "epochs": 5})
    summary = run_study(changed, tmp_path / "s", run_fn=fake_run, force=True, progress=False)
    assert len(summary.ran) == 9 and not summary.skipped


# --- executors -------------------------------------------------------------------------------------

def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in state


def test_sigterm_stops_the_workers_too_and_the_study_resumes(tmp_path):
    out = tmp_path / "s"
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from study_fakes import sleeping_run
        from sparseslice.study.orchestrate import run_study
        from sparseslice.study.spec import parse_spec
        run_study(parse_spec({SPEC!r}), {str(out)!r}, run_fn=sleeping_run, workers=2, progress=False)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], start_new_session=True, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(list(out.glob("pids/*"))) < 2:
            time.sleep(0.05)
        workers = [int(p.read_text()) for p in out.glob("pids/*")]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        proc.send_signal(signal.SIGTERM)  # to the study process only, as `kill PID` or a scheduler does
        assert proc.wait(timeout=30) != 0
        deadline = time.time() + 5
        while time.time() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.05)
        assert not any(_alive(pid) for pid in workers)  # none left running (they slept 60 s)
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if proc.poll() is None else None
    assert not list(out.glob("runs/*/done.json"))
    summary = run_study(make_spec(), out, run_fn=fake_run, progress=False)
    assert len(summary.ran) == 9 and summary.ok  # the stopped runs are redone, none is left locked

def test_local_workers_give_the_same_results_as_one_process(tmp_path):
    spec = make_spec()
    run_study(spec, tmp_path / "one", run_fn=fake_run, progress=False)
    summary = run_study(spec, tmp_path / "two", run_fn=crashing_run, workers=2, progress=False)
    assert len(summary.failed) == 2
    one, two = read_results(tmp_path / "one"), read_results(tmp_path / "two")
    one = one[one.run_id.isin(set(two.run_id))]
    key = ["run_id", "case", "label", "metric"]
    pd.testing.assert_frame_equal(one.sort_values(key).reset_index(drop=True),
                                  two.sort_values(key).reset_index(drop=True))
    config = json.loads((tmp_path / "two" / "runs" / "2d_full_seed0" / "config.json").read_text())
    assert config["execution"] == {"executor": "local", "threads": max(1, (os.cpu_count() or 1) // 2)}


def test_ray_executor_runs_one_task_per_run_on_a_local_instance(tmp_path):
    ray = pytest.importorskip("ray")
    import study_fakes

    ray.cloudpickle.register_pickle_by_value(study_fakes)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        summary = run_study(make_spec(), tmp_path / "s", run_fn=crashing_run, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert len(summary.ran) == 9 and len(summary.failed) == 2
    assert all("simulated crash" in m for m in summary.failed.values())
    assert len(read_results(tmp_path / "s")) == 7 * len(CASES) * 9


# --- CLI bad input -------------------------------------------------------------------------------

def test_cli_study_run_reports_bad_spec_in_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({**SPEC, "seed": [0]}))
    result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "did you mean 'seeds'" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["study", "run", "quick", "-o", str(tmp_path / "out"),
                                      "--data", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_fixed_test_cases_are_the_test_split_and_the_rest_is_split_by_seed():
    from sparseslice.datasets import split_cases

    ids = [f"la_{i:03d}" for i in range(20)]
    split = split_cases(ids, seed=0, val=0.1, test_cases=ids[15:])
    assert split.test == tuple(ids[15:])
    assert len(split.val) == 2 and len(split.train) == 13
    assert not set(split.train) & set(split.val) and set(split.train) | set(split.val) == set(ids[:15])
    assert split_cases(list(reversed(ids)), seed=0, val=0.1, test_cases=ids[15:]) == split
    with pytest.raises(UserError, match=r"test_cases must name cases of the dataset, got 'la_0200'; did you mean"):
        split_cases(ids, seed=0, test_cases=["la_0200"])
    with pytest.raises(UserError, match="test_cases must leave cases for training"):
        split_cases(ids, seed=0, val=0.1, test_cases=ids[1:])
    base = {"name": "s", "grid": [{"budget": [10], "rho": [0.5], "strategy": ["random"]}]}
    spec = parse_spec({**base, "dataset": {"split": {"test_cases": ["la_018", "la_019"]}}})
    assert spec.dataset.test_cases == ("la_018", "la_019")
    assert spec.dataset.to_dict()["split"]["test_cases"] == ["la_018", "la_019"]
    assert "test_cases" not in parse_spec(base).dataset.to_dict()["split"]  # older specs keep their fingerprint
    with pytest.raises(UserError, match="both test and test_cases"):
        parse_spec({**base, "dataset": {"split": {"test": 0.2, "test_cases": ["a"]}}})
    with pytest.raises(UserError, match="test_cases must be a list of case ids"):
        parse_spec({**base, "dataset": {"split": {"test_cases": "la_018"}}})


def test_test_cases_from_the_command_line_replace_the_spec_split(tmp_path):
    from sparseslice.cli import _case_list

    spec = load_spec("partial-annotation", data=tmp_path, test_cases=["la_045", "la_046"])
    assert spec.dataset.test_cases == ("la_045", "la_046") and spec.dataset.test == 0.0
    assert spec.fingerprint() != load_spec("partial-annotation", data=tmp_path).fingerprint()
    assert parse_spec(spec.to_dict()).dataset == spec.dataset  # what a study folder stores reads back
    listed = tmp_path / "test.txt"
    listed.write_text("# held out\nla_045\n\nla_046\n")
    assert _case_list(str(listed), files=True) == _case_list("la_045, la_046") == ["la_045", "la_046"]
    with pytest.raises(UserError, match="test_cases must be a list of case ids"):
        load_spec("quick", data=tmp_path, test_cases=[])


def test_training_options_per_model_apply_to_that_model_only():
    spec = make_spec(grid=[{"budget": [12], "rho": [0.5], "strategy": ["random"], "model": ["2d", "3d"]}],
                     training={"preset": "quick", "epochs": 4, "3d": {"samples_per_epoch": 40,
                                                                     "patch_size": [16, 16, 8]}})
    by_model = {r.model: spec.training_config(r) for r in spec.runs() if not r.baseline}
    assert by_model["3d"]["samples_per_epoch"] == 40 and by_model["3d"]["patch_size"] == [16, 16, 8]
    assert by_model["2d"]["samples_per_epoch"] == TRAINING_PRESETS["quick"]["samples_per_epoch"]
    assert "patch_size" not in by_model["2d"] and "3d" not in by_model["2d"]
    assert by_model["2d"]["epochs"] == by_model["3d"]["epochs"] == 4


@pytest.mark.parametrize("training, message", [
    ({"3d": {"model": "2d"}}, r"training.3d.model cannot be set per model"),
    ({"3d": 5}, r"training.3d must be a mapping of training options, got 5"),
    ({"2d": {"samples_per_epoch": "many"}}, r"'samples_per_epoch' must be"),
    ({"2d": {"samples_per_epoch": None}}, r"training.2d.samples_per_epoch must be a number in a study"),
])
def test_bad_per_model_training_options_are_named(training, message):
    with pytest.raises(UserError, match=message):
        make_spec(training=training)


def test_a_run_configuration_with_fixed_test_cases_splits_as_asked(phantom_dataset):
    from sparseslice.study.pipeline import study_split
    from sparseslice.study.spec import run_config

    spec = load_spec("quick", data=phantom_dataset, test_cases=["phantom_003"])
    _, split = study_split(run_config(spec, spec.runs()[0], threads=1, executor="local"))
    assert list(split.test) == ["phantom_003"] and "phantom_003" not in (*split.train, *split.val)
