"""Hostile inputs answered in one line (issue 16, "Tracebacks instead of one line").

Each case runs the CLI as a user would (Typer's runner, which catches exceptions: a
traceback shows as ``result.exception`` not being ``SystemExit``). Output paths that cannot
be written are made with a parent that is a file or a path under ``/proc``: the tests run as
root, whom ``chmod`` does not stop. A failed command leaves nothing that looks like a result.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sparseslice.cli import app, info, synth
from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint
from sparseslice.select import read_plan

runner = CliRunner()
TINY_TRAIN = ["--model", "2d", "--epochs", "1", "--channels", "4,8", "--device", "cpu", "--threads", "1",
              "--no-progress"]


def one_line_error(result) -> str:
    """The single ``error:`` line of a failed command (exit 2, no traceback)."""
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:"), lines[0]
    return lines[0]


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A file where a folder would have to be (``blocker/x`` cannot be made, even by root)."""
    path = tmp_path / "blocker"
    path.write_text("not a folder")
    return path


@pytest.fixture(scope="module")
def plan_file(tmp_path_factory, phantom_dataset) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    result = runner.invoke(app, ["plan", str(phantom_dataset), "--budget", "8", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """An untrained 2D checkpoint for one-channel images with labels 0, 1, 2 (enough to predict)."""
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best.pt", Checkpoint(spec=spec, normalization=Normalization("zscore"), axis=2,
                                                labels=(0, 1, 2), patch_size=(16, 16),
                                                state_dict=build_model(spec).state_dict()))
    return run


def _copy(dataset: Path, dest: Path) -> Path:
    shutil.copytree(dataset, dest)
    return dest


def _make_two_channel(image: Path) -> None:
    img = nib.load(image)
    arr = np.asarray(img.dataobj)
    nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), img.affine), image)


# --- operating-system errors on outputs ---


@pytest.mark.parametrize("command", ["plan", "simulate", "train", "evaluate", "predict", "interpolate", "study",
                                     "synth", "demo"])
def test_output_under_a_file_is_one_line_naming_the_argument(command, blocker, phantom_dataset, plan_file,
                                                             run_dir, tmp_path):
    out = blocker / "out"
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: tiny\ngrid:\n  - {budget: [8], rho: [0.5], strategy: [random], model: [2d]}\n"
                    "seeds: [0]\ntraining: {preset: quick}\n")
    args = {
        "plan": ["plan", str(phantom_dataset), "--budget", "4", "-o", str(out / "plan.json")],
        "simulate": ["simulate", str(phantom_dataset), str(plan_file), "-o", str(out)],
        "train": ["train", str(phantom_dataset), "-o", str(out), *TINY_TRAIN],
        "evaluate": ["evaluate", str(phantom_dataset / "labelsTr"), str(phantom_dataset), "-o",
                     str(out / "metrics.csv"), "--no-progress"],
        "predict": ["predict", str(run_dir), str(phantom_dataset), "-o", str(out), "--device", "cpu",
                    "--no-progress"],
        "interpolate": ["interpolate", str(phantom_dataset), "-o", str(out), "--no-progress"],
        "study": ["study", "run", str(spec), "-o", str(out), "--data", str(phantom_dataset), "--no-progress"],
        "synth": ["synth", str(out), "--cases", "2"],
        "demo": ["demo", "-o", str(out), "--no-progress"],
    }[command]
    line = one_line_error(runner.invoke(app, args))
    given = out if command == "synth" else args[args.index("-o") + 1]
    assert line.startswith(f"error: cannot write {'OUT' if command == 'synth' else '--out'} {str(given)!r}: "), line
    assert "Not a directory" in line or "File exists" in line, line
    assert "pass" in line.split(";", 1)[1], line
    assert blocker.read_text() == "not a folder"


def test_out_naming_an_existing_folder_where_a_file_goes(tmp_path, phantom_dataset):
    folder = tmp_path / "metrics.csv"
    folder.mkdir()
    line = one_line_error(runner.invoke(app, ["evaluate", str(phantom_dataset / "labelsTr"), str(phantom_dataset),
                                              "-o", str(folder), "--no-progress"]))
    assert f"cannot write --out {str(folder)!r}: Is a directory" in line and "pass a file name" in line
    assert list(folder.iterdir()) == [] and not (tmp_path / "metrics.json").exists()


def test_out_under_proc_cannot_be_made(phantom_dataset):
    line = one_line_error(runner.invoke(app, ["synth", "/proc/sparseslice-test/x", "--cases", "2"]))
    assert "cannot write OUT '/proc/sparseslice-test/x'" in line


def test_full_or_read_only_disk_is_one_line_and_other_os_errors_are_not_hidden():
    from sparseslice.cli import os_error_line

    full = OSError(errno.ENOSPC, "No space left on device")
    assert os_error_line(full, synth, {}) == (
        "cannot write: No space left on device; the disk is full: free space or pass a folder on another disk")
    ro = OSError(errno.EROFS, "Read-only file system", "/data/out/imagesTr")
    line = os_error_line(ro, synth, {"out": Path("/data/out")})
    assert line == ("cannot write OUT '/data/out': Read-only file system ('/data/out/imagesTr'); the file system "
                    "is read-only: pass a folder on a writable disk")
    denied = PermissionError(errno.EACCES, "Permission denied", "/data/in/a.nii.gz")
    assert "cannot read DATA '/data/in'" in os_error_line(denied, info, {"data": Path("/data/in")})
    # an OSError on a path the user did not give is a bug: it keeps its traceback
    assert os_error_line(OSError(errno.EBADF, "Bad file descriptor", "/tmp/internal"), synth,
                         {"out": Path("/data/out")}) is None


