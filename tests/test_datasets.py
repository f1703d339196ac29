"""Dataset discovery in every layout, splits, phantoms, and their bad inputs."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sparseslice.datasets import discover_dataset, load_image, load_label, split_cases
from sparseslice.errors import UserError
from sparseslice.io import Volume, affine_from_spacing, write_volume
from sparseslice.sparse import extent_of
from sparseslice.synthetic import make_phantom, write_phantom_dataset


def test_msd_layout(phantom_dataset):
    ds = discover_dataset(phantom_dataset, require_labels=True)
    assert ds.layout == "msd" and ds.case_ids == [f"phantom_{i:03d}" for i in range(4)]
    assert ds.label_names == {0: "background", 1: "part1", 2: "part2"}
    case = ds.case("phantom_001")
    image = load_image(case)
    label = load_label(case, image=image)
    assert image.shape == label.shape and image.array.dtype == np.float32
    with pytest.raises(UserError, match="case 'nope' is not in the dataset"):
        ds.case("nope")


def test_nnunet_channels_and_unlabelled_pool(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    for cid in ("a", "b"):
        for ch in range(2):
            write_volume(Volume(np.full((3, 3, 3), ch, np.int16)), tmp_path / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
    write_volume(Volume(np.zeros((3, 3, 3), np.uint8)), tmp_path / "labelsTr" / "a.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "tumour": 1}}))
    ds = discover_dataset(tmp_path)
    assert ds.case_ids == ["a", "b"] and len(ds.case("a").images) == 2
    assert ds.case("b").label is None and ds.label_names == {0: "background", 1: "tumour"}
    assert load_image(ds.case("a")).shape == (3, 3, 3, 2)
    with pytest.raises(UserError, match="case 'b' has an image but no label"):
        discover_dataset(tmp_path, require_labels=True)


def test_folder_pairs_and_flat_tags(tmp_path):
    vol = Volume(np.zeros((3, 3, 3), np.uint8))
    for cid in ("x1", "x2"):
        write_volume(vol, tmp_path / "sub" / "images" / f"{cid}.nrrd")
        write_volume(vol, tmp_path / "sub" / "labels" / f"{cid}.nrrd")
        write_volume(vol, tmp_path / "flat" / f"{cid}.nii.gz")
        write_volume(vol, tmp_path / "flat" / f"{cid}_seg.nii.gz")
    write_volume(vol, tmp_path / "flat" / "x3.mha")
    write_volume(vol, tmp_path / "flat" / "x3.seg.nrrd")
    sub = discover_dataset(tmp_path / "sub", require_labels=True)
    assert sub.layout == "pairs" and sub.case_ids == ["x1", "x2"]
    flat = discover_dataset(tmp_path / "flat", require_labels=True)
    assert flat.case_ids == ["x1", "x2", "x3"]
    assert flat.case("x3").label.name == "x3.seg.nrrd"


def test_csv_layout(tmp_path):
    vol = Volume(np.zeros((3, 3, 3), np.uint8))
    write_volume(vol, tmp_path / "img" / "p.nii.gz")
    write_volume(vol, tmp_path / "lab" / "p.nii.gz")
    write_volume(vol, tmp_path / "img" / "q.nii.gz")
    (tmp_path / "list.csv").write_text("image,label\nimg/p.nii.gz,lab/p.nii.gz\nimg/q.nii.gz,\n")
    ds = discover_dataset(tmp_path / "list.csv")
    assert ds.case_ids == ["p", "q"] and ds.case("q").label is None
    (tmp_path / "bad.csv").write_text("image,label\nimg/missing.nii.gz,\n")
    with pytest.raises(UserError, match="line 2: file .*missing.nii.gz' does not exist"):
        discover_dataset(tmp_path / "bad.csv")
    (tmp_path / "nohead.csv").write_text("a,b\n1,2\n")
    with pytest.raises(UserError, match="must have an 'image' column"):
        discover_dataset(tmp_path / "nohead.csv")


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        discover_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no image files"):
        discover_dataset(tmp_path / "empty")


def test_mismatched_label_is_named(tmp_path, phantom_dataset):
    root = tmp_path / "ds"
    shutil.copytree(phantom_dataset, root)
    case = discover_dataset(root).case("phantom_002")
    write_volume(Volume(np.zeros((5, 5, 5), np.uint8)), case.label)
    with pytest.raises(UserError, match="case 'phantom_002': label shape must match"):
        load_label(case, image=load_image(case))


def test_split_is_deterministic_disjoint_and_order_free():
    ids = [f"c{i:03d}" for i in range(50)]
    a = split_cases(ids, seed=3)
    b = split_cases(list(reversed(ids)), seed=3)
    assert a == b
    assert (len(a.train), len(a.val), len(a.test)) == (35, 5, 10)
    assert set(a.train) | set(a.val) | set(a.test) == set(ids)
    assert not (set(a.train) & set(a.val)) and not (set(a.train) & set(a.test))
    assert split_cases(ids, seed=4) != a
    with pytest.raises(UserError, match="val \\+ test must leave cases"):
        split_cases(ids, seed=0, val=0.5, test=0.5)


def test_phantoms_are_seeded_and_anisotropic(tmp_path):
    a, b, c = make_phantom(seed=5), make_phantom(seed=5), make_phantom(seed=6)
    np.testing.assert_array_equal(a.image.array, b.image.array)
    assert not np.array_equal(a.label.array, c.label.array)
    assert a.image.spacing == (1.0, 1.0, 2.5)
    assert set(np.unique(a.label.array)) == {0, 1, 2}
    first, last = extent_of(a.label.array, axis=2)
    assert 0 < first < last < a.label.shape[2] - 1, "structure must not touch the volume ends"
    fg = a.image.array[a.label.array > 0].mean()
    bg = a.image.array[a.label.array == 0].mean()
    assert fg - bg > 0.2, "structure must be visible in the image"
    out = write_phantom_dataset(tmp_path / "p", cases=2, seed=1, n_labels=1)
    ds = discover_dataset(out, require_labels=True)
    assert len(ds.cases) == 2
    np.testing.assert_allclose(load_image(ds.cases[0]).affine, affine_from_spacing((1.0, 1.0, 2.5)))


def _msd_json(root, training, **extra):
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "organ"},
                                                   "modality": {"0": "CT"}, "training": training, **extra}))


def test_msd_listing_is_the_truth_for_four_digit_case_ids(tmp_path):
    # AMOS names its cases amos_0001, amos_0002: two cases of one channel, not two channels of "amos"
    for cid in ("amos_0001", "amos_0002"):
        write_volume(Volume(np.zeros((3, 3, 3), np.int16)), tmp_path / "imagesTr" / f"{cid}.nii.gz")
        write_volume(Volume(np.zeros((3, 3, 3), np.uint8)), tmp_path / "labelsTr" / f"{cid}.nii.gz")
    _msd_json(tmp_path, [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                         for c in ("amos_0001", "amos_0002")])
    ds = discover_dataset(tmp_path, require_labels=True)
    assert ds.case_ids == ["amos_0001", "amos_0002"]
    assert [len(c.images) for c in ds.cases] == [1, 1]
    assert ds.case("amos_0002").label.name == "amos_0002.nii.gz"
    assert load_image(ds.case("amos_0001")).shape == (3, 3, 3)
    # the same files without dataset.json: suffixes 0001, 0002 are not channels 0000..000k either
    (tmp_path / "dataset.json").unlink()
    assert discover_dataset(tmp_path).case_ids == ["amos_0001", "amos_0002"]
    # ... nor amos_0000, amos_0001 when labels carry those names
    for n, cid in enumerate(("amos_0001", "amos_0002")):
        for sub in ("imagesTr", "labelsTr"):
            (tmp_path / sub / f"{cid}.nii.gz").rename(tmp_path / sub / f"amos_{n:04d}.nii.gz")
    assert discover_dataset(tmp_path, require_labels=True).case_ids == ["amos_0000", "amos_0001"]


def test_msd_listing_channels_and_bad_entries(tmp_path):
    for ch in range(2):
        write_volume(Volume(np.full((3, 3, 3), ch, np.int16)), tmp_path / "imagesTr" / f"p_{ch:04d}.nii.gz")
    write_volume(Volume(np.zeros((3, 3, 3), np.uint8)), tmp_path / "labelsTr" / "p.nii.gz")
    # a list of channels (MONAI's load_decathlon_datalist form), and "_0000" only (its siblings follow)
    for image in (["./imagesTr/p_0000.nii.gz", "./imagesTr/p_0001.nii.gz"], "./imagesTr/p_0000.nii.gz",
                  "./imagesTr/p.nii.gz"):  # nnU-Net v1: listed without the suffix
        _msd_json(tmp_path, [{"image": image, "label": "./labelsTr/p.nii.gz"}])
        ds = discover_dataset(tmp_path)
        assert ds.case_ids == ["p"] and load_image(ds.case("p")).array[0, 0, 0].tolist() == [0, 1]
    _msd_json(tmp_path, [{"image": "./imagesTr/q.nii.gz", "label": "./labelsTr/q.nii.gz"}])
    with pytest.raises(UserError, match="training entry 0 names .*q.nii.gz', which does not exist"):
        discover_dataset(tmp_path)


def test_nnunet_channel_suffixes_follow_channel_names(tmp_path):
    # nnU-Net v2 raw: case_001_0000, case_001_0001 are the two channels of case_001
    for ch in range(2):
        write_volume(Volume(np.full((3, 3, 3), ch, np.int16)), tmp_path / "imagesTr" / f"case_001_{ch:04d}.nii.gz")
    write_volume(Volume(np.zeros((3, 3, 3), np.uint8)), tmp_path / "labelsTr" / "case_001.nii.gz")
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0, "organ": 1},
         "numTraining": 1, "file_ending": ".nii.gz"}))
    ds = discover_dataset(tmp_path, require_labels=True)
    assert ds.case_ids == ["case_001"] and load_image(ds.case("case_001")).shape == (3, 3, 3, 2)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "T1", "1": "T2", "2": "FLAIR"}, "labels": {"background": 0, "organ": 1}}))
    with pytest.raises(UserError, match="case 'case_001' has channel files \\['0000', '0001'\\], but dataset.json "
                                        "channel_names declares 3"):
        discover_dataset(tmp_path)


def test_info_reads_nnunet_ignore_label(tmp_path):
    from typer.testing import CliRunner

    from nnunet_fakes import ANNOTATED, IGNORE, PARTIAL, write_ignore_dataset
    from sparseslice.cli import app
    from sparseslice.info import describe_dataset
    from sparseslice.io import read_label

    data = write_ignore_dataset(tmp_path / "nn")
    desc = describe_dataset(data)
    assert desc.ignore_value == IGNORE and desc.label_values == (0, 1, 2) and desc.axis == 2
    for case in desc.cases:
        assert case.annotated == ANNOTATED and case.partial == (PARTIAL,)
        # structure slices count known foreground only: the ignore value is no structure
        ref = read_label(data / "labelsTr" / f"{case.case_id}.nii.gz").array
        assert case.structure_slices == int(np.sum(np.any((ref > 0) & (ref != IGNORE), axis=(0, 1))))
    out = CliRunner().invoke(app, ["info", str(data)], terminal_width=200).output
    assert "ignore value 3 (dataset.json)" in out and "case_000: annotated 3,6; partly labelled 8" in out
    assert "labels {0, 1, 2}" in out


def test_ignore_label_drawn_along_another_axis_than_the_default(tmp_path):
    # whole slices along axis 1 while the spacing makes axis 2 the default: every stage finds axis 1
    from nnunet_fakes import ANNOTATED, PARTIAL, write_ignore_dataset
    from sparseslice.evaluate import evaluate_folder
    from sparseslice.info import describe_dataset
    from sparseslice.interpolate import interpolate_dataset
    from sparseslice.train.data import resolve_axis

    data = write_ignore_dataset(tmp_path / "nn", cases=1, axis=1)
    ds = discover_dataset(data)
    assert resolve_axis(ds, None) == 1
    desc = describe_dataset(data)
    assert desc.axis == 1 and desc.cases[0].annotated == ANNOTATED and desc.cases[0].partial == (PARTIAL,)
    out = interpolate_dataset(data, tmp_path / "out", method="nearest", progress=False)
    side = json.loads((out / "labelsTr" / "case_000.sparse.json").read_text())
    assert side["axis"] == 1 and side["interpolated"] == [4, 5]
    (tmp_path / "pred").mkdir()
    shutil.copy(data / "full" / "case_000.nii.gz", tmp_path / "pred" / "case_000.nii.gz")
    df = evaluate_folder(tmp_path / "pred", data, progress=False)
    assert df.attrs["axis"] == 1 and np.all(df[df.metric == "dice"].value == 1.0)
