"""Study runner end to end on tiny phantoms: the real stages, a 1-epoch preset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.errors import UserError
from sparseslice.study.orchestrate import run_study
from sparseslice.study.pipeline import preflight
from sparseslice.study.report import render_report
from sparseslice.study.results import read_results
from sparseslice.study.spec import parse_spec

TINY = {"epochs": 1, "samples_per_epoch": 8, "batch_size": 4, "channels": [8, 16], "strides": [2],
        "augment": False, "preset": "demo"}


def tiny_spec(data: Path, **changes) -> dict:
    return {"name": "e2e", "dataset": {"path": str(data), "split": {"seed": 0, "val": 0.25, "test": 0.25}},
            "grid": [{"budget": [4], "rho": [0.25], "strategy": ["random"], "interpolation": ["none", "sdf"],
                      "model": ["2d"]},
                     {"budget": [4], "rho": [0.25], "strategy": ["random"], "model": ["3d"]}],
            "seeds": [0], "training": TINY, **changes}


def test_real_pipeline_runs_baseline_and_sparse_runs_and_reports(phantom_dataset, tmp_path):
    spec = parse_spec(tiny_spec(phantom_dataset))
    summary = run_study(spec, tmp_path / "s", progress=False)
    assert summary.ok, summary.failed
    assert sorted(summary.ran) == sorted(r.run_id for r in spec.runs()) and len(summary.ran) == 5
    sparse_run = tmp_path / "s" / "runs" / "2d_b4_rho0.25_random_interp-none_seed0"
    plan = json.loads((sparse_run / "plan.json").read_text())
    assert sum(len(e["slices"]) for e in plan["entries"]) == 4
    sidecars = list((sparse_run / "sparse" / "labelsTr").glob("*.sparse.json"))
    assert len(sidecars) == len(plan["entries"])
    # planned volumes come from the training split only; predictions cover the test split only
    split_test = {p.name.split(".")[0] for p in (sparse_run / "pred").glob("*.nii.gz")}
    assert split_test and split_test.isdisjoint(e["case"] for e in plan["entries"])
    assert (sparse_run / "model" / "best.pt").is_file() and (sparse_run / "done.json").is_file()
    interp = tmp_path / "s" / "runs" / "2d_b4_rho0.25_random_interp-sdf_seed0"
    assert any(json.loads(p.read_text()).get("interpolated") for p in
               (interp / "interpolated" / "labelsTr").glob("*.sparse.json"))
    table = read_results(tmp_path / "s")
    assert set(table.case) == split_test and set(table.label) >= {0, 1, 2}
    dice = table[table.metric == "dice"].value
    assert dice.between(0, 1).all() and len(dice) == 5 * len(split_test) * 3
    trained = json.loads((tmp_path / "s" / "runs" / "3d_full_seed0" / "model" / "config.json").read_text())
    assert trained["model"] == "3d"
    runs = pd.read_csv(tmp_path / "s" / "runs.csv").set_index("run_id")
    assert runs.loc["2d_b4_rho0.25_random_interp-none_seed0", "n_volumes"] == len(plan["entries"])
    html = render_report(tmp_path / "s")
    # interpolation, strategy, regimes, learning curves, hours vs Dice, per-label, example slices; no
    # density figure: one density (0.25) per model shows no trend
    assert html.count("<img ") == 7 and "vs density" not in html
    plan_text = re.search(r"annotate (\d+) volumes: ([\d+]+) = 4 slices, slices chosen by random", html)
    assert plan_text, "the recommendation names whole slices per volume that spend the budget"
    counts = [int(c) for c in plan_text.group(2).split("+")]
    assert len(counts) == int(plan_text.group(1)) and sum(counts) == 4


def test_preflight_refuses_more_volumes_than_the_training_split(phantom_dataset, tmp_path):
    spec = parse_spec(tiny_spec(phantom_dataset, grid=[{"budget": [20], "volumes": [5], "strategy": ["random"]}]))
    with pytest.raises(UserError, match=r"volumes asks for more volumes than the training split has, got 5 "
                                        r"\(training split: 2 of 4 cases\)"):
        preflight(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(phantom_dataset, grid=[{"budget": [40], "rho": [0.25],
                                                                     "strategy": ["random"]}])))
    result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "cannot be planned on the 2 training cases" in result.output
    assert not (tmp_path / "out").exists()  # nothing started


def test_spec_refuses_unknown_training_keys(phantom_dataset):
    # refused when the spec is read (it used to wait for preflight)
    with pytest.raises(UserError, match="did you mean 'epochs'"):
        parse_spec(tiny_spec(phantom_dataset, training={**TINY, "epoch": 3}))


def test_cli_refuses_a_folder_with_another_study_and_exits_nonzero_on_crashes(phantom_dataset, tmp_path,
                                                                                monkeypatch):
    from sparseslice.study import pipeline as runner
    from sparseslice.study.store import StudyStore

    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(tiny_spec(phantom_dataset)))
    StudyStore.open(tmp_path / "other", parse_spec(tiny_spec(phantom_dataset, seeds=[5])))
    result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "other")])
    assert result.exit_code == 2 and "holds a different study" in result.output and "--force" in result.output

    def crash(run, config, run_dir):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(runner, "run_pipeline", crash)
    result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "other"), "--force",
                                      "--no-progress"])
    assert result.exit_code == 1
    assert "5 failed" in result.output and "out of memory (simulated)" in result.output
    assert (tmp_path / "other" / "report.html").is_file()
    import importlib.util

    if importlib.util.find_spec("pyarrow") is None:
        result = CliRunner().invoke(app, ["study", "run", str(path), "-o", str(tmp_path / "x"), "--format",
                                          "parquet"])
        assert result.exit_code == 2 and "pyarrow is not installed" in result.output
