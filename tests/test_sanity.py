"""Silent wrong results refused: non-finite voxels and losses, config values of the wrong type."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset, load_image
from sparseslice.errors import UserError
from sparseslice.io import read_volume, write_volume
from sparseslice.predict import predict_folder
from sparseslice.study.spec import parse_spec
from sparseslice.synthetic import write_phantom_dataset
from sparseslice.train import TrainConfig, train

torch.set_num_threads(1)
TINY = {"channels": [8, 16], "strides": [2], "num_res_units": 0, "num_threads": 1, "val_fraction": 0.0,
        "augment": False, "epochs": 1, "samples_per_epoch": 4, "batch_size": 4}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "full", cases=2, seed=0, shape=(16, 16, 8))


@pytest.fixture(scope="module")
def poisoned(phantoms, tmp_path_factory):
    """A copy of ``phantoms`` whose first case's image holds 3 NaN and 2 inf voxels."""
    out = tmp_path_factory.mktemp("poisoned") / "data"
    ds = discover_dataset(phantoms)
    for case in ds.cases:
        for p in (*case.images, case.label):
            target = out / p.relative_to(phantoms)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    (out / "dataset.json").write_text((phantoms / "dataset.json").read_text())
    first = discover_dataset(out).cases[0]
    vol = read_volume(first.images[0])
    arr = vol.array.astype(np.float32)
    arr[0, 0, :3] = np.nan
    arr[1, 1, :2] = [np.inf, -np.inf]
    write_volume(vol.like(arr), first.images[0])
    return out


