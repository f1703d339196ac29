"""Shape-based (signed distance) interpolation between annotated slices: the ``sdf`` method.

See :mod:`sparseslice.interpolate` for what the method does; this module holds the
machinery. Everything works on a label array whose first axis is the slice axis (``view``),
on runs of consecutive gaps (a gap: two consecutive annotated slices and the slices between)
whose maps fit in ``_CHUNK_VALUES``, inside the bounding box of their slices' foreground.

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


try:  # the C routine behind scipy.ndimage.distance_transform_edt, without its per-call overhead
    from scipy.ndimage._nd_image import euclidean_feature_transform as _feature_transform
except ImportError:  # pragma: no cover - private scipy API moved: use the public function
    _feature_transform = None

_PLANE = np.zeros((3, 3, 3), bool)
_PLANE[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity inside each slice of a stack


def fill_sdf(view: np.ndarray, gaps: list[tuple[int, int]], *, sampling: tuple[float, ...],
             border: np.ndarray, extent: tuple[int, int] | None) -> None:
    """Fill the gaps of ``view`` (slice axis first) by shape-based interpolation.

    Consecutive gaps are filled together, as many as keep the annotated slices' maps within
    ``_CHUNK_VALUES`` values (a whole hippocampus volume at once, a few slices of a 512x512
    CT), so the per-gap work is a handful of array operations over all filled slices instead
    of a Python loop. Each annotated slice's distance maps are computed once, on the box
    holding its foreground and its neighbours' plus one voxel of background: inside that box
    they equal the whole slice's (the image edge is not background).
    """
    per_slice = view.shape[1] * view.shape[2] * 12  # float32 maps, int32 feature indices
    group: list[tuple[int, int]] = []
    ends: set[int] = set()
    for gap in gaps:
        if group and len(ends | set(gap)) * per_slice > _CHUNK_VALUES:
            _fill_group(view, group, sampling=sampling, border=border, extent=extent)
            group, ends = [], set()
        group.append(gap)
        ends |= set(gap)
    if group:
        _fill_group(view, group, sampling=sampling, border=border, extent=extent)


def _span(present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """First index and one past the last of each row of ``present`` (rows with a True), grown by one
    voxel on each side and clipped to the row."""
    n = present.shape[-1]
    first = np.argmax(present, axis=-1)
    last = n - 1 - np.argmax(present[..., ::-1], axis=-1)
    return np.maximum(first - 1, 0), np.minimum(last + 2, n)


def _nearest(features: np.ndarray, *, sampling: tuple[float, ...], boxes: np.ndarray | None = None,
             present: np.ndarray | None = None, far: float = np.inf) -> np.ndarray:
    """Distance in mm from each voxel to the nearest True voxel of its 2D slice, for a stack of
    slices ``(n, h, w)``.

    Scipy's exact Euclidean feature transform, run slice by slice, with the distances computed
    once for the whole stack exactly as ``scipy.ndimage.distance_transform_edt`` computes them
    (the per-call overhead is most of the cost on small slices). ``boxes`` (``n x 4``: row
    start, stop, column start, stop) limits each slice's transform to a box: distances are to
    the nearest True voxel inside it, exact wherever that is the nearest overall (everywhere
    when the box holds all True voxels). Voxels outside the box, and slices without a True
    voxel in it, get ``far``. ``present`` (per slice: a True voxel lies in its box) saves
    looking; slices it marks False are skipped.
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
        if _feature_transform is None:
            ndimage.distance_transform_edt(zeros[i, r0:r1, c0:c1], sampling=spacing, return_distances=False,
                                           return_indices=True, indices=ft[i, :, r0:r1, c0:c1])
        else:
            _feature_transform(zeros[i, r0:r1, c0:c1], spacing, ft[i, :, r0:r1, c0:c1])
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
                sampling: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Signed distances of the foreground and (with several labels) of each label, per slice.

    One transform per class present on a slice (background and each label: the distance to its
    nearest voxel) gives them all: inside a set, the distance to the nearest voxel outside it is
    the smallest distance to a class not in the set. Equal to :func:`signed_distance` of each
    mask, with half the transforms. The background transform runs on the box of the slice's
    foreground (``own_box``, grown by one voxel), where it is used; the labels' on the box of
    the foreground of the slice and its neighbours (``near_box``), where the gaps use them.
    Elsewhere, and for absent classes, distances are ``far``, more than any in the box.
    Also returns the label masks ``(labels, slices, h, w)``.
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
                    present=present.reshape(-1), far=far).reshape(features.shape)
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


