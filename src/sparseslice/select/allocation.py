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
from dataclasses import dataclass

import numpy as np

from sparseslice.errors import UserError

VOLUME_SELECTIONS = ("random", "diverse")


@dataclass(frozen=True)
class Allocation:
    """How a slice budget is spread over the volumes of the selection order.

    One of the modes of the module rules: ``block_fraction`` (``block`` strategy: a block of
    this fraction of each volume), ``volumes`` (the first ``s`` volumes), ``rho=1`` (whole
    volumes), ``rho`` below 1 (the fewest volumes reaching the budget) or none of them
    (``spread``: as many volumes as the budget allows).

    Parameters
    ----------
    rho : float, optional
        Density, drawn / selectable slices per volume; exclusive with ``volumes``.
    volumes : int, optional
        Number of volumes.
    block_fraction : float, optional
        Block length as a fraction of each volume's selectable slices.
    """

    rho: float | None = None
    volumes: int | None = None
    block_fraction: float | None = None

    @property
    def mode(self) -> str:
        """``"block_fraction"``, ``"volumes"``, ``"full"`` (``rho=1``), ``"rho"`` or ``"spread"``."""
        if self.block_fraction is not None:
            return "block_fraction"
        if self.volumes is not None:
            return "volumes"
        if self.rho == 1:
            return "full"
        return "rho" if self.rho is not None else "spread"

    def check(self, *, strategy: str) -> None:
        """Refuse options that contradict each other or lie out of range (``strategy``: the slice strategy)."""
        rho, volumes, block_fraction = self.rho, self.volumes, self.block_fraction
        if rho is not None and volumes is not None:
            raise UserError(f"rho and volumes are exclusive, got rho={rho}, volumes={volumes}; give one, the "
                            "other follows from the budget")
        if rho is not None and not 0 < rho <= 1:
            raise UserError(f"rho must be a fraction in (0, 1], got {rho}; e.g. 0.1 annotates 10% of the slices")
        if block_fraction is not None:
            if strategy != "block":
                raise UserError(f"block_fraction only applies to strategy 'block', got strategy {strategy!r}; "
                                "drop block_fraction or use strategy='block'")
            if rho is not None or volumes is not None:
                raise UserError("block_fraction is exclusive with rho and volumes, got both; give one")
            if not 0 < block_fraction <= 1:
                raise UserError(f"block_fraction must be in (0, 1], got {block_fraction}; e.g. 0.2")

    def block_lengths(self, capacities: Sequence[int]) -> list[int]:
        """Each volume's block length in ``block_fraction`` mode (at least one slice)."""
        if self.block_fraction is None:
            raise ValueError("block_lengths needs block_fraction; this allocation has none")
        return [max(1, int(round(self.block_fraction * c))) for c in capacities]

    def spend(self, budget: int, capacities: Sequence[int]) -> tuple[int, list[int], str]:
        """Spend ``budget`` over the leading volumes with selectable slices ``capacities`` (selection order).

        Returns
        -------
        volumes : int
            How many leading volumes receive slices.
        counts : list of int
            Slices of each of them.
        note : str
            The rule applied, in words (the plan's ``allocation``).
        """
        caps = list(capacities)
        total = sum(caps)
        if budget > total:
            raise UserError(f"budget is larger than the data, got {budget} slices; the {len(caps)} volumes hold "
                            f"{total} selectable slices: lower the budget")
        mode = self.mode
        if mode == "block_fraction":
            return self._spend_blocks(budget, caps)
        if mode == "full":
            s = whole_volumes(budget, caps)
            note = (f"rho=1 (full annotation): the {s} leading volumes that fit whole, every selectable slice; "
                    f"{budget - sum(caps[:s])} of the {budget} budgeted slices unspent (no whole volume fits "
                    "in them)")
            return s, caps[:s], note
        if mode == "volumes":
            s = self._check_volumes(budget, caps)
            how = f"{s} volumes requested"
        elif mode == "rho":
            s = volumes_for_rho(self.rho, caps, budget)  # type: ignore[arg-type]
            how = f"rho={self.rho:g} needs {s} volumes"
        else:
            s = min(len(caps), budget)
            how = f"no rho or volumes given: spread over {s} volumes (as many as the budget allows)"
        counts = apportion(budget, caps[:s])
        note = (f"{how}; one slice each, the other {budget - s} apportioned in proportion to each volume's "
                "selectable slices (largest remainder, ties to earlier volumes)")
        return s, counts, note

    def _spend_blocks(self, budget: int, caps: list[int]) -> tuple[int, list[int], str]:
        lengths = self.block_lengths(caps)
        cumulative = np.cumsum(lengths)
        if cumulative[-1] < budget:
            raise UserError(f"budget exceeds what block_fraction={self.block_fraction} can use on {len(caps)} "
                            f"volumes, got {budget} (at most {int(cumulative[-1])}); raise the fraction or "
                            "lower the budget")
        s = int(np.searchsorted(cumulative, budget) + 1)
        counts = lengths[:s]
        counts[-1] = budget - sum(counts[:-1])
        note = (f"blocks of {self.block_fraction:g} x structure slices on {s} volumes; the last volume's block "
                f"holds the remainder ({counts[-1]} of {lengths[s - 1]})")
        return s, counts, note

    def _check_volumes(self, budget: int, caps: list[int]) -> int:
        s = self.volumes
        if s is None or not 1 <= s <= len(caps):
            raise UserError(f"volumes must be between 1 and the {len(caps)} candidate cases, got {s}; "
                            "lower it or add cases")
        if budget < s:
            raise UserError(f"budget must give each of the {s} volumes at least one slice, got {budget}; "
                            f"raise the budget to {s} or lower volumes")
        if budget > sum(caps[:s]):
            raise UserError(f"budget is larger than {s} volumes can hold, got {budget} (they have "
                            f"{sum(caps[:s])} selectable slices); raise volumes or lower the budget")
        return s

    def budget_range(self, capacities: Sequence[int]) -> tuple[int, int]:
        """Smallest and largest slice budget worth trying for volumes ``capacities`` (``budget_hours`` search)."""
        caps = list(capacities)
        if self.volumes is not None:
            return self.volumes, sum(caps[:self.volumes])
        if self.mode == "full":  # no budget below the first whole volume gives a plan
            return caps[0], sum(caps)
        if self.rho is not None:
            return 1, int(np.floor(sum(self.rho * c for c in caps) + 1e-9))
        if self.block_fraction is not None:
            return 1, sum(self.block_lengths(caps))
        return 1, sum(caps)


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

    if np.asarray(image).size > LARGE_VOLUME:
        return _large_volume_embedding(np.asarray(image), size=size)
    arr = np.asarray(image, dtype=np.float64)
    if arr.ndim == 4:
        arr = arr.mean(axis=-1)
    q25, med, q75 = np.percentile(arr, [25, 50, 75])
    arr = (arr - med) / max(q75 - q25, 1e-6)
    small = ndimage.zoom(arr, [size / s for s in arr.shape], order=1, grid_mode=True, mode="nearest")
    return small.ravel()


