"""Shared checks of training batches: draw a sampler's epoch, and compare two lists of batches bit for bit."""

from __future__ import annotations

import numpy as np
import torch


def draw(sampler, seed: int, *, batches: int, batch_size: int = 3) -> list:
    """``batches`` batches of ``batch_size`` from ``sampler``'s epoch with a generator seeded ``seed``."""
    return list(sampler.epoch(batches * batch_size, batch_size, np.random.default_rng(seed)))


def assert_same_batches(a: list, b: list) -> None:
    """Same number of batches, each tensor of the same dtype and values."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for t, u in zip(x, y, strict=True):
            assert t.dtype == u.dtype and torch.equal(t, u)
