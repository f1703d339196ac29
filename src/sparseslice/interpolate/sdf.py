"""Shape-based (signed distance) interpolation between annotated slices: the ``sdf`` method.

See :mod:`sparseslice.interpolate` for what the method does; this module holds the
machinery. Everything works on a label array whose first axis is the slice axis (``view``),
on runs of consecutive gaps (a gap: two consecutive annotated slices and the slices between)
whose maps fit in ``chunk_values`` values (:func:`fill_sdf`; ``_CHUNK_VALUES`` by default),
inside the bounding box of their slices' foreground.

A class (the foreground, or one label) present on both sides of a gap is interpolated
linearly between its two signed distance maps. A class seen on one side only ends inside the
gap: each connected component is eroded by ``depth * cap(x)``, ``depth`` being its deepest
distance and ``x`` the fraction of the gap from the side that shows it divided by where it
ends, so it vanishes there (:func:`_cap`). A foreground component with no overlapping
counterpart on the other side (a topology change) ends the same way, while the components that
have one are blended linearly; such an ending part needs no distance transform of its own,
since only its inside matters and there its distance is the foreground's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from scipy import ndimage

_CHUNK_VALUES = 1 << 24  # values (float32: 64 MB) held at once for a run of gaps, or for the rows filled at once
_END_FRACTION = 0.5  # where a structure missing on the far side of a gap ends (fraction of the gap)
_LABEL_END = 0.5  # the same for one label inside the foreground


def _end_fractions(a: int, b: int, *, border: np.ndarray, extent: tuple[int, int] | None) -> tuple[float, float]:
    """Where, as a fraction of the gap from each side, a structure missing on the other side ends.

    Half-way by default. When the empty side is a border slice outside a known extent, the
    structure is known to reach the slice next to the border, so it ends half a slice short
    of the border slice.
    """
    from_a = from_b = _END_FRACTION
    if extent is not None:
        if border[b] and b > extent[1]:
            from_a = (b - 0.5 - a) / (b - a)
        if border[a] and a < extent[0]:
            from_b = (b - a - 0.5) / (b - a)
    return from_a, from_b


def signed_distance(mask: np.ndarray, *, sampling: tuple[float, ...]) -> np.ndarray:
    """Signed Euclidean distance in mm: positive inside ``mask``, negative outside.

    Inside voxels hold the distance to the nearest outside voxel and vice versa
    (``edt(mask) - edt(~mask)``), so the zero level lies between the two and an interpolation
    of two identical maps returns the same mask. ``mask`` must hold both values.

    Examples
    --------
    >>> signed_distance(np.array([[0, 1, 1, 1, 0]], bool), sampling=(1.0, 2.0)).tolist()
    [[-2.0, 2.0, 4.0, 2.0, -2.0]]
    """
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    return (inside - outside).astype(np.float32)


def _cap(x: np.ndarray) -> np.ndarray:
    """Erosion profile towards a structure's end: 0 at the last slice seen, 1 (gone) at x = 1.

    The round cap ``1 - sqrt(1 - x)`` keeps the section large until close to the end, as
    rounded anatomical ends do."""
    return np.where(x < 1, 1 - np.sqrt(np.clip(1 - x, 0, 1)), 1 + x).astype(np.float32)


#: ``(zeros, sampling, out)``: the feature transform of a 2D int8 array into ``out`` (2, h, w), in place.
FeatureTransform = Callable[[np.ndarray, np.ndarray, np.ndarray], None]

_feature_transform: FeatureTransform | None
try:  # the C routine behind scipy.ndimage.distance_transform_edt, without its per-call overhead
    from scipy.ndimage._nd_image import euclidean_feature_transform as _feature_transform
except ImportError:  # pragma: no cover - private scipy API moved: use the public function
    _feature_transform = None

_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity inside each slice of a stack


def fill_sdf(view: np.ndarray, gaps: list[tuple[int, int]], *, sampling: tuple[float, ...],
             border: np.ndarray, extent: tuple[int, int] | None, chunk_values: int = _CHUNK_VALUES) -> None:
    """Fill the gaps of ``view`` (slice axis first) by shape-based interpolation.

    Consecutive gaps are filled together, as many as keep the annotated slices' maps within
    ``chunk_values`` values (by default 2**24, 64 MB of float32: a whole hippocampus volume at
    once, a few slices of a 512x512 CT), so the per-gap work is a handful of array operations
    over all filled slices instead of a Python loop; the filled slices are then computed as many
    rows at a time as fit the same budget. The result does not depend on ``chunk_values``. Each
    annotated slice's distance maps are computed once, on the box holding its foreground and
    its neighbours' plus one voxel of background: inside that box they equal the whole slice's
    (the image edge is not background).
    """
    per_slice = view.shape[1] * view.shape[2] * 12  # float32 maps, int32 feature indices
    group: list[tuple[int, int]] = []
    ends: set[int] = set()
    for gap in gaps:
        if group and len(ends | set(gap)) * per_slice > chunk_values:
            _fill_group(view, group, sampling=sampling, border=border, extent=extent, chunk_values=chunk_values)
            group, ends = [], set()
        group.append(gap)
        ends |= set(gap)
    if group:
        _fill_group(view, group, sampling=sampling, border=border, extent=extent, chunk_values=chunk_values)


def _span(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First index and one past the last of each row of ``present`` (rows with a True), grown by one
    voxel on each side and clipped to the row."""
    n = present.shape[-1]
    first = np.argmax(present, axis=-1)
    last = n - 1 - np.argmax(present[..., ::-1], axis=-1)
    return np.maximum(first - 1, 0), np.minimum(last + 2, n)