def one_line_refusal(result, *needles):
    """A CLI result that is a one-line refusal (exit 2, no traceback) holding every needle."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- non-finite voxels ----------------------------------------------------------------------

def test_nonfinite_image_is_refused_at_read_naming_case_and_count(poisoned):
    case = discover_dataset(poisoned).cases[0]
    message = rf"case '{case.case_id}' image .* has 5 non-finite voxel\(s\).*nonfinite: zero"
    with pytest.raises(UserError, match=message):
        load_image(case)
    res = CliRunner().invoke(app, ["train", str(poisoned), "-o", str(poisoned.parent / "run"), "--no-progress"])
    one_line_refusal(res, case.case_id, "5 non-finite")
    assert not (poisoned.parent / "run" / "best.pt").exists()


def test_nonfinite_zero_reads_them_as_zero_and_trains(poisoned, tmp_path):
    case = discover_dataset(poisoned).cases[0]
    raw = read_volume(case.images[0]).array
    image = load_image(case, nonfinite="zero").array
    bad = ~np.isfinite(raw)
    assert bad.sum() == 5 and np.all(image[bad] == 0) and np.array_equal(image[~bad], raw[~bad])
    result = train(poisoned, tmp_path / "run", config=TrainConfig.from_dict({**TINY, "nonfinite": "zero"}),
                   progress=False)
    assert np.isfinite(result.best_val_dice) and result.checkpoint.exists()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["nonfinite"] == "zero"
    # predict reads images as the run was trained to: the poisoned case is predicted, not refused
    written = predict_folder(tmp_path / "run", poisoned, tmp_path / "pred", progress=False)
    assert len(written) == 2


def test_predict_and_plan_refuse_nonfinite_images(poisoned, phantoms, tmp_path):
    case = discover_dataset(poisoned).cases[0]
    train(phantoms, tmp_path / "run", config=TrainConfig.from_dict(TINY), progress=False)
    with pytest.raises(UserError, match=f"case '{case.case_id}' image .* has 5 non-finite"):
        predict_folder(tmp_path / "run", poisoned, tmp_path / "pred", progress=False)
    res = CliRunner().invoke(app, ["plan", str(poisoned), "--budget", "4", "--strategy", "ual", "-o",
                                   str(tmp_path / "plan.json"), "--no-progress"])
    one_line_refusal(res, case.case_id, "5 non-finite")


def test_nonfinite_loss_stops_training_and_leaves_no_checkpoint(phantoms, tmp_path):
    with pytest.raises(UserError, match=r"training loss is non-finite at epoch 1, got (nan|inf).*lower lr"):
        # fp32: under bfloat16 autocast the first epoch's losses can stay finite
        train(phantoms, tmp_path / "run", config=TrainConfig.from_dict({**TINY, "lr": 1e30, "epochs": 3,
                                                                          "samples_per_epoch": 8, "bf16": False}),
              progress=False)
    assert not (tmp_path / "run" / "best.pt").exists() and not (tmp_path / "run" / "last.pt").exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "lr": 1e30, "samples_per_epoch": 8, "bf16": False}))
    res = CliRunner().invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "r2"), "-c", str(cfg),
                                   "--no-progress"])
    one_line_refusal(res, "training loss is non-finite")
    assert not (tmp_path / "r2" / "best.pt").exists()


# --- config types ---------------------------------------------------------------------------

BAD_TYPES = [
    ("augment", "false", "must be true or false (unquoted), got 'false'; write e.g. augment: false"),
    ("mask_channel", "no", "must be true or false (unquoted), got 'no'; write e.g. mask_channel: false"),
    ("epochs", "two", "must be an integer, got 'two'; write e.g. epochs: 50"),
    ("epochs", True, "must be an integer, got True"),
    ("channels", 16, "must be a list of integers or null, got 16; write e.g. channels: [16, 32, 64, 128]"),
    ("channels", [16, "x"], "must be a list of integers"),
    ("ct_window", [0, 1, 2], "must be a list of 2 numbers"),
    ("lr", "1e-3", "must be a number, got '1e-3'; write e.g. lr: 0.001"),
    ("batch_size", 2.5, "must be an integer or null, got 2.5"),
]


@pytest.mark.parametrize("key, value, message", BAD_TYPES)
def test_config_values_of_the_wrong_type_name_the_key(key, value, message):
    with pytest.raises(UserError, match=f"^train config key '{key}' " + re.escape(message)):
        TrainConfig.from_dict({key: value})


def test_config_types_that_fit_are_taken():
    cfg = TrainConfig.from_dict({"augment": False, "lr": 1, "batch_size": None, "ct_window": [-1, 1],
                                 "patch_size": [64, 64], "max_minutes": 0.5, "nonfinite": "zero"})
    assert (cfg.augment, cfg.lr, cfg.batch_size, cfg.ct_window, cfg.patch_size) == (False, 1, None, (-1.0, 1.0),
                                                                                     (64, 64))
    assert cfg.nonfinite == "zero"


@pytest.mark.parametrize("key, value, message", BAD_TYPES[:5])
def test_cli_train_config_of_the_wrong_type_is_one_line(phantoms, tmp_path, key, value, message):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({key: value}))
    res = CliRunner().invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "run"), "-c", str(cfg)])
    one_line_refusal(res, f"train config key '{key}' {message}")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("key, value, message", BAD_TYPES[:5])
def test_study_training_block_of_the_wrong_type_is_refused(key, value, message):
    spec = {"name": "t", "dataset": {"path": "/nonexistent/data"}, "seeds": [0],
            "grid": [{"budget": [12], "rho": [0.5], "strategy": ["random"], "model": ["2d"]}],
            "training": {"preset": "demo", key: value}}
    if key == "mask_channel":  # a grid factor in a study (checked there): try another bool
        spec["training"] = {"preset": "demo", "channels_last": value}
        key, message = "channels_last", message.replace("mask_channel", "channels_last")
    with pytest.raises(UserError, match=f"train config key '{key}' " + re.escape(message)):
        parse_spec(spec)



# --- empty labels ---------------------------------------------------------------------------

def test_training_on_background_only_labels_is_refused(phantoms, tmp_path):
    from test_train import make_sparse

    sparse = make_sparse(phantoms, tmp_path / "edge", lambda n: [0])  # first slice: background only
    with pytest.raises(UserError, match=r"must hold a foreground voxel in an annotated slice, got none in the 2 "):
        train(sparse, tmp_path / "run", config=TrainConfig.from_dict(TINY), progress=False)
    assert not (tmp_path / "run" / "best.pt").exists()
    res = CliRunner().invoke(app, ["train", str(sparse), "-o", str(tmp_path / "r2"), "--no-progress"])
    one_line_refusal(res, "foreground voxel")
