"""Shape-based (signed distance) interpolation between annotated slices: the ``sdf`` method.

See :mod:`sparseslice.interpolate` for what the method does; this module holds the
machinery. Everything works on a label array whose first axis is the slice axis (``view``),
one gap (two consecutive annotated slices) at a time, inside the bounding box of the two
slices' foreground.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy import ndimage

_CHUNK_VALUES = 1 << 24  # float32 values held at once while filling one gap (64 MB)
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


def _profile(da: np.ndarray | None, ma: np.ndarray, db: np.ndarray | None, mb: np.ndarray,
             ends: tuple[float, float]) -> Callable[[np.ndarray], np.ndarray]:
    """Signed distance of one class across a gap, as a function of the gap fraction ``t``.

    ``da``/``db`` are the class's signed distances on the two annotated slices (None where the
    class is absent), ``ma``/``mb`` its masks. Present on both sides: linear interpolation.
    Present on one side only: :func:`_ending`.
    """
    if da is not None and db is not None:
        def linear(t: np.ndarray) -> np.ndarray:
            return (1 - t) * da + t * db

        linear.linear = True  # type: ignore[attr-defined]
        return linear
    if da is not None:
        return _ending(da, ma, from_a=True, end=ends[0])
    return _ending(db, mb, from_a=False, end=ends[1])


def _ending(dist: np.ndarray, mask: np.ndarray, *, from_a: bool, end: float) -> Callable[[np.ndarray], np.ndarray]:
    """Profile of a shape seen on one side of a gap only: it ends inside the gap.

    Each connected component is eroded by ``depth * cap(x)``, ``depth`` being its deepest
    distance and ``x`` the fraction of the gap from the side that shows it divided by ``end``,
    so it vanishes at fraction ``end``. The round-cap profile ``cap(x) = 1 - sqrt(1 - x)``
    keeps the section large until close to the end, as rounded anatomical ends do.
    """
    components, n = ndimage.label(mask)
    depth = np.asarray(ndimage.maximum(dist, components, np.arange(1, n + 1)), np.float32)
    drop = np.concatenate([[depth.max()], depth])[components]

    def at(t: np.ndarray) -> np.ndarray:
        x = (t if from_a else 1 - t) / np.float32(end)
        return dist - _cap(x) * drop

    return at


def _cap(x: np.ndarray) -> np.ndarray:
    """Erosion profile towards a structure's end: 0 at the last slice seen, 1 (gone) at x = 1."""
    return np.where(x < 1, 1 - np.sqrt(np.clip(1 - x, 0, 1)), 1 + x).astype(np.float32)


def _foreground_profile(da: np.ndarray | None, ma: np.ndarray, db: np.ndarray | None, mb: np.ndarray,
                        ends: tuple[float, float], *,
                        sampling: tuple[float, ...]) -> Callable[[np.ndarray], np.ndarray]:
    """Foreground across a gap, with topology changes handled component by component.

    A connected component that overlaps foreground on the other side is interpolated with it
    (linear signed distances); one that overlaps nothing there is a structure that ends (or
    starts) inside the gap and gets :func:`_ending`'s profile instead of being pulled towards
    a distant shape. The union of the parts is their maximum.
    """
    if da is None or db is None:
        return _profile(da, ma, db, mb, ends)
    keep_a, keep_b = _overlapping(ma, mb), _overlapping(mb, ma)
    lone_a, lone_b = ma & ~keep_a, mb & ~keep_b
    if not (lone_a.any() or lone_b.any()):
        return _profile(da, ma, db, mb, ends)
    parts = []
    if keep_a.any():  # then keep_b.any() too: overlap is symmetric
        ka, kb = (signed_distance(m, sampling=sampling) for m in (keep_a, keep_b))
        parts.append(lambda t: (1 - t) * ka + t * kb)
    if lone_a.any():
        parts.append(_ending(signed_distance(lone_a, sampling=sampling), lone_a, from_a=True, end=ends[0]))
    if lone_b.any():
        parts.append(_ending(signed_distance(lone_b, sampling=sampling), lone_b, from_a=False, end=ends[1]))
    return lambda t: np.maximum.reduce([part(t) for part in parts])


def _overlapping(mask: np.ndarray, other: np.ndarray) -> np.ndarray:
    """The connected components of ``mask`` that share at least one voxel with ``other``."""
    if not (mask & ~other).any():
        return mask
    components, n = ndimage.label(mask)
    hit = np.zeros(n + 1, bool)
    hit[np.unique(components[mask & other])] = True
    hit[0] = False
    return hit[components]


