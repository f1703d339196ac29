"""Reading and writing volumes (NIfTI, NRRD, MetaImage) without losing space or dtype.

Every volume is held the way nibabel holds NIfTI: ``array`` indexed ``[i, j, k]`` and a 4x4
``affine`` mapping voxel indices to RAS+ world millimetres. NRRD and MetaImage files go
through SimpleITK and are converted to and from that convention (SimpleITK's arrays are
``[k, j, i]`` and its world is LPS), so a label written here reopens in 3D Slicer or ITK-SNAP
on top of its image. Intensities are never rescaled and dtypes are kept.

A NIfTI header holds two transforms, the qform and the sform, each with a code; nibabel's
``affine`` is one of them, ITK (SimpleITK, 3D Slicer, ITK-SNAP, nnU-Net) may read the other.
Volumes read from NIfTI carry both (:class:`NiftiGeometry`), and every file written from
them repeats them, so a label lands on its image in every viewer.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from sparseslice.atomic import atomic_path
from sparseslice.errors import UserError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
ITK_SUFFIXES = (".seg.nrrd", ".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
DETACHED_SUFFIXES = (".nhdr", ".mhd")  # a header file naming a voxel file beside it
_LPS = np.diag([-1.0, -1.0, 1.0])
#: Bytes of one slab :func:`c_order` copies at a time (source and copy stay in the CPU's cache).
SLAB_BYTES = 2**20


@dataclass(frozen=True)
class NiftiGeometry:
    """The spatial part of a NIfTI header: both transforms, their codes and the units.

    Parameters
    ----------
    qform, sform : numpy.ndarray
        4x4 voxel-to-RAS+ matrices stored in the header (each kept even when its code is 0).
    qform_code, sform_code : int
        NIfTI xform codes (0 unknown, 1 scanner, 2 aligned, 3 Talairach, 4 MNI, 5 template).
    units : tuple of str
        Spatial and temporal units (``("mm", "sec")``).
    """

    qform: np.ndarray
    sform: np.ndarray
    qform_code: int
    sform_code: int
    units: tuple[str, str] = ("mm", "sec")

    @property
    def affine(self) -> np.ndarray | None:
        """The transform nibabel reads as ``affine``: the sform if coded, else the qform, else None."""
        if self.sform_code > 0:
            return self.sform
        if self.qform_code > 0:
            return self.qform
        return None

    def matches(self, affine: np.ndarray, *, atol: float = 1e-4) -> bool:
        """Whether ``affine`` is still the one this header gives (so the header may be written)."""
        own = self.affine
        return own is not None and bool(np.allclose(own, affine, atol=atol))

    def permuted(self, order: Sequence[int]) -> NiftiGeometry:
        """The same header for an array transposed by ``order`` (same physical space)."""
        return replace(self, qform=permute_affine(self.qform, order), sform=permute_affine(self.sform, order))


def permute_affine(affine: np.ndarray, order: Sequence[int]) -> np.ndarray:
    """Affine of ``np.transpose(array, order)`` so that every voxel keeps its world position.

    Examples
    --------
    >>> moved = permute_affine(np.diag([1.0, 2.0, 3.0, 1.0]), (1, 2, 0))
    >>> np.linalg.norm(moved[:3, :3], axis=0).tolist()  # spacing follows its axis
    [2.0, 3.0, 1.0]
    """
    out = np.array(affine, dtype=float, copy=True)
    out[:3, :3] = np.asarray(affine, dtype=float)[:3, list(order)]
    return out


def _nifti_geometry(img) -> NiftiGeometry | None:  # noqa: ANN001 - a nibabel Nifti1Image
    """Both transforms of a nibabel image's header, or None when neither is coded."""
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode == 0 and scode == 0:
        return None
    units = tuple(u or "unknown" for u in hdr.get_xyzt_units())
    return NiftiGeometry(np.asarray(hdr.get_qform(), float), np.asarray(hdr.get_sform(), float),
                         qcode, scode, (units[0], units[1]))


