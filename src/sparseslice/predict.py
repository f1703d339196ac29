"""Inference: sliding-window prediction, flip test-time augmentation and post-processing.

A 2D model sees each whole slice along the checkpoint's slice axis (in batches, one window per
slice: :func:`slice_classes`); a 3D model the largest window that fits the device's memory, at
least its patch. ``window="patch"`` uses sliding windows of the training patch instead. All go
through :mod:`sparseslice.inference` (the sliding window training validation uses too), with
Gaussian blending where windows overlap. Test-time augmentation averages the
logits over every combination of flips of the chosen axes (nnU-Net v2's mirroring); a
network trained at another in-plane spacing has the probabilities of those logits resampled
back to the image's grid. The
label map is then post-processed per label: largest connected component (26-connectivity)
and hole filling (3D cavities of background enclosed by the label), each switchable.
Output label maps have the image's shape and affine.

With a plan (``predict --plan``) only the planned cases are predicted and each map keeps only the
planned slices (zeros elsewhere): pre-annotations that annotators correct in the next round, which
``collect --preannotations`` tells apart from slices drawn from scratch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from sparseslice.errors import UserError
from sparseslice.inference import (
    Window,
    device_of,
    from_model_outputs,
    largest_window,
    model_inputs,
    softmax_inplace,
    stacked_logits,
    whole_window,
    window_logits,
    window_size,
    with_mask_channel,
)
from sparseslice.io import Volume, narrow_label_dtype, read_header, write_volume
from sparseslice.model import Checkpoint, normalization_stats, normalize
from sparseslice.outputs import MARKER
from sparseslice.progress import track
from sparseslice.resample import (
    needs_resampling,
    resample_image,
    resample_probabilities,
    resampled_shape,
    resize_slices,
)

if TYPE_CHECKING:
    from sparseslice.select.plan import Plan, PlanEntry


def label_boxes(labels: np.ndarray) -> list[tuple[int, tuple[slice, ...]]]:
    """``(value, bounding box)`` of every non-zero value of ``labels``, by increasing value.

    One pass (:func:`scipy.ndimage.find_objects`) for small non-negative integer labels, the
    usual case; other arrays are first coded by :func:`numpy.unique`.

    Examples
    --------
    >>> a = np.zeros((4, 5), np.uint8); a[1:3, 2] = 2
    >>> label_boxes(a)
    [(2, (slice(1, 3, None), slice(2, 3, None)))]
    """
    if labels.size == 0:
        return []
    if labels.dtype.kind in "ui" and int(labels.min()) >= 0 and int(labels.max()) <= 2**16:
        return [(v + 1, box) for v, box in enumerate(ndimage.find_objects(labels)) if box is not None]
    values, codes = np.unique(labels, return_inverse=True)
    boxes = ndimage.find_objects(codes.reshape(labels.shape) + 1)
    return [(values[c].item(), box) for c, box in enumerate(boxes) if box is not None and values[c] != 0]


_CONNECTED = {n: np.ones((3,) * n, bool) for n in (1, 2, 3)}


def _keep_largest_inplace(out: np.ndarray) -> None:
    """:func:`keep_largest_component` on ``out`` itself, each label within its bounding box.

    A label's components lie inside its box, and :func:`scipy.ndimage.label` numbers them in
    raster order there as on the whole array, so even a tie between equal largest components
    keeps the same one. Memory: the box's int32 component map and, while it is labelled, its
    mask; the removal runs a slab at a time.
    """
    structure = _CONNECTED.get(out.ndim, np.ones((3,) * out.ndim, bool))
    for value, box in label_boxes(out):
        region = out[box]
        comp, n = ndimage.label(region == value, structure=structure)
        if n > 1:
            sizes = _component_sizes(comp, n)
            sizes[0] = 0
            best = int(np.argmax(sizes))
            _set_where(region, comp, lambda c, best=best: (c != best) & (c != 0), 0)
        del comp  # before the next label's map is made


def _slabs(*arrays: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """The same slab (a range of first-axis indices, about :data:`_LOOKUP_CHUNK` voxels) of each of
    ``arrays`` (one shape), in turn: temporaries of a whole-volume expression would be as large as the volume."""
    step = max(1, _LOOKUP_CHUNK // max(1, arrays[0][:1].size))
    for start in range(0, arrays[0].shape[0], step):
        yield tuple(a[start:start + step] for a in arrays)


def _set_where(region: np.ndarray, comp: np.ndarray, select: Callable[[np.ndarray], np.ndarray], value: int, *,
               background_only: bool = False) -> None:
    """``region[select(comp)] = value`` (where ``region`` is 0 only, with ``background_only``), a slab at a
    time; the slabs die with the call, so ``comp`` is freed as soon as its caller drops it."""
    for part, c in _slabs(region, comp):
        where = select(c)
        if background_only:
            where &= part == 0
        np.copyto(part, value, where=where)


def _component_sizes(comp: np.ndarray, n: int) -> np.ndarray:
    """Voxels of each component ``0..n`` of a labelled map, counted a slab at a time: one ``bincount`` of
    the whole int32 map copies it as intp (8 bytes a voxel, the peak of predict on a CT volume)."""
    sizes = np.zeros(n + 1, np.int64)
    for (c,) in _slabs(comp):
        sizes += np.bincount(c.ravel(), minlength=n + 1)
    return sizes


def _fill_holes_inplace(out: np.ndarray) -> None:
    """:func:`fill_label_holes` on ``out`` itself, each label within its bounding box.

    Outside a label's box all is background and reaches the array's border without entering
    the box, and a path from inside the box to that border leaves it through one of the box's
    faces: so the background enclosed by the label in the whole array is the background the
    label encloses in its box (:func:`scipy.ndimage.binary_fill_holes` on the box). Filling a
    label only turns background into it, so each later label's mask is as in the input.
    """
    for value, box in label_boxes(out):
        region = out[box]
        comp, closed = _closed_components(region != value)
        _set_where(region, comp, lambda c, closed=closed: closed[c], value, background_only=True)
        del comp


def _closed_components(free: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The components (6-connectivity) of ``free`` and, by component number, whether it does not reach
    the array's border (component 0, the rest of the array, is never closed)."""
    comp, n = ndimage.label(free, structure=ndimage.generate_binary_structure(free.ndim, 1))
    open_ = np.zeros(n + 1, bool)
    open_[0] = True
    for a in range(free.ndim):
        for end in (0, -1):
            open_[np.take(comp, end, axis=a)] = True
    return comp, ~open_


