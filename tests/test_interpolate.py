"""Interpolation between annotated slices: none, nearest, sdf (shape-based), mci (ITK)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.interpolate import METHODS, interpolate_dataset, interpolate_label, signed_distance
from sparseslice.io import read_label
from sparseslice.sparse import SparseLabel, read_sparse, write_sparse
from sparseslice.synthetic import make_phantom

FILLING = ("nearest", "sdf", "mci")


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


def ball(shape=(40, 40, 40), *, spacing=(1.0, 1.0, 1.0), radius=14.0) -> np.ndarray:
    grid = np.meshgrid(*[(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)],
                       indexing="ij")
    return (sum(g ** 2 for g in grid) < radius ** 2).astype(np.uint8)


@pytest.fixture(scope="module")
def itk_ok() -> None:
    pytest.importorskip("itk", reason="the optional itk extra is not installed")


def run(sparse: SparseLabel, method: str, spacing=(1.0, 1.0, 1.0)):
    if method == "mci":
        pytest.importorskip("itk", reason="the optional itk extra is not installed")
    return interpolate_label(sparse, spacing=spacing, method=method)


@pytest.mark.parametrize("method", FILLING)
def test_identical_annotated_slices_give_the_same_mask_between(method: str) -> None:
    rng = np.random.default_rng(0)
    shape2d = np.zeros((24, 20), np.uint8)
    shape2d[5:17, 4:12] = 1
    shape2d[8:14, 12:16] = 2  # a second, touching label
    label = rng.integers(0, 3, (24, 20, 9)).astype(np.uint8)  # junk in unannotated slices
    label[:, :, 1] = label[:, :, 7] = shape2d
    res = run(SparseLabel.from_slices(label, [1, 7], axis=2), method, spacing=(0.7, 0.9, 3.0))
    assert res.interpolated.tolist() == [False, False, True, True, True, True, True, False, False]
    for k in range(2, 7):
        np.testing.assert_array_equal(res.sparse.label[:, :, k], shape2d)
    assert res.sparse.annotated[1:8].all() and not res.sparse.annotated[[0, 8]].any()


@pytest.mark.parametrize("phase", range(4))
def test_sdf_recovers_a_sphere_kept_every_fourth_slice(phase: int) -> None:
    full = ball((40, 40, 40), spacing=(1.0, 1.0, 1.0), radius=16.0)
    res = interpolate_label(SparseLabel.from_slices(full, range(phase, 40, 4), axis=2), spacing=(1.0, 1.0, 1.0),
                            method="sdf")
    filled = res.interpolated
    assert filled.sum() == 27
    assert dice(res.sparse.label[:, :, filled] > 0, full[:, :, filled] > 0) > 0.95


def test_sdf_any_axis_and_anisotropic_spacing_agree() -> None:
    full = ball((30, 36, 24), spacing=(0.8, 0.8, 2.0), radius=11.0)
    slices = list(range(0, 24, 3))
    ref = interpolate_label(SparseLabel.from_slices(full, slices, axis=2), spacing=(0.8, 0.8, 2.0), method="sdf")
    assert dice(ref.sparse.label[:, :, ref.interpolated] > 0, full[:, :, ref.interpolated] > 0) > 0.87
    for axis, order in ((0, (2, 0, 1)), (1, (0, 2, 1))):
        moved = np.ascontiguousarray(np.transpose(full, order))
        spacing = tuple((0.8, 0.8, 2.0)[i] for i in order)
        res = interpolate_label(SparseLabel.from_slices(moved, slices, axis=axis), spacing=spacing, method="sdf")
        np.testing.assert_array_equal(res.sparse.label, np.transpose(ref.sparse.label, order))
        np.testing.assert_array_equal(res.interpolated, ref.interpolated)


def test_sdf_matches_a_full_slice_reference() -> None:
    """Batching and cropping must not change the result: compare with scipy on whole slices."""
    i, j = np.mgrid[:50, :46]
    a = ((i - 22) / 12.0) ** 2 + ((j - 20) / 7.0) ** 2 < 1  # overlapping ellipses, one component each
    b = ((i - 28) / 6.0) ** 2 + ((j - 25) / 14.0) ** 2 + 0.3 * np.sin(i / 3.0) < 1
    label = np.zeros((50, 46, 7), np.uint8)
    label[:, :, 0], label[:, :, 6] = a, b
    res = interpolate_label(SparseLabel.from_slices(label, [0, 6], axis=2), spacing=(0.6, 1.1, 2.0), method="sdf")
    da, db = (ndimage.distance_transform_edt(m, sampling=(0.6, 1.1)) - ndimage.distance_transform_edt(
        ~m, sampling=(0.6, 1.1)) for m in (a, b))
    np.testing.assert_allclose(signed_distance(a, sampling=(0.6, 1.1)), da, atol=1e-5)
    for k in range(1, 6):
        t = k / 6
        level = (1 - t) * da + t * db
        area = int(round((1 - t) * a.sum() + t * b.sum()))
        threshold = np.sort(level.ravel())[::-1][area - 1]  # area kept linear: the top `area` voxels
        clear = np.abs(level - threshold) > 1e-4  # float32 vs float64 may split exact ties
        np.testing.assert_array_equal((res.sparse.label[:, :, k] > 0)[clear], (level >= threshold)[clear])
        assert area <= np.count_nonzero(res.sparse.label[:, :, k]) <= 1.05 * area  # ties at the threshold kept


@pytest.mark.parametrize("private", [True, False])
def test_sdf_distance_maps_match_scipy(private: bool) -> None:
    """The fast transforms (one per class, scipy's feature transform) equal scipy's signed distances,
    also through the public scipy function used if the private routine moves."""
    from sparseslice.interpolate.sdf import _class_maps, _nearest

    transform = {} if private else {"feature_transform": None}  # None: the public scipy function
    rng = np.random.default_rng(1)
    stack = ndimage.median_filter(rng.integers(0, 3, (4, 30, 26)), size=(1, 5, 5)).astype(np.uint8)
    stack[3] = 0
    stack[3, 10:15, 8:20] = 2  # a slice with one label only
    sampling = (0.7, 1.3)
    box = np.tile([0, 30, 0, 26], (4, 1))
    fmap, lmaps, _ = _class_maps(stack, np.array([1, 2]), far=1e3, near_box=box, own_box=box, sampling=sampling,
                                 **transform)
    for s in range(4):
        np.testing.assert_allclose(fmap[s], signed_distance(stack[s] > 0, sampling=sampling), atol=1e-5)
        for j, v in enumerate((1, 2)):
            if (stack[s] == v).any():
                np.testing.assert_allclose(lmaps[j, s], signed_distance(stack[s] == v, sampling=sampling), atol=1e-5)
    masks = rng.random((3, 20, 17)) > 0.95
    np.testing.assert_allclose(_nearest(masks, sampling=sampling, **transform),
                               [ndimage.distance_transform_edt(~m, sampling=sampling) for m in masks], rtol=1e-6)


def test_sdf_result_does_not_depend_on_the_chunk_size() -> None:
    """Gaps are filled in runs that fit a memory budget: a tiny budget gives the same labels."""
    from sparseslice.interpolate.sdf import fill_sdf

    phantom = make_phantom((40, 36, 30), spacing=(0.9, 0.9, 2.0), n_labels=2, seed=3)
    sparse = SparseLabel.from_slices(phantom.label.array, range(1, 30, 3), axis=2)
    ref = interpolate_label(sparse, spacing=(0.9, 0.9, 2.0), method="sdf")
    filled = ref.sparse.label[:, :, ref.interpolated]
    assert (filled == 1).any() and (filled == 2).any()
    small = sparse.label.copy()  # the same fill as interpolate_label's (slice axis first), on a tiny budget
    slices = np.flatnonzero(sparse.annotated).tolist()
    fill_sdf(np.moveaxis(small, 2, 0), list(zip(slices[:-1], slices[1:], strict=True)), sampling=(0.9, 0.9),
             border=sparse.border, extent=sparse.extent,
             chunk_values=40 * 36 * 12 * 3)  # three annotated slices, a few rows at a time
    np.testing.assert_array_equal(small, ref.sparse.label)


def test_sdf_keeps_the_area_of_a_shifting_shape() -> None:
    label = np.zeros((30, 40, 9), np.uint8)
    label[10:20, 5:17, 0] = 1
    label[10:20, 13:25, 8] = 1  # same square moved by 8 voxels: plain distance blending would shrink it
    res = interpolate_label(SparseLabel.from_slices(label, [0, 8], axis=2), spacing=(1.0, 1.0, 1.0), method="sdf")
    areas = np.count_nonzero(res.sparse.label, axis=(0, 1))
    assert areas[0] == areas[8] == 120 and np.all((areas >= 120) & (areas <= 140))  # ties at the threshold kept
    centre = [np.mean(np.nonzero(res.sparse.label[:, :, k])[1]) for k in range(9)]
    assert np.all(np.diff(centre) >= 0) and centre[4] == pytest.approx(14.5)  # it moves across, half-way at t=0.5


def test_sdf_component_without_counterpart_ends_inside_the_gap() -> None:
    label = np.zeros((40, 40, 9), np.uint8)
    label[5:15, 5:15, 0] = 1  # a blob that is gone on the other side
    label[20:34, 20:34, 0] = 1
    label[22:36, 22:36, 8] = 1  # overlaps the second blob: interpolated with it
    res = interpolate_label(SparseLabel.from_slices(label, [0, 8], axis=2), spacing=(1.0, 1.0, 1.0), method="sdf")
    lone = np.count_nonzero(res.sparse.label[:16, :16], axis=(0, 1))
    kept = np.count_nonzero(res.sparse.label[16:, 16:], axis=(0, 1))
    assert lone[1] > 0.5 * lone[0] and lone[4] == 0 and np.all(np.diff(lone[:5]) <= 0)  # rounded end half-way
    assert np.all(kept[1:8] >= 14 * 14 * 0.8)  # the matched blob is not eroded by the lone one


@pytest.mark.parametrize("method", FILLING)
def test_annotated_empty_slice_is_never_filled_and_ends_the_structure(method: str) -> None:
    label = np.zeros((30, 30, 17), np.uint8)
    for k in (0, 16):
        label[8:22, 8:22, k] = 1
    label[:, :, 3:8] = label[:, :, 9:14] = 7  # junk in slices that are not annotated
    res = run(SparseLabel.from_slices(label, [0, 8, 16], axis=2), method)
    out = res.sparse.label
    assert not out[:, :, 8].any()
    assert res.sparse.annotated.all() and not res.interpolated[[0, 8, 16]].any()
    sizes = np.count_nonzero(out, axis=(0, 1))
    assert sizes[0] == sizes[16] == 14 * 14
    assert np.all(np.diff(sizes[:9]) <= 0) and np.all(np.diff(sizes[8:]) >= 0)  # shrinks to the empty slice
    if method == "sdf":
        assert sizes[4] == 0 < sizes[3]  # half-way


@pytest.mark.parametrize("method", FILLING)
def test_unknown_beyond_the_annotated_range_stays_unknown(method: str) -> None:
    label = np.zeros((20, 20, 12), np.uint8)
    label[5:15, 5:15, 2:10] = 1
    res = run(SparseLabel.from_slices(label, [4, 8], axis=2), method)
    assert np.flatnonzero(res.interpolated).tolist() == [5, 6, 7]
    assert np.flatnonzero(res.sparse.annotated).tolist() == [4, 5, 6, 7, 8]
    np.testing.assert_array_equal(res.sparse.label[:, :, :4], label[:, :, :4])
    np.testing.assert_array_equal(res.sparse.label[:, :, 9:], label[:, :, 9:])


def test_border_slices_are_known_background_and_the_structure_reaches_the_extent() -> None:
    label = np.zeros((24, 24, 16), np.uint8)
    label[6:18, 6:18, 4:12] = 1
    sparse = SparseLabel.from_slices(label, [7, 8], axis=2).with_border_slices((4, 11))
    res = interpolate_label(sparse, spacing=(1.0, 1.0, 1.0), method="sdf")
    assert res.sparse.annotated.all()
    assert np.flatnonzero(res.interpolated).tolist() == [4, 5, 6, 9, 10, 11]
    out = res.sparse.label
    assert not out[:, :, :4].any() and not out[:, :, 12:].any()
    assert all(out[:, :, k].any() for k in range(4, 12))  # known extent: present up to the border
    np.testing.assert_array_equal(res.sparse.border, sparse.border)


@pytest.mark.parametrize("method", FILLING)
def test_multi_label_has_no_overlap_and_no_hole_between_touching_labels(method: str) -> None:
    label = np.zeros((32, 32, 9), np.uint8)
    label[6:26, 6:26, 0] = 1
    label[6:26, 6:12, 0] = 2  # interface moves from column 12 ...
    label[6:26, 6:26, 8] = 1
    label[6:26, 6:22, 8] = 2  # ... to column 22 while the union stays the same square
    label[8:24, 4:6, 8] = 3  # a third label appears
    res = run(SparseLabel.from_slices(label, [0, 8], axis=2), method)
    out = res.sparse.label
    masks = np.stack([out == v for v in (1, 2, 3)])
    assert masks.sum(axis=0).max() == 1
    if method in ("sdf", "nearest"):  # the union is the same square throughout: no hole opens
        for k in range(1, 8):
            np.testing.assert_array_equal(out[6:26, 6:26, k] > 0, np.ones((20, 20), bool))
    if method == "sdf":
        interface = [int(np.argmax(out[15, 6:26, k] == 1)) for k in range(9)]
        assert interface == sorted(interface)  # label 2 grows monotonically


def test_mci_agrees_with_sdf_on_a_simple_shape(itk_ok: None) -> None:
    full = ball((36, 36, 33), spacing=(1.0, 1.0, 1.5), radius=14.0)
    sparse = SparseLabel.from_slices(full, range(0, 33, 4), axis=2)
    sdf = interpolate_label(sparse, spacing=(1.0, 1.0, 1.5), method="sdf")
    mci = interpolate_label(sparse, spacing=(1.0, 1.0, 1.5), method="mci")
    np.testing.assert_array_equal(mci.interpolated, sdf.interpolated)
    filled = sdf.interpolated
    assert dice(mci.sparse.label[:, :, filled] > 0, full[:, :, filled] > 0) > 0.9
    assert dice(mci.sparse.label[:, :, filled] > 0, sdf.sparse.label[:, :, filled] > 0) > 0.9


def test_nearest_copies_the_nearest_annotated_slice_ties_to_the_lower() -> None:
    label = np.zeros((6, 6, 5), np.uint8)
    label[:, :, 0] = 1
    label[:, :, 4] = 2
    out = interpolate_label(SparseLabel.from_slices(label, [0, 4], axis=2), spacing=(1, 1, 1),
                            method="nearest").sparse.label
    assert out[0, 0].tolist() == [1, 1, 1, 2, 2]


def test_none_fills_nothing() -> None:
    label = ball((20, 20, 10), radius=8.0)
    sparse = SparseLabel.from_slices(label, [0, 5, 9], axis=2)
    res = interpolate_label(sparse, spacing=(1, 1, 1), method="none")
    assert not res.interpolated.any()
    np.testing.assert_array_equal(res.sparse.annotated, sparse.annotated)


def test_bad_input() -> None:
    label = ball((12, 12, 6), radius=4.0)
    with pytest.raises(UserError, match="no annotated slice"):
        interpolate_label(SparseLabel.from_slices(label, [], axis=2), spacing=(1, 1, 1), method="sdf")
    with pytest.raises(UserError, match="did you mean 'sdf'"):
        interpolate_label(SparseLabel.from_slices(label, [0, 5], axis=2), spacing=(1, 1, 1), method="sfd")
    with pytest.raises(UserError, match="spacing must have 3 positive values"):
        interpolate_label(SparseLabel.from_slices(label, [0, 5], axis=2), spacing=(1, 0, 1), method="sdf")
    one = SparseLabel.from_slices(label, [3], axis=2)
    with pytest.warns(UserWarning, match="nothing can be interpolated"):
        res = interpolate_label(one, spacing=(1, 1, 1), method="sdf")
    assert res.sparse is one and not res.interpolated.any()


def test_mci_without_itk_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "itk", None)  # makes "import itk" fail
    label = ball((12, 12, 6), radius=4.0)
    with pytest.raises(UserError, match=r'pip install -c constraints.txt "sparseslice\[itk\]"'):
        interpolate_label(SparseLabel.from_slices(label, [0, 5], axis=2), spacing=(1, 1, 1), method="mci")


@pytest.fixture()
def sparse_dir(tmp_path: Path) -> Path:
    """Three phantom cases with every 3rd slice annotated (case c2: one slice), MSD layout."""
    root = tmp_path / "sparse"
    for i in range(3):
        ph = make_phantom((24, 24, 13), seed=i)
        image = root / "imagesTr" / f"c{i}.nii.gz"
        image.parent.mkdir(parents=True, exist_ok=True)
        original = tmp_path / "orig" / f"c{i}.nii.gz"
        original.parent.mkdir(exist_ok=True)
        from sparseslice.io import write_volume

        write_volume(ph.image, original)
        os.symlink(original, image)
        slices = [6] if i == 2 else list(range(0, 13, 3))
        write_sparse(SparseLabel.from_slices(ph.label.array, slices, axis=2), root / "labelsTr" / f"c{i}.nii.gz",
                     like=ph.label, extra={"strategy": "interval"})
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "a", "2": "b"}}))
    return root


def test_interpolate_dataset_writes_the_same_layout_with_sidecars(sparse_dir: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"1 case\(s\) have only one annotated slice \(c2\)"):
        out = interpolate_dataset(sparse_dir, tmp_path / "dense", method="sdf", progress=False)
    ds = discover_dataset(out, require_labels=True)
    assert ds.case_ids == ["c0", "c1", "c2"] and ds.label_names[2] == "b"
    assert (out / "imagesTr" / "c0.nii.gz").is_symlink()
    sparse, vol = read_sparse(out / "labelsTr" / "c0.nii.gz")
    side = sparse.meta
    assert side["method"] == "sdf" and side["strategy"] == "interval"
    assert side["interpolated"] == [1, 2, 4, 5, 7, 8, 10, 11]
    assert side["annotated"] == list(range(13)) and side["drawn"] == [0, 3, 6, 9, 12]
    assert vol.spacing == read_label(sparse_dir / "labelsTr" / "c0.nii.gz").spacing
    one, _ = read_sparse(out / "labelsTr" / "c2.nii.gz")
    assert one.meta["interpolated"] == [] and one.annotated_indices == [6]
    record = json.loads((out / "interpolation.json").read_text())
    assert record["interpolated_slices"] == {"c0": 8, "c1": 8, "c2": 0}


def test_cli_interpolate(sparse_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["interpolate", str(sparse_dir), "-o", str(tmp_path / "o"), "--method", "nearest",
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "o" / "labelsTr" / "c1.sparse.json").read_text())["method"] == "nearest"
    bad = runner.invoke(app, ["interpolate", str(sparse_dir), "-o", str(tmp_path / "p"), "--method", "cubic"])
    assert bad.exit_code == 2
    assert "method must be one of none, nearest, sdf, mci, got 'cubic'" in bad.output
    same = runner.invoke(app, ["interpolate", str(sparse_dir), "-o", str(sparse_dir)])
    assert same.exit_code == 2 and "out must differ from sparse_dir" in same.output


@pytest.mark.parametrize("method", METHODS)
def test_every_registered_fill_writes_inside_its_gaps_only(method: str, request: pytest.FixtureRequest) -> None:
    """The contract every entry of the registry shares (methods.Fill): with the slice axis first, a
    fill writes the slices strictly inside each gap and nothing else, and says whether it filled."""
    from sparseslice.interpolate.methods import FILLS

    if method == "mci":
        request.getfixturevalue("itk_ok")
    label = ball((30, 14, 28), radius=11.0)
    label[:, :, 14:] *= 2  # two touching labels
    sparse = SparseLabel.from_slices(label, [2, 6, 7, 11], axis=1)  # gaps (2, 6) and (7, 11); 6, 7 adjacent
    view = np.moveaxis(label.copy(), 1, 0)
    view[~sparse.annotated] = 9  # a value no method may leave in a gap, nor write elsewhere
    before = view.copy()
    filled = FILLS[method](view, [(2, 6), (7, 11)], sparse=sparse, spacing=(1.0, 1.2, 0.9))
    inside = np.zeros(14, bool)
    inside[[3, 4, 5, 8, 9, 10]] = True
    np.testing.assert_array_equal(view[~inside], before[~inside])
    if method == "none":
        assert filled is False
        np.testing.assert_array_equal(view, before)
    else:
        assert filled is True and not np.any(view[inside] == 9)
        assert set(np.unique(view[inside]).tolist()) == {0, 1, 2}


def test_methods_constant() -> None:
    assert METHODS == ("none", "nearest", "sdf", "mci")


def test_nnunet_ignore_label_without_sidecars(tmp_path: Path) -> None:
    # dataset.json declares "ignore": 3; slices 3 and 6 are whole, slice 8 is labelled on one half only
    from nnunet_fakes import ANNOTATED, IGNORE, PARTIAL, write_ignore_dataset

    data = write_ignore_dataset(tmp_path / "nn", cases=1)
    out = interpolate_dataset(data, tmp_path / "out", method="nearest", progress=False)
    src = read_label(data / "labelsTr" / "case_000.nii.gz").array
    written = read_label(out / "labelsTr" / "case_000.nii.gz").array
    side = json.loads((out / "labelsTr" / "case_000.sparse.json").read_text())
    assert side["ignore_value"] == IGNORE and side["annotated"] == [3, 4, 5, 6] and side["interpolated"] == [4, 5]
    assert side["partial"] == [PARTIAL] and side["drawn"] == list(ANNOTATED)
    np.testing.assert_array_equal(written[..., 4], src[..., 3])  # nearest: 4 copies 3, 5 copies 6
    np.testing.assert_array_equal(written[..., 5], src[..., 6])
    # the partly labelled slice is no input (slice 7 would be filled from it) and keeps its known half
    assert np.all(written[..., 7] == IGNORE)
    np.testing.assert_array_equal(written[..., PARTIAL], src[..., PARTIAL])
    assert not np.any(written == 255)
    sparse, _ = read_sparse(out / "labelsTr" / "case_000.nii.gz")
    assert sparse.partial_slices == [PARTIAL] and sparse.annotated_indices == [3, 4, 5, 6]


def test_partly_labelled_slice_in_a_gap_keeps_its_labelled_voxels() -> None:
    lab = np.zeros((6, 6, 5), np.uint8)
    lab[1:5, 1:5, 0] = 1
    lab[:, :, 2] = 2  # the annotator labelled slice 2's first rows as 2 (the rest of it is unknown)
    partial = np.zeros(lab.shape, bool)
    partial[:2, :, 2] = True
    sparse = SparseLabel(lab, np.array([1, 0, 0, 0, 1], bool), 2, partial_known=partial)
    res = interpolate_label(sparse, spacing=(1.0, 1.0, 1.0), method="nearest")
    assert res.interpolated.tolist() == [False, True, True, True, False] and res.sparse.partial_known is None
    np.testing.assert_array_equal(res.sparse.label[:2, :, 2], 2)
    np.testing.assert_array_equal(res.sparse.label[2:, :, 2], lab[2:, :, 0])


def test_reinterpolated_sidecar_drops_a_partial_slice_that_was_filled(tmp_path: Path) -> None:
    """``partial`` describes the label written, not the input: a partly labelled slice that a
    re-interpolation fills is annotated in the output, and its sidecar no longer lists it."""
    from sparseslice.io import write_volume

    ph = make_phantom((24, 24, 12), seed=0)
    root = tmp_path / "sparse"
    write_volume(ph.image, root / "imagesTr" / "c0.nii.gz")
    known = np.zeros(ph.label.shape, bool)
    known[12:, :, 6] = True  # slice 6, between the annotated 3 and 9, is labelled on its second half only
    sparse = SparseLabel(ph.label.array, np.isin(np.arange(12), [3, 9]), 2, partial_known=known)
    write_sparse(sparse, root / "labelsTr" / "c0.nii.gz", like=ph.label)
    kept = interpolate_dataset(root, tmp_path / "kept", method="none", progress=False)
    side = json.loads((kept / "labelsTr" / "c0.sparse.json").read_text())
    assert side["partial"] == [6] and side["interpolated"] == []  # nothing filled: still partly labelled
    filled = interpolate_dataset(kept, tmp_path / "filled", method="nearest", progress=False)
    side = json.loads((filled / "labelsTr" / "c0.sparse.json").read_text())
    assert side["annotated"] == list(range(3, 10)) and side["interpolated"] == [4, 5, 6, 7, 8]
    assert "partial" not in side, side
    back, _ = read_sparse(filled / "labelsTr" / "c0.nii.gz")
    assert back.partial_slices == [] and back.annotated_indices == list(range(3, 10))
    np.testing.assert_array_equal(back.label[12:, :, 6], ph.label.array[12:, :, 6])  # its labelled half kept
