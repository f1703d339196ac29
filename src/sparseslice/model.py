"""Networks, intensity normalisation and checkpoints shared by ``train`` and ``predict``.

A checkpoint holds everything inference needs: the :class:`ModelSpec`, the
:class:`Normalization`, the slice axis, the label values, the patch size and the weights.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sparseslice.atomic import atomic_path
from sparseslice.errors import UserError

ARCHITECTURES = ("unet", "dynunet")
SCHEMES = ("zscore", "ct", "none")


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a MONAI U-Net.

    ``in_channels`` counts image channels plus one when ``mask_channel`` is on (the
    annotated-slice mask given as input, Specktor-Fadida et al.). At inference that channel
    is all ones: every slice is to be segmented.
    """

    dims: int
    in_channels: int
    out_channels: int
    channels: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[int, ...] = (2, 2, 2)
    num_res_units: int = 1
    arch: str = "unet"
    mask_channel: bool = False
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.dims not in (2, 3):
            raise UserError(f"model dims must be 2 or 3, got {self.dims}; use --model 2d or 3d")
        if self.arch not in ARCHITECTURES:
            raise UserError(f"arch must be one of {', '.join(ARCHITECTURES)}, got {self.arch!r}; e.g. arch: unet")
        if len(self.strides) != len(self.channels) - 1:
            raise UserError(f"strides must have len(channels) - 1 = {len(self.channels) - 1} values, "
                            f"got {tuple(self.strides)}; e.g. channels 16,32,64,128 with strides 2,2,2")
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "strides", tuple(int(s) for s in self.strides))

    @property
    def divisor(self) -> int:
        """Patch sizes must be multiples of this (product of the strides)."""
        return int(np.prod(self.strides)) if self.strides else 1


def build_model(spec: ModelSpec) -> nn.Module:
    """Instantiate the network described by ``spec`` (MONAI ``UNet`` or ``DynUNet``)."""
    if spec.arch == "unet":
        from monai.networks.nets import UNet

        return UNet(spatial_dims=spec.dims, in_channels=spec.in_channels,
                    out_channels=spec.out_channels, channels=spec.channels, strides=spec.strides,
                    num_res_units=spec.num_res_units, dropout=spec.dropout, norm="instance")
    from monai.networks.nets import DynUNet

    kernels = [3] * len(spec.channels)
    strides = [1, *spec.strides]
    return DynUNet(spatial_dims=spec.dims, in_channels=spec.in_channels,
                   out_channels=spec.out_channels, kernel_size=kernels, strides=strides,
                   upsample_kernel_size=strides[1:], filters=list(spec.channels),
                   norm_name="instance", res_block=spec.num_res_units > 0, dropout=spec.dropout)


@dataclass(frozen=True)
class Normalization:
    """Per-modality intensity normalisation.

    ``zscore`` (MRI): subtract the mean and divide by the standard deviation of the volume,
    after clipping to the ``clip`` percentiles. ``ct``: clip to ``window`` (HU) and scale
    to [0, 1]; HU values are never rescaled silently before that. ``none``: cast only.
    """

    scheme: str = "zscore"
    window: tuple[float, float] = (-1000.0, 1000.0)
    clip: tuple[float, float] = (0.5, 99.5)

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise UserError(f"normalization must be one of {', '.join(SCHEMES)}, got {self.scheme!r}; "
                            "use zscore for MRI, ct for CT")


def normalization_stats(image: np.ndarray, norm: Normalization) -> list[tuple[Any, ...]]:
    """What :func:`normalize` needs of the whole ``(C, ...)`` image, per channel: ``zscore``'s
    clip percentiles, mean and standard deviation (float64); nothing for the other schemes.

    With them a part of the image (a batch of slices) is normalised exactly as the whole would be.
    """
    if norm.scheme != "zscore":
        return [() for _ in range(image.shape[0])]
    stats = []
    for c in range(image.shape[0]):
        x = np.empty(image.shape[1:], np.float32)
        x[...] = image[c]  # the float32 values and layout normalize sees, so the same sums
        lo, hi = np.percentile(x, norm.clip)
        z = np.clip(x, lo, hi)
        stats.append((lo, hi, z.mean(), max(float(z.std()), 1e-8)))
        del x, z
    return stats


def normalize(image: np.ndarray, norm: Normalization, *, stats: list[tuple[Any, ...]] | None = None) -> np.ndarray:
    """Normalise a ``(C, ...)`` image channel by channel; returns float32.

    ``stats`` (:func:`normalization_stats` of the whole image) normalises ``image``, a part of
    it, as the whole; by default they are those of ``image``.

    Examples
    --------
    >>> x = normalize(np.arange(10, dtype=np.uint8)[None], Normalization("zscore", clip=(0, 100)))
    >>> round(float(x.mean()), 6), round(float(x.std()), 6)
    (0.0, 1.0)
    """
    if stats is None:
        stats = normalization_stats(image, norm)
    out = np.empty(image.shape, np.float32)
    for c in range(image.shape[0]):
        x = out[c]
        x[...] = image[c]
        if norm.scheme == "ct":  # in place: a CT volume costs its float32 copy, not several (same values)
            lo, hi = norm.window
            np.clip(x, lo, hi, out=x)
            x -= lo
            x /= hi - lo
        elif norm.scheme == "zscore":  # statistics in float64 (the percentiles are float64 scalars)
            lo, hi, mean, sd = stats[c]
            x[...] = (np.clip(x, lo, hi) - mean) / sd
    return out


