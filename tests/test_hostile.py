"""Hostile inputs (issue 16), run through the CLI as a user would."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.io import write_volume
from sparseslice.synthetic import make_phantom

runner = CliRunner()


def one_line_error(result) -> str:
    """The one line a refused command prints (exit 2, no traceback)."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def ok(result) -> None:
    assert result.exit_code == 0, result.output


# data loss ------------------------------------------------------------------------------
# A command deletes or overwrites only what it wrote itself; an output that is, holds or lies
# inside an input is refused before anything is touched.


def user_dataset(root: Path, *, cases: int = 2) -> Path:
    """A user's own MSD dataset (written without sparseslice's writers, so it carries no marker)."""
    training = []
    for n in range(cases):
        ph = make_phantom((16, 16, 8), spacing=(1.0, 1.0, 2.5), n_labels=1, seed=n)
        write_volume(ph.image, root / "imagesTr" / f"case_{n}.nii.gz")
        write_volume(ph.label, root / "labelsTr" / f"case_{n}.nii.gz")
        training.append({"image": f"./imagesTr/case_{n}.nii.gz", "label": f"./labelsTr/case_{n}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({
        "name": "mine", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "part1"},
        "numTraining": cases, "training": training}))
    return root


def snapshot(root: Path) -> dict[str, tuple[bool, bytes]]:
    """Every entry under ``root``: whether it is a link, and its bytes (links not followed)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = (True, os.readlink(path).encode())
            elif path.is_file():
                out[rel] = (False, path.read_bytes())
            else:
                out[rel] = (False, b"<dir>")
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return user_dataset(tmp_path / "data")


@pytest.fixture
def plan(data: Path, tmp_path: Path) -> Path:
    path = tmp_path / "plans" / "plan.json"
    ok(runner.invoke(app, ["plan", str(data), "--budget", "4", "--volumes", "2", "--strategy", "interval",
                           "--seed", "0", "-o", str(path), "--no-progress"]))
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A tiny untrained 2D checkpoint (predicting needs no training)."""
    from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint

    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,))
    run = tmp_path / "run"
    save_checkpoint(run / "best.pt", Checkpoint(spec=spec, normalization=Normalization("zscore"), axis=2,
                                                labels=(0, 1), patch_size=(16, 16),
                                                state_dict=build_model(spec).state_dict()))
    return run


def simulate(data: Path, plan: Path, out: Path) -> object:
    return runner.invoke(app, ["simulate", str(data), str(plan), "-o", str(out), "--no-progress"])


def test_simulate_into_another_dataset_is_refused_and_it_stays_byte_identical(data, plan, tmp_path):
    other = user_dataset(tmp_path / "other", cases=3)
    before = snapshot(other)
    line = one_line_error(simulate(data, plan, other))
    assert line.startswith(f"error: out {str(other)!r} is not empty") and line.endswith("choose an empty or new folder")
    assert snapshot(other) == before


def test_simulate_into_its_own_input_is_refused_and_it_stays_untouched(data, plan):
    before = snapshot(data)
    line = one_line_error(simulate(data, plan, data))
    assert str(data) in line and "input" in line
    assert snapshot(data) == before
    inside = data / "sparse"  # inside the input: refused too, nothing created
    assert str(data) in one_line_error(simulate(data, plan, inside))
    assert snapshot(data) == before


def test_interpolate_into_the_source_of_its_linked_images_is_refused(data, plan, tmp_path):
    sparse = tmp_path / "sparse"
    ok(simulate(data, plan, sparse))  # images are links to data/imagesTr
    before = snapshot(data)
    line = one_line_error(runner.invoke(app, ["interpolate", str(sparse), "-o", str(data), "--no-progress"]))
    assert str(data) in line
    assert snapshot(data) == before
    assert not any(p.is_symlink() for p in (data / "imagesTr").iterdir())


def test_predict_into_the_input_images_is_refused_and_they_stay_untouched(data, run_dir):
    before = snapshot(data)
    line = one_line_error(runner.invoke(app, ["predict", str(run_dir), str(data), "-o", str(data / "imagesTr"),
                                              "--no-progress", "--device", "cpu"]))
    assert str(data / "imagesTr") in line and "input" in line
    assert snapshot(data) == before


