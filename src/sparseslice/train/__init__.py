"""Training on sparse labels: 2D slices or 3D blocks, selective losses, one- or two-step schedules.

Unknown voxels are never background: samplers draw only known slices (or blocks holding
one), and the losses weight voxels by what is known.
"""

from sparseslice.train.config import TrainConfig, load_config
from sparseslice.train.losses import masked_cross_entropy, selective_dice_loss, selective_loss
from sparseslice.train.trainer import TrainResult, train, validate

__all__ = ["TrainConfig", "TrainResult", "load_config", "masked_cross_entropy", "selective_dice_loss",
           "selective_loss", "train", "validate"]