@dataclass
class Checkpoint:
    """What a trained run leaves for inference."""

    spec: ModelSpec
    normalization: Normalization
    axis: int
    labels: tuple[int, ...]
    patch_size: tuple[int, ...]
    state_dict: dict[str, Any] = field(repr=False)
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    #: In-plane spacing (mm) the network was trained at; None: each image's own grid.
    spacing: tuple[float, float] | None = None


_PLAIN = (str, int, float, bool, type(None))


def _check_plain(value: Any, where: str) -> None:
    """Refuse anything but tensors, plain containers and plain scalars (what ``weights_only`` loads)."""
    if isinstance(value, torch.Tensor) or type(value) in _PLAIN:
        return
    if isinstance(value, dict) and type(value).__module__ in ("builtins", "collections"):
        for key, item in value.items():
            _check_plain(key, f"{where} key")
            _check_plain(item, f"{where}[{key!r}]")
        return
    if type(value) in (list, tuple):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    raise TypeError(f"{where} must be a tensor or plain data (dict, list, tuple, str, int, float, bool, None) to "
                    f"load with weights_only, got {type(value).__module__}.{type(value).__qualname__}")


def save_plain(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Write ``payload`` (tensors and plain data only, else TypeError) as a ``.pt`` file, atomically.

    Such files load with ``torch.load(..., weights_only=True)`` (:func:`load_plain`): no pickled
    objects, so reading a checkpoint never runs code from it.
    """
    _check_plain(payload, "payload")
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_plain(path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a ``.pt`` file of tensors and plain data with ``weights_only=True`` (the one reader of them).

    Refuses (:class:`UserError`) a file that cannot be read, or holds pickled objects.
    """
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"checkpoint {str(path)!r} could not be read ({exc}); retrain or copy it again") from exc
    if not isinstance(payload, dict):
        raise UserError(f"checkpoint {str(path)!r} is not a sparseslice checkpoint, got a "
                        f"{type(payload).__name__}; pass a file written by sparseslice train")
    return payload


def save_checkpoint(path: str | os.PathLike[str], ckpt: Checkpoint) -> Path:
    """Write a checkpoint atomically (plain dicts and tensors; loads with weights_only)."""
    payload = {
        "format": "sparseslice-checkpoint-1",
        "spec": asdict(ckpt.spec),
        "normalization": asdict(ckpt.normalization),
        "axis": int(ckpt.axis),
        "labels": [int(v) for v in ckpt.labels],
        "patch_size": [int(v) for v in ckpt.patch_size],
        "spacing": None if ckpt.spacing is None else [float(v) for v in ckpt.spacing],
        "state_dict": ckpt.state_dict,
        "epoch": int(ckpt.epoch),
        "metrics": {k: float(v) for k, v in ckpt.metrics.items()},
        "extra": ckpt.extra,
    }
    return save_plain(path, payload)


def read_checkpoint(path: str | os.PathLike[str], *, device: str | torch.device = "cpu") -> Checkpoint:
    """The checkpoint in ``path`` (a ``best.pt``, or a run folder holding one), weights on ``device``.

    Read with ``weights_only=True``; :func:`load_checkpoint` also rebuilds its network.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "best.pt"
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist; pass a run folder from "
                        "sparseslice train (it holds best.pt)")
    payload = load_plain(path, map_location=device)
    if payload.get("format") != "sparseslice-checkpoint-1":
        raise UserError(f"checkpoint {str(path)!r} is not a sparseslice checkpoint; "
                        "pass the best.pt written by sparseslice train")
    spec = ModelSpec(**{**payload["spec"], "channels": tuple(payload["spec"]["channels"]),
                        "strides": tuple(payload["spec"]["strides"])})
    norm = payload["normalization"]
    return Checkpoint(spec=spec,
                      normalization=Normalization(norm["scheme"], tuple(norm["window"]), tuple(norm["clip"])),
                      axis=payload["axis"], labels=tuple(payload["labels"]),
                      patch_size=tuple(payload["patch_size"]), state_dict=payload["state_dict"],
                      epoch=payload["epoch"], metrics=payload["metrics"], extra=payload["extra"],
                      spacing=None if payload.get("spacing") is None else tuple(payload["spacing"]))


def load_checkpoint(
    path: str | os.PathLike[str], *, device: str | torch.device = "cpu"
) -> tuple[nn.Module, Checkpoint]:
    """Rebuild the model of a checkpoint (:func:`read_checkpoint`) in eval mode on ``device``."""
    ckpt = read_checkpoint(path, device=device)
    model = build_model(ckpt.spec).to(device)
    model.load_state_dict(ckpt.state_dict)
    model.eval()
    return model, ckpt


def available_devices() -> list[str]:
    """The devices this machine can run on: ``cpu``, then ``cuda``, ``cuda:0``... and ``mps`` when present."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        found.append("mps")
    return found


def memory_format(dims: int, *, channels_last: bool) -> torch.memory_format | None:
    """The memory format of a ``dims``-D network's weights and inputs (None: PyTorch's default layout)."""
    if not channels_last:
        return None
    return torch.channels_last if dims == 2 else torch.channels_last_3d


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (CUDA with bf16 support; a CPU with AVX512-BF16 or
    AMX tiles), so bfloat16 autocast speeds the network up rather than emulating it."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def pick_device(device: str | None = None) -> torch.device:
    """``device`` if given (refused, listing the available ones, when this machine lacks it), else
    CUDA when present, else CPU."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    available = available_devices()
    try:
        picked = torch.device(device)
    except RuntimeError:
        picked = None
    if picked is None or (picked.type != "cpu" and str(picked) not in available):
        raise UserError(f"--device is not available on this machine, got {device!r}; use one of "
                        f"{', '.join(available)}")
    return picked
