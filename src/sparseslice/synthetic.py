"""Seeded phantom volumes with exact labels, for unit tests and the offline demo.

Each phantom holds smooth, irregular 3D structures (an ellipsoid warped by a low-frequency
random field), split into ``n_labels`` touching parts like the hippocampus' head and tail,
on an anisotropic grid, with a multiplicative bias field and Gaussian noise. They are not
evidence for any claim about segmentation quality on real data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from sparseslice.atomic import write_json
from sparseslice.errors import UserError
from sparseslice.io import Volume, affine_from_spacing, write_volume


@dataclass(frozen=True)
class Phantom:
    image: Volume
    label: Volume


def make_phantom(shape: tuple[int, int, int] = (48, 48, 20), *, spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                 n_labels: int = 2, seed: int = 0, noise: float = 0.15) -> Phantom:
    """One phantom volume and its exact label.

    Parameters
    ----------
    shape : tuple of int
        Grid size ``(i, j, k)``.
    spacing : tuple of float
        Voxel size in mm; the default makes axis 2 the slice axis.
    n_labels : int
        Number of foreground labels the structure is split into (1 to 4).
    seed : int
        Random seed; the same seed gives the same phantom.
    noise : float
        Standard deviation of the additive noise, relative to the structure contrast.

    Examples
    --------
    >>> ph = make_phantom((24, 24, 10), seed=1)
    >>> sorted(np.unique(ph.label.array).tolist())
    [0, 1, 2]
    """
    if not 1 <= n_labels <= 4:
        raise UserError(f"n_labels must be in 1..4, got {n_labels}; phantoms hold 1 to 4 labels")
    if len(shape) != 3 or min(shape) < 8:
        raise UserError(f"shape must be 3 sizes of at least 8, got {tuple(shape)}; e.g. (48, 48, 20)")
    rng = np.random.default_rng(seed)
    sp = np.asarray(spacing, float)
    extent_mm = np.asarray(shape) * sp
    grid = np.stack(np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, sp, strict=True)],
                                indexing="ij"), axis=-1)
    centre = extent_mm * rng.uniform(0.42, 0.58, 3)
    radii = extent_mm * rng.uniform(0.2, 0.3, 3)
    # random rotation of the ellipsoid axes
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    local = (grid - centre) @ q
    dist = np.sqrt(np.sum((local / radii) ** 2, axis=-1))
    warp = ndimage.gaussian_filter(rng.normal(size=shape), sigma=np.maximum(3 / sp * 2, 1.0))
    warp /= np.abs(warp).max() + 1e-9
    inside = dist + 0.35 * warp < 1.0
    label = np.zeros(shape, np.uint8)
    if n_labels == 1:
        label[inside] = 1
    else:
        coord = local[..., 0]
        edges = np.quantile(coord[inside], np.linspace(0, 1, n_labels + 1)[1:-1]) if inside.any() else []
        part = np.digitize(coord, edges) + 1
        label[inside] = part[inside].astype(np.uint8)
    tissue = 0.3 + 0.1 * ndimage.gaussian_filter(rng.normal(size=shape), 2)
    intensity = np.where(label > 0, 0.6 + 0.15 * label, tissue)
    bias = np.exp(0.2 * np.sum(((grid - extent_mm / 2) / extent_mm) * rng.normal(size=3), axis=-1))
    image = (intensity * bias + rng.normal(scale=noise, size=shape)).astype(np.float32)
    affine = affine_from_spacing(tuple(sp))
    return Phantom(Volume(image, affine), Volume(label, affine))


def write_phantom_dataset(out: str | os.PathLike[str], *, cases: int = 8, seed: int = 0,
                          shape: tuple[int, int, int] = (48, 48, 20),
                          spacing: tuple[float, float, float] = (1.0, 1.0, 2.5),
                          n_labels: int = 2) -> Path:
    """Write ``cases`` phantoms in MSD layout (``imagesTr``, ``labelsTr``, ``dataset.json``).

    ``out`` must be new, empty or an earlier phantom dataset, which is replaced
    (:mod:`sparseslice.outputs`); any other folder that is not empty is refused.
    """
    from sparseslice.outputs import claim_output

    if cases < 1:
        raise UserError(f"cases must be at least 1, got {cases}; e.g. --cases 8")
    folder = claim_output(out, command="synth", argument="out", exclusive=True)
    folder.clear()  # dataset.json (written last) goes first
    out = Path(out)
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31 - 1, size=cases)
    training = []
    for n, case_seed in enumerate(seeds):
        cid = f"phantom_{n:03d}"
        jitter = rng.integers(-2, 3, size=3)
        case_shape = tuple(int(max(8, s + j)) for s, j in zip(shape, jitter, strict=True))
        ph = make_phantom(case_shape, spacing=spacing, n_labels=n_labels, seed=int(case_seed))
        write_volume(ph.image, folder.path(f"imagesTr/{cid}.nii.gz"))
        write_volume(ph.label, folder.path(f"labelsTr/{cid}.nii.gz"))
        training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    labels = {"0": "background", **{str(k): f"part{k}" for k in range(1, n_labels + 1)}}
    write_json(folder.path("dataset.json"), {
        "name": "sparseslice-phantoms", "description": f"synthetic phantoms, seed {seed}",
        "tensorImageSize": "3D", "modality": {"0": "MRI"}, "labels": labels,
        "numTraining": cases, "numTest": 0, "training": training, "test": [],
    })
    return out