def enclosed_background(mask: np.ndarray) -> np.ndarray:
    """The background of ``mask`` not connected (6-connectivity) to the array's border: the holes
    :func:`scipy.ndimage.binary_fill_holes` fills, by one labelling of the background instead of its
    iterated dilation (over twice as fast on a CT volume).

    Examples
    --------
    >>> m = np.ones((3, 3, 3), bool); m[1, 1, 1] = False
    >>> int(enclosed_background(m).sum())
    1
    """
    comp, closed = _closed_components(~mask)
    out = np.empty(comp.shape, bool)
    # looked up a slab at a time: indexing by the whole int32 map would copy it as intp (8 bytes a voxel)
    for o, c in _slabs(out, comp):
        o[...] = closed[c]
    return out


#: Voxels looked up at a time in :func:`enclosed_background`.
_LOOKUP_CHUNK = 1 << 22


def keep_largest_component(labels: np.ndarray) -> np.ndarray:
    """Keep, for each label value, only its largest connected component (26-connectivity).

    Removed voxels become background (0).

    Examples
    --------
    >>> a = np.zeros((6, 6, 6), np.uint8); a[0:3, 0:3, 0:3] = 1; a[5, 5, 5] = 1
    >>> int(keep_largest_component(a).sum())
    27
    """
    out = labels.copy()
    _keep_largest_inplace(out)
    return out


def fill_label_holes(labels: np.ndarray) -> np.ndarray:
    """Fill, for each label value, background cavities fully enclosed by it.

    Only background voxels are filled, so a structure nested inside another label is kept.

    Examples
    --------
    >>> a = np.ones((5, 5, 5), np.uint8); a[2, 2, 2] = 0
    >>> int(fill_label_holes(a)[2, 2, 2])
    1
    """
    out = labels.copy()
    _fill_holes_inplace(out)
    return out


