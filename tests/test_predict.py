"""Inference: crafted models with known outputs, post-processing, folder prediction, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset, load_image
from sparseslice.errors import UserError
from sparseslice.io import Volume, affine_from_spacing, read_label, read_volume
from sparseslice.metrics import dice
from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint
from sparseslice.predict import fill_label_holes, keep_largest_component, predict_folder, predict_volume


class Threshold(nn.Module):
    """Foreground logit = gain * (intensity - 0.5) + a ramp along one spatial dim (strength 0: none)."""

    def __init__(self, *, ramp_dim: int = -1, strength: float = 0.0, gain: float = 4.0) -> None:
        super().__init__()
        self.ramp_dim, self.strength, self.gain = ramp_dim, strength, gain

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        fg = self.gain * (t[:, :1] - 0.5)
        if self.strength:
            n = t.shape[self.ramp_dim]
            shape = [1] * t.ndim
            shape[self.ramp_dim] = n
            fg = fg + torch.linspace(-self.strength, self.strength, n).reshape(shape)
        return torch.cat([-fg, fg], dim=1)


def crafted_ckpt(*, dims: int = 3, axis: int = 2, patch=(16, 16, 8), mask_channel: bool = False) -> Checkpoint:
    spec = ModelSpec(dims=dims, in_channels=1 + int(mask_channel), out_channels=2, channels=(4, 8), strides=(2,),
                     mask_channel=mask_channel)
    return Checkpoint(spec=spec, normalization=Normalization("none"), axis=axis, labels=(0, 1),
                      patch_size=tuple(patch), state_dict={})


def cube_image(shape=(16, 16, 8)) -> tuple[Volume, np.ndarray]:
    truth = np.zeros(shape, bool)
    truth[4:12, 4:12, 2:6] = True
    return Volume(truth.astype(np.float32), affine_from_spacing((1.0, 1.0, 2.5))), truth


def test_pointwise_model_reproduces_threshold_in_2d_and_3d():
    image, truth = cube_image(shape=(12, 16, 8))
    out3 = predict_volume(Threshold(), crafted_ckpt(patch=(8, 8, 8)), image, fill_holes=False, largest_component=False)
    assert out3.shape == image.shape and np.array_equal(out3 > 0, truth)
    for axis in range(3):
        plane = tuple(s for a, s in enumerate(image.shape) if a != axis)
        ckpt = crafted_ckpt(dims=2, axis=axis, patch=plane)
        out2 = predict_volume(Threshold(), ckpt, image, fill_holes=False, largest_component=False, batch_size=3)
        assert np.array_equal(out2 > 0, truth), axis


def test_tta_removes_a_position_bias_and_only_improves():
    image, truth = cube_image()
    ckpt = crafted_ckpt(patch=image.shape)
    model = Threshold(ramp_dim=4, strength=3.0)  # biased along image axis 2
    plain = predict_volume(model, ckpt, image, tta=False, fill_holes=False, largest_component=False)
    flipped = predict_volume(model, ckpt, image, tta=True, tta_axes=[2], fill_holes=False, largest_component=False)
    assert dice(plain > 0, truth) < 1.0
    assert np.array_equal(flipped > 0, truth)  # symmetric bias averages out exactly
    # flipping an axis the bias does not depend on changes nothing
    other = predict_volume(model, ckpt, image, tta=True, tta_axes=[0], fill_holes=False, largest_component=False)
    assert np.array_equal(other, plain)


def test_postprocessing_removes_stray_blob_and_fills_hole():
    image, truth = cube_image()
    arr = image.array.copy()
    arr[7, 7, 3] = 0.0  # a hole inside the structure
    arr[0:2, 14:16, 7] = 1.0  # a stray blob far from it
    image = image.like(arr)
    ckpt = crafted_ckpt(patch=image.shape)
    raw = predict_volume(Threshold(), ckpt, image, fill_holes=False, largest_component=False)
    lcc = predict_volume(Threshold(), ckpt, image, fill_holes=False, largest_component=True)
    both = predict_volume(Threshold(), ckpt, image)
    assert raw[0, 14, 7] == 1 and raw[7, 7, 3] == 0
    assert lcc[0, 14, 7] == 0 and lcc[7, 7, 3] == 0
    assert np.all(lcc <= raw)  # only removes voxels
    assert np.all(both >= lcc)  # hole filling only adds voxels
    assert np.array_equal(both > 0, truth)
    assert dice(raw > 0, truth) < dice(lcc > 0, truth) < dice(both > 0, truth) == 1.0


def test_postprocessing_per_label_keeps_nested_label():
    lab = np.zeros((9, 9, 9), np.uint8)
    lab[1:8, 1:8, 1:8] = 1
    lab[4, 4, 4] = 2  # nested structure inside label 1: not a hole to fill
    lab[3, 3, 3] = 0  # a real hole
    lab[0, 0, 0] = 2  # second component of label 2, same size: one of the two is kept
    filled = fill_label_holes(lab)
    assert filled[4, 4, 4] == 2 and filled[3, 3, 3] == 1
    kept = keep_largest_component(lab)
    assert (kept == 2).sum() == 1 and (kept == 1).sum() == (lab == 1).sum()


def test_mask_channel_is_all_ones_at_inference():
    seen = {}

    class Spy(Threshold):
        def forward(self, t):
            seen["mask"] = t[:, -1].clone()
            return super().forward(t)

    image, truth = cube_image()
    out = predict_volume(Spy(), crafted_ckpt(mask_channel=True, patch=image.shape), image, fill_holes=False,
                         largest_component=False)
    assert torch.all(seen["mask"] == 1) and np.array_equal(out > 0, truth)


def test_bad_input_names_the_problem():
    image, _ = cube_image()
    ckpt = crafted_ckpt()
    two = Volume(np.stack([image.array] * 2, axis=-1), image.affine)
    with pytest.raises(UserError, match="image must have 1 channel"):
        predict_volume(Threshold(), ckpt, two)
    with pytest.raises(UserError, match="overlap"):
        predict_volume(Threshold(), ckpt, image, overlap=1.0)
    with pytest.raises(UserError, match="tta_axes"):
        predict_volume(Threshold(), ckpt, image, tta=True, tta_axes=[3])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> object:
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    model = build_model(spec)
    run = tmp_path_factory.mktemp("run")
    save_checkpoint(run / "best.pt", Checkpoint(spec=spec, normalization=Normalization("zscore"), axis=2,
                                                labels=(0, 1, 2), patch_size=(16, 16),
                                                state_dict=model.state_dict()))
    return run


def test_predict_folder_writes_label_maps_in_image_space(run_dir, phantom_dataset, tmp_path):
    out = tmp_path / "pred"
    written = predict_folder(run_dir, phantom_dataset, out, cases=["phantom_000", "phantom_001"], tta=True,
                             progress=False)
    assert [p.name for p in written] == ["phantom_000.nii.gz", "phantom_001.nii.gz"]
    ds = discover_dataset(phantom_dataset)
    for path in written:
        image = load_image(ds.case(path.name[:-7]))
        pred = read_label(path)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine, atol=1e-6)
        assert set(np.unique(pred.array)) <= {0, 1, 2}
        assert read_volume(path).array.dtype == np.uint8
    record = json.loads((out / "predict.json").read_text())
    assert record["tta"] is True and record["tta_axes"] == [0, 1] and record["cases"] == ["phantom_000", "phantom_001"]


def test_predict_folder_3d_unet_with_odd_shape(tmp_path):
    torch.manual_seed(1)
    spec = ModelSpec(dims=3, in_channels=2, out_channels=2, channels=(4, 8), strides=(2,), mask_channel=True)
    save_checkpoint(tmp_path / "run" / "best.pt",
                    Checkpoint(spec=spec, normalization=Normalization("zscore"), axis=2, labels=(1,),
                               patch_size=(8, 8, 8), state_dict=build_model(spec).state_dict()))
    from sparseslice.io import write_volume
    from sparseslice.synthetic import make_phantom

    ph = make_phantom((13, 11, 9), spacing=(0.8, 0.9, 3.0), seed=3)
    write_volume(ph.image, tmp_path / "imgs" / "a.nii.gz")
    (path,) = predict_folder(tmp_path / "run", tmp_path / "imgs", tmp_path / "pred", progress=False)
    pred = read_label(path)
    assert pred.shape == (13, 11, 9) and np.allclose(pred.affine, ph.image.affine)


def test_cli_predict(run_dir, phantom_dataset, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run_dir), str(phantom_dataset), "-o", str(tmp_path / "p"),
                                 "--cases", "phantom_002", "--no-fill-holes"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "p" / "phantom_002.nii.gz").is_file()
    result = runner.invoke(app, ["predict", str(tmp_path / "nope"), str(phantom_dataset), "-o", str(tmp_path / "q")])
    assert result.exit_code == 2 and "checkpoint" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["predict", str(run_dir), str(phantom_dataset), "-o", str(tmp_path / "q"),
                                 "--cases", "nosuch"])
    assert result.exit_code == 2 and "nosuch" in result.output