def _nearest(features: np.ndarray, *, sampling: tuple[float, ...], boxes: np.ndarray | None = None,
             present: np.ndarray | None = None, far: float = np.inf,
             feature_transform: FeatureTransform | None = _feature_transform) -> np.ndarray:
    """Distance in mm from each voxel to the nearest True voxel of its 2D slice, for a stack of
    slices ``(n, h, w)``.

    Scipy's exact Euclidean feature transform, run slice by slice, with the distances computed
    once for the whole stack exactly as ``scipy.ndimage.distance_transform_edt`` computes them
    (the per-call overhead is most of the cost on small slices). ``boxes`` (``n x 4``: row
    start, stop, column start, stop) limits each slice's transform to a box: distances are to
    the nearest True voxel inside it, exact wherever that is the nearest overall (everywhere
    when the box holds all True voxels). Voxels outside the box, and slices without a True
    voxel in it, get ``far``. ``present`` (per slice: a True voxel lies in its box) saves
    looking; slices it marks False are skipped. ``feature_transform`` is scipy's C routine when
    its private module has it; None computes the same through the public
    ``scipy.ndimage.distance_transform_edt``.
    """
    n, h, w = features.shape
    if boxes is None:
        boxes = np.tile([0, h, 0, w], (n, 1))
    boxes = np.asarray(boxes)
    if present is None:
        present = np.array([features[i, r0:r1, c0:c1].any() for i, (r0, r1, c0, c1) in enumerate(boxes.tolist())],
                           bool).reshape(n)
    out = np.full((n, h, w), far, np.float32)
    if not present.any():
        return out
    boxes = boxes[present]
    ft = np.empty((boxes.shape[0], 2, h, w), np.int32)  # only the slices with something to find
    ft[:, 0] = 2 * h  # outside a box: an offset beyond the table (-> far)
    ft[:, 1] = 0
    spacing = np.asarray(sampling, np.float64)
    zeros = np.logical_not(features[present]).view(np.int8)  # the transform finds the zeros of its input
    for i, (r0, r1, c0, c1) in enumerate(boxes.tolist()):
        if feature_transform is None:
            ndimage.distance_transform_edt(zeros[i, r0:r1, c0:c1], sampling=spacing, return_distances=False,
                                           return_indices=True, indices=ft[i, :, r0:r1, c0:c1])
        else:
            feature_transform(zeros[i, r0:r1, c0:c1], spacing, ft[i, :, r0:r1, c0:c1])
    rows, cols = np.arange(h, dtype=np.int32), np.arange(w, dtype=np.int32)
    ft[:, 0] += (boxes[:, 0, None] - rows).astype(np.int32)[:, :, None]  # feature index in the box -> offset
    ft[:, 1] += (boxes[:, 2, None] - cols).astype(np.int32)[:, None, :]
    np.abs(ft, out=ft)
    index = ft[:, 0]
    index *= w
    index += ft[:, 1]
    np.minimum(index, h * w, out=index)
    # distance of every offset, computed as distance_transform_edt does (float64, then float32)
    dr, dc = np.ogrid[:h, :w]
    table = np.append(np.sqrt((dr * spacing[0]) ** 2 + (dc * spacing[1]) ** 2).astype(np.float32).ravel(),
                      np.float32(far))
    out[present] = table[index]
    return out