def postprocess(labels: np.ndarray, *, fill_holes: bool = True, largest_component: bool = True,
                inplace: bool = False) -> np.ndarray:
    """Largest connected component per label, then hole filling, each switchable.

    ``inplace`` changes ``labels`` itself (and returns it) instead of a copy.
    """
    if not (fill_holes or largest_component):
        return labels
    out = labels if inplace else labels.copy()
    if largest_component:
        _keep_largest_inplace(out)
    if fill_holes:
        _fill_holes_inplace(out)
    return out


def _flip_sets(axes: Sequence[int]) -> list[tuple[int, ...]]:
    axes = sorted(set(int(a) for a in axes))
    return [c for n in range(len(axes) + 1) for c in itertools.combinations(axes, n)]


def _check_tta_axes(tta_axes: Sequence[int] | None, ckpt: Checkpoint) -> tuple[int, ...]:
    default = tuple(a for a in range(3) if ckpt.spec.dims == 3 or a != ckpt.axis)
    if tta_axes is None:
        return default
    axes = tuple(int(a) for a in tta_axes)
    if any(a not in (0, 1, 2) for a in axes):
        raise UserError(f"tta_axes must be among 0, 1, 2, got {axes}; pass image axes to flip")
    # flipping along the slice axis does not change a 2D model's per-slice prediction
    return tuple(a for a in axes if ckpt.spec.dims == 3 or a != ckpt.axis)


def image_channels(image: Volume, ckpt: Checkpoint) -> np.ndarray:
    """The image as ``(C, X, Y, Z)`` (a view), refused unless it has the model's channels."""
    arr = image.array
    arr = arr[None] if arr.ndim == 3 else np.moveaxis(arr, -1, 0)
    want = ckpt.spec.in_channels - int(ckpt.spec.mask_channel)
    if arr.shape[0] != want:
        raise UserError(f"image must have {want} channel(s) for this model, got {arr.shape[0]} "
                        f"(shape {image.shape}); pass images like those the model was trained on")
    return arr


def _prepare(image: Volume, ckpt: Checkpoint) -> np.ndarray:
    return with_mask_channel(normalize(image_channels(image, ckpt), ckpt.normalization),
                             mask_channel=ckpt.spec.mask_channel, axis=0)


def slice_batches(x: np.ndarray, ckpt: Checkpoint, *, batch_size: int, spacing: Sequence[float] | None = None,
                  device: torch.device | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """A 2D model's inputs ``(n, C, h, w)`` of the slices of ``x`` ``(C, X, Y, Z)``, at most ``batch_size``
    at a time (:func:`slices_per_pass`).

    Each batch is gathered from ``x`` (unnormalised: :func:`image_channels`), normalised as the
    whole volume would be (:func:`~sparseslice.model.normalization_stats`), given the mask
    channel and resampled in-plane from ``spacing`` to the checkpoint's, then sent to
    ``device``: the volume is never copied whole, in float32 or otherwise. Yields
    ``(first slice, batch)``; predict and the bench's bare forward passes both read these.
    """
    axis = ckpt.axis
    stats = normalization_stats(x, ckpt.normalization)
    size = None
    if spacing is not None and needs_resampling(spacing, ckpt.spacing, axis=axis):
        size = tuple(s for a, s in enumerate(resampled_shape(x.shape[1:], spacing, ckpt.spacing, axis=axis))
                     if a != axis)
    stack = model_inputs(x, dims=2, axis=axis)
    per_pass = slices_per_pass(size or stack.shape[2:], batch_size=batch_size, device=device)
    chunk = per_pass * max(1, _GATHER_SLICES // per_pass)
    for first in range(0, stack.shape[0], chunk):
        # consecutive slices gathered together: a slice of a volume whose slice axis varies fastest
        # is one value per cache line, and the network's passes evict those lines between slices
        block = np.ascontiguousarray(stack[first:first + chunk])
        for start in range(0, block.shape[0], per_pass):
            part = np.moveaxis(block[start:start + per_pass], 1, 0)  # (C, n, h, w), as normalize takes it
            batch = with_mask_channel(normalize(part, ckpt.normalization, stats=stats),
                                      mask_channel=ckpt.spec.mask_channel, axis=0)
            t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(batch, 0, 1)))
            if size is not None and tuple(t.shape[2:]) != size:
                t = resize_slices(t, size)
            yield first + start, t.to(device) if device is not None else t


