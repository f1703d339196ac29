"""Equal training in a study: equal gradient steps for every arm, fine-tuning included; runs cut
short are marked; the full-annotation arm annotates whole volumes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.select import make_plan, write_plan
from sparseslice.select.plan import Plan
from sparseslice.study.orchestrate import run_study
from sparseslice.study.spec import PRESETS, load_spec, parse_spec
from sparseslice.study.store import StudyStore
from sparseslice.train import TrainConfig, train

NET = {"channels": [8, 16], "strides": [2], "augment": False, "num_threads": 1}


def spec_of(data, grid, training, **changes):
    return parse_spec({"name": "eq", "dataset": {"path": str(data), "split": {"seed": 0, "val": 0.25, "test": 0.25}},
                       "grid": grid, "seeds": [0], "training": training, **changes})


def test_arms_with_different_annotated_slice_counts_take_the_same_gradient_steps(phantom_dataset, tmp_path):
    # the paper preset's arms (no samples_per_epoch given) annotate 2 vs 12 slices: same steps
    spec = spec_of(phantom_dataset, [{"budget": [2, 12], "volumes": [2], "strategy": ["random"]}],
                   {"preset": "paper", "epochs": 2, **NET}, baseline=False)
    summary = run_study(spec, tmp_path / "s", progress=False)
    assert summary.ok, summary.failed
    runs = pd.read_csv(tmp_path / "s" / "runs.csv").set_index("run_id")
    assert sorted(runs["slices"]) == [2, 12]
    # 400 samples per epoch in batches of 16: 25 batches x 2 epochs, whatever the arm annotated
    assert list(runs["gradient_steps"]) == [50, 50] and list(runs["planned_steps"]) == [50, 50]
    assert list(runs["samples_seen"]) == [800, 800] and not runs["cut_short"].any()
    for run_id in runs.index:
        folder = tmp_path / "s" / "runs" / run_id
        for name in ("result.json", "done.json"):
            facts = json.loads((folder / name).read_text())
            assert facts["gradient_steps"] == 50 and facts["cut_short"] is False and facts["cut_short_reason"] == ""


def test_two_step_epochs_count_fine_tuning_so_both_schedules_take_epochs_x_batches(phantom_dataset, tmp_path):
    spec = spec_of(phantom_dataset, [{"budget": [4], "rho": [0.25], "strategy": ["random"],
                                      "schedule": ["one-step", "two-step"]}],
                   {"preset": "demo", "epochs": 3, "finetune_epochs": 1, "samples_per_epoch": 8, "batch_size": 4,
                    **NET}, baseline=False)
    one, two = spec.runs()
    assert spec.training_config(one)["epochs"] == 3 and spec.training_config(two)["epochs"] == 2
    assert spec.training_config(two)["patience"] == 3  # early stopping never ends an arm sooner
    steps = {}
    for run in (one, two):
        options = {k: v for k, v in spec.training_config(run).items() if k != "preset"}
        res = train(phantom_dataset, tmp_path / run.schedule, config=TrainConfig.from_dict(options),
                    val_dir=phantom_dataset, progress=False)
        steps[run.schedule] = (res.gradient_steps, res.planned_steps, res.samples_seen, res.epochs)
    history = pd.read_csv(tmp_path / "two-step" / "history.csv")
    assert list(history["phase"]) == [1, 1, 2]
    # 3 epochs x ceil(8 / 4) batches, fine-tuning included
    assert steps == {"one-step": (6, 6, 24, 3), "two-step": (6, 6, 24, 3)}
    with pytest.raises(UserError, match=r"training.epochs must exceed finetune_epochs for two-step runs"):
        spec_of(phantom_dataset, [{"budget": [4], "rho": [0.25], "strategy": ["random"], "schedule": ["two-step"]}],
                {"preset": "demo", "epochs": 3, "finetune_epochs": 3})


@pytest.mark.parametrize("name", PRESETS)
def test_presets_set_no_wall_clock_cap_and_fixed_samples(name):
    spec = load_spec(name, data=".")
    for run in spec.runs():
        options = spec.training_config(run)
        assert "max_minutes" not in options, run.run_id
        assert options["samples_per_epoch"] >= 1 and options["patience"] >= options["epochs"]


@pytest.mark.parametrize("cut, reason", [({"max_minutes": 1e-6}, "max_minutes"),
                                         ({"patience": 1, "lr": 1e-12}, "early_stop")])
def test_a_run_cut_short_is_marked(phantom_dataset, tmp_path, cut, reason):
    cfg = TrainConfig.from_dict({**NET, "epochs": 4, "samples_per_epoch": 8, "batch_size": 4, "val_fraction": 0.25,
                                 "patience": 10, **cut})
    res = train(phantom_dataset, tmp_path / "run", config=cfg, progress=False)
    assert res.planned_steps == 8 and res.gradient_steps < 8
    assert res.cut_short and res.cut_short_reason == reason
    assert res.samples_seen == 4 * res.gradient_steps
    full = train(phantom_dataset, tmp_path / "full", config=cfg.updated(max_minutes=None, patience=10, lr=1e-3),
                 progress=False)
    assert (full.gradient_steps, full.cut_short, full.cut_short_reason) == (8, False, "")


def test_run_table_marks_interrupted_runs_cut_short(tmp_path):
    from study_fakes import fake_run

    spec = parse_spec({"name": "t", "dataset": {"path": str(tmp_path)}, "seeds": [0], "baseline": False,
                       "grid": [{"budget": [10], "rho": [0.1, 0.5], "strategy": ["random"]}]})
    run_study(spec, tmp_path / "s", run_fn=fake_run, progress=False)
    interrupted = spec.runs()[0]
    (StudyStore(tmp_path / "s").run_dir(interrupted.run_id) / "done.json").unlink()
    from sparseslice.study.results import run_table

    table = run_table(StudyStore(tmp_path / "s"), spec).set_index("run_id")
    assert table.loc[interrupted.run_id, "cut_short"] is True
    assert table.loc[interrupted.run_id, "cut_short_reason"] == "interrupted"
    assert {"gradient_steps", "samples_seen", "planned_steps"} <= set(table.columns)


def test_rho_1_annotates_whole_volumes_and_states_the_unspent_budget(phantom_dataset, tmp_path):
    ds = discover_dataset(phantom_dataset)
    plan = make_plan(ds, budget=30, rho=1.0, strategy="random", seed=0)  # volumes of 12 and 10 slices
    assert [e.n_slices for e in plan.entries] == [12, 10]
    assert plan.volumes == 2 and all(e.slices == tuple(range(e.n_slices)) for e in plan.entries)
    assert (plan.budget, plan.unspent, plan.full_volumes, plan.rho_effective) == (22, 8, True, 1.0)
    write_plan(plan, tmp_path / "plan.json")
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["full_volumes"] is True and stored["unspent"] == 8
    assert Plan.from_dict(stored).unspent == 8
    assert not make_plan(ds, budget=20, rho=0.5, strategy="random", seed=0).full_volumes
    with pytest.raises(UserError, match=r"budget is smaller than one whole volume, got 11 for rho=1"):
        make_plan(ds, budget=11, rho=1.0, strategy="random", seed=0)
