"""Selective losses: hand computations, exact zero gradients at unknown voxels, MONAI cross-checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sparseslice.train.losses import (
    masked_cross_entropy,
    masked_dice_scores,
    selective_dice_loss,
    selective_loss,
)

torch.set_num_threads(1)


def _example(seed: int = 0, dims: int = 2):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 5, 6) if dims == 2 else (2, 4, 5, 3)
    logits = torch.randn((shape[0], 3, *shape[1:]), generator=gen, dtype=torch.float64)
    target = torch.randint(0, 3, shape, generator=gen)
    weight = torch.ones(shape, dtype=torch.float64)
    weight[0, 1:3] = 0  # unknown rows (slices) in sample 0
    weight[1, 0] = 0.5  # an interpolated slice in sample 1
    weight[1, -1] = 0
    return logits, target, weight


def _hand_dice(logits, target, weight, smooth=1e-5):
    """Specktor-Fadida eq. 2, voxel by voxel with plain Python sums."""
    lg, tg, w = logits.numpy(), target.numpy(), weight.numpy()
    k = lg.shape[1]
    dices = []
    for c in range(1, k):
        inter = p_sum = y_sum = 0.0
        for idx in np.ndindex(tg.shape):
            b, rest = idx[0], idx[1:]
            z = lg[(b, slice(None), *rest)]
            p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
            y = float(tg[idx] == c)
            inter += w[idx] * p[c] * y
            p_sum += w[idx] * p[c]
            y_sum += w[idx] * y
        dices.append((2 * inter + smooth) / (p_sum + y_sum + smooth))
    return 1 - float(np.mean(dices))


def _hand_ce(logits, target, weight):
    lg, tg, w = logits.numpy(), target.numpy(), weight.numpy()
    num = den = 0.0
    for idx in np.ndindex(tg.shape):
        z = lg[(idx[0], slice(None), *idx[1:])]
        logp = z - z.max() - np.log(np.exp(z - z.max()).sum())
        num += w[idx] * -logp[tg[idx]]
        den += w[idx]
    return num / den


@pytest.mark.parametrize("dims", [2, 3])
def test_selective_dice_equals_hand_computation(dims):
    logits, target, weight = _example(dims=dims)
    got = float(selective_dice_loss(logits, target, weight))
    assert got == pytest.approx(_hand_dice(logits, target, weight), abs=1e-10)


def test_masked_cross_entropy_equals_hand_computation():
    logits, target, weight = _example(1)
    assert float(masked_cross_entropy(logits, target, weight)) == pytest.approx(
        _hand_ce(logits, target, weight), abs=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
def test_gradient_is_exactly_zero_at_unknown_voxels(dims):
    logits, target, weight = _example(2, dims=dims)
    logits.requires_grad_(True)
    selective_loss(logits, target, weight).backward()
    grad = logits.grad.abs().sum(1)
    unknown = weight == 0
    assert torch.all(grad[unknown] == 0)  # exactly, not approximately
    assert torch.all(grad[~unknown] > 0)


def test_unknown_voxels_do_not_change_the_loss():
    logits, target, weight = _example(3)
    base = selective_loss(logits, target, weight)
    unknown = (weight == 0).unsqueeze(1).expand_as(logits)
    logits2 = torch.where(unknown, torch.randn_like(logits) * 50, logits)
    target2 = torch.where(weight == 0, torch.randint_like(target, 0, 3), target)
    assert torch.equal(selective_loss(logits2, target2, weight), base)


def test_dice_is_one_dice_over_the_batch_not_a_mean_of_samples():
    # class 1 present only in sample 0: a per-sample Dice would average in an empty sample
    logits = torch.full((2, 2, 1, 2), -5.0)
    logits[0, 1] = 5.0  # sample 0 predicts class 1 everywhere
    target = torch.tensor([[[1, 0]], [[0, 0]]])
    weight = torch.ones(2, 1, 2)
    p = torch.softmax(logits, 1)[:, 1]
    expected = 1 - (2 * p[0, 0, 0]) / (p.sum() + 1)
    assert float(selective_dice_loss(logits, target, weight, smooth=0)) == pytest.approx(float(expected))


def test_matches_monai_dice_loss_when_everything_is_known():
    from monai.losses import DiceLoss

    logits, target, _ = _example(4)
    weight = torch.ones(target.shape, dtype=torch.float64)
    monai = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                     smooth_nr=1e-5, smooth_dr=1e-5)(logits, target.unsqueeze(1))
    assert float(selective_dice_loss(logits, target, weight)) == pytest.approx(float(monai), abs=1e-10)


def test_matches_monai_masked_dice_loss_for_binary_masks():
    # MONAI >= 1.x applies the softmax before masking when softmax=True: same loss for 0/1 masks
    from monai.losses import MaskedDiceLoss

    logits, target, weight = _example(5)
    binary = (weight > 0).double()
    monai = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True,
                           smooth_nr=1e-5, smooth_dr=1e-5)(logits, target.unsqueeze(1), mask=binary.unsqueeze(1))
    assert float(selective_dice_loss(logits, target, binary)) == pytest.approx(float(monai), abs=1e-10)


def test_fractional_weights_count_each_voxel_once():
    # an interpolated voxel with weight w counts w times in every sum (MONAI's mask would give w**2
    # in the intersection); here: two identical voxels of weight 0.5 equal one voxel of weight 1
    logits = torch.tensor([[[2.0, 2.0]], [[-1.0, -1.0]]]).permute(1, 0, 2)[None, :, 0]  # (1, 2, 2)
    target = torch.tensor([[1, 1]])
    half = selective_dice_loss(logits, target, torch.tensor([[0.5, 0.5]]), smooth=0)
    one = selective_dice_loss(logits[..., :1], target[..., :1], torch.tensor([[1.0]]), smooth=0)
    assert float(half) == pytest.approx(float(one))


def test_masked_dice_scores_known_answer_and_monai():
    from monai.metrics import compute_dice

    pred = torch.tensor([[0, 1, 1, 2], [2, 2, 0, 0]])
    ref = torch.tensor([[0, 1, 2, 2], [2, 0, 0, 1]])
    known = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    d = masked_dice_scores(pred, ref, known, n_classes=3)
    assert d.tolist() == pytest.approx([2 / 3, 2 / 3])
    onehot = lambda t: torch.nn.functional.one_hot(t[known][None], 3).movedim(-1, 1)  # noqa: E731
    assert compute_dice(onehot(pred), onehot(ref), include_background=False)[0].tolist() == pytest.approx(d.tolist())
    empty = masked_dice_scores(torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long),
                               torch.ones(4, dtype=torch.bool), n_classes=2)
    assert torch.isnan(empty).all()