#: Slices :func:`slice_batches` copies out of the volume at a time (at least one pass's).
_GATHER_SLICES = 32


#: Pixels a CPU forward pass of a 2D model takes at most (whole slices, at least one). The cost per
#: pixel is lowest near 2^18 pixels a pass (one 512x512 slice, four 256x256, sixteen 128x128) and
#: 2.6x higher for sixteen 512x512 slices, whose activations no longer fit the caches (measured
#: on 2 cores with the 2D models of the hippocampus and CT benches).
CPU_PASS_PIXELS = 1 << 18


def slices_per_pass(plane: Sequence[int], *, batch_size: int, device: torch.device | None = None) -> int:
    """Slices of ``plane`` (the network's input plane) per 2D forward pass: ``batch_size``, on a CPU
    (``device`` None or ``cpu``) at most :data:`CPU_PASS_PIXELS` pixels' worth and at least one.

    Examples
    --------
    >>> slices_per_pass((512, 512), batch_size=16), slices_per_pass((128, 128), batch_size=16)
    (1, 16)
    """
    if device is not None and device.type != "cpu":
        return batch_size
    return max(1, min(batch_size, CPU_PASS_PIXELS // max(1, int(np.prod(plane)))))


def slice_window(ckpt: Checkpoint, plane: Sequence[int]) -> tuple[int, ...]:
    """The one window a 2D model sees each whole slice ``plane`` through (at least the training patch)."""
    plane = tuple(int(p) for p in plane)
    patch = window_size(ckpt.patch_size, dims=2, axis=ckpt.axis, divisor=ckpt.spec.divisor, plane=plane)
    return whole_window(patch, plane, divisor=ckpt.spec.divisor)


@torch.inference_mode()
def predict_logits(model: nn.Module, ckpt: Checkpoint, x: np.ndarray, *, overlap: float = 0.5,
                   batch_size: int = 16, roi: tuple[int, ...] | None = None) -> np.ndarray:
    """Logits ``(K, X, Y, Z)`` float32 of a normalised ``(C, X, Y, Z)`` array (sliding window, Gaussian blending).

    The window is ``roi``, by default the checkpoint's training patch (:func:`~sparseslice.inference.window_size`).
    """
    dims = ckpt.spec.dims
    images = model_inputs(x, dims=dims, axis=ckpt.axis)
    if roi is None:
        roi = window_size(ckpt.patch_size, dims=dims, axis=ckpt.axis, divisor=ckpt.spec.divisor,
                          plane=images.shape[2:])
    window = Window(overlap=overlap, blend="gaussian", images_per_pass=batch_size, windows_per_pass=batch_size)
    return from_model_outputs(stacked_logits(model, images, roi=roi, window=window), dims=dims, axis=ckpt.axis)


def predict_probabilities(model: nn.Module, ckpt: Checkpoint, x: np.ndarray, *, overlap: float = 0.5,
                          batch_size: int = 16, roi: tuple[int, ...] | None = None) -> np.ndarray:
    """Softmax ``(K, X, Y, Z)`` of :func:`predict_logits` (over the class axis)."""
    logit = predict_logits(model, ckpt, x, overlap=overlap, batch_size=batch_size, roi=roi)
    return softmax_inplace(logit[None], axis=1)[0]


#: How predict lays windows over an image: ``whole`` (2D: each whole slice, padded to the network's
#: divisor and at least the training patch; 3D: the largest window that fits the device's memory) or
#: ``patch`` (sliding windows of the training patch, overlap and Gaussian blending).
WINDOWS = ("whole", "patch")


def check_window(window: str) -> str:
    """Return ``window`` if it is one of :data:`WINDOWS`, else raise naming them."""
    if window not in WINDOWS:
        raise UserError(f"window must be one of {', '.join(WINDOWS)}, got {window!r}; e.g. whole")
    return window


def _stack_dims(flip: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """Image axes ``flip`` (never the slice axis) as dims of a 2D model's stack ``(N, C, h, w)``."""
    plane = [a for a in range(3) if a != axis]
    return tuple(2 + plane.index(a) for a in flip)


@torch.inference_mode()
def slice_classes(model: nn.Module, ckpt: Checkpoint, x: np.ndarray, *, flips: Sequence[tuple[int, ...]] = ((),),
                  batch_size: int = 16, grid: tuple[int, int, int] | None = None,
                  spacing: Sequence[float] | None = None) -> np.ndarray:
    """Class indices ``(X, Y, Z)`` of an unnormalised ``(C, X, Y, Z)`` array by a 2D model, whole slices at a time.

    Batches of ``batch_size`` slices come prepared from :func:`slice_batches` (normalised, and
    resampled to the checkpoint's spacing from ``spacing``, the image's, when given). Each goes
    through the network once per flip set of ``flips`` (image axes; ``()`` is the plain pass), as
    one window over the whole slice (:func:`~sparseslice.inference.window_logits`); the logits of
    the passes are summed and the argmax taken before the next batch, so memory holds one batch of
    logits, never the volume's. ``grid`` (the image's own shape, when the network saw ``x``
    resampled) resamples each batch's probabilities (softmax of the mean logits) back in-plane
    first, as :func:`predict_volume` does.
    """
    axis = ckpt.axis
    device = device_of(model)
    plane = tuple(s for a, s in enumerate(grid or x.shape[1:]) if a != axis)
    out = np.empty((x.shape[1 + axis], *plane), np.uint8 if ckpt.spec.out_channels <= 256 else np.int64)
    roi = None
    for start, t in slice_batches(x, ckpt, batch_size=batch_size, spacing=spacing, device=device):
        roi = roi or slice_window(ckpt, t.shape[2:])
        resized = tuple(t.shape[2:]) != plane  # the probabilities are resampled back in-plane
        total = None
        for flip in flips:  # logits summed over the flips, as nnU-Net v2 mirrors
            dims = _stack_dims(flip, axis)
            lg = window_logits(model, torch.flip(t, dims) if dims else t, roi=roi).float()
            lg = torch.flip(lg, dims) if dims else lg
            total = lg if total is None else total.add_(lg)
        if resized:  # the mean logits' probabilities resampled back in-plane
            total = torch.softmax(total / len(flips), dim=1)
            total = resize_slices(total, plane)
        out[start:start + t.shape[0]] = _argmax_channels(total).cpu().numpy()
    return np.moveaxis(out, 0, axis)


def _argmax_channels(p: torch.Tensor) -> torch.Tensor:
    """``p.argmax(1)`` (the first of equal maxima) as uint8, by comparing channels in turn with
    arithmetic on 0/1 bytes: several times faster than torch's reduction over the channel dim
    (and than ``masked_fill_``) for a few channels. Tensors with NaN or infinity (never, for a
    trained network's logits; found by one sum) go to torch's own argmax, which ranks NaN highest."""
    if p.shape[1] > 8 or not bool(torch.isfinite(p.sum())):
        return p.argmax(1)
    best = p[:, 0]
    index = torch.zeros((p.shape[0], *p.shape[2:]), dtype=torch.uint8, device=p.device)
    for k in range(1, p.shape[1]):
        better = (p[:, k] > best).view(torch.uint8)
        index.mul_(1 - better).add_(better * k)
        if k + 1 < p.shape[1]:
            best = torch.maximum(best, p[:, k])
    return index


def memory_budget(device: torch.device) -> float:
    """Bytes a 3D prediction window's activations may take: half the free GPU memory, or on a CPU a
    quarter of the available memory, at most 2 GiB (bigger windows gain little time there)."""
    if device.type == "cuda":
        return 0.5 * float(torch.cuda.mem_get_info(device)[0])
    try:
        info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        available = float(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 8 * 2.0**30
    return min(available / 4, 2 * 2.0**30)


def activation_bytes(ckpt: Checkpoint) -> float:
    """Rough bytes per window voxel of a forward pass without gradients (a simple memory model): each
    level's channels at its resolution in float32, times 1.25 per residual unit and level.

    Calibrated on a CPU: MONAI's U-Net (16, 32, 64, 128), one residual unit, in inference mode
    grows by about 100 bytes per voxel from a 128^3 to a 192^3 window; this model says 106.
    """
    spec = ckpt.spec
    scale, total = 1, 0.0
    for level, c in enumerate(spec.channels):
        total += c / scale
        if level < len(spec.strides):
            scale *= int(spec.strides[level]) ** spec.dims
    return 4 * total * (1 + 0.25 * spec.num_res_units)


def _windowed_classes(model: nn.Module, ckpt: Checkpoint, x: np.ndarray, *, flips: Sequence[tuple[int, ...]],
                      overlap: float, batch_size: int, grid: tuple[int, int, int] | None,
                      roi: tuple[int, ...] | None) -> np.ndarray:
    """Class indices by sliding windows ``roi``: the logits summed over ``flips`` in one volume (nnU-Net v2's
    mirroring), then, resampled back to ``grid`` as probabilities when given, the argmax."""
    total = np.zeros((ckpt.spec.out_channels, *x.shape[1:]), np.float32)
    for flip in flips:
        dims = tuple(a + 1 for a in flip)
        xf = np.flip(x, dims) if dims else x
        lg = predict_logits(model, ckpt, xf, overlap=overlap, batch_size=batch_size, roi=roi)
        total += np.flip(lg, dims) if dims else lg
        del lg
    if grid is not None:
        total /= len(flips)
        total = resample_probabilities(softmax_inplace(total[None], axis=1)[0], grid, axis=ckpt.axis)
    return np.argmax(total, axis=0)


def _label_values(ckpt: Checkpoint) -> np.ndarray:
    k = ckpt.spec.out_channels
    labels = [int(v) for v in ckpt.labels]
    if len(labels) == k:
        return np.asarray(labels)
    if len(labels) == k - 1:  # foreground values only; channel 0 is background
        return np.asarray([0, *labels])
    return np.arange(k)


def predict_volume(model: nn.Module, ckpt: Checkpoint, image: Volume, *, tta: bool = False, fill_holes: bool = True,
                   largest_component: bool = True, tta_axes: Sequence[int] | None = None, overlap: float = 0.5,
                   batch_size: int = 16, window: str = "whole") -> np.ndarray:
    """Label map of one image, on the image's own grid.

    Parameters
    ----------
    model, ckpt
        From :func:`sparseslice.model.load_checkpoint`.
    image : Volume
        The image (channels on a last axis if several), unnormalised.
    tta : bool
        Average the logits over all flips of ``tta_axes`` (2^n passes), as nnU-Net v2 does.
    fill_holes, largest_component : bool
        Post-processing per label (see :func:`postprocess`).
    tta_axes : sequence of int, optional
        Image axes to flip; default all three for 3D models, the two in-plane axes for 2D.
    overlap : float
        Sliding-window overlap in [0, 1) (windows smaller than the image only).
    batch_size : int
        Windows (3D) or slices (2D) per forward pass; on a CPU, 2D passes hold at most
        :data:`CPU_PASS_PIXELS` pixels (fewer slices of a large plane: faster).
    window : {"whole", "patch"}
        ``whole``: a 2D model sees each whole slice (:func:`slice_classes`), a 3D model the
        largest window that fits the device's memory; ``patch``: sliding windows of the training
        patch (see :data:`WINDOWS`).

    Returns
    -------
    numpy.ndarray
        Integer label map with the image's spatial shape (values from ``ckpt.labels``); a
        network trained at another in-plane spacing (``ckpt.spacing``) sees the image
        resampled to it, and its probabilities are resampled back before the argmax.
    """
    if not 0 <= overlap < 1:
        raise UserError(f"overlap must lie in [0, 1), got {overlap}; e.g. 0.5")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}; e.g. 16")
    check_window(window)
    flips = _flip_sets(_check_tta_axes(tta_axes, ckpt)) if tta else [()]
    if window == "whole" and ckpt.spec.dims == 2:
        grid = image.shape[:3]
        back = grid if needs_resampling(image.spacing, ckpt.spacing, axis=ckpt.axis) else None
        index = slice_classes(model, ckpt, image_channels(image, ckpt), flips=flips, batch_size=batch_size,
                              grid=back, spacing=image.spacing)
    else:
        index = _volume_classes(model, ckpt, image, flips=flips, overlap=overlap, batch_size=batch_size,
                                window=window)
    labels = _label_map(index, ckpt)
    del index
    return postprocess(labels, fill_holes=fill_holes, largest_component=largest_component, inplace=True)


def _volume_classes(model: nn.Module, ckpt: Checkpoint, image: Volume, *, flips: Sequence[tuple[int, ...]],
                    overlap: float, batch_size: int, window: str) -> np.ndarray:
    """Class indices by sliding windows over the whole normalised volume (3D models, or ``window="patch"``)."""
    x = _prepare(image, ckpt)
    grid = x.shape[1:]
    resampled = needs_resampling(image.spacing, ckpt.spacing, axis=ckpt.axis)
    if resampled:  # to the spacing the network was trained at, and the probabilities back
        x = resample_image(x, resampled_shape(grid, image.spacing, ckpt.spacing, axis=ckpt.axis), axis=ckpt.axis)
    roi, per_pass = None, batch_size
    if window == "whole":  # 3D: the largest window that fits, as many of them per pass as fit
        patch = window_size(ckpt.patch_size, dims=3, axis=ckpt.axis, divisor=ckpt.spec.divisor, plane=x.shape[1:])
        budget, per_voxel = memory_budget(device_of(model)), activation_bytes(ckpt)
        roi = largest_window(patch, x.shape[1:], divisor=ckpt.spec.divisor, bytes_per_voxel=per_voxel,
                             budget=budget)
        per_pass = max(1, min(batch_size, int(budget // (float(np.prod(roi)) * per_voxel))))
    return _windowed_classes(model, ckpt, x, flips=flips, overlap=overlap, batch_size=per_pass,
                             grid=grid if resampled else None, roi=roi)


def _label_map(index: np.ndarray, ckpt: Checkpoint) -> np.ndarray:
    """Class indices -> the checkpoint's label values, in the narrowest dtype holding those present.

    Indices that are the values already (channel ``k`` is label ``k``) are kept as they are, not copied.
    """
    values = narrow_label_dtype(_label_values(ckpt))
    if np.array_equal(values, np.arange(len(values))):
        return narrow_label_dtype(index)
    return narrow_label_dtype(values[index])


def _remove_written(files: list[Path], folder: Path | None) -> None:
    """Undo a failed :func:`predict_folder`: remove the maps it wrote, and ``folder`` if it made it and it is empty."""
    for f in files:
        f.unlink(missing_ok=True)
    if folder is not None and folder.is_dir():
        (folder / MARKER).unlink(missing_ok=True)  # the folder is ours: its marker goes with it
        if not any(folder.iterdir()):
            folder.rmdir()


def check_plan_fits(entry: PlanEntry, shape: Sequence[int]) -> None:
    """Raise a :class:`UserError` unless an image of ``shape`` has the slices the plan ``entry`` counts."""
    if shape[entry.axis] != entry.n_slices:
        raise UserError(f"plan entry for case {entry.case_id!r} has {entry.n_slices} slices along axis {entry.axis}, "
                        f"got an image with {shape[entry.axis]}; pass the plan made for these images")


def planned_slices_only(labels: np.ndarray, entry: PlanEntry) -> np.ndarray:
    """``labels`` with every slice the plan ``entry`` does not name set to 0 (a pre-annotation)."""
    check_plan_fits(entry, labels.shape)
    keep = np.zeros(entry.n_slices, bool)
    keep[list(entry.slices)] = True
    shape = [1] * labels.ndim
    shape[entry.axis] = entry.n_slices
    return np.where(keep.reshape(shape), labels, 0).astype(labels.dtype)


def predict_folder(run_dir: Path, images: Path, out: Path, *, cases: Sequence[str] | None = None, tta: bool = False,
                   fill_holes: bool = True, largest_component: bool = True, device: str | None = None,
                   progress: bool = True, tta_axes: Sequence[int] | None = None, overlap: float = 0.5,
                   batch_size: int = 16, plan: Plan | None = None, window: str = "whole") -> list[Path]:
    """Predict every image of a dataset into ``out/<case>.nii.gz`` (image's own space).

    ``images`` is anything :func:`sparseslice.datasets.discover_dataset` reads; its labels,
    if any, are not used. The resolved settings go to ``out/predict.json``, written last. Each
    file is written atomically; a run that fails (or is interrupted) removes the maps it wrote,
    so no partial result looks like a finished one. ``out`` must be new, empty or an earlier
    prediction, and apart from the inputs (:mod:`sparseslice.outputs`). With ``plan``, only its
    cases (among ``cases``) are predicted, on their planned slices only (pre-annotations).

    Examples
    --------
    >>> predict_folder(Path("runs/r1"), Path("data/test"), Path("pred"))  # doctest: +SKIP
    [PosixPath('pred/case_001.nii.gz'), ...]
    """
    from sparseslice.atomic import write_json
    from sparseslice.datasets import discover_dataset, load_image
    from sparseslice.model import load_checkpoint, pick_device
    from sparseslice.outputs import claim_output, dataset_inputs

    check_window(window)
    model, ckpt = load_checkpoint(run_dir, device=pick_device(device))
    ds = discover_dataset(images)
    todo = list(ds.cases) if cases is None else [ds.case(c) for c in cases]
    planned = {e.case_id: e for e in plan.entries} if plan is not None else None
    if planned is not None:  # pre-annotation: the plan's cases only, checked against their headers first
        todo = [ds.case(c) for c in planned if cases is None or c in cases]
        for case in todo:
            check_plan_fits(planned[case.case_id], read_header(case.images[0]).shape)
    out = Path(out)
    made = not out.exists()
    folder = claim_output(out, command="predict", inputs=[run_dir, *dataset_inputs(ds)], argument="out")
    folder.path("predict.json").unlink(missing_ok=True)  # an earlier run's: this one is not complete yet
    settings = {
        "run_dir": str(run_dir), "images": str(images), "cases": [c.case_id for c in todo], "tta": tta,
        "tta_axes": list(_check_tta_axes(tta_axes, ckpt)) if tta else [], "fill_holes": fill_holes,
        "largest_component": largest_component, "overlap": overlap, "batch_size": batch_size, "window": window,
        "device": str(device_of(model)), "axis": ckpt.axis, "dims": ckpt.spec.dims,
        "patch_size": list(ckpt.patch_size), "labels": list(ckpt.labels),
        "spacing": None if ckpt.spacing is None else list(ckpt.spacing),
        "planned_slices": None if planned is None else {c.case_id: list(planned[c.case_id].slices) for c in todo},
    }
    written: list[Path] = []
    nonfinite = ckpt.extra.get("config", {}).get("nonfinite", "error")  # read images as training did
    try:
        for case in track(todo, "predicting", progress=progress):
            image = load_image(case, nonfinite=nonfinite)
            labels = predict_volume(model, ckpt, image, tta=tta, fill_holes=fill_holes,
                                    largest_component=largest_component, tta_axes=tta_axes, overlap=overlap,
                                    batch_size=batch_size, window=window)
            if planned is not None:
                labels = planned_slices_only(labels, planned[case.case_id])
            written.append(write_volume(image.like(labels), folder.path(f"{case.case_id}.nii.gz")))
        write_json(folder.path("predict.json"), settings)  # last: its presence says the folder is complete
    except BaseException:
        _remove_written(written, out if made else None)
        raise
    return written