def test_synth_into_an_existing_dataset_is_refused(data):
    before = snapshot(data)
    line = one_line_error(runner.invoke(app, ["synth", str(data), "--cases", "1"]))
    assert str(data) in line and "choose an empty or new folder" in line
    assert snapshot(data) == before


def test_synth_rerun_replaces_its_own_phantoms_without_mixing(tmp_path):
    out = tmp_path / "ph"
    ok(runner.invoke(app, ["synth", str(out), "--cases", "3"]))
    ok(runner.invoke(app, ["synth", str(out), "--cases", "1", "--seed", "1"]))  # its own output: replaced
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["phantom_000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["phantom_000.nii.gz"]


def test_simulate_rerun_replaces_only_its_own_files(data, plan, tmp_path):
    out = tmp_path / "sparse"
    ok(simulate(data, plan, out))
    cases = sorted(p.name for p in (out / "imagesTr").iterdir())
    (out / "imagesTr" / "README.txt").write_text("my notes")  # a user's file inside a folder simulate made
    smaller = tmp_path / "plans" / "smaller.json"
    ok(runner.invoke(app, ["plan", str(data), "--budget", "2", "--volumes", "1", "--strategy", "interval",
                           "--seed", "0", "-o", str(smaller), "--no-progress"]))
    ok(simulate(data, smaller, out))  # its own earlier output: replaced
    (case,) = [e["case"] for e in json.loads(smaller.read_text())["entries"]]
    kept = sorted(p.name for p in (out / "imagesTr").iterdir())
    assert len(cases) == 2 and kept == sorted([f"{case}.nii.gz", "README.txt"])
    assert (out / "imagesTr" / "README.txt").read_text() == "my notes"


def test_predict_and_interpolate_rerun_into_their_own_output_but_not_another_commands(data, plan, run_dir,
                                                                                       tmp_path):
    sparse, filled, pred = tmp_path / "sparse", tmp_path / "filled", tmp_path / "pred"
    ok(simulate(data, plan, sparse))
    for _ in range(2):
        ok(runner.invoke(app, ["interpolate", str(sparse), "-o", str(filled), "--no-progress"]))
        ok(runner.invoke(app, ["predict", str(run_dir), str(data), "-o", str(pred), "--no-progress",
                               "--device", "cpu"]))
    assert sorted(p.name for p in pred.glob("*.nii.gz")) == ["case_0.nii.gz", "case_1.nii.gz"]
    before = snapshot(sparse)
    line = one_line_error(runner.invoke(app, ["predict", str(run_dir), str(data), "-o", str(sparse),
                                              "--no-progress", "--device", "cpu"]))
    assert str(sparse) in line and "simulate" in line  # the folder holds simulate's output
    assert snapshot(sparse) == before


def test_plan_and_evaluate_refuse_to_write_over_their_inputs(data, tmp_path):
    before = snapshot(data)
    line = one_line_error(runner.invoke(app, ["plan", str(data), "--budget", "2", "-o", str(data / "dataset.json"),
                                              "--no-progress"]))
    assert "--out" in line and str(data) in line
    pred = user_dataset(tmp_path / "mine") / "labelsTr"  # a folder of label maps standing for predictions
    pred_before = snapshot(pred)
    target = data / "labelsTr" / "case_0.nii.gz"
    line = one_line_error(runner.invoke(app, ["evaluate", str(pred), str(data), "-o", str(target), "--no-progress"]))
    assert "--out" in line and str(target) in line
    assert snapshot(data) == before and snapshot(pred) == pred_before
    ok(runner.invoke(app, ["evaluate", str(pred), str(data), "-o", str(pred / "metrics.csv"), "--no-progress"]))
    assert (pred / "metrics.csv").is_file()  # beside the predictions: not an input


def test_train_refuses_a_run_folder_inside_its_data(data):
    before = snapshot(data)
    line = one_line_error(runner.invoke(app, ["train", str(data), "-o", str(data / "run"), "--model", "2d",
                                              "--epochs", "1", "--batch-size", "2", "--patch-size", "16,16",
                                              "--channels", "4,8", "--no-progress", "--device", "cpu"]))
    assert line.startswith(f"error: run_dir {str(data / 'run')!r} lies inside the input") and str(data) in line
    assert snapshot(data) == before
