"""Issue 16, what was left: the training run folder and single-file outputs follow the output rule.

A command deletes or overwrites only what it wrote itself; an output that is, holds or lies
inside an input is refused before anything is touched. Every case runs the CLI as a user would.
"""

from __future__ import annotations

import errno
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


# --- single-file outputs: plan -o NAME.json|csv, evaluate -o NAME.csv|json ----------------


def plan(data: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["plan", str(data), "--budget", "4", "--volumes", "2", "-o", str(out),
                               "--no-progress", *extra])


def evaluate(pred: Path, ref: Path, out: Path, *extra: str) -> object:
    return runner.invoke(app, ["evaluate", str(pred), str(ref), "-o", str(out), "--no-progress", *extra])


def test_plan_replaces_its_own_earlier_plan_but_no_other_file(data, tmp_path):
    out = tmp_path / "plan.json"
    ok(plan(data, out))
    ok(plan(data, out, "--seed", "1"))  # its own earlier plan, untouched since: replaced
    assert json.loads(out.read_text())["seed"] == 1
    notes = tmp_path / "notes.csv"
    notes.write_text("my,own\n1,2\n")
    line = one_line_error(plan(data, tmp_path / "notes.json"))  # plan.csv half would overwrite notes.csv
    assert line == (f"error: --out {str(tmp_path / 'notes.json')!r} would overwrite {str(notes)!r}, which is not a "
                    "result of sparseslice plan; pass another --out or move that file")
    assert notes.read_text() == "my,own\n1,2\n" and not (tmp_path / "notes.json").exists()
    settings = tmp_path / "settings.json"
    settings.write_text('{"mine": 1}')
    assert "is not a result of sparseslice plan" in one_line_error(plan(data, settings))
    assert settings.read_text() == '{"mine": 1}'


def test_plan_keeps_a_worklist_the_annotators_filled_in(data, tmp_path):
    out = tmp_path / "plan.json"
    ok(plan(data, out))
    csv = out.with_suffix(".csv")
    rows = csv.read_text().splitlines()
    filled = [rows[0], *[",".join(r.split(",")[:3] + ["1", "5"] + r.split(",")[5:]) for r in rows[1:]]]
    csv.write_text("\n".join(filled) + "\n")  # first,last clicked in
    before = (out.read_bytes(), csv.read_bytes())
    line = one_line_error(plan(data, out, "--seed", "3"))
    assert f"would overwrite {str(csv)!r}, which is not a result of sparseslice plan" in line
    assert (out.read_bytes(), csv.read_bytes()) == before


def test_plan_out_naming_a_folder_where_a_file_goes(data, tmp_path):
    folder = tmp_path / "p.csv"
    folder.mkdir()
    line = one_line_error(plan(data, tmp_path / "p.json"))
    assert line.startswith(f"error: cannot write --out {str(tmp_path / 'p.json')!r}: Is a directory ({str(folder)!r})")
    assert list(folder.iterdir()) == [] and not (tmp_path / "p.json").exists()


def test_evaluate_out_json_writes_the_table_and_its_summary(data, tmp_path):
    pred = data / "labelsTr"  # the labels as predictions: a perfect score
    out = tmp_path / "m.json"
    result = evaluate(pred, data, out)
    ok(result)
    assert f"wrote {tmp_path / 'm.csv'} and {out}" in " ".join(result.output.split())
    assert (tmp_path / "m.csv").read_text().startswith("case,label,region,metric,value,note")
    assert set(json.loads(out.read_text())) == {"missing", "axis", "summary"}  # not the table over-written
    ok(evaluate(pred, data, tmp_path / "m.csv"))  # its own earlier result: replaced


def test_evaluate_refuses_to_overwrite_a_file_it_did_not_write(data, tmp_path):
    pred = data / "labelsTr"
    mine = tmp_path / "results.csv"
    mine.write_text("subject,score\na,1\n")
    line = one_line_error(evaluate(pred, data, mine))
    assert line == (f"error: --out {str(mine)!r} would overwrite {str(mine)!r}, which is not a result of sparseslice "
                    "evaluate; pass another --out or move that file")
    summary = tmp_path / "results2.json"
    summary.write_text('{"mine": true}')
    line = one_line_error(evaluate(pred, data, tmp_path / "results2.csv"))
    assert f"would overwrite {str(summary)!r}" in line
    assert mine.read_text() == "subject,score\na,1\n" and summary.read_text() == '{"mine": true}'
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results2.csv").exists()


def test_evaluate_that_cannot_write_its_summary_leaves_neither_file(data, tmp_path, monkeypatch):
    pred = data / "labelsTr"
    out = tmp_path / "m.csv"
    ok(evaluate(pred, data, out))

    def full_disk(path, text):  # the summary (the second file) cannot be written
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("sparseslice.atomic.write_text", full_disk)
    line = one_line_error(evaluate(pred, data, out))
    assert "No space left on device" in line
    assert not out.exists() and not out.with_suffix(".json").exists()  # no table, no stale summary


# --- evaluate: a label value the reference does not declare ------------------------------


def test_evaluate_refuses_a_prediction_holding_an_undeclared_label(data, tmp_path):
    import nibabel as nib
    import numpy as np

    pred = tmp_path / "pred"
    pred.mkdir()
    for name in ("case_0.nii.gz", "case_1.nii.gz"):
        img = nib.load(data / "labelsTr" / name)
        arr = np.asarray(img.dataobj).astype(np.uint8)
        if name == "case_1.nii.gz":
            arr[0, 0, 0] = 3  # dataset.json declares 0 (background) and 1 only
        nib.save(nib.Nifti1Image(arr, img.affine), pred / name)
    out = tmp_path / "m.csv"
    line = one_line_error(evaluate(pred, data, out))
    assert line == ("error: case 'case_1': prediction holds label value 3, which the reference's dataset.json does "
                    "not declare (labels 0, 1); predict with a model trained on these labels, or pass the reference "
                    "the prediction was made for")
    assert not out.exists() and not out.with_suffix(".json").exists()
    ok(evaluate(pred, data / "labelsTr", out))  # a bare folder of labels declares nothing: scored as found


def test_a_label_off_its_image_grid_is_named_in_plain_numbers(data):
    import nibabel as nib
    import numpy as np

    label = data / "labelsTr" / "case_0.nii.gz"
    img = nib.load(label)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), np.diag([2.0, 2.0, 2.0, 1.0])), label)
    line = one_line_error(runner.invoke(app, ["info", str(data), "--no-progress"]))
    assert ("got spacing (2.0, 2.0, 2.0) origin (0.0, 0.0, 0.0) vs spacing (1.0, 1.0, 2.5) "
            "origin (0.0, 0.0, 0.0)") in line
