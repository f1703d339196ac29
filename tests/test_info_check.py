"""``info --check`` reads everything, as nnU-Net's --verify_dataset_integrity does (issue 16);
``info`` without it says what it did not check."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from test_hostile import user_dataset

runner = CliRunner()


def info(*args: str) -> object:
    return runner.invoke(app, ["info", *map(str, args), "--no-progress"])


@pytest.fixture
def hostile(tmp_path: Path) -> Path:
    """A dataset with one integrity problem per case (case_0 is sound)."""
    data = user_dataset(tmp_path / "data", cases=8)
    images, labels = data / "imagesTr", data / "labelsTr"
    meta = json.loads((data / "dataset.json").read_text())

    def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
        img = nib.load(path)
        return np.asarray(img.dataobj), img.affine

    raw = gzip.decompress((images / "case_1.nii.gz").read_bytes())
    (images / "case_1.nii.gz").write_bytes(gzip.compress(raw[: len(raw) // 2]))  # truncated voxel data
    arr, aff = load(images / "case_2.nii.gz")
    nib.save(nib.Nifti1Image(np.stack([arr, arr], -1), aff), images / "case_2.nii.gz")  # two channels
    arr, aff = load(labels / "case_3.nii.gz")
    moved = aff.copy()
    moved[:3, 3] += 5.0
    nib.save(nib.Nifti1Image(arr, moved), labels / "case_3.nii.gz")  # label off the image grid (origin)
    arr, aff = load(labels / "case_4.nii.gz")
    arr = arr.astype(np.uint8)
    arr[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(arr, aff), labels / "case_4.nii.gz")  # a value dataset.json does not declare
    arr, aff = load(images / "case_5.nii.gz")
    arr = arr.astype(np.float32)
    arr[1, 1, 1] = np.nan
    arr[2, 2, 2] = np.inf
    nib.save(nib.Nifti1Image(arr, aff), images / "case_5.nii.gz")  # non-finite intensities
    (labels / "case_6.nii.gz").unlink()  # listed, missing
    (labels / "stray.nii.gz").write_bytes((labels / "case_0.nii.gz").read_bytes())  # a label without image
    arr, aff = load(labels / "case_7.nii.gz")
    nib.save(nib.Nifti1Image(arr[:, :, :-1], aff), labels / "case_7.nii.gz")  # label shape differs
    meta["numTraining"] = 9
    (data / "dataset.json").write_text(json.dumps(meta))
    return data


def test_info_check_lists_every_problem_one_line_each_and_exits_1(hostile):
    result = info(hostile, "--check")
    assert result.exit_code == 1, result.output
    problems = [line for line in result.stdout.splitlines() if line.startswith("problem: ")]
    assert len(problems) == len(result.stdout.strip().splitlines()) == 9, result.stdout
    expected = [
        "dataset.json training entry 6 lists label './labelsTr/case_6.nii.gz', which does not exist",
        "dataset.json numTraining is 9, but its training list has 8 entries",
        "case 'case_1': file",  # its message says truncated or corrupt
        "case 'case_3': label origin",
        "case 'case_4': label holds value 7, which dataset.json does not declare (labels 0, 1)",
        "case 'case_5': image 'case_5.nii.gz' has 2 non-finite voxel(s) (NaN or inf)",
        "case 'case_7': label shape (16, 16, 7) differs from the image's (16, 16, 8)",
        "case 'case_2': 2 image channel(s), but dataset.json declares 1",
        f"label {str(hostile / 'labelsTr' / 'stray.nii.gz')!r} has no image",
    ]
    for text, line in zip(expected, problems, strict=True):
        assert line.startswith(f"problem: {text}"), (text, line)
    assert "truncated or corrupt" in problems[2]
    assert "case_0" not in result.stdout
    assert "9 problem(s)" in result.stderr and "Traceback" not in result.output
    record = json.loads(info(hostile, "--check", "--json").stdout)
    assert record["checked"] == "everything" and [f"problem: {p}" for p in record["problems"]] == problems


def test_info_without_check_passes_the_same_dataset_but_says_what_it_did_not_check(hostile, tmp_path):
    sound = user_dataset(tmp_path / "sound", cases=2)
    (sound / "imagesTr" / "case_1.nii.gz").write_bytes(
        gzip.compress(gzip.decompress((sound / "imagesTr" / "case_1.nii.gz").read_bytes())[:400]))  # truncated
    result = info(sound)
    assert result.exit_code == 0, result.output  # headers only: the truncated image passes
    text = " ".join(result.stdout.split())
    assert "read image headers only (labels in full); not checked: image voxels (a truncated or corrupt image " \
           "passes); non-finite intensities" in text and "(info --check reads everything)" in text
    record = json.loads(info(sound, "--json").stdout)
    assert record["checked"] == "headers" and "non-finite intensities (NaN, inf)" in record["not_checked"]
    assert info(sound, "--check").exit_code == 1


def test_info_check_passes_a_sound_dataset_and_says_so(phantom_dataset):
    result = info(phantom_dataset, "--check")
    assert result.exit_code == 0, result.output
    assert "checked everything: every file dataset.json lists exists" in " ".join(result.stdout.split())
    assert "not checked" not in result.stdout
    record = json.loads(info(phantom_dataset, "--check", "--json").stdout)
    assert record["checked"] == "everything" and record["not_checked"] == [] and record["problems"] == []
    assert record["n_cases"] == 4


def test_info_without_check_never_decodes_an_image(phantom_dataset, monkeypatch):
    """info reads image headers only: decoding any image's voxels fails the test (labels are read in full)."""
    import sparseslice.io as io_module
    from sparseslice.datasets import discover_dataset
    from sparseslice.info import describe_dataset

    images = {str(p) for c in discover_dataset(phantom_dataset).cases for p in c.images}
    real = io_module._read_nifti

    def guarded(path):
        if str(path) in images:
            raise AssertionError(f"info decoded image {path}")
        return real(path)

    monkeypatch.setattr(io_module, "_read_nifti", guarded)
    desc = describe_dataset(phantom_dataset)
    assert desc.cases and all(c.shape for c in desc.cases)
