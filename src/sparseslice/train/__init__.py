"""Training on sparse labels: 2D slices or 3D blocks, selective losses, one- or two-step schedules.

Unknown voxels are never background: samplers draw only known slices (or blocks holding
one), and the losses weight voxels by what is known.

The configuration imports no torch (the CLI reads its fields for ``train``'s options); the
losses and the trainer are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from sparseslice.train.config import TrainConfig, load_config

#: Names exported from the torch-importing modules, loaded when first asked for.
_LAZY = {"masked_cross_entropy": "losses", "selective_dice_loss": "losses", "selective_loss": "losses",
         "TrainResult": "trainer", "train": "trainer", "validate": "trainer"}

__all__ = ["TrainConfig", "TrainResult", "load_config", "masked_cross_entropy", "selective_dice_loss",
           "selective_loss", "train", "validate"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"sparseslice.train.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
