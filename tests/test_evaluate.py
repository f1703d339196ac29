"""Folder evaluation: tidy frame, sparse references, missing cases, mismatches, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.errors import UserError
from sparseslice.evaluate import evaluate_folder, summarize
from sparseslice.io import Volume, affine_from_spacing, read_label, write_volume
from sparseslice.metrics import METRICS, dice, surface_distances
from sparseslice.sparse import SparseLabel, write_sparse

CASES = ["phantom_000", "phantom_001", "phantom_002", "phantom_003"]


def copy_labels(phantom_dataset: Path, out: Path, *, skip: tuple[str, ...] = ()) -> Path:
    out.mkdir(parents=True)
    for p in sorted((phantom_dataset / "labelsTr").glob("*.nii.gz")):
        if p.name[:-7] not in skip:
            shutil.copy(p, out / p.name)
    return out


def test_identical_predictions_score_perfectly(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred")
    df = evaluate_folder(pred, phantom_dataset, progress=False)
    assert list(df.columns) == ["case", "label", "region", "metric", "value", "note"]
    assert sorted(df["case"].unique()) == CASES
    assert set(zip(df["label"], df["region"], strict=True)) == {(1, "label"), (2, "label"), (0, "foreground")}
    assert set(df["metric"]) == set(METRICS)
    assert len(df) == 4 * 3 * len(METRICS)
    assert np.all(df.loc[df.metric == "dice", "value"] == 1.0)
    assert np.all(df.loc[df.metric.isin(["hd", "hd95", "assd", "assd2d", "rvd"]), "value"] == 0.0)
    assert df.attrs["missing"] == [] and df.attrs["axis"] == 2


def test_values_equal_direct_metric_calls(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred")
    ref = read_label(phantom_dataset / "labelsTr" / "phantom_001.nii.gz")
    arr = ref.array.copy()
    arr[np.roll(arr == 1, 2, axis=0)] = 1  # grow label 1 by a shifted copy
    write_volume(ref.like(arr), pred / "phantom_001.nii.gz")
    df = evaluate_folder(pred, phantom_dataset, cases=["phantom_001"], progress=False)
    got = df.set_index(["label", "metric"])["value"]
    assert got[(1, "dice")] == pytest.approx(dice(arr == 1, ref.array == 1))
    sd = surface_distances(arr == 1, ref.array == 1, spacing=ref.spacing)
    assert got[(1, "hd95")] == pytest.approx(sd.hausdorff(95))
    assert got[(1, "assd")] == pytest.approx(sd.assd())
    assert got[(1, "hd")] > 0 and got[(1, "rvd")] > 0


def test_missing_case_raises_or_is_listed(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred", skip=("phantom_002",))
    with pytest.raises(UserError, match="phantom_002"):
        evaluate_folder(pred, phantom_dataset, progress=False)
    df = evaluate_folder(pred, phantom_dataset, allow_missing=True, progress=False)
    assert df.attrs["missing"] == ["phantom_002"]
    assert sorted(df["case"].unique()) == ["phantom_000", "phantom_001", "phantom_003"]


def test_shape_and_spacing_mismatch_name_the_case(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred")
    ref = read_label(pred / "phantom_003.nii.gz")
    write_volume(Volume(ref.array[:-1], ref.affine), pred / "phantom_003.nii.gz")
    with pytest.raises(UserError, match="case 'phantom_003': prediction shape must match"):
        evaluate_folder(pred, phantom_dataset, progress=False)
    write_volume(Volume(ref.array, affine_from_spacing((1.0, 1.0, 3.0))), pred / "phantom_003.nii.gz")
    with pytest.raises(UserError, match="case 'phantom_003': prediction spacing must match"):
        evaluate_folder(pred, phantom_dataset, progress=False)


def test_sparse_reference_scores_annotated_slices_only(phantom_dataset, tmp_path):
    full = read_label(phantom_dataset / "labelsTr" / "phantom_000.nii.gz")
    annotated = [3, 5, 7]
    ref_dir = tmp_path / "ref"
    write_sparse(SparseLabel.from_slices(full.array, annotated, axis=2), ref_dir / "phantom_000.nii.gz", like=full)
    pred_arr = full.array.copy()
    pred_arr[:, :, 4] = 0  # wrong only in an unannotated slice
    pred_arr[:, :, 6] = 1
    write_volume(full.like(pred_arr), tmp_path / "pred" / "phantom_000.nii.gz")
    df = evaluate_folder(tmp_path / "pred", ref_dir, progress=False)
    got = df.set_index(["label", "metric"])
    assert got.loc[(0, "dice"), "value"] == 1.0 and got.loc[(1, "assd2d"), "value"] == 0.0
    assert math.isnan(got.loc[(0, "hd"), "value"]) and got.loc[(0, "hd"), "note"] == "sparse ref"
    # without a sidecar, the ignore value marks unknown voxels (decoded along the slice axis)
    (ref_dir / "phantom_000.sparse.json").unlink()
    df2 = evaluate_folder(tmp_path / "pred", ref_dir, axis=2, progress=False)
    pd.testing.assert_frame_equal(df2, df, check_like=True)


def test_summarize_statistics_exclude_nan():
    df = pd.DataFrame({"case": list("abcd"), "label": 1, "region": "label", "metric": "hd",
                       "value": [1.0, 2.0, 3.0, math.nan], "note": ["", "", "", "empty pred"]})
    row = summarize(df).iloc[0]
    assert (row.n, row.nan) == (3, 1)
    assert row["mean"] == 2.0 and row["median"] == 2.0 and row["std"] == pytest.approx(1.0)
    assert row["p5"] == pytest.approx(np.percentile([1, 2, 3], 5))


def test_cli_evaluate_writes_tidy_csv_and_table(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred")
    out = tmp_path / "m" / "metrics.csv"
    result = CliRunner().invoke(app, ["evaluate", str(pred), str(phantom_dataset / "labelsTr"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "dice" in result.output and "hd95" in result.output and "median" in result.output
    df = pd.read_csv(out)  # no dtype needed: label is an integer column, region names the union
    assert df["label"].dtype == np.int64 and set(df["case"]) == set(CASES)
    assert set(df.loc[df.label == 1, "region"]) == {"label"} and len(df[df.label == 1]) == len(CASES) * len(METRICS)
    assert set(df.loc[df.region == "foreground", "label"]) == {0} and set(df["label"]) == {0, 1, 2}
    summary = json.loads(out.with_suffix(".json").read_text())
    assert summary["missing"] == [] and summary["summary"][0]["metric"] == "dice"


def test_cli_evaluate_missing_case_and_shape_mismatch(phantom_dataset, tmp_path):
    pred = copy_labels(phantom_dataset, tmp_path / "pred", skip=("phantom_001",))
    out = tmp_path / "metrics.csv"
    runner = CliRunner()
    result = runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "-o", str(out)])
    assert result.exit_code == 2 and "phantom_001" in result.output and "Traceback" not in result.output
    assert "3 cases" in result.output and not out.exists()  # the rest is shown; a failure writes no result
    result = runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "--allow-missing"])
    assert result.exit_code == 0 and "phantom_001" in result.output
    ref = read_label(pred / "phantom_000.nii.gz")
    write_volume(Volume(ref.array[:, :-2], ref.affine), pred / "phantom_000.nii.gz")
    result = runner.invoke(app, ["evaluate", str(pred), str(phantom_dataset), "--allow-missing"])
    assert result.exit_code == 2 and "phantom_000" in result.output and "shape" in result.output


def test_real_hippocampus_case_against_itself_shifted(hippocampus, tmp_path):
    ref = read_label(hippocampus / "labelsTr" / "hippocampus_001.nii.gz")
    write_volume(ref.like(np.roll(ref.array, 1, axis=1)), tmp_path / "pred" / "hippocampus_001.nii.gz")
    df = evaluate_folder(tmp_path / "pred", hippocampus, cases=["hippocampus_001"], progress=False)
    got = df.set_index(["label", "metric"])["value"]
    assert got[(0, "hd")] == pytest.approx(1.0)  # 1 mm isotropic, one-voxel shift
    assert 0.5 < got[(0, "dice")] < 1.0 and df.attrs["axis"] == 0


def test_nnunet_ignore_label_voxels_are_not_scored(tmp_path):
    # the reference declares "ignore": 3 in dataset.json and has no sidecars
    from nnunet_fakes import ANNOTATED, IGNORE, write_ignore_dataset

    data = write_ignore_dataset(tmp_path / "nn", cases=1)
    ref = read_label(data / "labelsTr" / "case_000.nii.gz")
    truth = read_label(data / "full" / "case_000.nii.gz").array
    unknown = ref.array == IGNORE
    pred = truth.copy()
    pred[unknown] = 1  # anything where the reference is unknown, the partly labelled slice's ignored half too
    write_volume(ref.like(pred), tmp_path / "pred" / "case_000.nii.gz")
    df = evaluate_folder(tmp_path / "pred", data, axis=2, progress=False)
    scores = df[df.metric == "dice"]
    assert len(scores) == 3 and np.all(scores.value == 1.0)  # labels 1, 2 and the union; never 3
    assert df[df.metric == "hd"].note.str.startswith("sparse ref").all()
    # an error on an annotated slice counts, on the annotated slices only
    pred[..., ANNOTATED[0]] = 0
    write_volume(ref.like(pred), tmp_path / "pred" / "case_000.nii.gz")
    df = evaluate_folder(tmp_path / "pred", data, axis=2, progress=False)
    known = np.zeros(truth.shape, bool)
    known[..., list(ANNOTATED)] = True
    expected = {v: dice(pred == v, truth == v, mask=known) for v in (1, 2)} | {0: dice(pred > 0, truth > 0, mask=known)}
    got = df[df.metric == "dice"].set_index("label")["value"]
    np.testing.assert_allclose([got[k] for k in expected], list(expected.values()))
    assert max(expected.values()) < 1
