"""Post-processing on each label's bounding box (issue 14) against the whole-array SciPy reference."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from sparseslice.predict import fill_label_holes, keep_largest_component, label_boxes, postprocess


def reference_largest(labels: np.ndarray) -> np.ndarray:
    """The former whole-array implementation: ndimage.label of each value's mask over the whole array."""
    out = labels.copy()
    structure = np.ones((3,) * labels.ndim, bool)
    for value in np.unique(labels):
        if value == 0:
            continue
        comp, n = ndimage.label(labels == value, structure=structure)
        if n > 1:
            sizes = np.bincount(comp.ravel())
            sizes[0] = 0
            out[(comp > 0) & (comp != int(np.argmax(sizes)))] = 0
    return out


def reference_holes(labels: np.ndarray) -> np.ndarray:
    """The former whole-array implementation: binary_fill_holes of each value's mask over the whole array."""
    out = labels.copy()
    for value in np.unique(labels):
        if value == 0:
            continue
        mask = labels == value
        out[ndimage.binary_fill_holes(mask) & ~mask & (out == 0)] = value
    return out


def random_labels(seed: int, shape=(23, 19, 17), *, values=3, density=0.35, smooth=1.0) -> np.ndarray:
    """Blobby labels: smoothed noise thresholded, many components, cavities and equal-size ties."""
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=(values, *shape)), smooth)
    top = field.argmax(0) + 1
    keep = field.max(0) > np.quantile(field.max(0), 1 - density)
    return np.where(keep, top, 0).astype(np.uint8)


def random_case(seed: int) -> np.ndarray:
    rng = np.random.default_rng(100 + seed)
    lab = random_labels(seed, density=float(rng.uniform(0.05, 0.8)), smooth=float(rng.uniform(0.5, 2.0)),
                        values=int(rng.integers(1, 5)))
    lab[rng.random(lab.shape) < 0.03] = 0  # pinholes: many become cavities
    if seed % 3 == 1:  # a transposed view, as predict's label map is
        lab = np.moveaxis(lab, 0, 2)
    if seed % 3 == 2:  # one voxel per value far away: bounding boxes as large as the array
        lab[0, 0, 0], lab[-1, -1, -1] = 1, int(lab.max())
    return lab


@pytest.mark.parametrize("seed", range(12))
def test_box_postprocessing_equals_the_whole_array_reference(seed):
    lab = random_case(seed)
    want_lcc = reference_largest(lab)
    np.testing.assert_array_equal(keep_largest_component(lab), want_lcc)
    np.testing.assert_array_equal(fill_label_holes(lab), reference_holes(lab))
    np.testing.assert_array_equal(postprocess(lab), reference_holes(want_lcc))


def test_the_random_cases_have_components_to_remove_and_holes_to_fill():
    cases = [random_case(seed) for seed in range(12)]
    assert sum(not np.array_equal(reference_largest(c), c) for c in cases) >= 6
    assert sum(not np.array_equal(reference_holes(c), c) for c in cases) >= 6


def test_ties_between_equal_largest_components_keep_the_same_one():
    """Single voxels everywhere: every component is a tie, the reference keeps the first in raster order."""
    rng = np.random.default_rng(7)
    lab = np.zeros((15, 16, 17), np.uint8)
    idx = rng.choice(lab.size, 60, replace=False)
    lab.flat[idx[::2]] = 1
    lab.flat[idx[1::2]] = 2
    lab[::2, :, :] = 0  # no two voxels 26-adjacent across x planes... and sparse within planes
    for arr in (lab, np.moveaxis(lab, 2, 0), lab[:, ::-1]):
        np.testing.assert_array_equal(keep_largest_component(arr), reference_largest(arr))


def test_holes_touching_a_box_face_are_not_filled_and_nested_labels_stay():
    lab = np.zeros((12, 12, 12), np.uint8)
    lab[2:9, 2:9, 2:9] = 1
    lab[4:6, 4:6, 4:6] = 0  # an enclosed cavity
    lab[7, 2:9, 7] = 0  # a tunnel from face to face of the label's box: open, not a hole
    lab[6, 6, 6] = 2  # another label nested inside
    lab[3, 3, 2] = 0  # a dent on a face of the box
    got = fill_label_holes(lab)
    np.testing.assert_array_equal(got, reference_holes(lab))
    assert got[4, 4, 4] == 1 and got[5, 5, 5] == 1 and got[7, 5, 7] == 0 and got[6, 6, 6] == 2 and got[3, 3, 2] == 0


def test_label_boxes_finds_every_value_and_its_box():
    lab = np.zeros((5, 6, 7), np.int64)
    lab[1:3, 2, 4:6] = 3
    lab[4, 5, 6] = 1
    assert label_boxes(lab) == [(1, (slice(4, 5), slice(5, 6), slice(6, 7))),
                                (3, (slice(1, 3), slice(2, 3), slice(4, 6)))]
    big = lab * 100000  # values too large for one find_objects list: coded first, same boxes
    assert [v for v, _ in label_boxes(big)] == [100000, 300000]
    assert [b for _, b in label_boxes(big)] == [b for _, b in label_boxes(lab)]
    assert label_boxes(np.zeros((3, 3), np.uint8)) == []


def test_postprocess_inplace_changes_the_input_only_when_asked():
    lab = random_labels(3)
    before = lab.copy()
    got = postprocess(lab)
    np.testing.assert_array_equal(lab, before)
    same = postprocess(lab, inplace=True)
    assert same is lab
    np.testing.assert_array_equal(same, got)


@pytest.mark.parametrize("seed", range(6))
def test_enclosed_background_equals_binary_fill_holes(seed):
    from sparseslice.predict import enclosed_background

    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.normal(size=(21, 18, 15)), 1.0) > rng.uniform(-0.3, 0.1)
    mask[rng.random(mask.shape) < 0.05] = False
    want = ndimage.binary_fill_holes(mask) & ~mask
    assert want.any() or seed > 3
    np.testing.assert_array_equal(enclosed_background(mask), want)
    flat = mask[:, :, 3]
    np.testing.assert_array_equal(enclosed_background(flat), ndimage.binary_fill_holes(flat) & ~flat)


def test_argmax_of_channels_equals_torch_argmax_with_ties():
    import torch

    from sparseslice.predict import _argmax_channels

    g = torch.Generator().manual_seed(0)
    for k in (2, 3, 5, 12):
        p = torch.randint(0, 3, (4, k, 9, 7), generator=g).float()  # many ties
        assert torch.equal(_argmax_channels(p).long(), p.argmax(1))
    p = torch.rand((2, 3, 5, 5), generator=g)
    p[0, 1, 0, 0] = float("nan")
    assert torch.equal(_argmax_channels(p).long(), p.argmax(1))