@dataclass(frozen=True)
class Volume:
    """A 3D image or label array with its place in the world.

    Parameters
    ----------
    array : numpy.ndarray
        Voxel values, indexed ``[i, j, k]``.
    affine : numpy.ndarray
        4x4 matrix from voxel indices to RAS+ millimetres.
    geometry : NiftiGeometry or None
        The NIfTI header's transforms and codes when read from NIfTI; written back as long
        as ``affine`` is still the header's.
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    geometry: NiftiGeometry | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size along each array axis, in millimetres."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def like(self, array: np.ndarray) -> Volume:
        """Return a volume with the same space holding ``array`` (same shape required).

        Raises
        ------
        ValueError
            If ``array``'s spatial shape differs: a bug in the caller, never a user's input.
        """
        if array.shape[:3] != self.array.shape[:3]:
            raise ValueError(
                f"array shape must match the volume, got {array.shape} for {self.array.shape}; "
                "pass an array on the same grid"
            )
        return Volume(array, self.affine.copy(), self.geometry)

    def transposed(self, order: Sequence[int]) -> Volume:
        """The volume with spatial axes reordered by ``order``, in the same physical space."""
        order = [int(a) for a in order]
        full = order + list(range(3, self.array.ndim))
        geometry = self.geometry.permuted(order) if self.geometry is not None else None
        return Volume(np.ascontiguousarray(np.transpose(self.array, full)), permute_affine(self.affine, order),
                      geometry)


def affine_from_spacing(spacing: tuple[float, ...], origin: tuple[float, ...] = (0, 0, 0)) -> np.ndarray:
    """Axis-aligned affine with the given voxel spacing and origin."""
    affine = np.eye(4)
    affine[:3, :3] = np.diag([float(s) for s in spacing])
    affine[:3, 3] = origin
    return affine


def volume_suffix(path: str | os.PathLike[str]) -> str | None:
    """The recognised volume suffix of ``path`` (``".nii.gz"``, ``".nrrd"``...), or None."""
    name = Path(path).name.lower()
    for suffix in VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_suffix(path: str | os.PathLike[str]) -> str:
    """File name without its volume suffix: ``"case_001.nii.gz"`` -> ``"case_001"``."""
    name = Path(path).name
    suffix = volume_suffix(name)
    return name[: -len(suffix)] if suffix else name


def read_volume(path: str | os.PathLike[str]) -> Volume:
    """Read a NIfTI, NRRD or MetaImage file.

    Raises
    ------
    UserError
        If the file is missing, has an unknown suffix, or cannot be decoded (the message
        names the file).

    Examples
    --------
    >>> vol = read_volume("image.nii.gz")  # doctest: +SKIP
    >>> vol.array.shape, vol.spacing  # doctest: +SKIP
    ((35, 50, 36), (1.0, 1.0, 1.0))
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"file {str(path)!r} does not exist; check the path")
    suffix = volume_suffix(path)
    if suffix is None:
        raise UserError(
            f"file {str(path)!r} has an unknown format; use one of {', '.join(VOLUME_SUFFIXES)}"
        )
    try:
        if suffix in NIFTI_SUFFIXES:
            return _read_nifti(path)
        return _read_itk(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad file for the user
        raise UserError(
            f"file {str(path)!r} could not be read ({type(exc).__name__}: {exc}); "
            "it may be truncated or corrupt, re-export or re-download it"
        ) from exc


def _read_nifti(path: Path) -> Volume:
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asanyarray(img.dataobj)
    array = np.array(array, copy=False)
    if array.ndim == 4 and array.shape[3] == 1:
        array = array[..., 0]
    if array.ndim not in (3, 4):
        raise _not_3d(path, array.shape)
    return Volume(c_order(array), np.asarray(img.affine, dtype=float), _nifti_geometry(img))


def _not_3d(path: Path, shape: tuple[int, ...]) -> UserError:
    """The error for a file that is not one 3D volume (a 2D image, a time series)."""
    fix = ("sparseslice needs 3D volumes: stack the slices into one 3D file" if len(shape) < 3
           else "pass one 3D volume per file (channels on a 4th axis at most)")
    return UserError(f"file {str(path)!r} must hold a 3D volume, got a {len(shape)}D image of shape "
                     f"{tuple(shape)}; {fix}")


def _read_itk(path: Path) -> Volume:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(path))
    if img.GetDimension() != 3:
        raise _not_3d(path, img.GetSize())
    array = sitk.GetArrayFromImage(img)  # [k, j, i] (+ components)
    if img.GetNumberOfComponentsPerPixel() > 1:
        array = np.transpose(array, (2, 1, 0, 3))
    else:
        array = np.transpose(array, (2, 1, 0))
    return Volume(c_order(array), _itk_affine(img))


