"""Whole-slice and large-window prediction (issue 14) against MONAI's sliding window with the same window."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from sparseslice.inference import largest_window, whole_window, window_logits
from sparseslice.io import Volume, affine_from_spacing
from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model
from sparseslice.predict import _windowed_classes, activation_bytes, predict_volume, slice_classes


@pytest.fixture(scope="module")
def net2d():
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8, 16), strides=(2, 2))
    return spec, build_model(spec).eval()


def ckpt_of(spec: ModelSpec, *, patch, axis: int = 2, spacing=None) -> Checkpoint:
    return Checkpoint(spec=spec, normalization=Normalization("none"), axis=axis, labels=(0, 1, 2),
                      patch_size=tuple(patch), state_dict={}, spacing=spacing)


@pytest.mark.parametrize("plane", [(36, 44), (29, 40), (16, 16)])
def test_one_window_equals_monai_sliding_window_over_the_whole_slice(net2d, plane):
    """Softmax of window_logits = MONAI's (Gaussian, overlap 0.5) with the window = whole padded slice, to 1e-5."""
    spec, model = net2d
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(3, 1, *plane)).astype(np.float32))
    roi = whole_window((16, 16), plane, divisor=spec.divisor)
    with torch.no_grad():
        got = torch.softmax(window_logits(model, x, roi=roi), 1)
        want = torch.softmax(sliding_window_inference(x, roi, 3, model, overlap=0.5, mode="gaussian"), 1)
    assert got.shape == want.shape == (3, 3, *plane)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_one_window_refuses_a_window_smaller_than_the_image(net2d):
    with pytest.raises(ValueError, match="roi must cover"):
        window_logits(net2d[1], torch.zeros(1, 1, 20, 20), roi=(16, 16))


@pytest.mark.parametrize("axis", [0, 2])
def test_whole_slice_classes_equal_windowed_classes_with_the_whole_slice_window(net2d, axis):
    """slice_classes (batch by batch, TTA flips summed per batch) = the volume-wide windowed path with the
    same single window, with and without flips; the patch larger than a slice pads it as the window pads."""
    spec, model = net2d
    x = np.random.default_rng(1).normal(size=(1, 28, 20, 22)).astype(np.float32)
    plane = tuple(s for a, s in enumerate(x.shape[1:]) if a != axis)
    for patch in [(8, 8), (32, 32)]:
        ckpt = ckpt_of(spec, patch=patch, axis=axis)
        roi = whole_window(patch, plane, divisor=spec.divisor)
        flip_sets = [[()], [(), *[(a,) for a in range(3) if a != axis]]]
        for flips in flip_sets:
            got = slice_classes(model, ckpt, x, flips=flips, batch_size=4)
            want = _windowed_classes(model, ckpt, x, flips=flips, overlap=0.5, batch_size=4, grid=None, roi=roi)
            assert got.shape == x.shape[1:]
            np.testing.assert_array_equal(got, want)


def test_whole_slice_classes_resample_back_like_the_windowed_path(net2d):
    spec, model = net2d
    x = np.random.default_rng(2).normal(size=(1, 24, 16, 5)).astype(np.float32)
    ckpt = ckpt_of(spec, patch=(24, 16))
    grid = (37, 30, 5)
    got = slice_classes(model, ckpt, x, batch_size=2, grid=grid)
    want = _windowed_classes(model, ckpt, x, flips=[()], overlap=0.5, batch_size=2, grid=grid, roi=(24, 16))
    assert got.shape == grid
    np.testing.assert_array_equal(got, want)


def test_predict_volume_whole_equals_patch_when_the_patch_is_the_slice(net2d):
    """Hippocampus-like: the training patch covers every slice, so both windows are one and the same."""
    spec, model = net2d
    rng = np.random.default_rng(3)
    image = Volume(rng.normal(size=(20, 24, 9)).astype(np.float32), affine_from_spacing((1.0, 1.0, 3.0)))
    ckpt = ckpt_of(spec, patch=(24, 24))
    for tta in (False, True):
        whole = predict_volume(model, ckpt, image, tta=tta, window="whole", batch_size=4)
        patch = predict_volume(model, ckpt, image, tta=tta, window="patch", batch_size=4)
        np.testing.assert_array_equal(whole, patch)


def test_largest_window_fits_the_budget_and_never_undercuts_the_patch():
    spec = ModelSpec(dims=3, in_channels=1, out_channels=2)
    per_voxel = activation_bytes(ckpt_of(spec, patch=(32, 32, 16)))
    assert 80 < per_voxel < 130  # calibrated: about 100 bytes per voxel for this U-Net
    for budget in (1e6, 2**28, 2**31, 1e12):
        win = largest_window((32, 32, 16), (512, 512, 300), divisor=8, bytes_per_voxel=per_voxel, budget=budget)
        assert all(w >= p and w % 8 == 0 for w, p in zip(win, (32, 32, 16), strict=True))
        assert np.prod(win) * per_voxel <= budget or win == (32, 32, 16)
    assert largest_window((32, 32, 16), (50, 60, 20), divisor=8, bytes_per_voxel=1, budget=1e12) == (56, 64, 24)


