"""Volume I/O: round-trips for every format keep values, dtype, spacing and affine."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from sparseslice.errors import UserError
from sparseslice.io import (
    Volume,
    check_same_space,
    default_slice_axis,
    read_header,
    read_label,
    read_volume,
    write_volume,
)

SUFFIXES = [".nii", ".nii.gz", ".nrrd", ".seg.nrrd", ".mha", ".mhd"]


def oblique_affine() -> np.ndarray:
    """A rotated, anisotropic, shifted affine: catches axis-order and LPS/RAS mistakes."""
    theta = 0.3
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rot @ np.diag([0.7, 0.9, 2.5])
    affine[:3, 3] = [-12.5, 30.25, 7.0]
    return affine


@pytest.mark.parametrize("suffix", SUFFIXES)
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_round_trip_keeps_values_dtype_spacing_affine(tmp_path, suffix, dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((5, 6, 7)) * 100).astype(dtype)
    vol = Volume(array, oblique_affine())
    path = write_volume(vol, tmp_path / f"v{suffix}")
    back = read_volume(path)
    assert back.array.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.array, array)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-5)
    np.testing.assert_allclose(back.spacing, (0.7, 0.9, 2.5), atol=1e-6)
    head = read_header(path)
    assert head.shape == (5, 6, 7)
    np.testing.assert_allclose(head.affine, vol.affine, atol=1e-5)


def test_nrrd_written_by_us_matches_nifti_world_coordinates(tmp_path):
    """The same voxel lands at the same world point whichever format it went through."""
    vol = Volume(np.arange(60, dtype=np.int16).reshape(3, 4, 5), oblique_affine())
    write_volume(vol, tmp_path / "a.nii.gz")
    write_volume(vol, tmp_path / "a.nrrd")
    nii = nib.load(str(tmp_path / "a.nii.gz"))
    itk = sitk.ReadImage(str(tmp_path / "a.nrrd"))
    ijk = (2, 1, 3)
    ras = nii.affine @ np.array([*ijk, 1.0])
    lps = np.array(itk.TransformIndexToPhysicalPoint(ijk))
    np.testing.assert_allclose(ras[:3], lps * [-1, -1, 1], atol=1e-5)
    assert itk.GetPixel(ijk) == nii.get_fdata()[ijk]


def test_write_is_atomic_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.nii.gz"
    write_volume(Volume(np.zeros((2, 2, 2), np.uint8)), target)
    before = target.read_bytes()

    def half_write(img, filename, **_):  # the disk fills up while nibabel writes the file
        Path(filename).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(nib, "save", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(Volume(np.ones((2, 2, 2), np.uint8)), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.nii.gz"]


@pytest.mark.parametrize(("suffix", "voxels"), [(".mhd", "v.raw"), (".nhdr", "v.raw.gz")])
def test_detached_header_names_its_voxel_file_by_its_final_name(tmp_path, suffix, voxels):
    """A header + voxel-file pair lands as exactly those two files, the header naming the second
    (not a temporary name), and a rewrite replaces both."""
    for value in (1, 2):
        path = write_volume(Volume(np.full((3, 4, 5), value, np.int16), oblique_affine()), tmp_path / f"v{suffix}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"v{suffix}", voxels])
        assert voxels in path.read_text(errors="replace")
        np.testing.assert_array_equal(read_volume(path).array, value)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".mhd", ".nhdr"])
def test_itk_write_is_atomic_on_failure(tmp_path, monkeypatch, suffix):
    """A write that fails half-way leaves the old file (and its voxel file) as they were, and no leftovers."""
    target = write_volume(Volume(np.zeros((2, 2, 2), np.uint8)), tmp_path / f"x{suffix}")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_write(img, filename, *args, **kwargs):
        Path(filename).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(sitk, "WriteImage", half_write)
    with pytest.raises(RuntimeError, match="disk full"):
        write_volume(Volume(np.ones((2, 2, 2), np.uint8)), target)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_missing_and_unknown_format_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(UserError, match="unknown format"):
        read_volume(tmp_path / "a.txt")


def test_truncated_file_names_the_file(tmp_path):
    path = write_volume(Volume(np.ones((20, 20, 20), np.float32)), tmp_path / "t.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="t.nii.gz.*truncated or corrupt"):
        read_volume(path)
    (tmp_path / "g.nii.gz").write_bytes(gzip.compress(b"not a nifti header"))
    with pytest.raises(UserError, match="g.nii.gz"):
        read_volume(tmp_path / "g.nii.gz")


@pytest.mark.parametrize("suffix", [".nrrd", ".seg.nrrd", ".mha", ".mhd", ".nii.gz"])
def test_read_header_does_not_read_the_voxels(tmp_path, suffix):
    """A file whose voxel data is cut off cannot be read, yet its header still reads, and it is
    the header the full read gave (shape, dtype, spacing, origin, direction)."""
    rng = np.random.default_rng(0)
    path = write_volume(Volume(rng.random((64, 48, 40)).astype(np.float32), oblique_affine()),
                        tmp_path / f"big{suffix}")
    full = read_volume(path)
    data = path.with_suffix(".raw") if suffix == ".mhd" else path  # .mhd keeps its voxels beside it
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        read_volume(path)
    head = read_header(path)
    assert head.shape == full.shape == (64, 48, 40)
    assert head.dtype == full.array.dtype == np.float32
    np.testing.assert_allclose(head.affine, full.affine, atol=1e-6)
    np.testing.assert_allclose(head.affine, oblique_affine(), atol=1e-5)


def test_read_header_of_a_multichannel_itk_file_matches_the_full_read(tmp_path):
    path = write_volume(Volume(np.zeros((5, 6, 7, 3), np.int16), oblique_affine()), tmp_path / "c.mha")
    head, full = read_header(path), read_volume(path)
    assert head.shape == full.shape == (5, 6, 7, 3) and head.dtype == full.array.dtype == np.int16
    np.testing.assert_allclose(head.affine, full.affine, atol=1e-6)


def test_read_header_refuses_a_2d_itk_file(tmp_path):
    sitk.WriteImage(sitk.Image([4, 5], sitk.sitkUInt8), str(tmp_path / "flat.mha"))
    with pytest.raises(UserError, match="flat.mha.*must hold a 3D volume"):
        read_header(tmp_path / "flat.mha")


def test_label_validation(tmp_path):
    write_volume(Volume(np.full((3, 3, 3), 1.5, np.float32)), tmp_path / "frac.nii.gz")
    with pytest.raises(UserError, match="must hold integer values, got 1.5"):
        read_label(tmp_path / "frac.nii.gz")
    write_volume(Volume(np.full((3, 3, 3), -1, np.int16)), tmp_path / "neg.nii.gz")
    with pytest.raises(UserError, match="non-negative"):
        read_label(tmp_path / "neg.nii.gz")
    write_volume(Volume(np.full((3, 3, 3), 2.0, np.float32)), tmp_path / "wholefloat.nii.gz")
    lab = read_label(tmp_path / "wholefloat.nii.gz")
    assert lab.array.dtype == np.uint8 and int(lab.array.max()) == 2


def test_like_with_another_grid_is_a_programmer_error():
    vol = Volume(np.zeros((4, 5, 6), np.uint8))
    assert vol.like(np.ones((4, 5, 6, 2), np.float32)).shape == (4, 5, 6, 2)  # channels may be added
    with pytest.raises(ValueError, match="array shape must match the volume") as wrong:
        vol.like(np.zeros((4, 6, 5), np.uint8))
    assert not isinstance(wrong.value, UserError)


def test_check_same_space():
    a = Volume(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(UserError, match="case 'c1': label shape must match"):
        check_same_space(a, Volume(np.zeros((4, 4, 5)), np.eye(4)), name="c1")
    shifted = np.eye(4)
    shifted[0, 3] = 3.0
    with pytest.raises(UserError, match="case 'c1': label affine must match"):
        check_same_space(a, Volume(np.zeros((4, 4, 4)), shifted), name="c1")


@pytest.mark.parametrize(
    ("spacing", "shape", "axis"),
    [
        ((0.8, 0.8, 5.0), (512, 512, 40), 2),
        ((3.0, 0.5, 0.5), (30, 256, 256), 0),
        ((1.0, 1.0, 1.0), (35, 50, 36), 0),  # tie: fewest voxels
        ((1.0, 1.0, 1.0), (50, 40, 36), 2),
        ((1.0, 2.0, 2.0), (10, 20, 20), 1),  # tie on spacing and size: lowest index
        ((1.0, 1.0, 1.0004), (20, 30, 40), 0),  # within 0.1 %: a tie, fewest voxels wins
    ],
)
def test_default_slice_axis(spacing, shape, axis):
    assert default_slice_axis(spacing, shape) == axis


def test_default_slice_axis_needs_three_spacings():
    with pytest.raises(UserError, match=r"spacing must have 3 values, got \(1.0, 1.0\)"):
        default_slice_axis((1.0, 1.0), (4, 4, 4))


def test_atomic_writes_respect_the_umask(tmp_path):
    import os

    from sparseslice.atomic import write_json

    old = os.umask(0o022)
    try:
        path = write_json(tmp_path / "r.json", {"a": 1})
        vol = write_volume(Volume(np.zeros((2, 2, 2), np.uint8)), tmp_path / "v.nii.gz")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert vol.stat().st_mode & 0o777 == 0o644


def _write_scaled_nifti(path: Path, array: np.ndarray, slope: float, inter: float, *, endian: str = "<") -> None:
    header = nib.Nifti1Header(endianness=endian)
    header.set_data_dtype(array.dtype)
    img = nib.Nifti1Image(array, oblique_affine(), header=header)
    img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("scaling", [(1.0, 0.0), (2.5, -1024.0)])
def test_nifti_read_gives_nibabels_array_in_c_order(tmp_path, monkeypatch, suffix, dtype, scaling):
    """The slab-wise copy to C order keeps nibabel's values and dtype (scl_slope/inter applied as nibabel does)."""
    import sparseslice.io as io_module

    monkeypatch.setattr(io_module, "SLAB_BYTES", 1000)  # several slabs even for a small volume
    rng = np.random.default_rng(1)
    array = (rng.random((37, 29, 23)) * 120).astype(dtype)
    path = tmp_path / f"s{suffix}"
    _write_scaled_nifti(path, array, *scaling)
    want = np.asanyarray(nib.load(str(path)).dataobj)
    got = read_volume(path).array
    assert got.flags.c_contiguous and got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    if scaling == (1.0, 0.0):
        np.testing.assert_array_equal(got, array)


