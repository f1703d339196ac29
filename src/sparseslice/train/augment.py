"""Batch-level augmentation: one ``affine_grid`` + ``grid_sample`` per batch.

Each sample gets its own random flips, in-plane rotation and in-plane scaling, packed into
one affine matrix per sample, so the whole batch is resampled by a single call (bilinear for
images, nearest for labels, weights and the annotated mask); when some samples are only
mirrored (half of them with the defaults) in a 3D batch, those are flipped by index instead and
the others resampled together (3D left atrium: 80 -> 40 ms a batch of 2). Voxels sampled from outside the
patch become unknown (weight 0). Intensity: per-sample scale, shift and Gaussian noise.

Why not MONAI's per-sample ``RandAffined``: applied sample by sample on CPU it costs far more
than one batched ``grid_sample`` (see ``bench/train.py``), and the throughput goal is
end-to-end training at >= 90 % of the bare model step. The transforms are the same family
(nnU-Net/MONAI defaults: mirror, rotation, scaling, intensity).

The random numbers are always drawn on the CPU from the caller's generator (the same
sequence whatever the device); the resampling runs on the batch's device, so a trainer on a
GPU moves the batch there first and the CPU never resamples it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sparseslice.train.data import Batch


@dataclass(frozen=True)
class AugmentSettings:
    """Probabilities and ranges of the random transforms."""

    p_flip: float = 0.5
    p_rotate: float = 0.3
    max_degrees: float = 15.0
    p_scale: float = 0.3
    scale: tuple[float, float] = (0.85, 1.15)
    p_intensity: float = 0.5
    intensity_scale: tuple[float, float] = (0.9, 1.1)
    intensity_shift: float = 0.1
    p_noise: float = 0.15
    noise_std: float = 0.1


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def random_affine(n: int, shape: tuple[int, ...], *, axis: int | None, settings: AugmentSettings,
                  gen: torch.Generator) -> torch.Tensor:
    """``(n, d, d+1)`` ``affine_grid`` matrices: flips, rotation and scaling in the plane.

    ``shape`` is the spatial shape (``d`` = 2 or 3); ``axis`` the slice axis of a 3D patch
    (rotation and scaling act in the plane of the two other axes), None for 2D.
    """
    d = len(shape)
    plane = [a for a in range(d) if a != axis] if d == 3 else [0, 1]
    mats = torch.eye(d).repeat(n, 1, 1)
    angle = torch.deg2rad(_uniform(n, -settings.max_degrees, settings.max_degrees, gen))
    angle = torch.where(torch.rand(n, generator=gen) < settings.p_rotate, angle, torch.zeros(n))
    scale = _uniform(n, *settings.scale, gen)
    scale = torch.where(torch.rand(n, generator=gen) < settings.p_scale, scale, torch.ones(n))
    a, b = plane
    cos, sin = torch.cos(angle), torch.sin(angle)
    mats[:, a, a], mats[:, a, b], mats[:, b, a], mats[:, b, b] = cos * scale, -sin * scale, sin * scale, cos * scale
    flips = torch.where(torch.rand(n, d, generator=gen) < settings.p_flip, -1.0, 1.0)
    mats = mats * flips[:, None, :]
    # physical (voxel) units -> normalised coordinates; grid_sample's order is reversed (x = last axis)
    half = torch.tensor(shape, dtype=torch.float32) / 2
    mats = mats * half[None, None, :] / half[None, :, None]
    rev = list(range(d))[::-1]
    theta = torch.zeros(n, d, d + 1)
    theta[:, :, :d] = mats[:, rev][:, :, rev]
    return theta


def resample(image: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` (bilinear, border values) and ``maps`` (nearest; 0 from outside) resampled by the
    ``affine_grid`` matrices ``theta``, one ``grid_sample`` call each."""
    grid = F.affine_grid(theta, [image.shape[0], 1, *image.shape[2:]], align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    maps = F.grid_sample(maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return image, maps


def augment_batch(batch: Batch, *, axis: int | None, gen: torch.Generator,
                  settings: AugmentSettings | None = None) -> Batch:
    """Randomly transform a batch (spatially with one ``grid_sample`` call per kind, then intensity).

    Unknown voxels stay unknown; voxels coming from outside the patch become unknown.
    """
    s = settings or AugmentSettings()
    image, label, weight, annotated = batch
    n, spatial = image.shape[0], tuple(image.shape[2:])
    dev = image.device
    theta = random_affine(n, spatial, axis=axis, settings=s, gen=gen)
    maps = torch.stack([label.float(), weight, annotated], 1)
    warped = (theta[:, :, :-1].abs() != torch.eye(len(spatial))).any(dim=(1, 2))  # rotated or scaled
    if len(spatial) == 2 or bool(warped.all()):  # 2D: one batched call beats splitting a batch of 16
        image, maps = resample(image, maps, theta.to(dev))
    else:  # a 3D sample only mirrored is flipped by index: what grid_sample computes, up to float rounding
        image, maps = image.clone(), maps.clone()
        if bool(warped.any()):
            idx = torch.nonzero(warped).flatten().to(dev)
            image[idx], maps[idx] = resample(image[idx], maps[idx], theta[warped].to(dev))
        d = len(spatial)
        for i in torch.nonzero(~warped).flatten().tolist():
            dims = [1 + a for a in range(d) if theta[i, d - 1 - a, d - 1 - a] < 0]  # theta's axes are reversed
            if dims:
                image[i], maps[i] = torch.flip(image[i], dims), torch.flip(maps[i], dims)
    label, weight, annotated = maps[:, 0].round().long(), maps[:, 1], maps[:, 2]
    view = (n, *([1] * (image.ndim - 1)))
    on = torch.rand(n, generator=gen) < s.p_intensity
    mult = torch.where(on, _uniform(n, *s.intensity_scale, gen), torch.ones(n)).view(view)
    shift = torch.where(on, _uniform(n, -s.intensity_shift, s.intensity_shift, gen), torch.zeros(n)).view(view)
    image = image * mult.to(dev) + shift.to(dev)
    noisy = (torch.rand(n, generator=gen) < s.p_noise).float().view(view)
    if bool(noisy.any()):
        image = image + (noisy * s.noise_std * torch.randn(image.shape, generator=gen)).to(dev)
    return Batch(image, label, weight, annotated)