@pytest.mark.parametrize("scheme", ["zscore", "ct", "none"])
def test_slice_batches_are_the_whole_volume_prepared_then_sliced(net2d, scheme):
    """Batch by batch (normalised with the whole volume's statistics, mask channel, resampled in-plane) =
    normalising, masking and resampling the whole volume first, as predict did: bit for bit."""
    from sparseslice.inference import model_inputs
    from sparseslice.model import normalize
    from sparseslice.predict import slice_batches
    from sparseslice.resample import resample_image, resampled_shape

    spec = ModelSpec(dims=2, in_channels=2, out_channels=3, channels=(4, 8), strides=(2,), mask_channel=True)
    x = np.random.default_rng(4).normal(0, 400, size=(1, 30, 26, 11)).astype(np.int16)
    for axis, spacing in ((2, (0.7, 0.9, 2.5)), (0, (2.5, 0.6, 0.8)), (2, (1.0, 1.0, 2.5))):
        ckpt = Checkpoint(spec=spec, normalization=Normalization(scheme), axis=axis, labels=(0, 1, 2),
                          patch_size=(16, 16), state_dict={}, spacing=(1.0, 1.0))
        whole = normalize(x, ckpt.normalization)
        whole = np.concatenate([whole, np.ones_like(whole)], axis=0)
        whole = resample_image(whole, resampled_shape(x.shape[1:], spacing, (1.0, 1.0), axis=axis), axis=axis)
        want = model_inputs(whole, dims=2, axis=axis)
        got = [(start, t.numpy()) for start, t in slice_batches(x, ckpt, batch_size=4, spacing=spacing)]
        assert [s for s, _ in got] == list(range(0, want.shape[0], 4))
        np.testing.assert_array_equal(np.concatenate([t for _, t in got]), want)


def test_slices_per_pass_caps_the_pixels_of_a_cpu_pass_only():
    from sparseslice.predict import CPU_PASS_PIXELS, slices_per_pass

    assert CPU_PASS_PIXELS == 512 * 512
    assert [slices_per_pass(p, batch_size=16) for p in [(512, 512), (256, 256), (128, 128), (64, 64), (700, 900)]] \
        == [1, 4, 16, 16, 1]
    assert slices_per_pass((512, 512), batch_size=16, device=torch.device("cpu")) == 1
    assert slices_per_pass((512, 512), batch_size=16, device=torch.device("cuda")) == 16  # no cap on a GPU


def test_slice_batches_of_a_large_plane_hold_one_slice_each(net2d):
    from sparseslice.predict import slice_batches

    spec = net2d[0]
    x = np.random.default_rng(2).normal(size=(1, 520, 510, 3)).astype(np.float32)
    got = list(slice_batches(x, ckpt_of(spec, patch=(16, 16)), batch_size=16))
    assert [(s, tuple(t.shape)) for s, t in got] == [(k, (1, 1, 520, 510)) for k in range(3)]
    np.testing.assert_array_equal(got[1][1][0, 0].numpy(), x[0, :, :, 1])


def test_tta_argmax_of_the_logits_summed_over_the_flips(net2d):
    """nnU-Net v2's mirroring: each flipped input's logits flipped back and summed, then the argmax; it
    differs from the plain pass somewhere on an untrained network, so the flips are really used."""
    spec, model = net2d
    x = np.random.default_rng(3).normal(size=(1, 20, 24, 5)).astype(np.float32)
    ckpt = ckpt_of(spec, patch=(16, 16))
    flips = [(), (0,), (1,), (0, 1)]
    got = slice_classes(model, ckpt, x, flips=flips, batch_size=2)
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, 3, 0)))  # (Z, C, X, Y)
    roi = whole_window((16, 16), (20, 24), divisor=spec.divisor)
    with torch.no_grad():
        total = sum(torch.flip(window_logits(model, torch.flip(t, [2 + a for a in f]), roi=roi), [2 + a for a in f])
                    for f in flips)
    want = np.moveaxis(total.argmax(1).numpy(), 0, 2)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, slice_classes(model, ckpt, x, batch_size=2))


def test_argmax_of_channels_falls_back_to_torch_on_infinite_values():
    from sparseslice.predict import _argmax_channels

    p = torch.rand((2, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    p[1, 2, 0, 0] = float("inf")
    p[0, 1, 1, 1] = float("-inf")
    assert torch.equal(_argmax_channels(p).long(), p.argmax(1))
