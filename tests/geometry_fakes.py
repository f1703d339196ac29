"""NIfTI files whose qform and sform differ, as scanners, converters and FSL/ANTs pipelines write them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: (qform_code, sform_code) pairs the geometry tests cover: both coded, qform only, sform preferred.
CODE_PAIRS = ((2, 1), (1, 0), (1, 2))


def _rotation(degrees: float, axis: int) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def skewed_transforms(spacing: tuple[float, float, float] = (1.0, 1.2, 2.0)) -> tuple[np.ndarray, np.ndarray]:
    """A qform and an sform that disagree by about 7 degrees and several millimetres."""
    qform = np.eye(4)
    qform[:3, :3] = _rotation(12.0, 2) @ _rotation(-5.0, 0) @ np.diag(spacing)
    qform[:3, 3] = (-20.0, 31.5, -7.25)
    sform = np.eye(4)
    sform[:3, :3] = _rotation(5.0, 2) @ np.diag(spacing)
    sform[:3, 3] = (-17.0, 28.0, -4.0)
    return qform, sform


def write_skewed(array: np.ndarray, path: Path, *, codes: tuple[int, int] = (2, 1),
                 spacing: tuple[float, float, float] = (1.0, 1.2, 2.0)) -> Path:
    """Write ``array`` as NIfTI with a qform != sform header and the given (qform, sform) codes."""
    import nibabel as nib

    qform, sform = skewed_transforms(spacing)
    img = nib.Nifti1Image(array, None)
    img.set_sform(sform, code=codes[1])
    img.set_qform(qform, code=codes[0])
    img.header.set_xyzt_units("mm", "sec")
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def skew_header(path: Path, *, codes: tuple[int, int] = (2, 1)) -> Path:
    """Rewrite ``path`` in place so its qform differs from its sform (voxels unchanged)."""
    import nibabel as nib

    img = nib.load(str(path))
    spacing = tuple(float(z) for z in img.header.get_zooms()[:3])
    return write_skewed(np.asanyarray(img.dataobj), path, codes=codes, spacing=spacing)


def sitk_geometry(path: Path) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Origin, spacing and direction as SimpleITK (and so ITK-SNAP, Slicer, nnU-Net) reads them."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    return img.GetOrigin(), img.GetSpacing(), img.GetDirection()


def nifti_codes(path: Path) -> tuple[int, int]:
    """(qform_code, sform_code) of a NIfTI file."""
    import nibabel as nib

    hdr = nib.load(str(path)).header
    return int(hdr["qform_code"]), int(hdr["sform_code"])


def make_skewed_dataset(root: Path, *, codes: tuple[int, int] = (2, 1), n_cases: int = 3,
                        shape: tuple[int, int, int] = (12, 14, 10)) -> Path:
    """An MSD-like dataset (imagesTr/labelsTr/dataset.json) of small blobs with skewed headers.

    Labels carry the image's header, as the converters that write both do.
    """
    import json

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    for c in range(n_cases):
        centre = np.array(shape) / 2 + rng.uniform(-1, 1, 3)
        dist = np.linalg.norm((grid - centre) / (np.array(shape) / 3.2), axis=-1)
        label = (dist < 1).astype(np.uint8) + (dist < 0.5).astype(np.uint8)
        image = (100 * label + rng.normal(0, 5, shape)).astype(np.float32)
        write_skewed(image, root / "imagesTr" / f"case_{c:03d}.nii.gz", codes=codes)
        write_skewed(label, root / "labelsTr" / f"case_{c:03d}.nii.gz", codes=codes)
    (root / "dataset.json").write_text(json.dumps({
        "name": "skewed", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "outer", "2": "inner"},
        "numTraining": n_cases,
        "training": [{"image": f"./imagesTr/case_{c:03d}.nii.gz", "label": f"./labelsTr/case_{c:03d}.nii.gz"}
                     for c in range(n_cases)]}))
    return root
