"""Metrics: known answers, empty masks, cross-checks against SciPy and MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage

from sparseslice.errors import UserError
from sparseslice.metrics import (
    average_surface_distance,
    bounding_box,
    dice,
    hausdorff_distance,
    label_metrics,
    mask_metrics,
    relative_volume_difference,
    slice_assd,
    surface,
    surface_distances,
)


def cube(shape=(12, 12, 10), lo=(3, 3, 3), size=(5, 5, 4)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + s) for a, s in zip(lo, size, strict=True))] = True
    return m


def blobs(seed: int, shape=(28, 24, 14)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    return a, b


def monai_values(a: np.ndarray, b: np.ndarray, spacing) -> tuple[float, float, float]:
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance

    ta, tb = torch.tensor(a[None, None]).float(), torch.tensor(b[None, None]).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(ta, tb, include_background=True, spacing=spacing).item()
        hd95 = compute_hausdorff_distance(ta, tb, include_background=True, percentile=95, spacing=spacing).item()
        asd = compute_average_surface_distance(ta, tb, include_background=True, symmetric=True,
                                               spacing=spacing).item()
    return hd, hd95, asd


def test_identical_masks_give_dice_one_and_zero_distances():
    a = cube()
    sd = surface_distances(a, a, spacing=(0.7, 1.0, 2.5))
    assert dice(a, a) == 1.0
    assert sd.hausdorff() == 0.0 and sd.hausdorff(95) == 0.0 and sd.assd() == 0.0
    assert relative_volume_difference(a, a) == 0.0


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_cube_shifted_one_voxel_along_axis_with_spacing_2_5(axis):
    a = cube()
    b = np.roll(a, 1, axis=axis)
    spacing = [1.0, 1.0, 1.0]
    spacing[axis] = 2.5
    assert hausdorff_distance(a, b, spacing=spacing) == pytest.approx(2.5)
    # every other axis keeps unit spacing: shifting by one voxel there would give 1.0
    other = [0.8, 0.8, 0.8]
    other[axis] = 2.5
    assert hausdorff_distance(a, b, spacing=other) == pytest.approx(2.5)
    size = (5, 5, 4)[axis]
    assert dice(a, b) == pytest.approx((size - 1) / size)


def test_surface_matches_scipy_erosion_including_volume_border():
    a, _ = blobs(1)
    a[0, :, :] = True  # touches the array border: those voxels are surface (border_value=0)
    expected = a ^ ndimage.binary_erosion(a)
    assert np.array_equal(surface(a), expected)
    assert np.array_equal(surface(a[:, :, 3]), a[:, :, 3] ^ ndimage.binary_erosion(a[:, :, 3]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("spacing", [(0.7, 1.3, 3.1), (2.5, 0.6, 0.6)])
def test_distances_match_monai_on_anisotropic_masks(seed, spacing):
    a, b = blobs(seed)
    if seed == 2:  # masks touching the array border: border voxels are surface in both
        a[0] = True
        b[:, -1] = True
    sd = surface_distances(a, b, spacing=spacing)
    hd, hd95, asd = monai_values(a, b, spacing)
    assert sd.hausdorff() == pytest.approx(hd, rel=1e-6)
    assert sd.hausdorff(95) == pytest.approx(hd95, rel=1e-6)
    assert sd.assd() == pytest.approx(asd, rel=1e-6)


def test_distances_match_brute_force_on_small_masks():
    a, b = blobs(4, shape=(10, 9, 6))
    spacing = np.array([0.9, 1.7, 3.0])
    pa, pb = np.argwhere(surface(a)) * spacing, np.argwhere(surface(b)) * spacing
    d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
    sd = surface_distances(a, b, spacing=spacing)
    np.testing.assert_allclose(np.sort(sd.pred_to_ref), np.sort(d.min(axis=1)))
    np.testing.assert_allclose(np.sort(sd.ref_to_pred), np.sort(d.min(axis=0)))
    assert average_surface_distance(a, b, spacing=spacing) == pytest.approx(
        (d.min(1).sum() + d.min(0).sum()) / (d.shape[0] + d.shape[1]))


def test_dice_against_monai():
    from monai.metrics import compute_dice

    a, b = blobs(3)
    expected = compute_dice(torch.tensor(a[None, None]).float(), torch.tensor(b[None, None]).float(),
                            include_background=True).item()
    assert dice(a, b) == pytest.approx(expected, rel=1e-6)


def test_empty_masks_documented_values_never_inf():
    a = cube()
    empty = np.zeros_like(a)
    assert dice(empty, empty) == 1.0 and relative_volume_difference(empty, empty) == 0.0
    assert dice(a, empty) == 0.0 and math.isnan(relative_volume_difference(a, empty))
    assert dice(empty, a) == 0.0 and relative_volume_difference(empty, a) == -1.0
    for p, r, note in [(empty, empty, "empty both"), (a, empty, "empty ref"), (empty, a, "empty pred")]:
        sd = surface_distances(p, r, spacing=(1, 1, 1))
        assert sd.note == note
        assert math.isnan(sd.hausdorff()) and math.isnan(sd.hausdorff(95)) and math.isnan(sd.assd())
        values = mask_metrics(p, r, spacing=(1, 1, 1), axis=2)
        assert all(not math.isinf(v) for v, _ in values.values())
        assert values["hd"][1] == note


def test_slice_assd_equals_per_slice_hand_computation():
    a, b = blobs(5)
    b[:, :, 0] = False  # a slice where only one mask is present: skipped
    a[:, :, 0] = True
    spacing = (0.6, 1.4, 4.0)
    value, n = slice_assd(a, b, spacing=spacing, axis=2)
    expected = []
    for k in range(a.shape[2]):
        pa, pb = a[:, :, k], b[:, :, k]
        if pa.any() and pb.any():
            ea, eb = pa ^ ndimage.binary_erosion(pa), pb ^ ndimage.binary_erosion(pb)
            ca, cb = np.argwhere(ea) * spacing[:2], np.argwhere(eb) * spacing[:2]
            d = np.linalg.norm(ca[:, None] - cb[None], axis=-1)
            expected.append((d.min(1).sum() + d.min(0).sum()) / (d.shape[0] + d.shape[1]))
    assert n == len(expected) == a.shape[2] - 1
    assert value == pytest.approx(np.mean(expected))


def test_slice_assd_uses_in_plane_spacing_along_axis_0():
    a = cube()
    b = np.roll(a, 1, axis=1)  # shift within the plane of slices along axis 0
    value, n = slice_assd(a, b, spacing=(9.0, 2.0, 1.0), axis=0)
    assert n == 5
    hand = surface_distances(a[5], b[5], spacing=(2.0, 1.0)).assd()
    assert value == pytest.approx(hand)
    assert 0 < value <= 2.0


def test_slice_assd_nan_when_no_common_slice():
    a = cube(lo=(3, 3, 0), size=(4, 4, 2))
    b = cube(lo=(3, 3, 6), size=(4, 4, 2))
    value, n = slice_assd(a, b, spacing=(1, 1, 1), axis=2)
    assert math.isnan(value) and n == 0
    assert mask_metrics(a, b, spacing=(1, 1, 1), axis=2)["assd2d"][1] == "no common slice"


def test_sparse_reference_counts_only_annotated_slices():
    ref = cube()
    pred = ref.copy()
    pred[:, :, 5] = False  # an error in an unannotated slice: invisible
    annotated = np.zeros(ref.shape[2], bool)
    annotated[[3, 4, 6]] = True
    values = mask_metrics(pred, ref, spacing=(1, 1, 2), axis=2, annotated=annotated)
    assert values["dice"][0] == 1.0 and values["rvd"][0] == 0.0 and values["assd2d"][0] == 0.0
    assert math.isnan(values["hd"][0]) and values["hd"][1] == "sparse ref"
    pred[:, :, 4] = False  # an error in an annotated slice counts
    assert mask_metrics(pred, ref, spacing=(1, 1, 2), axis=2, annotated=annotated)["dice"][0] < 1.0


def test_label_metrics_rows_per_label_and_foreground():
    ref = np.zeros((10, 10, 6), np.uint8)
    ref[2:5, 2:5, 1:4] = 1
    ref[5:8, 5:8, 1:4] = 2
    pred = ref.copy()
    pred[pred == 2] = 1  # label 2 predicted as 1: per-label scores drop, fg stays perfect
    rows = label_metrics(pred, ref, spacing=(1, 1, 2), axis=2, labels=[1, 2])
    got = {(r["label"], r["metric"]): r["value"] for r in rows}
    assert set(got) == {(lab, m) for lab in (1, 2, 0) for m in ("dice", "hd", "hd95", "assd", "assd2d", "rvd")}
    assert {(r["label"], r["region"]) for r in rows} == {(1, "label"), (2, "label"), (0, "foreground")}
    assert got[(0, "dice")] == 1.0 and got[(0, "hd")] == 0.0
    assert got[(2, "dice")] == 0.0 and math.isnan(got[(2, "hd")])
    assert got[(1, "dice")] == pytest.approx(2 * 27 / (54 + 27))


def test_bounding_box_and_bad_input():
    m = cube()
    box = bounding_box(m, pad=1)
    assert box == (slice(2, 9), slice(2, 9), slice(2, 8))
    assert bounding_box(np.zeros((3, 3), bool)) is None
    with pytest.raises(UserError, match="spacing must have 3"):
        surface_distances(m, m, spacing=(1.0, 1.0))
    with pytest.raises(UserError, match="pred shape must match ref"):
        dice(m, m[:-1])
    with pytest.raises(UserError, match="percentile"):
        surface_distances(m, np.roll(m, 1, 0), spacing=(1, 1, 1)).hausdorff(120)