def c_order(array: np.ndarray) -> np.ndarray:
    """``np.ascontiguousarray(array)``, copied a slab of axis 1 at a time when axis 0 is the fastest.

    A NIfTI file holds its voxels with the first index fastest (Fortran order), and SimpleITK's
    arrays transposed to ``[i, j, k]`` are the same; one whole copy to C order reads or writes
    with a stride of a whole slice and runs ten times slower than copying slabs of about
    :data:`SLAB_BYTES`, whose source and copy both stay in cache. Values, dtype and shape are
    those of ``np.ascontiguousarray``.

    Examples
    --------
    >>> f = np.asfortranarray(np.arange(24, dtype=np.int16).reshape(2, 3, 4))
    >>> c = c_order(f)
    >>> c.flags.c_contiguous, bool(np.array_equal(c, f))
    (True, True)
    """
    strides = [abs(s) for s in array.strides[:3]]
    if array.flags.c_contiguous or array.ndim < 3 or strides[0] > min(strides[1:]):
        return np.ascontiguousarray(array)  # slabs only help when the first index is the fastest
    out = np.empty(array.shape, array.dtype)
    per_index = array.itemsize * array.size // max(array.shape[1], 1)  # bytes of one index of axis 1
    step = max(1, SLAB_BYTES // max(per_index, 1))
    for j in range(0, array.shape[1], step):
        out[:, j:j + step] = array[:, j:j + step]
    return out


def _itk_affine(source) -> np.ndarray:  # noqa: ANN001 - a SimpleITK Image or ImageFileReader
    """The voxel-to-RAS+ affine of an ITK image or of a reader that read its header (ITK's world is LPS)."""
    direction = np.asarray(source.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(source.GetSpacing(), dtype=float)
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ direction @ np.diag(spacing)
    affine[:3, 3] = _LPS @ np.asarray(source.GetOrigin(), dtype=float)
    return affine


def write_volume(volume: Volume, path: str | os.PathLike[str]) -> Path:
    """Write ``volume`` atomically; the format follows the suffix of ``path``.

    The dtype is written as is (no scaling); a temporary file is renamed into place so an
    interrupted write never leaves a half-written file under ``path``.
    """
    path = Path(path)
    suffix = volume_suffix(path)
    if suffix is None:
        raise UserError(
            f"output {str(path)!r} has an unknown format; use one of {', '.join(VOLUME_SUFFIXES)}"
        )
    array = volume.array
    if array.dtype == np.bool_:
        array = array.astype(np.uint8)
    if suffix in DETACHED_SUFFIXES:
        _write_detached(array, volume.affine, path, compress=suffix != ".mhd")
        return path
    with atomic_path(path) as tmp:
        if suffix in NIFTI_SUFFIXES:
            _write_nifti(array, volume.affine, tmp, geometry=volume.geometry)
        else:
            _write_itk(array, volume.affine, tmp, compress=True)
    return path


def _write_detached(array: np.ndarray, affine: np.ndarray, path: Path, *, compress: bool) -> None:
    """Write a header and its voxel file (``.mhd`` + ``.raw``, ``.nhdr`` + ``.raw.gz``) under their final names.

    Both are written in a temporary folder beside ``path``, so the header names the final voxel
    file, then renamed into place voxels first and header last: ``path`` never names a missing or
    half-written voxel file, and a failed write leaves nothing behind.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent) as tmp:
        _write_itk(array, affine, Path(tmp) / path.name, compress=compress)
        for part in sorted(Path(tmp).iterdir(), key=lambda p: p.name == path.name):  # the header last
            os.replace(part, path.parent / part.name)


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path, *,
                 geometry: NiftiGeometry | None = None) -> None:
    """Write NIfTI with ``geometry``'s header when it still gives ``affine``, else ``affine`` twice (codes 1/1)."""
    import nibabel as nib

    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_slope_inter(1.0, 0.0)
    if geometry is not None and geometry.matches(affine):
        img.set_sform(geometry.sform, code=int(geometry.sform_code))
        img.set_qform(geometry.qform, code=int(geometry.qform_code))  # sets pixdim from the qform
        img.header.set_xyzt_units(*geometry.units)
    else:
        img.set_sform(affine, code=1)
        img.set_qform(affine, code=1)
        img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def _write_itk(array: np.ndarray, affine: np.ndarray, path: Path, *, compress: bool) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:
        img = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0, 3)), isVector=True)
    else:
        img = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))
    lps = _LPS @ affine[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in (lps / spacing).ravel()])
    img.SetOrigin([float(v) for v in _LPS @ affine[:3, 3]])
    sitk.WriteImage(img, str(path), useCompression=compress)