# --- plan -o NAME.csv ---


def test_plan_out_csv_names_the_files_not_a_folder(tmp_path, phantom_dataset):
    out = tmp_path / "plan.csv"
    result = runner.invoke(app, ["plan", str(phantom_dataset), "--budget", "4", "-o", str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "plan.json").is_file()
    assert out.read_text().startswith("case,axis,n_slices")
    sim = runner.invoke(app, ["simulate", str(phantom_dataset), str(out), "-o", str(tmp_path / "sparse"),
                              "--no-progress"])
    assert sim.exit_code == 0, sim.output


# --- extents CSV encodings ---


def test_extents_with_excel_byte_order_mark_is_read(tmp_path, phantom_dataset):
    ext = tmp_path / "extents.csv"
    ext.write_bytes("case,first,last\nphantom_000,3,5\n".encode("utf-8-sig"))
    out = tmp_path / "p.json"
    result = runner.invoke(app, ["plan", str(phantom_dataset), "--budget", "4", "--extents", str(ext), "-o",
                                 str(out), "--no-progress"])
    assert result.exit_code == 0, result.output
    entry = {e.case_id: e for e in read_plan(out).entries}["phantom_000"]
    assert tuple(entry.extent) == (3, 5) and entry.slices and all(3 <= s <= 5 for s in entry.slices)


def test_extents_not_utf8_is_one_line_naming_file_and_encoding(tmp_path, phantom_dataset):
    ext = tmp_path / "extents.csv"
    ext.write_bytes("case,first,last,note\nphantom_000,3,5,révisé\n".encode("latin-1"))
    line = one_line_error(runner.invoke(app, ["plan", str(phantom_dataset), "--budget", "4", "--extents", str(ext),
                                              "-o", str(tmp_path / "p.json"), "--no-progress"]))
    assert str(ext) in line and "UTF-8" in line and "0xe9" in line
    assert not (tmp_path / "p.json").exists()


# --- --device the machine lacks ---


def test_unavailable_device_is_one_line_listing_the_devices(tmp_path, phantom_dataset, run_dir):
    line = one_line_error(runner.invoke(app, ["train", str(phantom_dataset), "-o", str(tmp_path / "run"), "--model",
                                              "2d", "--epochs", "1", "--device", "cuda:99", "--no-progress"]))
    assert "--device" in line and "'cuda:99'" in line and "cpu" in line
    assert not (tmp_path / "run").exists()
    line = one_line_error(runner.invoke(app, ["predict", str(run_dir), str(phantom_dataset), "-o",
                                              str(tmp_path / "pred"), "--device", "cuda:99", "--no-progress"]))
    assert "--device" in line and "checkpoint" not in line and "cpu" in line
    assert not (tmp_path / "pred").exists()


# --- images that are not what sparseslice reads ---


def test_2d_image_is_named_as_2d(tmp_path, phantom_dataset):
    ds = _copy(phantom_dataset, tmp_path / "ds")
    image = ds / "imagesTr" / "phantom_001.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((32, 32), np.float32), np.eye(4)), image)
    for args in (["info", str(ds)], ["plan", str(ds), "--budget", "4", "-o", str(tmp_path / "p.json")]):
        line = one_line_error(runner.invoke(app, [*args, "--no-progress"]))
        assert "phantom_001" in line and "2D image" in line and "3D volumes" in line
        assert "spacing" not in line


def test_mixed_channel_counts_in_one_dataset_is_one_line(tmp_path, phantom_dataset):
    ds = _copy(phantom_dataset, tmp_path / "ds")
    for case in ("phantom_000", "phantom_002"):
        _make_two_channel(ds / "imagesTr" / f"{case}.nii.gz")
    line = one_line_error(runner.invoke(app, ["train", str(ds), "-o", str(tmp_path / "run"), *TINY_TRAIN]))
    assert "same number of image channels" in line and "2 in" in line and "1 in" in line
    assert not (tmp_path / "run" / "best.pt").exists()


# --- a failure leaves no result behind ---


def test_failed_predict_leaves_no_predictions_or_predict_json(tmp_path, phantom_dataset, run_dir):
    ds = _copy(phantom_dataset, tmp_path / "ds")
    _make_two_channel(ds / "imagesTr" / "phantom_003.nii.gz")  # the last case fails, after three were written
    out = tmp_path / "pred"
    line = one_line_error(runner.invoke(app, ["predict", str(run_dir), str(ds), "-o", str(out), "--device", "cpu",
                                              "--no-progress"]))
    assert "channel" in line
    assert not out.exists()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    one_line_error(runner.invoke(app, ["predict", str(run_dir), str(ds), "-o", str(kept), "--device", "cpu",
                                       "--no-progress"]))
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]


def test_failed_evaluate_writes_no_metrics(tmp_path, phantom_dataset):
    pred = tmp_path / "pred"
    pred.mkdir()
    out = tmp_path / "metrics.csv"
    for extra in ([], ["--allow-missing"]):
        line = one_line_error(runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "-o", str(out),
                                                  "--no-progress", *extra]))
        assert "no prediction" in line
        assert not out.exists() and not out.with_suffix(".json").exists()
    shutil.copy(phantom_dataset / "labelsTr" / "phantom_000.nii.gz", pred)
    result = runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "-o", str(out), "--no-progress"])
    assert result.exit_code == 2 and "--out was not written" in result.output
    assert not out.exists() and not out.with_suffix(".json").exists()
    result = runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "-o", str(out), "--no-progress",
                                 "--allow-missing"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".json").is_file()