def _level(maps: np.ndarray, drops: np.ndarray | None, ia: np.ndarray, ib: np.ndarray,
           coef: tuple[np.ndarray, ...]) -> np.ndarray:
    """Interpolated level of one class on the filled slices (rows) from :func:`_coefficients`."""
    wa, wb, ea, eb = coef
    level = wa[:, None, None] * maps[ia]
    level += wb[:, None, None] * maps[ib]
    if drops is not None:
        for erosion, slots in ((ea, ia), (eb, ib)):  # only on the slices where the class ends
            rows = np.flatnonzero(erosion)
            if rows.size:
                level[rows] -= erosion[rows, None, None] * drops[slots[rows]]
    return level


def _matched(comp: np.ndarray, n: int, fg: np.ndarray, ia: np.ndarray, ib: np.ndarray) -> tuple[np.ndarray, ...]:
    """For gaps ``ia[i] -> ib[i]`` (slots of ``fg``, foreground on both), which components
    (``comp``: per-slice components, numbered slice by slice) overlap foreground at the other
    end: ``right`` for components seen as the left end of a gap, ``left`` as the right end.
    Also, per gap, whether the left and the right end hold a component without counterpart."""
    right, left = np.zeros(n + 1, bool), np.zeros(n + 1, bool)
    if ia.size:
        overlap = fg[ia] & fg[ib]
        right[comp[ia][overlap]] = True
        left[comp[ib][overlap]] = True
    right[0] = left[0] = True
    last = np.maximum.accumulate(comp.reshape(comp.shape[0], -1).max(axis=1))  # components numbered by slice
    first = np.concatenate([[0], last[:-1]])
    missing_right = np.concatenate([[0], np.cumsum(~right[1:])])
    missing_left = np.concatenate([[0], np.cumsum(~left[1:])])
    lone_a = missing_right[last[ia]] > missing_right[first[ia]]
    lone_b = missing_left[last[ib]] > missing_left[first[ib]]
    return right, left, lone_a, lone_b