def _top(level: np.ndarray, area: float) -> np.ndarray:
    """The ``area`` voxels with the highest ``level``; ties at the threshold are all kept, so the
    result is symmetric and may exceed ``area`` by the voxels tied there."""
    n = int(round(float(area)))
    if n <= 0:
        return np.zeros(level.shape, bool)
    flat = level.ravel()
    n = min(n, flat.size)
    return level >= np.partition(flat, flat.size - n)[flat.size - n]


def _box(mask: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of a 2D mask grown by one voxel (clipped to the slice), or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return (slice(max(rows[0] - 1, 0), min(rows[-1] + 2, mask.shape[0])),
            slice(max(cols[0] - 1, 0), min(cols[-1] + 2, mask.shape[1])))


def fill_sdf(view: np.ndarray, gaps: list[tuple[int, int]], *, sampling: tuple[float, ...],
              border: np.ndarray, extent: tuple[int, int] | None) -> None:
    """Fill the gaps of ``view`` (slice axis first) by shape-based interpolation, gap by gap.

    Each annotated slice's distance maps are computed once, on the box holding its foreground
    and its two neighbours' plus one voxel of background: inside that box they equal the
    whole slice's (the interpolated shape never leaves the union of the two slices'
    foreground; the image edge is not background). Maps are dropped as soon as both gaps
    touching their slice are filled, so memory stays at a few slices.
    """
    linked: dict[int, list[int]] = {}
    for a, b in gaps:
        linked.setdefault(a, []).append(b)
        linked.setdefault(b, []).append(a)
    cache: dict[int, tuple[tuple[slice, slice], dict[int, np.ndarray]]] = {}

    def distance(s: int, value: int, box: tuple[slice, slice]) -> np.ndarray:
        if s not in cache:
            union = view[s] > 0
            for other in linked[s]:
                union |= view[other] > 0
            cache[s] = (_box(union), {})
        big, maps = cache[s]
        if value not in maps:
            region = view[s][big]
            maps[value] = signed_distance(region > 0 if value == 0 else region == value, sampling=sampling)
        return maps[value][tuple(slice(g.start - o.start, g.stop - o.start) for g, o in zip(box, big, strict=True))]

    for a, b in gaps:
        ca, cb = view[a], view[b]
        box = _box((ca > 0) | (cb > 0))
        view[a + 1:b] = 0
        if box is not None:
            _fill_gap(view, a, b, box, distance, sampling=sampling,
                      ends=_end_fractions(a, b, border=border, extent=extent))
        cache.pop(a, None)


def _fill_gap(view: np.ndarray, a: int, b: int, box: tuple[slice, slice], distance: Callable[..., np.ndarray], *,
              sampling: tuple[float, ...], ends: tuple[float, float]) -> None:
    """Fill slices ``a+1 .. b-1`` inside ``box`` from the profiles of the foreground and labels.

    When every component has a counterpart across the gap, each slice's foreground is the
    ``(1 - t) * area_a + t * area_b`` voxels with the highest interpolated distance (area
    kept linear, see the module docstring); otherwise it is where the profile is positive.
    """
    ca, cb = view[a][box], view[b][box]
    ma, mb = ca > 0, cb > 0
    fg = _foreground_profile(distance(a, 0, box) if ma.any() else None, ma,
                             distance(b, 0, box) if mb.any() else None, mb, ends, sampling=sampling)
    present = np.union1d(np.unique(ca), np.unique(cb))
    present = present[present > 0]
    per_label = []
    if present.size > 1:
        for v in present:
            la, lb = ca == v, cb == v
            per_label.append(_profile(distance(a, int(v), box) if la.any() else None, la,
                                      distance(b, int(v), box) if lb.any() else None, lb, (_LABEL_END, _LABEL_END)))
    t_all = (np.arange(a + 1, b, dtype=np.float32) - a) / np.float32(b - a)
    step = max(1, _CHUNK_VALUES // (ca.size * (len(per_label) + 1)))
    keep_area = getattr(fg, "linear", False)  # one shape on each side, matched
    for start in range(0, t_all.size, step):
        t = t_all[start:start + step, None, None]
        level = fg(t)
        if keep_area:
            inside = np.stack([_top(lv, (1 - ti) * ma.sum() + ti * mb.sum()) for lv, ti in zip(level, t.ravel(),
                                                                                                 strict=True)])
        else:
            inside = level > 0
        chosen = present[np.argmax(np.stack([p(t) for p in per_label]), axis=0)] if per_label else present[0]
        z0 = a + 1 + start
        view[z0:z0 + t.shape[0], box[0], box[1]] = np.where(inside, chosen, 0).astype(view.dtype)
