"""Batch-level augmentation: random flips, in-plane rotation and scaling, intensity.

Each sample gets its own random flips, in-plane rotation and in-plane scaling, packed into
one affine matrix per sample. A 2D batch is resampled by a single ``grid_sample`` call
(bilinear for images, nearest for labels, weights and the annotated mask). In a 3D batch a
sample only mirrored (half of them with the defaults) is flipped by index, and a rotated or
scaled one is resampled slice by slice (:func:`resample_in_plane`: the transforms never cross
the slice axis), which gives the 3D call's voxels at a fraction of its cost (3D left atrium,
a batch of 2 x 128x112x48 on 2 threads: 38 -> 17 ms; 80 ms before mirror-only samples were
flipped by index). Voxels sampled from outside the patch become unknown (weight 0).
Intensity: per-sample scale, shift and Gaussian noise.

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


def resample_in_plane(image: torch.Tensor, maps: torch.Tensor, theta: torch.Tensor, *, axis: int,
                      out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`resample` of 3D patches whose ``theta`` moves nothing across the slice ``axis``.

    Each channel's slices are resampled together by the in-plane 2x2 block of ``theta``: one 2D
    ``grid_sample`` with the slices as channels (the grid's weights computed once for all of
    them, 4 neighbours instead of trilinear's 8; with the slice axis last in memory the slices
    are a view), the slice order reversed first where ``theta`` mirrors the slice axis. This is
    what the 3D call computes, up to float rounding (its slice coordinates fall on voxel
    centres): 3D left atrium, a batch of 2 x 128x112x48 with 3 maps, 80 -> 16 ms on one thread.
    ``out`` (image, maps), when given, receives the result.
    """
    n, d = image.shape[0], 3
    z = d - 1 - axis  # theta's axes are reversed (x = last spatial axis)
    keep = [i for i in range(d) if i != z]
    theta2 = torch.zeros(n, 2, 3, dtype=theta.dtype, device=theta.device)
    theta2[:, :, :2] = theta[:, keep][:, :, keep]
    plane = [s for a, s in enumerate(image.shape[2:]) if a != axis]
    image_out, maps_out = out if out is not None else (torch.empty_like(image), torch.empty_like(maps))
    for i in range(n):
        grid = F.affine_grid(theta2[i:i + 1], [1, 1, *plane], align_corners=False)
        mirrored = bool(theta[i, z, z] < 0)
        for c in range(image.shape[1]):
            slices = image[i:i + 1, c].movedim(1 + axis, 1)  # (1, depth, *plane)
            if mirrored:
                slices = slices.flip(1)
            warped = F.grid_sample(slices, grid, mode="bilinear", padding_mode="border", align_corners=False)
            image_out[i:i + 1, c].copy_(warped.movedim(1, 1 + axis))
        rows, outside = _nearest_rows(grid[0], plane)
        for c in range(maps.shape[1]):  # nearest: whole rows of slices gathered, no transpose
            src = maps[i, c].movedim(axis, -1)
            if mirrored:
                src = src.flip(-1)
            gathered = src.reshape(rows.numel(), -1).index_select(0, rows).index_fill_(0, outside, 0)
            maps_out[i, c].copy_(gathered.view(*plane, -1).movedim(-1, axis))
    return image_out, maps_out


def _nearest_rows(grid: torch.Tensor, plane: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat in-plane source index of each output pixel of an ``affine_grid`` (``grid_sample``'s
    nearest rule, ``align_corners=False``), and the pixels that fall outside (zero padding)."""
    h, w = plane
    ix = torch.round(((grid[..., 0] + 1) * w - 1) / 2)  # round half to even, like grid_sample's nearbyint
    iy = torch.round(((grid[..., 1] + 1) * h - 1) / 2)
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    rows = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).long().flatten()
    return rows, torch.nonzero(~inside.flatten()).flatten()


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
    if len(spatial) == 2:  # one batched call beats splitting a batch of 16
        image, maps = resample(image, maps, theta.to(dev))
    else:  # 3D: rotated/scaled in-plane; a sample only mirrored is flipped by index
        d = len(spatial)
        out = torch.empty_like(image), torch.empty_like(maps)
        for i in range(n):
            one = slice(i, i + 1)
            if warped[i]:
                resample_in_plane(image[one], maps[one], theta[one].to(dev), axis=axis, out=(out[0][one], out[1][one]))
                continue
            dims = [1 + a for a in range(d) if theta[i, d - 1 - a, d - 1 - a] < 0]  # theta's axes are reversed
            for src, dst in zip((image, maps), out, strict=True):
                dst[i] = torch.flip(src[i], dims) if dims else src[i]
        image, maps = out
    label, weight, annotated = maps[:, 0].round().long(), maps[:, 1], maps[:, 2]
    view = (n, *([1] * (image.ndim - 1)))
    on = torch.rand(n, generator=gen) < s.p_intensity
    mult = torch.where(on, _uniform(n, *s.intensity_scale, gen), torch.ones(n)).view(view)
    shift = torch.where(on, _uniform(n, -s.intensity_shift, s.intensity_shift, gen), torch.zeros(n)).view(view)
    image = image * mult.to(dev) + shift.to(dev)
    noisy = torch.nonzero(torch.rand(n, generator=gen) < s.p_noise).flatten().tolist()
    for i in noisy:  # noise drawn only for the samples that get it (3D: a patch is 0.7 M voxels)
        image[i] += (s.noise_std * torch.randn(image.shape[1:], generator=gen)).to(dev)
    return Batch(image, label, weight, annotated)