#: Volumes (voxels, channels included) above this are embedded without a float64 copy of the volume.
LARGE_VOLUME = 2**24


def _large_volume_embedding(image: np.ndarray, *, size: int) -> np.ndarray:
    """:func:`default_volume_encoder` of a large (CT-sized) volume in bounded memory.

    The statistics come from every 8th voxel, and the linear zoom runs in two separable steps,
    a few slices at a time in-plane then along the last axis: the same embedding up to
    rounding and the sampling of the quantiles, without the volume's float64 copies.
    """
    from scipy import ndimage

    from sparseslice.select.strategies import zoom_reads

    sample = image[::2, ::2, ::2].astype(np.float64)
    q25, med, q75 = np.percentile(sample.mean(axis=-1) if sample.ndim == 4 else sample, [25, 50, 75])
    scale = max(q75 - q25, 1e-6)
    a, b, n = image.shape[:3]
    step = max(1, 2**22 // (a * b * (image.shape[3] if image.ndim == 4 else 1)))
    # the in-plane zoom reads few voxels: only those are normalised, into a buffer whose others stay 0
    rows, cols = np.ix_(zoom_reads(a, size), zoom_reads(b, size))
    buffer = np.zeros((a, b, min(step, n)))
    parts = []
    for s in range(0, n, step):
        m = min(step, n - s)
        chunk = image[rows, cols, s:s + m].astype(np.float64)
        buffer[rows, cols, :m] = ((chunk.mean(axis=-1) if chunk.ndim == 4 else chunk) - med) / scale
        parts.append(ndimage.zoom(buffer[:, :, :m], (size / a, size / b, 1.0), order=1, grid_mode=True,
                                  mode="nearest"))
    plane = np.concatenate(parts, axis=2)
    return ndimage.zoom(plane, (1.0, 1.0, size / n), order=1, grid_mode=True, mode="nearest").ravel()