def read_label(path: str | os.PathLike[str]) -> Volume:
    """Read a label volume and check that it holds non-negative integers.

    Float files holding whole numbers are accepted and converted to integers (many tools
    save labels as float); any fractional or negative value is refused.
    """
    vol = read_volume(path)
    arr = vol.array
    if arr.ndim != 3:
        raise UserError(f"label {str(path)!r} must be 3D, got shape {arr.shape}; "
                        "pass a single-channel label map")
    if not np.issubdtype(arr.dtype, np.integer):
        if np.issubdtype(arr.dtype, np.floating) and np.all(np.isfinite(arr)) and np.all(
            np.mod(arr, 1) == 0
        ):
            arr = arr.astype(np.int64)
        else:
            bad = arr[~np.isfinite(arr) | (np.mod(arr, 1) != 0)] if arr.dtype.kind == "f" else arr
            raise UserError(
                f"label {str(path)!r} must hold integer values, got {bad.flat[0].item()!r} "
                f"(dtype {vol.array.dtype}); pass a label map, not an image or probability map"
            )
    if arr.size and arr.min() < 0:
        raise UserError(f"label {str(path)!r} must hold non-negative values, got {arr.min().item()}; "
                        "labels are 0 (background), 1, 2, ...")
    arr = narrow_label_dtype(arr)
    return Volume(arr, vol.affine, vol.geometry)


