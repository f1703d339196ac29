"""The one sliding window: layouts, window sizes, and both callers' settings checked against MONAI itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from sparseslice.inference import (
    Window,
    classes,
    from_model_outputs,
    model_inputs,
    softmax_inplace,
    stacked_logits,
    window_size,
)
from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model
from sparseslice.predict import predict_probabilities
from sparseslice.train import validate
from sparseslice.train.data import CaseArrays


@pytest.fixture(scope="module")
def net2d():
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    return spec, build_model(spec).eval()


@pytest.mark.parametrize("dims, axis", [(2, 0), (2, 1), (2, 2), (3, 2)])
def test_model_inputs_round_trip(dims, axis):
    x = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    images = model_inputs(x, dims=dims, axis=axis)
    assert images.shape[1] == 2 and images.shape[0] == (1 if dims == 3 else x.shape[axis + 1])
    np.testing.assert_array_equal(from_model_outputs(images, dims=dims, axis=axis), x)
    if dims == 2:  # selected slices are those slices, in order
        picked = model_inputs(x, dims=dims, axis=axis, slices=np.array([3, 1]))
        np.testing.assert_array_equal(picked, images[[3, 1]])


def test_window_size_uses_the_patch_else_the_image_rounded_up():
    assert window_size((16, 24), dims=2, axis=2, divisor=8, plane=(40, 40)) == (16, 24)
    assert window_size((16, 24, 8), dims=2, axis=1, divisor=8, plane=(40, 40)) == (16, 8)
    assert window_size((16, 16, 8), dims=3, axis=2, divisor=8, plane=(9, 9, 9)) == (16, 16, 8)
    assert window_size((), dims=3, axis=2, divisor=4, plane=(9, 8, 3)) == (12, 8, 4)


@pytest.mark.parametrize("bad", [{"overlap": 1.0}, {"blend": "linear"}, {"images_per_pass": 0},
                                 {"windows_per_pass": 0}])
def test_window_refuses_bad_settings(bad):
    with pytest.raises(ValueError, match="must"):
        Window(**bad)


def test_predict_window_is_gaussian_half_overlap(net2d):
    """predict_probabilities = MONAI with overlap 0.5, Gaussian blending, batch_size slices per pass."""
    spec, model = net2d
    x = np.random.default_rng(1).normal(size=(1, 40, 36, 5)).astype(np.float32)
    ckpt = Checkpoint(spec=spec, normalization=Normalization("none"), axis=2, labels=(0, 1, 2), patch_size=(16, 16),
                      state_dict={})
    got = predict_probabilities(model, ckpt, x, batch_size=2)
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, 3, 0)))
    with torch.no_grad():
        want = torch.cat([torch.softmax(sliding_window_inference(slices[i:i + 2], (16, 16), 2, model, overlap=0.5,
                                                                 mode="gaussian"), 1) for i in range(0, 5, 2)])
    np.testing.assert_allclose(got, np.moveaxis(want.numpy(), 0, 3), rtol=0, atol=1e-6)
    # the cheaper validation window is a different window: the setting is not ignored
    cheap = softmax_inplace(stacked_logits(model, np.ascontiguousarray(np.moveaxis(x, 3, 0)), roi=(16, 16),
                                           window=Window(overlap=0.25, blend="constant")), axis=1)
    assert not np.allclose(cheap, np.moveaxis(got, 3, 0), atol=1e-4)


def test_validation_window_is_constant_quarter_overlap(net2d):
    """validate's Dice is that of MONAI's prediction with overlap 0.25 and constant blending."""
    spec, model = net2d
    rng = np.random.default_rng(2)
    image = rng.normal(size=(1, 20, 24, 6)).astype(np.float32)
    label = rng.integers(0, 3, size=(20, 24, 6)).astype(np.uint8)
    case = CaseArrays("c", image, label, np.array([1, 0, 1, 1, 0, 1], np.float32), axis=2)
    dice, per_class = validate(model, [case], spec=spec, patch_size=(16, 16), device=torch.device("cpu"),
                               batch_size=1)
    slices = torch.from_numpy(np.ascontiguousarray(np.moveaxis(image[..., [0, 2, 3, 5]], 3, 0)))
    with torch.no_grad():
        pred = torch.cat([sliding_window_inference(slices[i:i + 2], (16, 16), 2, model, overlap=0.25,
                                                   mode="constant").argmax(1) for i in (0, 2)])  # 2 slices a pass
    ref = torch.from_numpy(np.moveaxis(label[..., [0, 2, 3, 5]], 2, 0).astype(np.int64))
    want = [2 * float(((pred == k) & (ref == k)).sum()) / float((pred == k).sum() + (ref == k).sum()) for k in (1, 2)]
    assert per_class == pytest.approx(want) and dice == pytest.approx(np.mean(want))
    # the same classes as the inference module's, the one sliding window below both
    images = model_inputs(image, dims=2, axis=2, slices=np.array([0, 2, 3, 5]))
    assert torch.equal(classes(model, images, roi=(16, 16), window=Window(overlap=0.25, blend="constant",
                                                                         images_per_pass=2)), pred)
