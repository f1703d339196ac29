"""Labels land where their image is: qform/sform headers survive simulate, interpolate and predict.

ITK readers (SimpleITK, 3D Slicer, ITK-SNAP, nnU-Net) may place a NIfTI file by its qform,
nibabel by its sform; a label is only where its image is when both transforms and codes
are the image's. The nnU-Net export also reorders axes so that nnU-Net's 2d configuration
slices along the annotated axis, without moving any voxel in physical space.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry_fakes import CODE_PAIRS, make_skewed_dataset, nifti_codes, sitk_geometry, write_skewed
from sparseslice.datasets import discover_dataset
from sparseslice.interpolate import interpolate_dataset
from sparseslice.io import NiftiGeometry, Volume, read_label, read_volume, write_volume
from sparseslice.select import make_plan
from sparseslice.simulate import simulate


def assert_same_place(label: Path, image: Path, codes: tuple[int, int]) -> None:
    """SimpleITK places ``label`` exactly on ``image``, and nibabel's codes are the image's."""
    for got, want in zip(sitk_geometry(label), sitk_geometry(image), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-4)
    assert nifti_codes(label) == codes


@pytest.fixture(scope="module", params=CODE_PAIRS, ids=lambda c: f"codes{c[0]}{c[1]}")
def skewed(request, tmp_path_factory) -> tuple[Path, tuple[int, int]]:
    codes = request.param
    return make_skewed_dataset(tmp_path_factory.mktemp("skewed"), codes=codes), codes


@pytest.mark.parametrize("format", ["msd", "nnunet"])
def test_simulate_and_interpolate_write_labels_on_the_image(skewed, format: str, tmp_path: Path) -> None:
    root, codes = skewed
    ds = discover_dataset(root)
    plan = make_plan(ds, budget=4, volumes=2, strategy="interval", seed=0, axis=2)
    out = simulate(ds, plan, tmp_path / "sparse", format=format)
    dense = interpolate_dataset(out, tmp_path / "dense", method="sdf", progress=False)
    for cid in plan.case_ids:
        suffix = "_0000" if format == "nnunet" else ""
        source = ds.case(cid).images[0]
        for folder in (out, dense):
            image = folder / "imagesTr" / f"{cid}{suffix}.nii.gz"
            assert_same_place(folder / "labelsTr" / f"{cid}.nii.gz", image, codes)
            assert_same_place(image, source, codes)


def test_simulate_gives_labels_the_image_header_even_when_the_label_lacks_it(tmp_path: Path) -> None:
    """A label saved by a tool that writes the sform twice (codes 1/1) still gets the image's qform."""
    root = make_skewed_dataset(tmp_path / "src", codes=(1, 2), n_cases=2)
    for path in (root / "labelsTr").iterdir():
        label = read_label(path)
        write_volume(Volume(label.array, label.affine), path)  # no header kept: sform twice, codes 1/1
    ds = discover_dataset(root)
    out = simulate(ds, make_plan(ds, budget=2, volumes=2, strategy="interval", seed=0, axis=2), tmp_path / "out")
    for cid in ds.case_ids:
        assert_same_place(out / "labelsTr" / f"{cid}.nii.gz", ds.case(cid).images[0], (1, 2))


def test_predict_writes_labels_on_the_image(skewed, tmp_path: Path) -> None:
    from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint
    from sparseslice.predict import predict_folder

    root, codes = skewed
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    save_checkpoint(tmp_path / "run" / "best.pt",
                    Checkpoint(spec=spec, normalization=Normalization("zscore"), axis=2, labels=(0, 1, 2),
                               patch_size=(16, 16), state_dict=build_model(spec).state_dict()))
    written = predict_folder(tmp_path / "run", root / "imagesTr", tmp_path / "pred", progress=False,
                             fill_holes=False, largest_component=False)
    assert len(written) == 3
    for path in written:
        assert_same_place(path, root / "imagesTr" / path.name, codes)


def test_header_is_kept_only_while_it_still_describes_the_affine(tmp_path: Path) -> None:
    src = write_skewed(np.arange(24, dtype=np.int16).reshape(2, 3, 4), tmp_path / "a.nii.gz", codes=(1, 2))
    vol = read_volume(src)
    assert isinstance(vol.geometry, NiftiGeometry) and (vol.geometry.qform_code, vol.geometry.sform_code) == (1, 2)
    assert_same_place(write_volume(vol.like(vol.array * 2), tmp_path / "b.nii.gz"), src, (1, 2))
    moved = vol.affine.copy()
    moved[:3, 3] += 5.0  # a new grid: the old header would lie, so the affine goes in both slots
    write_volume(Volume(vol.array, moved, vol.geometry), tmp_path / "c.nii.gz")
    assert nifti_codes(tmp_path / "c.nii.gz") == (1, 1)
    np.testing.assert_allclose(read_volume(tmp_path / "c.nii.gz").affine, moved, atol=1e-4)


