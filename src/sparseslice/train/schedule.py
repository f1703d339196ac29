"""Optimiser and learning-rate schedules: one-step and two-step (Specktor-Fadida et al.).

Step 1: Adam with ReduceLROnPlateau on the validation Dice (mode ``max``). Step 2 (two-step
only): restart from the best checkpoint with a fresh Adam and cosine learning-rate restarts
every ``restart_every`` epochs (``CosineAnnealingWarmRestarts``), from ``lr`` down to
``lr / 100``.
"""

from __future__ import annotations

import torch

from sparseslice.train.config import TrainConfig


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the config's learning rate and weight decay."""
    return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, *, phase: int):
    """ReduceLROnPlateau for step 1, warm restarts every ``restart_every`` epochs for step 2."""
    if phase == 1:
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=config.plateau_factor, patience=config.plateau_patience)
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        optimizer, T_0=config.restart_every, eta_min=config.lr / 100)


def step_scheduler(scheduler, val_dice: float) -> None:
    """Advance a scheduler by one epoch."""
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(val_dice)
    else:
        scheduler.step()
