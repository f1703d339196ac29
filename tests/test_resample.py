"""In-plane resampling: cross-checked against scikit-image, unknown stays unknown."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from sparseslice.errors import UserError
from sparseslice.resample import (
    default_spacing,
    needs_resampling,
    resample_image,
    resample_label,
    resampled_shape,
)


@pytest.mark.parametrize("axis", [0, 1, 2])
@pytest.mark.parametrize("plane", [(18, 11), (50, 40), (19, 30)])
def test_image_resampling_matches_skimage_resize_order_1(axis, plane):
    rng = np.random.default_rng(axis)
    shape = [37, 23, 23]
    shape[axis] = 5
    image = rng.random((2, *shape)).astype(np.float32)
    target = list(shape)
    for a, n in zip([a for a in range(3) if a != axis], plane, strict=True):
        target[a] = n
    ours = resample_image(image, target, axis=axis)
    for c in range(2):
        ref = resize(image[c], target, order=1, mode="edge", anti_aliasing=False, preserve_range=True)
        np.testing.assert_allclose(ours[c], ref, atol=1e-5)


def test_resampling_never_mixes_slices_along_the_slice_axis():
    image = np.zeros((1, 20, 20, 6), np.float32)
    image[..., 3] = 1
    out = resample_image(image, (10, 7, 6), axis=2)
    assert np.all(out[..., 3] == 1) and np.all(out[..., [0, 1, 2, 4, 5]] == 0)


def test_label_resampling_keeps_values_and_matches_per_class_skimage():
    rng = np.random.default_rng(1)
    label = np.zeros((30, 26, 4), np.uint8)
    label[5:20, 4:18] = 2
    label[10:14, 8:12] = 7
    label[rng.random(label.shape) < 0.02] = 4
    out, known = resample_label(label, (15, 40, 4), axis=2)
    assert known is None
    assert set(np.unique(out)) <= {0, 2, 4, 7}
    scores = np.stack([resize((label == v).astype(float), (15, 40, 4), order=1, mode="edge",
                              anti_aliasing=False) for v in (0, 2, 4, 7)])
    ref = np.asarray([0, 2, 4, 7])[np.argmax(scores, axis=0)]
    # ties may break differently; elsewhere the class is the same
    top = np.sort(scores, axis=0)
    clear = top[-1] - top[-2] > 1e-4
    np.testing.assert_array_equal(out[clear], ref[clear])
    assert clear.mean() > 0.95


def test_sparse_label_round_trip_keeps_annotated_slices_and_never_makes_unknown_background():
    label = np.zeros((40, 36, 10), np.uint8)
    label[8:30, 6:28, 2:9] = 1
    # a partly labelled slice: its left half known
    partial = np.zeros(label.shape, bool)
    partial[:20, :, 6] = True
    down, known_down = resample_label(label, (20, 18, 10), axis=2, known=partial)
    back, known_back = resample_label(down, label.shape, axis=2, known=known_down)
    # whole slices stay whole: annotated slice numbers do not move, and nothing appears in unknown slices'
    # known mask (the partial mask only ever shrinks)
    assert not known_down[..., [0, 1, 2, 3, 4, 5, 7, 8, 9]].any()
    assert not (known_back & ~partial).any()
    assert known_back[:18, :, 6].all()
    # a label value inside an unknown region never comes from unknown voxels treated as background
    label_unknown_fg = label.copy()
    label_unknown_fg[~partial[..., 6], 6] = 0  # unknown voxels hold 0 in memory
    _, k = resample_label(label_unknown_fg, (20, 18, 10), axis=2, known=partial)
    assert not k[10:, :, 6].any()  # voxels near or in the unknown half are not known


def test_resampled_shape_keeps_the_slice_axis_and_refuses_bad_targets():
    assert resampled_shape((180, 140, 88), (0.625, 0.625, 0.625), (1.25, 1.25), axis=2) == (90, 70, 88)
    assert resampled_shape((88, 180, 140), (2.0, 0.625, 0.625), (1.25, 1.25), axis=0) == (88, 90, 70)
    assert resampled_shape((10, 10, 10), (1, 1, 1), None, axis=0) == (10, 10, 10)
    for bad in [(0, 1), (-1, 1), (1,), (float("nan"), 1)]:
        with pytest.raises(UserError, match="spacing must be two positive"):
            resampled_shape((10, 10, 10), (1, 1, 1), bad, axis=2)
    with pytest.raises(UserError, match="larger than case1's extent along axis 1"):
        resampled_shape((10, 10, 10), (1, 1, 1), (5, 11), axis=2, name="case1")


def test_default_spacing_is_the_median_coarsened_to_fit():
    assert default_spacing([(1, 1, 1)] * 3, [(35, 50, 36)] * 3, axis=2, max_inplane=128) == (1.0, 1.0)
    sp = default_spacing([(0.625, 0.625, 0.625), (0.7, 0.7, 0.625), (0.6, 0.6, 0.625)],
                         [(256, 200, 88)] * 3, axis=2, max_inplane=128)
    assert sp[0] == pytest.approx(0.625 * 256 / 128)
    assert needs_resampling((0.625, 0.625, 1), sp, axis=2)
    assert not needs_resampling((1, 1, 3), (1.0, 1.0), axis=2)
    assert not needs_resampling((1, 1, 3), None, axis=2)