def _class_maps(stack: np.ndarray, values: np.ndarray, *, far: float, near_box: np.ndarray, own_box: np.ndarray,
                sampling: tuple[float, ...], feature_transform: FeatureTransform | None = _feature_transform,
                ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Signed distances of the foreground and (with several labels) of each label, per slice.

    One transform per class present on a slice (background and each label: the distance to its
    nearest voxel) gives them all: inside a set, the distance to the nearest voxel outside it is
    the smallest distance to a class not in the set. Equal to :func:`signed_distance` of each
    mask, with half the transforms. The background transform runs on the box of the slice's
    foreground (``own_box``, grown by one voxel), where it is used; the labels' on the box of
    the foreground of the slice and its neighbours (``near_box``), where the gaps use them.
    Elsewhere, and for absent classes, distances are ``far``, more than any in the box.
    Also returns the label masks ``(labels, slices, h, w)``. ``feature_transform``: as for
    :func:`_nearest`.
    """
    m, h, w = stack.shape
    inside = stack > 0
    lmasks = stack[None] == values.astype(stack.dtype)[:, None, None, None]
    features = np.concatenate([np.logical_not(inside)[None], lmasks])  # (classes, m, h, w)
    boxes = np.concatenate([own_box[None], np.broadcast_to(near_box, (values.size, m, 4))])
    area = np.count_nonzero(inside, axis=(1, 2))
    present = np.concatenate([(area > 0)  # empty slices need no background map; a full box has none
                              & (area < (own_box[:, 1] - own_box[:, 0]) * (own_box[:, 3] - own_box[:, 2]))[None],
                              lmasks.any(axis=(2, 3))])
    near = _nearest(features.reshape(-1, h, w), sampling=sampling, boxes=boxes.reshape(-1, 4),
                    present=present.reshape(-1), far=far, feature_transform=feature_transform).reshape(features.shape)
    outside = near[1] if values.size == 1 else np.minimum.reduce(near[1:])
    fmap = np.where(inside, near[0], np.negative(outside))
    if values.size == 1:
        return fmap, None, lmasks
    lmaps = np.empty((values.size, m, h, w), np.float32)
    for j in range(values.size):  # inside a label: distance to the nearest other class
        others = np.minimum.reduce([near[k] for k in range(values.size + 1) if k != j + 1])
        lmaps[j] = np.where(lmasks[j], others, np.negative(near[j + 1]))
    return fmap, lmaps, lmasks


def _drops(maps: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per voxel of a stack of slices, the depth of its component (deepest distance) for
    the ending erosion (:func:`_cap`); background voxels get their slice's deepest component."""
    components, n = ndimage.label(masks, structure=_PLANE)
    depth = np.full(n + 1, -np.inf, np.float32)
    np.maximum.at(depth, components[masks], maps[masks])
    deepest = np.where(masks, maps, -np.inf).max(axis=(-2, -1))
    deepest = np.where(np.isfinite(deepest), deepest, 0).astype(np.float32)
    return np.where(masks, depth[components], deepest[..., None, None])


def _coefficients(t: np.ndarray, has_a: np.ndarray, has_b: np.ndarray, end_a: np.ndarray | float,
                  end_b: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Per filled slice, the weights of ``level = wa * map_a + wb * map_b - ea * drop_a - eb * drop_b``:
    linear blending when the class is on both sides, the ending erosion when on one."""
    both = has_a & has_b
    only_a, only_b = has_a & ~has_b, has_b & ~has_a
    one = np.float32(1)
    wa = np.where(both, one - t, np.where(only_a, one, 0)).astype(np.float32)
    wb = np.where(both, t, np.where(only_b, one, 0)).astype(np.float32)
    ea = np.where(only_a, _cap(t / np.asarray(end_a, np.float32)), 0).astype(np.float32)
    eb = np.where(only_b, _cap((one - t) / np.asarray(end_b, np.float32)), 0).astype(np.float32)
    return wa, wb, ea, eb


def _level(maps: np.ndarray, drops: np.ndarray | None, lower: np.ndarray, upper: np.ndarray,
           coef: tuple[np.ndarray, ...]) -> np.ndarray:
    """Interpolated level of one class on the filled slices (rows) from :func:`_coefficients`;
    ``lower`` and ``upper``: per row, the slots of its gap's ends."""
    wa, wb, ea, eb = coef
    level = wa[:, None, None] * maps[lower]
    level += wb[:, None, None] * maps[upper]
    if drops is not None:
        for erosion, slots in ((ea, lower), (eb, upper)):  # only on the slices where the class ends
            rows = np.flatnonzero(erosion)
            if rows.size:
                level[rows] -= erosion[rows, None, None] * drops[slots[rows]]
    return level


class _Group(NamedTuple):
    """A run of consecutive gaps read from the view: their annotated slices (*slots*, in slice
    order), cropped to the box of all their foreground grown by one voxel."""

    gaps: list[tuple[int, int]]
    stack: np.ndarray  # (slots, h, w): the annotated slices' labels inside the crop
    foreground: np.ndarray  # stack > 0
    rows: np.ndarray  # (slots, h): the rows holding foreground
    cols: np.ndarray  # (slots, w): the columns holding foreground
    area: np.ndarray  # (slots,): foreground voxels
    crop: tuple[slice, slice]  # where the crop lies in a slice of the view
    lower: np.ndarray  # per gap: the slot of its lower annotated slice
    upper: np.ndarray  # per gap: the slot of its upper annotated slice
    values: np.ndarray  # the labels present, sorted

    @property
    def has_foreground(self) -> np.ndarray:
        """Per slot: the slice holds foreground."""
        return self.rows.any(axis=1)


class _Maps(NamedTuple):
    """Signed distance maps of a group's slots inside its crop (see :func:`_class_maps`)."""

    foreground: np.ndarray  # (slots, h, w)
    labels: np.ndarray | None  # (labels, slots, h, w); None with a single label
    label_masks: np.ndarray  # (labels, slots, h, w)
    label_present: np.ndarray  # (labels, slots)
    near_box: np.ndarray  # (slots, 4): box of the slot's foreground and its neighbours' across its gaps
    far: float  # more than any distance in the crop


class _Matches(NamedTuple):
    """Foreground components (numbered over all slots) with an overlapping counterpart across their gap."""

    reaches_upper: np.ndarray  # per component at the lower end of a gap: overlaps foreground at its upper end
    reaches_lower: np.ndarray  # per component at the upper end of a gap: overlaps foreground at its lower end
    lone_lower: np.ndarray  # per gap: the lower end holds a component without counterpart
    lone_upper: np.ndarray  # per gap: the upper end does


class _EndingMaps(NamedTuple):
    """Maps of the gaps where foreground ends inside, one row per such gap (:func:`_ending_maps`)."""

    kept_lower: np.ndarray  # signed distances of the kept parts (with a counterpart) at the lower end
    kept_upper: np.ndarray  # the same at the upper end
    life_lower: np.ndarray  # lifetime of the voxels of lone parts at the lower end (0 elsewhere)
    life_upper: np.ndarray  # the same at the upper end
    has_kept: np.ndarray  # per gap: kept parts exist
    lone_lower: np.ndarray  # per gap: the lower end holds lone parts
    lone_upper: np.ndarray  # per gap: the upper end does


class _Endings(NamedTuple):
    """Which gaps of a group have foreground ending inside them, and those gaps' maps."""

    ending: np.ndarray  # per gap
    row: np.ndarray  # per gap: its row in ``maps`` (meaningful for ending gaps only)
    fractions: np.ndarray  # per gap: where a structure seen at the lower / upper end only ends (_end_fractions)
    maps: _EndingMaps | None  # None when no gap ends anything


class _Rows(NamedTuple):
    """Slices to fill, one row each."""

    gap: np.ndarray  # index of its gap in the group
    z: np.ndarray  # the slice in the view
    t: np.ndarray  # its fraction of the gap from the lower end (float32)


def _matched(components: np.ndarray, n: int, foreground: np.ndarray, lower: np.ndarray,
             upper: np.ndarray) -> _Matches:
    """Which components overlap foreground at the other end of their gap, for the gaps
    ``lower[i] -> upper[i]`` (slots of ``foreground``, foreground at both ends); ``components``:
    per-slice components, numbered slice by slice, ``n`` of them."""
    reaches_upper, reaches_lower = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    if lower.size:
        overlap = foreground[lower] & foreground[upper]
        reaches_upper[components[lower][overlap]] = True
        reaches_lower[components[upper][overlap]] = True
    reaches_upper[0] = reaches_lower[0] = True
    last = np.maximum.accumulate(components.reshape(components.shape[0], -1).max(axis=1))  # numbered by slice
    first = np.concatenate([[0], last[:-1]])
    missing_upper = np.concatenate([[0], np.cumsum(~reaches_upper[1:])])
    missing_lower = np.concatenate([[0], np.cumsum(~reaches_lower[1:])])
    return _Matches(reaches_upper, reaches_lower,
                    lone_lower=missing_upper[last[lower]] > missing_upper[first[lower]],
                    lone_upper=missing_lower[last[upper]] > missing_lower[first[upper]])


def _fill_group(view: np.ndarray, gaps: list[tuple[int, int]], *, sampling: tuple[float, ...],
                border: np.ndarray, extent: tuple[int, int] | None, chunk_values: int) -> None:
    """Fill the consecutive ``gaps`` at once, inside the box of their slices' foreground.

    The steps: read the annotated slices (:func:`_read_group`), their distance maps
    (:func:`_group_maps`), the gaps where foreground ends (:func:`_find_endings`) and the depths
    of the labels that end (:func:`_label_drops`); then, a few rows at a time, each filled
    slice's foreground (:func:`_fill_foreground`) and labels (:func:`_choose_labels`), as many
    rows as keep their maps within ``chunk_values`` values.
    """
    for a, b in gaps:
        view[a + 1:b] = 0
    group = _read_group(view, gaps)
    if group is None:
        return  # no foreground at either end of any gap: the gaps stay empty
    maps = _group_maps(group, sampling=sampling)
    endings = _find_endings(group, maps, sampling=sampling, border=border, extent=extent)
    label_drops = _label_drops(group, maps)
    rows = _rows_to_fill(group)
    _, h, w = group.stack.shape
    step = max(1, chunk_values // (h * w * (group.values.size + 3)))
    for start in range(0, rows.gap.size, step):
        chunk = _Rows(*(field[start:start + step] for field in rows))
        inside = _fill_foreground(group, maps, endings, chunk)
        chosen = _choose_labels(group, maps, label_drops, chunk)
        view[chunk.z, group.crop[0], group.crop[1]] = np.where(inside, chosen, 0).astype(view.dtype)


def _read_group(view: np.ndarray, gaps: list[tuple[int, int]]) -> _Group | None:
    """The annotated slices of ``gaps`` inside the box of their foreground; None when they hold none."""
    ends = sorted({s for gap in gaps for s in gap})
    slot = {s: i for i, s in enumerate(ends)}
    stack = view[ends]
    foreground = stack > 0
    rows, cols = foreground.any(axis=2), foreground.any(axis=1)
    if not rows.any():
        return None
    (row0,), (row1,) = _span(rows.any(axis=0)[None])
    (col0,), (col1,) = _span(cols.any(axis=0)[None])
    stack, foreground = stack[:, row0:row1, col0:col1], foreground[:, row0:row1, col0:col1]
    return _Group(gaps, stack, foreground, rows[:, row0:row1], cols[:, col0:col1],
                  area=np.count_nonzero(foreground, axis=(1, 2)), crop=(slice(row0, row1), slice(col0, col1)),
                  lower=np.array([slot[a] for a, _ in gaps]), upper=np.array([slot[b] for _, b in gaps]),
                  values=np.flatnonzero(np.bincount(stack[foreground])))


def _group_maps(group: _Group, *, sampling: tuple[float, ...]) -> _Maps:
    """Distance maps of the group's slots: the background's on each slot's own foreground box, the
    labels' on the box of the slot's and its neighbours' foreground (where the gaps use them)."""
    rows, cols, lower, upper = group.rows, group.cols, group.lower, group.upper
    own_box = np.stack([*_span(rows), *_span(cols)], axis=1)
    near_rows, near_cols = rows.copy(), cols.copy()  # each slot is the lower end of one gap at most
    near_rows[lower] |= rows[upper]
    near_cols[lower] |= cols[upper]
    near_rows[upper] |= rows[lower]
    near_cols[upper] |= cols[lower]
    near_box = np.stack([*_span(near_rows), *_span(near_cols)], axis=1)
    _, h, w = group.stack.shape
    far = 2 * (h * sampling[0] + w * sampling[1]) + 1  # more than any distance in the box
    fmap, lmaps, lmasks = _class_maps(group.stack, group.values, far=far, near_box=near_box, own_box=own_box,
                                      sampling=sampling)
    return _Maps(fmap, lmaps, lmasks, lmasks.any(axis=(2, 3)), near_box, far)


def _find_endings(group: _Group, maps: _Maps, *, sampling: tuple[float, ...], border: np.ndarray,
                  extent: tuple[int, int] | None) -> _Endings:
    """The gaps where (some) foreground ends inside: one end is empty, or holds a component
    with no overlapping counterpart at the other end (a topology change)."""
    has = group.has_foreground
    has_lower, has_upper = has[group.lower], has[group.upper]
    both = has_lower & has_upper
    components, n_components = ndimage.label(group.foreground, structure=_PLANE)
    matches = _matched(components, n_components, group.foreground, group.lower[both], group.upper[both])
    lone = np.zeros(len(group.gaps), bool)
    lone[both] = matches.lone_lower | matches.lone_upper
    ending = lone | (has_lower ^ has_upper)
    fractions = np.array([_end_fractions(a, b, border=border, extent=extent) for a, b in group.gaps], np.float32)
    ending_maps = None
    if ending.any():
        ending_maps = _ending_maps(maps, group.foreground, components, n_components, matches,
                                   group.lower[ending], group.upper[ending], sampling=sampling)
    return _Endings(ending, np.cumsum(ending) - 1, fractions, ending_maps)


def _label_drops(group: _Group, maps: _Maps) -> np.ndarray | None:
    """Depths (:func:`_drops`) of each label on the slots where it ends inside a gap (present at
    one end only), for its ending erosion; None with a single label or when no label ends."""
    if maps.labels is None:
        return None
    present, lower, upper = maps.label_present, group.lower, group.upper
    needed = np.zeros(present.shape, bool)
    needed[:, lower] |= present[:, lower] & ~present[:, upper]
    needed[:, upper] |= present[:, upper] & ~present[:, lower]
    if not needed.any():
        return None
    drops = np.zeros(maps.labels.shape, np.float32)
    drops[needed] = _drops(maps.labels[needed], maps.label_masks[needed])
    return drops


def _rows_to_fill(group: _Group) -> _Rows:
    """Every slice inside the group's gaps, except those of gaps empty at both ends (left at zero)."""
    has = group.has_foreground
    sizes = np.array([b - a - 1 for a, b in group.gaps])
    sizes[~(has[group.lower] | has[group.upper])] = 0
    gap = np.repeat(np.arange(len(group.gaps)), sizes)
    if gap.size == 0:
        return _Rows(gap, gap, gap.astype(np.float32))
    z = np.concatenate([np.arange(a + 1, b) for (a, b), n_z in zip(group.gaps, sizes, strict=True) if n_z])
    lower = np.array([a for a, _ in group.gaps])[gap]
    return _Rows(gap, z, ((z - lower) / (sizes[gap] + 1)).astype(np.float32))


def _fill_foreground(group: _Group, maps: _Maps, endings: _Endings, rows: _Rows) -> np.ndarray:
    """Foreground of the filled slices ``rows``: the voxels with the highest linear blend of the two
    ends' signed distances, as many as the area blended linearly (:func:`_top_rows`), or, in gaps
    where foreground ends, :func:`_ending_inside`."""
    lower, upper, t = group.lower[rows.gap], group.upper[rows.gap], rows.t
    inside = np.empty((rows.gap.size, *group.stack.shape[1:]), bool)
    linear = ~endings.ending[rows.gap]
    if linear.any():
        t3 = t[linear, None, None]
        level = (1 - t3) * maps.foreground[lower[linear]]
        level += t3 * maps.foreground[upper[linear]]
        area = (1 - t[linear]) * group.area[lower[linear]] + t[linear] * group.area[upper[linear]]
        inside[linear] = _top_rows(level, area, rows=_span((group.rows[lower] | group.rows[upper])[linear]),
                                   cols=_span((group.cols[lower] | group.cols[upper])[linear]))
    if not linear.all():
        ends = ~linear
        gap = rows.gap[ends]
        inside[ends] = _ending_inside(endings.maps, endings.row[gap], t[ends], endings.fractions[gap])
    return inside


def _choose_labels(group: _Group, maps: _Maps, label_drops: np.ndarray | None, rows: _Rows) -> np.ndarray:
    """Label of each voxel of the filled slices ``rows``: the one with the largest interpolated
    signed distance among the labels present at either end of its gap, ties to the first."""
    if maps.labels is None:
        return group.values[0]
    lower, upper, present_at = group.lower[rows.gap], group.upper[rows.gap], maps.label_present
    best = chosen = None
    for j, value in enumerate(group.values):
        present = present_at[j, lower] | present_at[j, upper]
        if not present.any():
            continue
        level = _level(maps.labels[j], None if label_drops is None else label_drops[j], lower, upper,
                       _coefficients(rows.t, present_at[j, lower], present_at[j, upper], _LABEL_END, _LABEL_END))
        if not present.all():
            level[~present] = -np.inf
        if best is None:
            best, chosen = level, np.full(level.shape, value)
        else:
            better = level > best
            np.copyto(best, level, where=better)
            chosen[better] = value
    return chosen


def _ending_maps(maps: _Maps, foreground: np.ndarray, components: np.ndarray, n_components: int,
                 matches: _Matches, lower: np.ndarray, upper: np.ndarray, *,
                 sampling: tuple[float, ...]) -> _EndingMaps:
    """Maps of the gaps ``lower[i] -> upper[i]`` (slots) where foreground ends inside: one end is
    empty, or holds components without counterpart at the other end (a topology change).

    Components with a counterpart (kept) are interpolated with it: linear signed distances of
    the kept parts, which equal the foreground's where a side has no other part, and otherwise
    take one transform of the kept part. The others (lone) end inside the gap: their level is
    the foreground distance eroded by their depth (:func:`_cap`), and only counts inside them,
    so each lone voxel has a lifetime: it is inside while ``x < 1 - (1 - d / depth) ** 2``
    (``d`` its distance, ``x`` as for :func:`_cap`), which is ``d > depth * cap(x)`` solved for ``x``.
    """
    fmap = maps.foreground
    comp_lower, comp_upper = components[lower], components[upper]
    kept_lower = matches.reaches_upper[comp_lower] & foreground[lower]  # empty where the other side is empty
    kept_upper = matches.reaches_lower[comp_upper] & foreground[upper]
    lone_lower, lone_upper = foreground[lower] & ~kept_lower, foreground[upper] & ~kept_upper
    has_kept = kept_lower.any(axis=(1, 2))
    depth = np.zeros(n_components + 1, np.float32)
    np.maximum.at(depth, components[foreground], fmap[foreground])
    maps_lower, maps_upper = fmap[lower], fmap[upper]
    partial = np.concatenate([has_kept & lone_lower.any(axis=(1, 2)), has_kept & lone_upper.any(axis=(1, 2))])
    if partial.any():  # a kept part beside lone parts: its own signed distance outside it
        kept = np.concatenate([kept_lower, kept_upper])[partial]
        box = np.concatenate([maps.near_box[lower], maps.near_box[upper]])[partial]
        dist = _nearest(kept, sampling=sampling, boxes=box, present=np.ones(kept.shape[0], bool), far=maps.far)
        both = np.concatenate([maps_lower, maps_upper])
        both[partial] = np.where(kept, both[partial], -dist)
        maps_lower, maps_upper = both[:lower.size], both[lower.size:]
    life = []
    for lone, slots, comps in ((lone_lower, lower, comp_lower), (lone_upper, upper, comp_upper)):
        share = np.divide(fmap[slots], depth[comps], out=np.zeros(lone.shape, np.float32), where=lone)
        life.append(np.where(lone, 1 - (1 - share) ** 2, 0).astype(np.float32))
    return _EndingMaps(maps_lower, maps_upper, life[0], life[1], has_kept,
                       lone_lower.any(axis=(1, 2)), lone_upper.any(axis=(1, 2)))


def _ending_inside(maps: _EndingMaps, index: np.ndarray, t: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Foreground of filled slices of ending gaps: where the kept parts' linear blend is positive
    or a lone part is still alive (``index``: row of each slice's gap in ``maps``; ``ends``: per
    slice, its gap's end fractions from the lower and the upper end)."""
    inside = np.zeros((t.size, *maps.kept_lower.shape[1:]), bool)
    rows = np.flatnonzero(maps.has_kept[index])
    if rows.size:
        t3 = t[rows, None, None]
        inside[rows] = (1 - t3) * maps.kept_lower[index[rows]] + t3 * maps.kept_upper[index[rows]] > 0
    for life, lone, x in ((maps.life_lower, maps.lone_lower, t / ends[:, 0]),
                          (maps.life_upper, maps.lone_upper, (1 - t) / ends[:, 1])):
        rows = np.flatnonzero(lone[index])
        if rows.size:
            inside[rows] |= life[index[rows]] > x[rows, None, None]
    return inside


def _top_rows(level: np.ndarray, area: np.ndarray, *, rows: tuple[np.ndarray, np.ndarray],
              cols: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Per slice, the ``area`` voxels with the highest ``level`` inside its gap's box (``rows`` and
    ``cols``: start and stop per slice); ties at the threshold are all kept, so the result is
    symmetric and may exceed ``area`` by the voxels tied there."""
    n_rows, h, w = level.shape
    box = (((np.arange(h) >= rows[0][:, None]) & (np.arange(h) < rows[1][:, None]))[:, :, None]
           & ((np.arange(w) >= cols[0][:, None]) & (np.arange(w) < cols[1][:, None]))[:, None, :])
    flat = np.where(box, level, -np.inf).reshape(n_rows, -1)
    n = np.minimum(np.rint(area).astype(np.int64), box.reshape(n_rows, -1).sum(axis=1))
    ordered = np.sort(flat, axis=1)
    threshold = ordered[np.arange(n_rows), flat.shape[1] - np.maximum(n, 1)]
    return (flat >= threshold[:, None]).reshape(level.shape) & (n > 0)[:, None, None]
