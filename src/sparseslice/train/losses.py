"""Losses that only see known voxels: selective batch Dice and masked cross-entropy.

Both take a voxel ``weight`` map: 0 at unknown voxels, 1 at annotated ones, and optionally a
value in (0, 1) for interpolated pseudo-labels. Unknown voxels contribute nothing, and the
gradient with respect to their logits is exactly zero.

The mask multiplies the softmax probabilities, after the activation (Specktor-Fadida et al.,
eq. 2); masking the logits before the softmax would turn unknown voxels into uniform
probabilities that enter the sums. MONAI 1.6's ``MaskedDiceLoss(softmax=True)`` applies the
softmax first and agrees with :func:`selective_dice_loss` for 0/1 masks (tested); it is not
used because it multiplies both prediction and target by the mask, so a fractional weight
(interpolated slices) would enter the intersection squared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def selective_dice_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *,
                        smooth: float = 1e-5, include_background: bool = False) -> torch.Tensor:
    """Selective batch Dice loss: one Dice per class over all known voxels of the batch.

    For each foreground class ``c``::

        D_c = (2 sum_v w_v p_vc y_vc + s) / (sum_v w_v p_vc + sum_v w_v y_vc + s)

    where the sums run over every voxel ``v`` of every sample in the batch, ``p`` is the
    softmax probability, ``y`` the one-hot target and ``w`` the weight. The loss is
    ``1 - mean_c D_c``.

    Parameters
    ----------
    logits : torch.Tensor
        ``(B, K, ...)`` raw network outputs.
    target : torch.Tensor
        ``(B, ...)`` integer class indices in ``[0, K)``; any value at unknown voxels.
    weight : torch.Tensor
        ``(B, ...)`` voxel weights, 0 at unknown voxels.
    smooth : float
        Added to numerator and denominator; a class absent from the batch scores 1.
    include_background : bool
        Also average the background class.

    Examples
    --------
    >>> logits = torch.zeros(1, 2, 2, 2); target = torch.tensor([[[0, 1], [1, 1]]])
    >>> weight = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    >>> round(float(selective_dice_loss(logits, target, weight)), 4)  # 1 - 2*0.5/(1+1)
    0.5
    """
    k = logits.shape[1]
    prob = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    onehot = F.one_hot(target.long().clamp(0, k - 1), k).movedim(-1, 1).to(prob.dtype)
    w = weight.to(prob.dtype).unsqueeze(1)
    prob_w = prob * w  # mask AFTER the activation
    dims = [0, *range(2, logits.ndim)]
    inter = (prob_w * onehot).sum(dims)
    denom = prob_w.sum(dims) + (onehot * w).sum(dims)
    dice = (2 * inter + smooth) / (denom + smooth)
    start = 0 if include_background or k == 1 else 1
    return 1 - dice[start:].mean()


def masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over known voxels: ``sum(w * ce) / sum(w)``.

    Returns 0 (with a zero gradient) when no voxel is known.
    """
    k = logits.shape[1]
    ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), target.long().clamp(0, k - 1),
                         reduction="none")
    w = weight.to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp_min(1e-8)


def selective_loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, *,
                   dice_weight: float = 1.0, ce_weight: float = 1.0) -> torch.Tensor:
    """``dice_weight * selective_dice_loss + ce_weight * masked_cross_entropy``."""
    loss = logits.new_zeros((), dtype=torch.float32)
    if dice_weight:
        loss = loss + dice_weight * selective_dice_loss(logits, target, weight)
    if ce_weight:
        loss = loss + ce_weight * masked_cross_entropy(logits, target, weight)
    return loss


def masked_dice_scores(pred: torch.Tensor, target: torch.Tensor, known: torch.Tensor, *,
                       n_classes: int) -> torch.Tensor:
    """Per-foreground-class Dice of a hard prediction on known voxels; NaN where both are empty.

    ``pred``, ``target``, ``known``: tensors of one shape. Returns ``(n_classes - 1,)``.
    """
    out = torch.full((n_classes - 1,), float("nan"))
    known = known.bool()
    p, t = pred[known], target[known]
    for c in range(1, n_classes):
        pc, tc = p == c, t == c
        denom = int(pc.sum()) + int(tc.sum())
        if denom:
            out[c - 1] = 2 * int((pc & tc).sum()) / denom
    return out
