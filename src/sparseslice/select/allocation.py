"""Spending a budget of slices: which volumes, and how many slices each.

Vocabulary: a volume's *selectable slices* ``S_i`` are the slices of its extent when the
extent is known (the structure slices an annotator can draw; border slices are free), and
all its slices otherwise. The density ``rho`` is drawn slices / selectable slices.

Rules (documented once here, reported in every plan):

- ``volumes=s``: the first ``s`` volumes of the selection order receive the budget.
- ``rho=1`` (full annotation): the leading volumes (in selection order) that fit whole in the
  budget, each with every selectable slice; the budget left over is not spent and the plan
  says so (``full_volumes``, ``unspent``), so a "full" arm never annotates part of a volume.
- ``rho`` below 1: the fewest volumes (in selection order) whose ``sum(rho * S_i)`` reaches the
  budget; ``rho`` times the selectable slices of every candidate volume must be at least 1.
- neither: every candidate volume (at most ``budget`` of them), following the slice-selection
  study's finding that spreading a budget over more volumes almost always wins.
- Then each chosen volume gets one slice and the remaining ``budget - s`` slices are
  apportioned in proportion to ``S_i - 1`` by the largest-remainder method (ties to the
  earlier volume in selection order), so the plan spends exactly the budget, every count is
  within one of its proportional share and never exceeds ``S_i``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sparseslice.errors import UserError

VOLUME_SELECTIONS = ("random", "diverse")


def apportion(budget: int, capacities: Sequence[int]) -> list[int]:
    """Split ``budget`` over volumes: one each, the rest in proportion to ``capacity - 1``.

    Largest-remainder (Hamilton) apportionment in exact integer arithmetic.

    Examples
    --------
    >>> apportion(10, [10, 20, 30])
    [2, 3, 5]
    >>> apportion(3, [40, 40, 40])
    [1, 1, 1]
    """
    caps = [int(c) for c in capacities]
    if not caps:
        raise UserError("volumes is empty; give at least one volume to spend the budget on")
    if min(caps) < 1:
        raise UserError(f"capacities must be at least 1 slice, got {min(caps)}; drop empty volumes")
    total_cap = sum(caps)
    if not len(caps) <= budget <= total_cap:
        raise UserError(f"budget must lie between {len(caps)} (one slice per volume) and {total_cap} "
                        f"(every selectable slice), got {budget}; change the budget or the volumes")
    rest = budget - len(caps)
    spare = [c - 1 for c in caps]
    denom = sum(spare)
    if denom == 0:
        return [1] * len(caps)
    floors = [rest * s // denom for s in spare]
    remainders = [rest * s % denom for s in spare]
    left = rest - sum(floors)
    order = sorted(range(len(caps)), key=lambda i: (-remainders[i], i))
    for i in order[:left]:
        floors[i] += 1
    return [1 + f for f in floors]


def volumes_for_rho(rho: float, capacities: Sequence[int], budget: int) -> int:
    """Fewest leading volumes whose ``rho``-share reaches ``budget``.

    Raises when the whole pool at density ``rho`` cannot absorb the budget.
    """
    if not 0 < rho <= 1:
        raise UserError(f"rho must be a fraction in (0, 1], got {rho}; e.g. 0.1 annotates 10% of "
                        "each volume's slices")
    caps = np.asarray(capacities, dtype=float)
    small = int(np.argmin(caps))
    if rho * caps[small] < 1:
        raise UserError(f"rho times the selectable slices must be at least 1 for every volume, got "
                        f"rho={rho} for a volume with {int(caps[small])} slices; raise rho to at least "
                        f"{1 / caps[small]:.3g} or give --volumes instead")
    cumulative = np.cumsum(rho * caps)
    if cumulative[-1] < budget - 1e-9:
        raise UserError(f"budget exceeds what rho={rho} can use on {caps.size} volumes, got {budget} "
                        f"(at most {int(np.floor(cumulative[-1] + 1e-9))}); raise rho or lower the budget")
    return int(np.searchsorted(cumulative, budget - 1e-9) + 1)


def whole_volumes(budget: int, capacities: Sequence[int]) -> int:
    """How many leading volumes fit whole (every selectable slice) in ``budget``.

    Examples
    --------
    >>> whole_volumes(150, [37, 33, 34, 38, 37])
    4
    >>> whole_volumes(20, [37, 33])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    sparseslice.errors.UserError: budget is smaller than one whole volume, got 20 for rho=1 ...
    """
    cumulative = np.cumsum(np.asarray(capacities, dtype=np.int64))
    s = int(np.searchsorted(cumulative, budget, side="right"))
    if s == 0:
        first = int(cumulative[0]) if cumulative.size else 0
        raise UserError(f"budget is smaller than one whole volume, got {budget} for rho=1 (full annotation; "
                        f"the first volume has {first} slices); raise the budget to at least {first} or lower rho")
    return s


def order_volumes(case_ids: Sequence[str], *, selection: str, seed: int,
                  embeddings: np.ndarray | None = None) -> list[str]:
    """All candidate volumes in the order they receive annotation.

    ``random``: a seeded permutation. ``diverse``: greedy k-center (farthest-point) over
    per-volume embeddings, starting from a seeded random volume, so the first ``s`` volumes
    of the order cover the appearance range of the pool (Gonzalez's 2-approximation).
    """
    if selection not in VOLUME_SELECTIONS:
        raise UserError(f"volume_selection is unknown, got {selection!r}; use one of "
                        f"{', '.join(VOLUME_SELECTIONS)}")
    ids = sorted(case_ids)  # independent of listing order
    rng = np.random.default_rng(seed)
    if selection == "random":
        return [ids[i] for i in rng.permutation(len(ids))]
    if embeddings is None or len(embeddings) != len(case_ids):
        raise ValueError("embeddings must have one row per case for volume_selection='diverse'; "
                        "pass volume embeddings")
    pos = {cid: n for n, cid in enumerate(case_ids)}
    emb = np.asarray(embeddings, dtype=np.float64)[[pos[c] for c in ids]]
    return [ids[i] for i in k_center_order(emb, start=int(rng.integers(len(ids))))]


def k_center_order(points: np.ndarray, *, start: int) -> list[int]:
    """Greedy farthest-point ordering of ``points`` (rows), beginning with ``start``.

    Examples
    --------
    >>> k_center_order(np.array([[0.0], [1.0], [10.0], [4.0]]), start=0)
    [0, 2, 3, 1]
    """
    n = points.shape[0]
    order = [start]
    dist = np.linalg.norm(points - points[start], axis=1)
    dist[start] = -1.0
    for _ in range(n - 1):
        nxt = int(np.argmax(dist))  # first index among ties
        order.append(nxt)
        dist = np.minimum(dist, np.linalg.norm(points - points[nxt], axis=1))
        dist[order] = -1.0
    return order


def default_volume_encoder(image: np.ndarray, *, size: int = 12) -> np.ndarray:
    """One feature vector per volume for ``diverse`` selection.

    The volume (channels averaged) is z-scored with its median and inter-quartile range and
    resampled to ``size`` voxels per axis; the flattened grid is the embedding. Volumes of
    different shapes become comparable; the scale keeps coarse appearance only.
    """
    from scipy import ndimage

    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    q25, med, q75 = np.percentile(arr, [25, 50, 75])
    arr = (arr - med) / max(q75 - q25, 1e-6)
    small = ndimage.zoom(arr, [size / s for s in arr.shape], order=1, grid_mode=True, mode="nearest")
    return small.ravel()
