"""Sparse labels: ignore-value encoding, sidecars, border slices, extents."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparseslice.errors import UserError
from sparseslice.io import Volume, affine_from_spacing, read_label
from sparseslice.sparse import (
    SparseLabel,
    decode,
    encode,
    extent_of,
    read_sparse,
    sidecar_extra,
    sidecar_ignore_value,
    sidecar_path,
    structure_slices,
    write_sparse,
)


def toy_label() -> np.ndarray:
    lab = np.zeros((6, 5, 8), np.uint8)
    lab[1:4, 1:4, 2:6] = 1
    lab[2:4, 2:4, 4:6] = 2
    return lab


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_encode_decode_round_trip(axis):
    lab = toy_label()
    n = lab.shape[axis]
    sp = SparseLabel.from_slices(lab, [0, n // 2, n - 1], axis=axis)
    enc = encode(sp)
    known = sp.known_mask()
    assert np.all(enc[~known] == 255)
    np.testing.assert_array_equal(enc[known], lab[known])
    back = decode(enc, axis=axis)
    np.testing.assert_array_equal(back.annotated, sp.annotated)
    np.testing.assert_array_equal(back.label[known], lab[known])


def test_unannotated_slices_are_unknown_not_background():
    lab = toy_label()
    sp = SparseLabel.from_slices(lab, [3], axis=2)
    enc = encode(sp)
    assert not np.any(enc[:, :, 4] == 0), "an unannotated slice must not read as background"
    assert sp.known_mask().sum() == 6 * 5


def test_ignore_value_collision_is_refused():
    lab = toy_label()
    lab[0, 0, 0] = 255
    sp = SparseLabel.from_slices(lab, [0], axis=2)
    with pytest.raises(UserError, match="ignore_value collides with a real label, got 255"):
        encode(sp)
    enc = encode(sp, ignore_value=300)
    assert enc.dtype == np.uint16
    assert decode(enc, axis=2, ignore_value=300).annotated_indices == [0]


def test_partly_ignored_slice_is_refused():
    enc = np.full((3, 3, 3), 255, np.uint8)
    enc[0, 0, 1] = 0
    with pytest.raises(UserError, match="slice 1 along axis 2 is partly ignored"):
        decode(enc, axis=2)


def test_border_slices_become_annotated_background():
    lab = toy_label()
    ext = extent_of(lab, axis=2)
    assert ext == (2, 5)
    sp = SparseLabel.from_slices(lab, [3], axis=2).with_border_slices(ext)
    assert sp.annotated_indices == [0, 1, 3, 6, 7]
    assert np.flatnonzero(sp.border).tolist() == [0, 1, 6, 7]
    assert np.flatnonzero(sp.drawn).tolist() == [3]
    assert not sp.label[:, :, [0, 1, 6, 7]].any()
    # extent is validated
    with pytest.raises(UserError, match="extent must satisfy"):
        sp.with_border_slices((5, 2))
    with pytest.raises(UserError, match="extent must satisfy"):
        sp.with_border_slices((0, 8))


def test_structure_slices_and_empty_extent():
    lab = toy_label()
    assert structure_slices(lab, axis=2) == 4
    assert structure_slices(lab, axis=0) == 3
    assert extent_of(np.zeros((3, 3, 3)), axis=0) is None


def test_write_read_sparse_with_sidecar(tmp_path):
    lab = toy_label()
    like = Volume(np.zeros(lab.shape, np.float32), affine_from_spacing((1.0, 1.0, 3.0)))
    sp = SparseLabel.from_slices(lab, [3, 4], axis=2).with_border_slices((2, 5))
    path = write_sparse(sp, tmp_path / "case.nii.gz", like=like, extra={"strategy": "interval"})
    side = json.loads(sidecar_path(path).read_text())
    assert side["annotated"] == [0, 1, 3, 4, 6, 7] and side["border"] == [0, 1, 6, 7]
    assert side["drawn"] == [3, 4] and side["extent"] == [2, 5] and side["strategy"] == "interval"
    back, vol = read_sparse(path)
    assert back.axis == 2 and back.extent == (2, 5)
    np.testing.assert_array_equal(back.border, sp.border)
    np.testing.assert_array_equal(back.label[back.known_mask()], sp.label[sp.known_mask()])
    np.testing.assert_allclose(vol.affine, like.affine)


def test_rewritten_sidecar_keeps_what_later_stages_added(tmp_path):
    """sidecar_extra: the entries write_sparse does not take from the label, which a rewrite passes on."""
    lab = toy_label()
    like = Volume(np.zeros(lab.shape, np.float32))
    path = write_sparse(SparseLabel.from_slices(lab, [2, 5], axis=2), tmp_path / "a.nii.gz", like=like,
                        ignore_value=9, extra={"strategy": "interval", "interpolated": []})
    first, _ = read_sparse(path)
    assert sidecar_extra(first.meta) == {"strategy": "interval", "interpolated": []}
    assert sidecar_ignore_value(first.meta) == 9 and sidecar_ignore_value(first.meta, default=3) == 9
    assert sidecar_ignore_value({}, default=3) == 3 and sidecar_ignore_value({}) == 255
    wider = SparseLabel.from_slices(lab, [2, 3, 4, 5], axis=2)
    extra = {**sidecar_extra(first.meta), "interpolated": [3, 4]}
    again, _ = read_sparse(write_sparse(wider, tmp_path / "b.nii.gz", like=like, extra=extra,
                                        ignore_value=sidecar_ignore_value(first.meta)))
    assert again.meta["annotated"] == [2, 3, 4, 5] and again.meta["ignore_value"] == 9
    assert again.meta["strategy"] == "interval" and again.meta["interpolated"] == [3, 4]


def test_partial_slices_come_from_the_label_written_not_the_old_sidecar(tmp_path):
    """write_sparse owns ``partial``: sidecar_extra leaves it out and extra may not set it, so a
    rewrite lists the partly labelled slices of its own label only."""
    lab = toy_label()
    like = Volume(np.zeros(lab.shape, np.float32))
    known = np.zeros(lab.shape, bool)
    known[:3, :, 4] = True  # slice 4: its first three rows are labelled
    path = write_sparse(SparseLabel(lab, np.eye(8, dtype=bool)[2], 2, partial_known=known), tmp_path / "a.nii.gz",
                        like=like, extra={"strategy": "interval"})
    first, _ = read_sparse(path)
    assert first.meta["partial"] == [4] and sidecar_extra(first.meta) == {"strategy": "interval"}
    whole = SparseLabel.from_slices(lab, [2, 4], axis=2)  # slice 4 now whole
    again, _ = read_sparse(write_sparse(whole, tmp_path / "b.nii.gz", like=like, extra=sidecar_extra(first.meta)))
    assert "partial" not in again.meta and again.meta["strategy"] == "interval"
    with pytest.raises(ValueError, match="extra must not hold 'partial'"):
        write_sparse(whole, tmp_path / "c.nii.gz", like=like, extra={"partial": [4]})


def test_sidecar_disagreeing_with_volume_is_refused(tmp_path):
    lab = toy_label()
    like = Volume(np.zeros(lab.shape, np.float32))
    path = write_sparse(SparseLabel.from_slices(lab, [3], axis=2), tmp_path / "c.nii.gz", like=like)
    side = sidecar_path(path)
    record = json.loads(side.read_text())
    record["annotated"] = [2]
    side.write_text(json.dumps(record))
    with pytest.raises(UserError, match="disagrees with its sidecar"):
        read_sparse(path)


def test_bad_annotated_vector():
    with pytest.raises(UserError, match="annotated must have one entry per slice"):
        SparseLabel(np.zeros((2, 2, 4)), np.ones(3, bool), axis=2)
    with pytest.raises(UserError, match="slices must lie in"):
        SparseLabel.from_slices(np.zeros((2, 2, 4)), [4], axis=2)
    with pytest.raises(UserError, match="axis must be 0, 1 or 2"):
        SparseLabel(np.zeros((2, 2, 4)), np.ones(4, bool), axis=3)


def test_read_label_file_follows_one_rule_for_every_stage(tmp_path):
    """Sidecar -> sparse (sidecar's axis); ignore value -> decoded along axis; else fully annotated."""
    from sparseslice.io import write_volume
    from sparseslice.sparse import read_label_file

    lab = toy_label()
    like = Volume(np.zeros(lab.shape, np.float32))
    with_side = write_sparse(SparseLabel.from_slices(lab, [1, 2], axis=0), tmp_path / "a.nii.gz", like=like)
    sparse, _ = read_label_file(with_side, axis=2)
    assert sparse.axis == 0 and sparse.annotated_indices == [1, 2]
    no_side = write_volume(like.like(encode(SparseLabel.from_slices(lab, [3, 5], axis=2))), tmp_path / "b.nii.gz")
    sparse, _ = read_label_file(no_side, axis=2)
    assert sparse.axis == 2 and sparse.annotated_indices == [3, 5]
    dense = write_volume(like.like(lab), tmp_path / "c.nii.gz")
    sparse, vol = read_label_file(dense, axis=2)
    assert sparse is None
    np.testing.assert_array_equal(vol.array, lab)


def test_declared_ignore_value_with_partly_labelled_slices(tmp_path):
    """nnU-Net's dataset.json ignore label: slices free of it are annotated, partly ignored ones voxel-level."""
    from sparseslice.io import write_volume
    from sparseslice.sparse import read_label_file

    lab = toy_label()
    raw = np.full(lab.shape, 3, np.uint8)
    raw[..., 2] = lab[..., 2]
    raw[:3, :, 4] = lab[:3, :, 4]  # slice 4: only its first three rows are labelled
    like = Volume(np.zeros(lab.shape, np.float32))
    path = write_volume(like.like(raw), tmp_path / "a.nii.gz")
    sparse, _ = read_label_file(path, axis=2, ignore_value=3)
    assert sparse.annotated_indices == [2] and sparse.partial_slices == [4]
    np.testing.assert_array_equal(sparse.known_mask(), raw != 3)
    np.testing.assert_array_equal(sparse.label[sparse.known_mask()], raw[raw != 3])
    with pytest.raises(UserError, match="slice 4 along axis 2 is partly ignored"):
        decode(raw, axis=2, ignore_value=3)  # our own files are whole slices: still refused
    # written with a sidecar (as interpolate does), read back the same
    back, _ = read_sparse(write_sparse(sparse, tmp_path / "b.nii.gz", like=like, ignore_value=3))
    assert json.loads(sidecar_path(tmp_path / "b.nii.gz").read_text())["partial"] == [4]
    np.testing.assert_array_equal(back.known_mask(), raw != 3)
    # a dense file under a declared ignore value is fully annotated; 255 is then no ignore value
    sparse, _ = read_label_file(write_volume(like.like(lab), tmp_path / "c.nii.gz"), axis=2, ignore_value=3)
    assert sparse is None
    # border slices become whole: their partial voxels are dropped
    part = SparseLabel(lab, np.eye(8, dtype=bool)[2], 2, partial_known=raw != 3).with_border_slices((2, 3))
    assert part.partial_known is None and part.annotated_indices == [0, 1, 2, 4, 5, 6, 7]


def test_extent_ignores_nnunet_ignore_voxels(tmp_path):
    # an nnU-Net sparse label: every unknown voxel is 3, so "any value > 0" would span every slice
    from nnunet_fakes import ANNOTATED, IGNORE, PARTIAL, write_ignore_dataset
    from sparseslice.datasets import discover_dataset
    from sparseslice.select.plan import extents_from_labels

    data = write_ignore_dataset(tmp_path / "nn", cases=1)
    label = read_label(data / "labelsTr" / "case_000.nii.gz").array
    assert extent_of(label, axis=2) == (0, label.shape[2] - 1)  # the ignore value read as foreground
    known = [s for s in (*ANNOTATED, PARTIAL) if np.isin(label[..., s], (1, 2)).any()]
    assert extent_of(label, axis=2, ignore_value=IGNORE) == (min(known), max(known))
    assert extents_from_labels(discover_dataset(data), axis=2) == {"case_000": (min(known), max(known))}
