"""Issue 16, what was left: the training run folder and single-file outputs follow the output rule.

A command deletes or overwrites only what it wrote itself; an output that is, holds or lies
inside an input is refused before anything is touched. Every case runs the CLI as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.outputs import MARKER
from test_hostile import ok, one_line_error, snapshot, user_dataset

runner = CliRunner()
TINY = ["--model", "2d", "--epochs", "1", "--batch-size", "2", "--patch-size", "16,16", "--channels", "4,8",
        "--samples-per-epoch", "4", "--device", "cpu", "--threads", "1", "--no-progress"]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return user_dataset(tmp_path / "data")


def train(data: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["train", str(data), "-o", str(out), *TINY, *extra])


# --- train -o RUN -------------------------------------------------------------------------


def test_train_claims_its_run_folder_lists_what_it_wrote_and_resumes(data, tmp_path):
    run = tmp_path / "run"
    ok(train(data, run))
    marker = json.loads((run / MARKER).read_text())
    assert marker["command"] == "train"
    assert sorted(marker["files"]) == ["best.pt", "config.json", "history.csv", "last.pt", "split.json"]
    assert sorted(p.name for p in run.iterdir()) == sorted([MARKER, *marker["files"]])  # no lock left
    ok(train(data, run, "--resume", "--epochs", "2"))  # its own run: resumed
    assert len((run / "history.csv").read_text().strip().splitlines()) == 1 + 2
    line = one_line_error(train(data, run))  # without --resume: refused, kept
    assert "already holds a run" in line and "--resume" in line


def test_train_refuses_a_folder_it_did_not_write_and_leaves_it_untouched(data, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    before = snapshot(mine)
    line = one_line_error(train(data, mine))
    assert line == (f"error: run_dir {str(mine)!r} is not empty and was not written by sparseslice train; "
                    "choose an empty or new folder")
    assert snapshot(mine) == before
    other = user_dataset(tmp_path / "other")  # another dataset: a folder sparseslice did not write
    before = snapshot(other)
    assert "was not written by sparseslice train" in one_line_error(train(data, other))
    assert snapshot(other) == before


def test_train_refuses_another_commands_output(data, tmp_path):
    ph = tmp_path / "ph"
    ok(runner.invoke(app, ["synth", str(ph), "--cases", "2"]))
    before = snapshot(ph)
    line = one_line_error(train(data, ph))
    assert line.startswith(f"error: run_dir {str(ph)!r} holds the output of sparseslice synth, not train")
    assert snapshot(ph) == before


@pytest.mark.parametrize("where", ["data", "parent", "images"])
def test_train_refuses_a_run_folder_that_is_holds_or_lies_inside_an_input(data, where):
    out = {"data": data, "parent": data.parent, "images": data / "imagesTr"}[where]
    before = snapshot(data)
    line = one_line_error(train(data, out))
    how = {"data": "is", "parent": "holds", "images": "lies inside"}[where]
    assert line.startswith(f"error: run_dir {str(out)!r} {how} the input"), line
    assert snapshot(data) == before


def test_train_into_images_linked_from_another_dataset_is_refused(data, tmp_path):
    plan = tmp_path / "plan.json"
    ok(runner.invoke(app, ["plan", str(data), "--budget", "4", "--volumes", "2", "--strategy", "interval",
                           "-o", str(plan), "--no-progress"]))
    sparse = tmp_path / "sparse"
    ok(runner.invoke(app, ["simulate", str(data), str(plan), "-o", str(sparse), "--no-progress"]))
    before = snapshot(data)
    line = one_line_error(train(sparse, data / "imagesTr"))  # where the sparse dataset's images really lie
    assert line.startswith(f"error: run_dir {str(data / 'imagesTr')!r} holds the input"), line
    assert snapshot(data) == before


def test_failed_training_leaves_no_run_folder(tmp_path, data):
    (data / "labelsTr" / "case_1.nii.gz").write_bytes(b"not a label")  # fails while reading, before writing
    run = tmp_path / "run"
    one_line_error(train(data, run))
    assert not run.exists()