def test_nifti_read_keeps_big_endian_and_channels(tmp_path):
    rng = np.random.default_rng(2)
    array = rng.integers(-3000, 3000, (33, 21, 17, 2)).astype(np.int16)
    _write_scaled_nifti(tmp_path / "b.nii.gz", array, 1.0, 0.0, endian=">")
    got = read_volume(tmp_path / "b.nii.gz").array
    want = np.asanyarray(nib.load(str(tmp_path / "b.nii.gz")).dataobj)
    assert got.flags.c_contiguous and got.dtype == want.dtype
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("channels", [1, 3])
def test_itk_read_matches_simpleitk_in_c_order(tmp_path, monkeypatch, channels):
    import sparseslice.io as io_module

    monkeypatch.setattr(io_module, "SLAB_BYTES", 1000)
    rng = np.random.default_rng(3)
    shape = (31, 27, 19) + ((channels,) if channels > 1 else ())
    array = rng.integers(-500, 500, shape).astype(np.int16)
    path = write_volume(Volume(array, oblique_affine()), tmp_path / "v.nrrd")
    got = read_volume(path).array
    itk = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))  # [k, j, i] (+ components)
    assert got.flags.c_contiguous
    np.testing.assert_array_equal(got, np.transpose(itk, (2, 1, 0, 3) if channels > 1 else (2, 1, 0)))
    np.testing.assert_array_equal(got, array)


@pytest.mark.parametrize("order", [(2, 1, 0), (1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2), (0, 1, 2)])
def test_c_order_equals_ascontiguousarray_for_every_layout(monkeypatch, order):
    import sparseslice.io as io_module
    from sparseslice.io import c_order

    monkeypatch.setattr(io_module, "SLAB_BYTES", 64)

    base = np.arange(11 * 13 * 7, dtype=np.int16).reshape(11, 13, 7)
    view = np.transpose(base, order)
    for arr in (view, view[:, ::2], np.asfortranarray(view)[..., None]):
        out = c_order(arr)
        assert out.flags.c_contiguous and out.dtype == arr.dtype
        np.testing.assert_array_equal(out, arr)