def narrow_label_dtype(array: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype holding every value of ``array`` (uint8 when possible)."""
    top = int(array.max()) if array.size else 0
    for dtype in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return array.astype(dtype, copy=False)
    return array.astype(np.int64, copy=False)


def check_same_space(image: Volume | Header, label: Volume | Header, *, name: str, atol: float = 1e-3) -> None:
    """Refuse an image/label pair whose shapes or affines differ (names the case).

    Either side may be a :class:`Header`, so a pair can be checked before any voxel is read.
    """
    if image.shape[:3] != label.shape[:3]:
        raise UserError(
            f"case {name!r}: label shape must match the image, got {label.shape[:3]} vs "
            f"{image.shape[:3]}; resample the label onto the image grid"
        )
    if not np.allclose(image.affine, label.affine, atol=atol):
        raise UserError(
            f"case {name!r}: label affine must match the image, got spacing {label.spacing} "
            f"origin {tuple(np.round(label.affine[:3, 3], 3).tolist())} vs spacing {image.spacing} "
            f"origin {tuple(np.round(image.affine[:3, 3], 3).tolist())}; resample the label onto the image"
        )


def default_slice_axis(spacing: tuple[float, ...], shape: tuple[int, ...]) -> int:
    """The axis slices are annotated along: largest spacing, ties broken by fewest voxels.

    Spacings within 0.1 % of each other count as equal; a remaining tie goes to the lowest
    axis index.

    Examples
    --------
    >>> default_slice_axis((0.8, 0.8, 5.0), (512, 512, 40))
    2
    >>> default_slice_axis((1.0, 1.0, 1.0), (35, 50, 36))
    0
    """
    if len(shape) < 3:
        raise UserError(f"shape must have 3 axes, got {tuple(shape)} (a 2D image); sparseslice needs 3D volumes")
    if len(spacing) != 3:
        raise UserError(f"spacing must have 3 values, got {tuple(spacing)}; pass the image's spacing")
    top = max(spacing)
    candidates = [a for a in range(3) if spacing[a] >= top * (1 - 1e-3)]
    return min(candidates, key=lambda a: (shape[a], a))


def check_spacing(spacing: Sequence[float], ndim: int = 3) -> tuple[float, ...]:
    """Validate a voxel spacing: ``ndim`` positive finite millimetre values.

    Examples
    --------
    >>> check_spacing((1, 1, 2.5))
    (1.0, 1.0, 2.5)
    """
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        values = ()
    if len(values) != ndim or not all(np.isfinite(v) and v > 0 for v in values):
        shown = tuple(spacing) if isinstance(spacing, list | tuple | np.ndarray) else spacing
        raise UserError(f"spacing must have {ndim} positive values in mm, got {shown!r}; "
                        "pass the image's spacing (Volume.spacing)")
    return values


def check_axis(axis: int, ndim: int = 3) -> int:
    """Validate a slice-axis argument and return it as a non-negative int."""
    if not isinstance(axis, int | np.integer) or not -ndim <= int(axis) < ndim:
        raise UserError(f"axis must be 0, 1 or 2, got {axis!r}; pass the slice axis of the volume")
    return int(axis) % ndim


@dataclass(frozen=True)
class Header:
    """Shape, affine and dtype of a volume file, read without decoding its voxels."""

    shape: tuple[int, ...]
    affine: np.ndarray
    dtype: np.dtype
    geometry: NiftiGeometry | None = None

    @property
    def spacing(self) -> tuple[float, ...]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_header(path: str | os.PathLike[str]) -> Header:
    """Read only the header of a volume file (fast: no voxel data is read or decoded).

    Shape, affine and dtype are those :func:`read_volume` gives for the same file; a file
    whose voxel data is truncated still gives its header.

    Raises
    ------
    UserError
        If the file is missing, has an unknown suffix, is not 3D or its header cannot be read.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"file {str(path)!r} does not exist; check the path")
    suffix = volume_suffix(path)
    if suffix is None:
        raise UserError(f"file {str(path)!r} has an unknown format; use one of "
                        f"{', '.join(VOLUME_SUFFIXES)}")
    try:
        return _nifti_header(path) if suffix in NIFTI_SUFFIXES else _itk_header(path)
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"file {str(path)!r} could not be read ({type(exc).__name__}: {exc}); "
                        "it may be truncated or corrupt, re-export it") from exc


def _nifti_header(path: Path) -> Header:
    import nibabel as nib

    img = nib.load(str(path))  # lazy: voxels stay on disk
    shape = tuple(int(s) for s in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) < 3:
        raise _not_3d(path, shape)
    return Header(shape, np.asarray(img.affine, float), np.dtype(img.get_data_dtype()), _nifti_geometry(img))


def _itk_header(path: Path) -> Header:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()  # the header only; Execute() would read the voxels
    size = tuple(int(s) for s in reader.GetSize())
    if reader.GetDimension() != 3:
        raise _not_3d(path, size)
    components = int(reader.GetNumberOfComponents())
    # the dtype GetArrayFromImage gives this pixel type, from a one-voxel image of it
    dtype = sitk.GetArrayViewFromImage(sitk.Image([1, 1, 1], reader.GetPixelID(), components)).dtype
    shape = size + (components,) if components > 1 else size
    return Header(shape, _itk_affine(reader), np.dtype(dtype))
