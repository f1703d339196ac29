"""Sliding-window inference: the one way a network is run over whole slices or volumes.

Training validation (:func:`sparseslice.train.validate`) and prediction
(:mod:`sparseslice.predict`) both run MONAI's ``sliding_window_inference`` through this
module, with the training patch as window. They differ only in the :class:`Window` they
pass: prediction blends overlapping windows with a Gaussian (overlap 0.5), validation takes
the cheaper constant blend at overlap 0.25, since it runs after every epoch.

A 2D model sees the slices along the slice axis, a 3D model the whole volume; both are
given as a stack of model inputs ``(N, C, *spatial)`` (:func:`model_inputs`), run
``Window.images_per_pass`` images at a time.

A window as large as the image needs no sliding: :func:`window_logits` is that single window
(the same padding, no blending buffers), which prediction uses for whole slices;
:func:`largest_window` sizes a 3D window to a memory budget.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

BLENDS = ("gaussian", "constant")


@dataclass(frozen=True)
class Window:
    """How windows are laid over the images and blended.

    Parameters
    ----------
    overlap : float
        Overlap of neighbouring windows, in [0, 1).
    blend : str
        ``"gaussian"`` (weights fall off towards a window's border) or ``"constant"``.
    images_per_pass : int
        Images (2D: slices; 3D: volumes) sent to the network together.
    windows_per_pass : int, optional
        Windows per forward pass (MONAI's ``sw_batch_size``); default one per image of the pass.
    """

    overlap: float = 0.5
    blend: str = "gaussian"
    images_per_pass: int = 16
    windows_per_pass: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < 1:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        if self.blend not in BLENDS:
            raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {self.blend!r}")
        if self.images_per_pass < 1 or (self.windows_per_pass is not None and self.windows_per_pass < 1):
            raise ValueError(f"images_per_pass and windows_per_pass must be at least 1, got "
                             f"{self.images_per_pass} and {self.windows_per_pass}")


def with_mask_channel(x: np.ndarray, *, mask_channel: bool, axis: int) -> np.ndarray:
    """``x`` with the mask channel appended on ``axis`` when the model takes one: all ones, as at
    inference every voxel is to be segmented (float32).

    Examples
    --------
    >>> with_mask_channel(np.zeros((2, 1, 4, 4), np.float32), mask_channel=True, axis=1).shape
    (2, 2, 4, 4)
    """
    if not mask_channel:
        return x
    shape = list(x.shape)
    shape[axis] = 1
    return np.concatenate([x, np.ones(shape, np.float32)], axis=axis)


def model_inputs(x: np.ndarray, *, dims: int, axis: int, slices: np.ndarray | None = None) -> np.ndarray:
    """The stack ``(N, C, *spatial)`` a network of ``dims`` dimensions sees of a ``(C, X, Y, Z)`` array.

    2D: the slices along ``axis`` (only those at ``slices`` when given; without, a view);
    3D: the volume itself (``N = 1``).

    Examples
    --------
    >>> model_inputs(np.zeros((1, 4, 5, 6)), dims=2, axis=2).shape
    (6, 1, 4, 5)
    >>> model_inputs(np.zeros((1, 4, 5, 6)), dims=2, axis=0, slices=np.array([1, 3])).shape
    (2, 1, 5, 6)
    """
    if dims == 3:
        return x[None]
    if slices is not None:
        x = np.take(x, slices, axis=axis + 1)
    return np.moveaxis(x, axis + 1, 0)


def from_model_outputs(out: np.ndarray, *, dims: int, axis: int) -> np.ndarray:
    """Inverse of :func:`model_inputs` (without ``slices``): ``(N, K, *spatial)`` -> ``(K, X, Y, Z)``."""
    return out[0] if dims == 3 else np.moveaxis(out, 0, axis + 1)


def window_size(patch_size: tuple[int, ...], *, dims: int, axis: int, divisor: int,
                plane: tuple[int, ...]) -> tuple[int, ...]:
    """The window: the training patch (in-plane for 2D; a 3D size given to a 2D model loses ``axis``).

    A patch of the wrong length (unknown) is replaced by the whole image ``plane``, rounded up to
    ``divisor``.

    Examples
    --------
    >>> window_size((32, 32, 8), dims=2, axis=2, divisor=8, plane=(40, 40))
    (32, 32)
    >>> window_size((), dims=2, axis=2, divisor=8, plane=(41, 40))
    (48, 40)
    """
    patch = tuple(int(p) for p in patch_size)
    if len(patch) == 3 and dims == 2:
        patch = tuple(p for a, p in enumerate(patch) if a != axis)
    if len(patch) != dims:
        patch = tuple(-(-s // divisor) * divisor for s in plane)
    return patch


def whole_window(patch: tuple[int, ...], plane: tuple[int, ...], *, divisor: int) -> tuple[int, ...]:
    """One window over a whole image ``plane``: the image rounded up to ``divisor``, at least ``patch``.

    An image smaller than the training patch is padded to it, as the sliding window pads; a
    larger one is seen whole (a fully convolutional network takes any multiple of ``divisor``).

    Examples
    --------
    >>> whole_window((32, 32), (41, 20), divisor=8)
    (48, 32)
    """
    return tuple(max(int(p), -(-int(s) // divisor) * divisor) for p, s in zip(patch, plane, strict=True))


def window_logits(model: nn.Module, images: torch.Tensor, *, roi: tuple[int, ...]) -> torch.Tensor:
    """Logits of a batch ``(n, C, *spatial)`` seen through one window ``roi`` covering each image whole.

    Zero padding is split as MONAI's sliding window splits it (half before, the rest after)
    and cropped off again, so this is ``sliding_window_inference`` with a single window,
    without its blending buffers.
    """
    spatial = images.shape[2:]
    if len(roi) != len(spatial) or any(r < s for r, s in zip(roi, spatial, strict=True)):
        raise ValueError(f"roi must cover the images, got {tuple(roi)} for images of {tuple(spatial)}")
    pads: list[int] = []
    for r, s in reversed(list(zip(roi, spatial, strict=True))):
        pads.extend([(r - s) // 2, r - s - (r - s) // 2])
    out = model(torch.nn.functional.pad(images, pads) if any(pads) else images)
    crop = tuple(slice((r - s) // 2, (r - s) // 2 + s) for r, s in zip(roi, spatial, strict=True))
    return out[(slice(None), slice(None), *crop)]


def largest_window(patch: tuple[int, ...], shape: tuple[int, ...], *, divisor: int, bytes_per_voxel: float,
                   budget: float) -> tuple[int, ...]:
    """The largest 3D window, a multiple of ``divisor`` and at least ``patch``, whose activations fit ``budget``.

    Starts from the whole (rounded-up) volume and shrinks the axes that are not yet at the
    patch by a common factor until ``voxels * bytes_per_voxel <= budget`` (never below the patch).

    Examples
    --------
    >>> largest_window((32, 32, 16), (100, 100, 40), divisor=8, bytes_per_voxel=1.0, budget=1e9)
    (104, 104, 40)
    >>> largest_window((32, 32, 16), (512, 512, 300), divisor=8, bytes_per_voxel=1.0, budget=64**3)
    (72, 72, 40)
    """
    win = list(whole_window(patch, shape, divisor=divisor))
    floor = [int(p) for p in patch]
    for _ in range(64):
        if float(np.prod(win)) * bytes_per_voxel <= budget:
            break
        free = [a for a in range(len(win)) if win[a] > floor[a]]
        if not free:
            break
        fixed = float(np.prod([win[a] for a in range(len(win)) if a not in free]))
        factor = (budget / bytes_per_voxel / fixed / float(np.prod([win[a] for a in free]))) ** (1 / len(free))
        for a in free:
            win[a] = max(floor[a], min(win[a] - divisor, int(win[a] * factor) // divisor * divisor))
    return tuple(win)


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's parameters (CPU for a model without any)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def logits(model: nn.Module, images: np.ndarray, *, roi: tuple[int, ...], window: Window,
           bf16: bool = False, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Logits ``(n, K, *spatial)`` of ``images`` ``(N, C, *spatial)``, pass by pass, on ``device``.

    ``device`` defaults to the model's; ``bf16`` runs the network under bfloat16 autocast.
    """
    from monai.inferers import sliding_window_inference

    device = device or device_of(model)
    for start in range(0, images.shape[0], window.images_per_pass):
        chunk = np.ascontiguousarray(images[start:start + window.images_per_pass])
        if not chunk.flags.writeable:  # a read-only memory map (a cached case): torch must get memory it may own
            chunk = chunk.copy()
        t = torch.from_numpy(chunk).to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = sliding_window_inference(t, roi, window.windows_per_pass or t.shape[0], model,
                                           overlap=window.overlap, mode=window.blend)
        yield out  # outside the autocast block: the caller's code does not run under it


@torch.no_grad()
def stacked_logits(model: nn.Module, images: np.ndarray, *, roi: tuple[int, ...], window: Window,
                   bf16: bool = False) -> np.ndarray:
    """Logits ``(N, K, *spatial)`` float32 of the stack ``images`` in one array (see :func:`logits`)."""
    out = None
    start = 0
    for chunk in logits(model, images, roi=roi, window=window, bf16=bf16):
        if out is None:
            out = np.empty((images.shape[0], chunk.shape[1], *images.shape[2:]), np.float32)
        out[start:start + chunk.shape[0]] = chunk.float().cpu().numpy()
        start += chunk.shape[0]
    if out is None:
        raise ValueError("images must hold at least one image, got an empty stack")
    return out


def softmax_inplace(x: np.ndarray, *, axis: int = 1) -> np.ndarray:
    """Softmax of float32 ``x`` over ``axis`` into ``x`` itself, one index of its first axis at a time
    (torch's softmax: the same values as ``torch.softmax``); returns ``x``."""
    for i in range(x.shape[0]):
        part = torch.from_numpy(x[i])
        part.copy_(torch.softmax(part, dim=axis - 1))
    return x


@torch.no_grad()
def classes(model: nn.Module, images: np.ndarray, *, roi: tuple[int, ...], window: Window, bf16: bool = False,
            device: torch.device | None = None) -> torch.Tensor:
    """Class indices ``(N, *spatial)`` (argmax of the logits, on the CPU) of the stack ``images``."""
    parts = [chunk.argmax(1).cpu() for chunk in logits(model, images, roi=roi, window=window, bf16=bf16,
                                                        device=device)]
    if not parts:
        raise ValueError("images must hold at least one image, got an empty stack")
    return torch.cat(parts)