@pytest.mark.parametrize(("axis", "codes"), [(0, (2, 1)), (1, (1, 2))])
def test_nnunet_export_puts_the_annotated_axis_where_nnunet_2d_slices(axis: int, codes: tuple[int, int],
                                                                      tmp_path: Path) -> None:
    """nnU-Net reads via SimpleITK and its 2d configuration slices along sitk array axis 0."""
    import SimpleITK as sitk

    root = make_skewed_dataset(tmp_path / "src", codes=codes, n_cases=2, shape=(9, 14, 12))
    ds = discover_dataset(root)
    plan = make_plan(ds, budget=4, volumes=2, strategy="interval", seed=0, axis=axis)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # axis 0/1 are finer than axis 2 here: nnU-Net 2d warning
        out = simulate(ds, plan, tmp_path / "nn", format="nnunet")
    assert json.loads((out / "dataset.json").read_text())["sparse"]["axis"] == 2
    for entry in plan.entries:
        src_img = sitk.ReadImage(str(ds.case(entry.case_id).images[0]))
        img = sitk.ReadImage(str(out / "imagesTr" / f"{entry.case_id}_0000.nii.gz"))
        lab = sitk.ReadImage(str(out / "labelsTr" / f"{entry.case_id}.nii.gz"))
        assert nifti_codes(out / "labelsTr" / f"{entry.case_id}.nii.gz") == codes
        arr = sitk.GetArrayFromImage(lab)  # nnU-Net's view: [slice, row, column]
        annotated = [k for k in range(arr.shape[0]) if not np.any(arr[k] == 3)]
        assert annotated == list(entry.slices)
        assert all(np.all(arr[k] == 3) for k in range(arr.shape[0]) if k not in entry.slices)
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.case(entry.case_id).label)))
        src_arr, new_arr = sitk.GetArrayFromImage(src_img), sitk.GetArrayFromImage(img)
        for index in np.ndindex(*img.GetSize()):  # every voxel keeps its physical point and value
            point = img.TransformIndexToPhysicalPoint(index)
            np.testing.assert_allclose(point, lab.TransformIndexToPhysicalPoint(index), atol=1e-4)
            old = src_img.TransformPhysicalPointToIndex(point)
            np.testing.assert_allclose(point, src_img.TransformIndexToPhysicalPoint(old), atol=1e-3)
            assert new_arr[index[::-1]] == src_arr[old[::-1]]
            if index[2] in entry.slices:
                assert arr[index[::-1]] == truth[old[::-1]]


def _nnunet_python() -> str:
    """A Python with nnunetv2 (``SPARSESLICE_NNUNET_PYTHON``, /tmp/nnunet-venv, or this one), else skip."""
    import importlib.util
    import os
    import sys

    for python in (os.environ.get("SPARSESLICE_NNUNET_PYTHON"), "/tmp/nnunet-venv/bin/python"):
        if python and Path(python).is_file():
            return python
    if importlib.util.find_spec("nnunetv2") is not None:
        return sys.executable
    pytest.skip("nnunetv2 not installed (set SPARSESLICE_NNUNET_PYTHON to a venv's python that has it)")


@pytest.mark.parametrize("border", [False, True], ids=["sparse", "border"])
def test_nnunet_verify_dataset_integrity_accepts_the_export(border: bool, tmp_path: Path) -> None:
    """nnU-Net v2's own check: no spacing/origin/direction mismatch, label values as declared."""
    import subprocess

    python = _nnunet_python()
    root = make_skewed_dataset(tmp_path / "src", codes=(1, 2), n_cases=2, shape=(9, 14, 12))
    ds = discover_dataset(root)
    plan = make_plan(ds, budget=4, volumes=2, strategy="interval", seed=0, axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = simulate(ds, plan, tmp_path / "raw" / "Dataset999_Skewed", format="nnunet", border_slices=border)
    env = {"PATH": "/usr/bin:/bin", "PYTHONUNBUFFERED": "1", "nnUNet_raw": str(tmp_path / "raw"),
           "nnUNet_preprocessed": str(tmp_path / "pre"), "nnUNet_results": str(tmp_path / "res")}
    code = ("import sys; from nnunetv2.experiment_planning.verify_dataset_integrity import "
            "verify_dataset_integrity as v; v(sys.argv[1], 1)")
    res = subprocess.run([python, "-c", code, str(out)], capture_output=True, text=True, env=env, timeout=300)
    text = res.stdout + res.stderr
    assert res.returncode == 0, text
    assert "mismatch" not in text.lower() and "verify_dataset_integrity Done" in text, text


def test_nnunet_channel_split_keeps_the_image_header(tmp_path: Path) -> None:
    """One 4D image split into ``_0000``/``_0001`` files: each channel keeps the qform/sform header."""
    import nibabel as nib

    root = make_skewed_dataset(tmp_path / "src", codes=(1, 2), n_cases=2)
    for path in (root / "imagesTr").iterdir():
        data = np.asanyarray(nib.load(str(path)).dataobj)
        write_skewed(np.stack([data, -data], axis=-1), path, codes=(1, 2))
    reference = write_skewed(np.zeros((2, 2, 2), np.uint8), tmp_path / "ref.nii.gz", codes=(1, 2))
    ds = discover_dataset(root)
    out = simulate(ds, make_plan(ds, budget=2, volumes=2, strategy="interval", seed=0, axis=2), tmp_path / "nn",
                   format="nnunet")
    for cid in ds.case_ids:
        files = [out / "imagesTr" / f"{cid}_{c:04d}.nii.gz" for c in (0, 1)]
        for path in [*files, out / "labelsTr" / f"{cid}.nii.gz"]:
            assert_same_place(path, reference, (1, 2))
        assert np.array_equal(np.asanyarray(nib.load(str(files[1])).dataobj),
                              -np.asanyarray(nib.load(str(files[0])).dataobj))