def _fill_group(view: np.ndarray, group: list[tuple[int, int]], *, sampling: tuple[float, ...],
                border: np.ndarray, extent: tuple[int, int] | None) -> None:
    """Fill the gaps of ``group`` (consecutive) at once, inside the box of their slices' foreground."""
    for a, b in group:
        view[a + 1:b] = 0
    ends = sorted({s for gap in group for s in gap})
    slot = {s: i for i, s in enumerate(ends)}
    stack = view[ends]
    fg = stack > 0
    rows_any, cols_any = fg.any(axis=2), fg.any(axis=1)
    if not rows_any.any():
        return
    (br0,), (br1,) = _span(rows_any.any(axis=0)[None])
    (bc0,), (bc1,) = _span(cols_any.any(axis=0)[None])
    stack, fg = stack[:, br0:br1, bc0:bc1], fg[:, br0:br1, bc0:bc1]
    rows_any, cols_any = rows_any[:, br0:br1], cols_any[:, bc0:bc1]
    m, h, w = stack.shape
    values = np.flatnonzero(np.bincount(stack[fg]))  # labels present, sorted
    ia = np.array([slot[a] for a, _ in group])
    ib = np.array([slot[b] for _, b in group])
    own_r, own_c = _span(rows_any), _span(cols_any)
    near_r, near_c = rows_any.copy(), cols_any.copy()  # each slot is the left end of one gap at most
    near_r[ia] |= rows_any[ib]
    near_c[ia] |= cols_any[ib]
    near_r[ib] |= rows_any[ia]
    near_c[ib] |= cols_any[ia]
    near_box = np.stack([*_span(near_r), *_span(near_c)], axis=1)
    far = 2 * (h * sampling[0] + w * sampling[1]) + 1  # more than any distance in the box
    fmap, lmaps, lmasks = _class_maps(stack, values, far=far, near_box=near_box,
                                      own_box=np.stack([*own_r, *own_c], axis=1), sampling=sampling)

    has = rows_any.any(axis=1)
    has_a, has_b = has[ia], has[ib]
    both = has_a & has_b
    comp, n_comp = ndimage.label(fg, structure=_PLANE)
    right, left, lone_a, lone_b = _matched(comp, n_comp, fg, ia[both], ib[both])
    lone = np.zeros(len(group), bool)
    lone[both] = lone_a | lone_b
    ending = lone | (has_a ^ has_b)  # gaps where (some) foreground ends inside
    ends_ab = np.array([_end_fractions(a, b, border=border, extent=extent) for a, b in group], np.float32)
    ending_maps = None
    if ending.any():
        ending_maps = _ending_maps(fmap, fg, comp, n_comp, right, left, ia[ending], ib[ending], near_box,
                                   sampling=sampling, far=far)
    ldrops = None
    if lmaps is not None:
        lhas = lmasks.any(axis=(2, 3))  # (labels, slots)
        needed = np.zeros(lhas.shape, bool)
        needed[:, ia] |= lhas[:, ia] & ~lhas[:, ib]
        needed[:, ib] |= lhas[:, ib] & ~lhas[:, ia]
        if needed.any():
            ldrops = np.zeros(lmaps.shape, np.float32)
            ldrops[needed] = _drops(lmaps[needed], lmasks[needed])
    area = np.count_nonzero(fg, axis=(1, 2))

    sizes = np.array([b - a - 1 for a, b in group])
    sizes[~(has_a | has_b)] = 0  # both ends empty: already zero
    gap_of = np.repeat(np.arange(len(group)), sizes)
    if gap_of.size == 0:
        return
    z_all = np.concatenate([np.arange(a + 1, b) for (a, b), n_z in zip(group, sizes, strict=True) if n_z])
    a_all = np.array([a for a, _ in group])[gap_of]
    t_all = ((z_all - a_all) / (sizes[gap_of] + 1)).astype(np.float32)
    ending_row = np.cumsum(ending) - 1  # gap -> row of the ending gaps' maps
    step = max(1, _CHUNK_VALUES // (h * w * (values.size + 3)))
    for start in range(0, gap_of.size, step):
        g, z, t = gap_of[start:start + step], z_all[start:start + step], t_all[start:start + step]
        sa, sb = ia[g], ib[g]
        inside = np.empty((g.size, h, w), bool)
        linear = ~ending[g]
        if linear.any():
            t3 = t[linear, None, None]
            level = (1 - t3) * fmap[sa[linear]]
            level += t3 * fmap[sb[linear]]
            inside[linear] = _top_rows(level, (1 - t[linear]) * area[sa[linear]] + t[linear] * area[sb[linear]],
                                       rows=_span((rows_any[sa] | rows_any[sb])[linear]),
                                       cols=_span((cols_any[sa] | cols_any[sb])[linear]))
        if not linear.all():
            rows = ~linear
            inside[rows] = _ending_inside(ending_maps, ending_row[g[rows]], t[rows], ends_ab[g[rows]])
        if lmaps is None:
            chosen = values[0]
        else:
            best = chosen = None
            for j in range(values.size):  # argmax over the labels present in the gap, ties to the first
                present = lhas[j, sa] | lhas[j, sb]
                if not present.any():
                    continue
                level = _level(lmaps[j], None if ldrops is None else ldrops[j], sa, sb,
                               _coefficients(t, lhas[j, sa], lhas[j, sb], _LABEL_END, _LABEL_END))
                if not present.all():
                    level[~present] = -np.inf
                if best is None:
                    best, chosen = level, np.full(level.shape, values[j])
                else:
                    better = level > best
                    np.copyto(best, level, where=better)
                    chosen[better] = values[j]
        view[z, br0:br1, bc0:bc1] = np.where(inside, chosen, 0).astype(view.dtype)


def _ending_maps(fmap: np.ndarray, fg: np.ndarray, comp: np.ndarray, n_comp: int, right: np.ndarray,
                 left: np.ndarray, ia: np.ndarray, ib: np.ndarray, boxes: np.ndarray, *,
                 sampling: tuple[float, ...], far: float) -> tuple[np.ndarray, ...]:
    """Maps of the gaps where foreground ends inside: one end is empty, or holds components
    without counterpart at the other end (a topology change).

    Components with a counterpart (kept) are interpolated with it: linear signed distances of
    the kept parts, which equal the foreground's where a side has no other part, and otherwise
    take one transform of the kept part. The others (lone) end inside the gap: their level is
    the foreground distance eroded by their depth (:func:`_cap`), and only counts inside them,
    so each lone voxel has a lifetime: it is inside while ``x < 1 - (1 - d / depth) ** 2``
    (``d`` its distance, ``x`` as for :func:`_cap`), which is ``d > depth * cap(x)`` solved for ``x``.
    Returns, side a then b: kept maps and lone lifetimes (0 outside lone parts), and per gap
    whether kept parts exist and whether each side has lone parts.
    """
    ca, cb = comp[ia], comp[ib]
    kept_a, kept_b = right[ca] & fg[ia], left[cb] & fg[ib]  # empty where the other side is empty
    lone_a, lone_b = fg[ia] & ~kept_a, fg[ib] & ~kept_b
    has_kept = kept_a.any(axis=(1, 2))
    depth = np.zeros(n_comp + 1, np.float32)
    np.maximum.at(depth, comp[fg], fmap[fg])
    maps_a, maps_b = fmap[ia], fmap[ib]
    partial = np.concatenate([has_kept & lone_a.any(axis=(1, 2)), has_kept & lone_b.any(axis=(1, 2))])
    if partial.any():  # a kept part beside lone parts: its own signed distance outside it
        kept = np.concatenate([kept_a, kept_b])[partial]
        box = np.concatenate([boxes[ia], boxes[ib]])[partial]
        dist = _nearest(kept, sampling=sampling, boxes=box, present=np.ones(kept.shape[0], bool), far=far)
        maps = np.concatenate([maps_a, maps_b])
        maps[partial] = np.where(kept, maps[partial], -dist)
        maps_a, maps_b = maps[:ia.size], maps[ia.size:]
    life = []
    for lone, slots, comps in ((lone_a, ia, ca), (lone_b, ib, cb)):
        share = np.divide(fmap[slots], depth[comps], out=np.zeros(lone.shape, np.float32), where=lone)
        life.append(np.where(lone, 1 - (1 - share) ** 2, 0).astype(np.float32))
    return maps_a, maps_b, life[0], life[1], has_kept, lone_a.any(axis=(1, 2)), lone_b.any(axis=(1, 2))


def _ending_inside(maps: tuple[np.ndarray, ...], index: np.ndarray, t: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """Foreground of filled slices of ending gaps: where the kept parts' linear blend is positive
    or a lone part is still alive (``index``: row of each slice's gap in ``maps``)."""
    kept_a, kept_b, life_a, life_b, has_kept, lone_a, lone_b = maps
    inside = np.zeros((t.size, *kept_a.shape[1:]), bool)
    rows = np.flatnonzero(has_kept[index])
    if rows.size:
        t3 = t[rows, None, None]
        inside[rows] = (1 - t3) * kept_a[index[rows]] + t3 * kept_b[index[rows]] > 0
    for life, lone, x in ((life_a, lone_a, t / ends[:, 0]), (life_b, lone_b, (1 - t) / ends[:, 1])):
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
