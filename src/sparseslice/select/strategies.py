"""Which slices of one volume to annotate: ``random``, ``interval``, ``ual`` and ``block``.

Every strategy picks ``k`` distinct slices from an inclusive range ``[lo, hi]`` (the extent
when it is known, otherwise the whole volume) and returns them sorted. All randomness comes
from the ``rng`` passed in, so the same generator state gives the same slices.

The strategies are registered by name in ``SELECTORS``, each a :data:`Selector` with one
shared signature; ``STRATEGIES`` (the names, in the order help texts list them), the CLI's
``--strategy`` choices and the study spec read it, so a new strategy is one function plus
one entry.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from sparseslice.errors import UserError, unknown_choice
from sparseslice.io import check_axis

#: Voxels of the float64 slices an encoder holds at once (32 MiB).
CHUNK_VOXELS = 2**22

#: An encoder maps an image array (channels last, if any) and the slice axis to one feature
#: row per slice: ``encoder(image, axis) -> (n_slices, n_features)``.
SliceEncoder = Callable[[np.ndarray, int], np.ndarray]


def _check_request(k: int, lo: int, hi: int, strategy: str) -> int:
    if hi < lo:
        raise UserError(f"slice range must satisfy lo <= hi, got ({lo}, {hi}); pass a valid extent")
    available = hi - lo + 1
    if not 1 <= k <= available:
        raise UserError(f"{strategy} was asked for {k} slices but the range [{lo}, {hi}] holds "
                        f"{available}; ask for 1 to {available} slices (lower rho or spread the budget "
                        "over more volumes)")
    return available


def random_slices(k: int, lo: int, hi: int, *, rng: np.random.Generator) -> tuple[int, ...]:
    """``k`` slices drawn uniformly without replacement from ``[lo, hi]``.

    Examples
    --------
    >>> random_slices(3, 0, 9, rng=np.random.default_rng(0))
    (5, 6, 9)
    """
    _check_request(k, lo, hi, "random")
    picked = rng.choice(np.arange(lo, hi + 1), size=k, replace=False)
    return tuple(sorted(int(s) for s in picked))


def interval_slices(k: int, lo: int, hi: int, *, rng: np.random.Generator) -> tuple[int, ...]:
    """``k`` evenly spaced slices over ``[lo, hi]`` with a random offset.

    The step is ``L / k`` for ``L = hi - lo + 1`` slices and the offset ``u`` is uniform in
    ``[0, L / k)``; slice ``i`` is ``lo + floor(u + i * L / k)``. Gaps between consecutive
    slices are therefore ``floor(L / k)`` or ``ceil(L / k)``: they differ by at most one and
    the whole range is covered evenly (a fixed integer interval would leave the end uncovered).

    Examples
    --------
    >>> interval_slices(4, 0, 19, rng=np.random.default_rng(0))
    (3, 8, 13, 18)
    """
    length = _check_request(k, lo, hi, "interval")
    step = length / k
    offset = rng.uniform(0.0, step)
    idx = np.floor(offset + np.arange(k) * step).astype(int)
    idx = np.minimum(idx, length - 1)  # guards float round-off at the top end
    return tuple(int(lo + i) for i in idx)


def block_slices(k: int, lo: int, hi: int, *, rng: np.random.Generator) -> tuple[int, ...]:
    """``k`` consecutive slices around a random slice of ``[lo, hi]``, clamped to the range.

    Specktor-Fadida et al.: a slice is drawn uniformly inside the structure's extent and a
    block centred on it is annotated; a block that would cross an end of the extent is
    shifted back inside it (so blocks near the ends are not shortened).

    Examples
    --------
    >>> block_slices(3, 0, 9, rng=np.random.default_rng(0))
    (7, 8, 9)
    """
    _check_request(k, lo, hi, "block")
    centre = int(rng.integers(lo, hi + 1))
    start = min(max(centre - (k - 1) // 2, lo), hi - k + 1)
    return tuple(range(start, start + k))


def default_slice_encoder(image: np.ndarray, axis: int, *, size: int = 16, components: int = 16) -> np.ndarray:
    """Per-slice features: intensity-normalised, downsampled slice projected by PCA.

    Each slice (all channels) is z-scored with the volume's robust statistics (median and
    inter-quartile range, estimated on every 8th voxel, so slices stay comparable),
    resampled to ``size x size`` by linear interpolation, flattened, and the rows are
    projected on their first ``components`` principal components (eigen-decomposition of
    the centred rows' Gram matrix: the PCA scores ``U * S`` of an SVD, up to sign).

    Parameters
    ----------
    image : numpy.ndarray
        Volume ``[i, j, k]`` or ``[i, j, k, c]``.
    axis : int
        Slice axis.

    Returns
    -------
    numpy.ndarray
        ``(n_slices, min(components, n_slices, size * size * c))`` float64 features.
    """
    from scipy import ndimage

    axis = check_axis(axis)
    arr = np.asarray(image)
    if arr.ndim == 3:
        arr = arr[..., None]
    arr = np.moveaxis(arr, axis, 0)  # (n, a, b, c), a view in the image's own dtype
    q25, med, q75 = robust_quartiles(arr[::2, ::2, ::2])  # every 8th voxel: same statistics, faster
    scale = max(q75 - q25, 1e-6)
    n, a, b, c = arr.shape
    zoom = (1.0, size / a, size / b, 1.0)
    # a few slices at a time (at most 32 MiB of float64), never a float64 copy of the volume: the zoom
    # along the slice axis is the identity, so the rows are those of zooming the whole volume, bit for bit.
    # The linear zoom reads few in-plane voxels (two per output along each axis): only those are normalised,
    # into a buffer whose other voxels stay 0 and are never read
    step = max(1, CHUNK_VOXELS // (a * b * c))
    grid = np.ix_(np.arange(min(step, n)), zoom_reads(a, size), zoom_reads(b, size), np.arange(c))
    buffer = np.zeros((min(step, n), a, b, c))
    parts = []
    for s in range(0, n, step):
        m = min(step, n - s)
        picked = arr[s:s + m][(grid[0][:m], *grid[1:])]
        buffer[(grid[0][:m], *grid[1:])] = (picked.astype(np.float64) - med) / scale
        parts.append(ndimage.zoom(buffer[:m], zoom, order=1, grid_mode=True, mode="nearest"))
    small = np.concatenate(parts)
    rows = small.reshape(n, -1)
    rows = rows - rows.mean(axis=0, keepdims=True)
    # PCA scores U*S from the small n x n Gram matrix (eigh): same result as an SVD of the rows,
    # but an order of magnitude faster when BLAS threads compete on a busy machine
    evals, evecs = np.linalg.eigh(rows @ rows.T)
    keep = min(components, n)
    top = np.argsort(evals)[::-1][:keep]
    return evecs[:, top] * np.sqrt(np.clip(evals[top], 0.0, None))


def zoom_reads(length: int, size: int) -> np.ndarray:
    """Indices along an axis of ``length`` voxels that a linear zoom to ``size`` reads, and one more each side.

    ``scipy.ndimage.zoom(..., order=1, grid_mode=True, mode="nearest")`` computes output ``o``
    from the two voxels around ``(o + 0.5) * length / size - 0.5``; the extra neighbour on each
    side covers any rounding, so a zoom of an array that is right at these indices (whatever it
    holds elsewhere) is the zoom of the whole array, bit for bit.

    Examples
    --------
    >>> zoom_reads(64, 4).tolist()
    [6, 7, 8, 9, 22, 23, 24, 25, 38, 39, 40, 41, 54, 55, 56, 57]
    """
    centre = np.floor((np.arange(size) + 0.5) * (length / size) - 0.5).astype(np.int64)
    return np.unique(np.clip(centre[:, None] + np.arange(-1, 3), 0, length - 1))


def robust_quartiles(sample: np.ndarray) -> tuple[float, float, float]:
    """``np.percentile(sample.astype(np.float64), [25, 50, 75])``, partitioning narrow integers as integers.

    Integers of at most 4 bytes are exact in float64 and their differences fit the integer type
    used (int32 or int64), so numpy's interpolation gives the same quartiles, bit for bit, at a
    fraction of the float64 partition's cost.
    """
    arr = np.asarray(sample)
    if arr.dtype.kind in "iu" and arr.dtype.itemsize <= 4:
        arr = arr.astype(np.int32 if arr.dtype.itemsize <= 2 else np.int64)
    else:
        arr = arr.astype(np.float64)
    q25, med, q75 = (float(v) for v in np.percentile(arr, [25, 50, 75]))
    return q25, med, q75


def ual_slices(k: int, lo: int, hi: int, *, rng: np.random.Generator, features: np.ndarray) -> tuple[int, ...]:
    """Unsupervised active learning: the slice nearest each k-means centre.

    The feature rows of slices ``lo..hi`` (``features`` has one row per slice of the
    volume) are clustered with k-means (``scipy.cluster.vq.kmeans2``, k-means++ start drawn
    from ``rng``), ``k`` = slices to annotate. Each cluster contributes the member nearest its
    centre (clusters are disjoint, so picks are distinct); a centre left with an empty
    cluster takes the nearest slice not yet picked. Diverse slices, one per appearance mode:
    the idea of Zhang et al.'s UAL baseline, with a cheap encoder instead of a pretrained one.

    Examples
    --------
    >>> feats = np.repeat(np.eye(3), 4, axis=0) + 0.01 * np.arange(12)[:, None]
    >>> len(set(ual_slices(3, 0, 11, rng=np.random.default_rng(0), features=feats)))
    3
    """
    from scipy.cluster.vq import kmeans2

    _check_request(k, lo, hi, "ual")
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] <= hi:
        raise ValueError(f"features must have one row per slice (at least {hi + 1}), got shape "
                        f"{feats.shape}; pass encoder(image, axis) output for the whole volume")
    x = feats[lo:hi + 1]
    n = x.shape[0]
    if k == n:
        return tuple(range(lo, hi + 1))
    if np.allclose(x, x[0]):  # featureless range: nothing to cluster, fall back to spreading
        return interval_slices(k, lo, hi, rng=rng)
    centres, assign = kmeans2(x, k, minit="++", seed=rng)
    dist = ((x[:, None, :] - centres[None, :, :]) ** 2).sum(-1)  # (n, k)
    picked: list[int] = []
    taken = np.zeros(n, bool)
    empty = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if members.size == 0:
            empty.append(c)
            continue
        best = int(members[np.argmin(dist[members, c])])
        picked.append(best)
        taken[best] = True
    for c in empty:
        order = np.argsort(dist[:, c], kind="stable")
        best = int(next(i for i in order if not taken[i]))
        picked.append(best)
        taken[best] = True
    return tuple(sorted(lo + i for i in picked))


def _select_ual(k: int, lo: int, hi: int, *, rng: np.random.Generator,
                features: np.ndarray | None) -> tuple[int, ...]:
    if features is None:
        raise TypeError("features is None for strategy 'ual'; pass one feature row per slice")
    return ual_slices(k, lo, hi, rng=rng, features=features)


def _featureless(strategy: Callable[..., tuple[int, ...]]) -> Selector:
    """A strategy that needs no features, called with the shared :data:`Selector` signature."""
    def select(k: int, lo: int, hi: int, *, rng: np.random.Generator,
               features: np.ndarray | None) -> tuple[int, ...]:
        return strategy(k, lo, hi, rng=rng)

    select.__doc__ = strategy.__doc__
    return select


#: A strategy as the registry holds it: ``selector(k, lo, hi, *, rng, features)`` returns the
#: ``k`` sorted slices of ``[lo, hi]``; ``features`` (one row per slice of the volume, or None)
#: is for strategies that look at the image, such as ``ual``.
Selector = Callable[..., tuple[int, ...]]

#: The slice-selection strategies by name (order: as help texts list them).
SELECTORS: dict[str, Selector] = {"random": _featureless(random_slices), "interval": _featureless(interval_slices),
                                  "ual": _select_ual, "block": _featureless(block_slices)}
STRATEGIES = tuple(SELECTORS)


def check_strategy(strategy: str) -> str:
    """Return ``strategy`` if it is in :data:`STRATEGIES`, else raise naming the valid ones."""
    if strategy not in STRATEGIES:
        raise unknown_choice("strategy", strategy, STRATEGIES, problem="is unknown",
                             otherwise=f"use one of {', '.join(STRATEGIES)}")
    return strategy


def select_slices(strategy: str, k: int, lo: int, hi: int, *, rng: np.random.Generator,
                  features: np.ndarray | None = None) -> tuple[int, ...]:
    """Dispatch to a strategy of :data:`SELECTORS` by name (``features`` only for ``ual``)."""
    return SELECTORS[check_strategy(strategy)](k, lo, hi, rng=rng, features=features)
