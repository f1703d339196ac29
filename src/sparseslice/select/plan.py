"""Annotation plans: which slices of which volumes to draw, made by :func:`make_plan`.

A :class:`Plan` is the worklist an annotator follows (``plan.json`` plus ``plan.csv``) and the
input of :func:`sparseslice.simulate.simulate`. It records the strategy, seed, budget and how
the budget was allocated, so the same call gives the same plan.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sparseslice.datasets import Dataset, dataset_slice_axis, load_image
from sparseslice.errors import UserError
from sparseslice.io import check_axis, read_header, read_label
from sparseslice.progress import track
from sparseslice.select.allocation import (
    VOLUME_SELECTIONS,
    Allocation,
    default_volume_encoder,
    order_volumes,
)
from sparseslice.select.cost import CostModel
from sparseslice.select.strategies import SliceEncoder, check_strategy, default_slice_encoder, select_slices
from sparseslice.sparse import check_extent, extent_of

PLAN_VERSION = 1


@dataclass(frozen=True)
class PlanEntry:
    """Slices to annotate in one volume.

    Parameters
    ----------
    case_id : str
        The case.
    axis : int
        Slice axis.
    slices : tuple of int
        Sorted, distinct 0-based slice indices along ``axis``.
    n_slices : int
        Slices of the volume along ``axis`` (checked against the data before simulating).
    extent : tuple of int, optional
        First and last structure slice, when known; slices then lie inside it.
    """

    case_id: str
    axis: int
    slices: tuple[int, ...]
    n_slices: int
    extent: tuple[int, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case_id, "axis": self.axis, "n_slices": self.n_slices,
                "extent": list(self.extent) if self.extent is not None else None,
                "slices": list(self.slices)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PlanEntry:
        try:
            case_id, axis, n = str(d["case"]), check_axis(int(d["axis"])), int(d["n_slices"])
            slices = tuple(int(s) for s in d["slices"])
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"plan entry is malformed ({type(exc).__name__}: {exc}), got {dict(d)!r}; "
                            "each entry needs case, axis, n_slices and slices") from None
        if len(set(slices)) != len(slices) or any(not 0 <= s < n for s in slices):
            bad = [s for s in slices if not 0 <= s < n] or sorted(s for s in slices if slices.count(s) > 1)
            raise UserError(f"plan entry for case {case_id!r} names slices outside [0, {n - 1}] or twice, "
                            f"got {bad[:5]}; fix the plan or make a new one")
        extent = check_extent(d.get("extent"), n) if d.get("extent") is not None else None
        return cls(case_id, axis, tuple(sorted(slices)), n, extent)


@dataclass(frozen=True)
class Plan:
    """A complete annotation plan.

    ``budget`` is the number of drawn slices (always ``sum(len(e.slices))``); ``rho`` is the
    requested density, or the derived one ``budget / selectable slices of the chosen volumes``
    when ``volumes`` was given; ``volumes`` is the number of volumes annotated.
    ``full_volumes`` marks a full-annotation plan (``rho=1``: whole volumes only), and
    ``unspent`` is the part of the requested budget it leaves (no whole volume fits in it).
    ``parents`` are the earlier rounds it excluded (:class:`Exclusion`): path and sha256 of each.
    """

    entries: list[PlanEntry]
    strategy: str
    seed: int
    budget: int
    rho: float | None
    volumes: int
    volume_selection: str = "random"
    axis: int | None = None
    block_fraction: float | None = None
    rho_effective: float | None = None
    rho_of: str = "volume"
    allocation: str = ""
    minutes: float | None = None
    budget_hours: float | None = None
    cost: CostModel = field(default_factory=CostModel)
    dataset: str | None = None
    full_volumes: bool = False
    unspent: int = 0
    parents: list[dict[str, Any]] = field(default_factory=list)

    @property
    def hours(self) -> float | None:
        return None if self.minutes is None else self.minutes / 60

    @property
    def case_ids(self) -> list[str]:
        return [e.case_id for e in self.entries]

    def entry(self, case_id: str) -> PlanEntry:
        for e in self.entries:
            if e.case_id == case_id:
                return e
        raise UserError(f"case {case_id!r} is not in the plan; planned cases: {', '.join(self.case_ids[:5])}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION, "strategy": self.strategy, "seed": self.seed, "budget": self.budget,
            "rho": self.rho, "volumes": self.volumes, "volume_selection": self.volume_selection,
            "axis": self.axis, "block_fraction": self.block_fraction, "rho_effective": self.rho_effective,
            "rho_of": self.rho_of, "allocation": self.allocation, "minutes": self.minutes,
            "hours": None if self.minutes is None else round(self.minutes / 60, 4),
            "budget_hours": self.budget_hours, "cost": self.cost.to_dict(), "dataset": self.dataset,
            "full_volumes": self.full_volumes, "unspent": self.unspent, "parents": self.parents,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        if not isinstance(d, Mapping) or "entries" not in d or "strategy" not in d:
            raise UserError("plan must be a JSON object with 'strategy' and 'entries', got "
                            f"{type(d).__name__}; pass a plan.json written by sparseslice plan")
        entries = [PlanEntry.from_dict(e) for e in d["entries"]]
        seen: set[str] = set()
        for e in entries:
            if e.case_id in seen:
                raise UserError(f"plan names case {e.case_id!r} twice; keep one entry per case")
            seen.add(e.case_id)
        return cls(
            entries=entries, strategy=str(d["strategy"]), seed=int(d.get("seed", 0)),
            budget=sum(len(e.slices) for e in entries), rho=d.get("rho"), volumes=len(entries),
            volume_selection=str(d.get("volume_selection", "random")), axis=d.get("axis"),
            block_fraction=d.get("block_fraction"), rho_effective=d.get("rho_effective"),
            rho_of=str(d.get("rho_of", "volume")), allocation=str(d.get("allocation", "")),
            minutes=d.get("minutes"), budget_hours=d.get("budget_hours"),
            cost=CostModel.from_dict(d.get("cost") or {}), dataset=d.get("dataset"),
            full_volumes=bool(d.get("full_volumes", False)), unspent=int(d.get("unspent") or 0),
            parents=[dict(p) for p in d.get("parents") or []],
        )


# ---------------------------------------------------------------------------------------- extents


def extents_from_labels(dataset: Dataset, *, axis: int, cases: Sequence[str] | None = None
                        ) -> dict[str, tuple[int, int]]:
    """Extents taken from the full labels (simulation); cases with an empty label are left out."""
    out: dict[str, tuple[int, int]] = {}
    for cid in cases if cases is not None else dataset.case_ids:
        case = dataset.case(cid)
        if case.label is None:
            raise UserError(f"case {cid!r} has no label to take its extent from; pass extents "
                            "(a CSV case,first,last) instead")
        ext = extent_of(read_label(case.label).array, axis=axis, ignore_value=dataset.ignore_value)
        if ext is not None:
            out[cid] = ext
    return out


# ---------------------------------------------------------------------------------------- planning


def plan_axis(dataset: Dataset, *, axis: int | None = None, cases: Sequence[str] | None = None,
              headers: Mapping[str, Any] | None = None) -> int:
    """The slice axis a plan uses: ``axis`` if given, else the dataset's (majority of per-case defaults)."""
    if axis is not None:
        return check_axis(axis)
    ids = list(cases) if cases is not None else dataset.case_ids
    heads = headers or {cid: read_header(dataset.case(cid).images[0]) for cid in ids}
    return dataset_slice_axis([heads[c].shape[:3] for c in ids], [heads[c].spacing for c in ids])


def case_rng(seed: int, case_id: str) -> np.random.Generator:
    """The random generator for one volume: depends on the seed and the case id only."""
    return np.random.default_rng([int(seed), zlib.crc32(case_id.encode())])


@dataclass(frozen=True)
class Exclusion:
    """Slices an earlier round annotated (or planned), which a new round's plan does not spend budget on.

    Parameters
    ----------
    axis : int
        Their slice axis (a new plan must use the same).
    slices : mapping
        ``case -> slices`` already annotated (0-based along ``axis``).
    parents : list of dict
        Where they come from, recorded in the new plan (``path``, ``kind``, ``sha256``...).
    """

    axis: int
    slices: Mapping[str, Sequence[int]]
    parents: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Pool:
    ids: list[str]
    n_slices: dict[str, int]
    extents: dict[str, tuple[int, int]]
    excluded: dict[str, frozenset[int]] = field(default_factory=dict)

    def range_of(self, cid: str) -> tuple[int, int]:
        return self.extents.get(cid, (0, self.n_slices[cid] - 1))

    def available(self, cid: str) -> list[int]:
        """The slices of ``cid``'s range not excluded (annotated in an earlier round)."""
        lo, hi = self.range_of(cid)
        gone = self.excluded.get(cid, frozenset())
        return [s for s in range(lo, hi + 1) if s not in gone]

    def capacity(self, cid: str) -> int:
        if self.excluded.get(cid):
            return len(self.available(cid))
        lo, hi = self.range_of(cid)
        return hi - lo + 1


def make_plan(dataset: Dataset, *, budget: int | None = None, budget_hours: float | None = None,
              rho: float | None = None, volumes: int | None = None, strategy: str = "random", seed: int = 0,
              axis: int | None = None, cases: Sequence[str] | None = None,
              extents: Mapping[str, tuple[int, int]] | None = None, volume_selection: str = "random",
              block_fraction: float | None = None, cost: CostModel | None = None,
              slice_encoder: SliceEncoder | None = None,
              volume_encoder: Callable[[np.ndarray], np.ndarray] | None = None,
              exclude: Exclusion | None = None, progress: bool = False) -> Plan:
    """Choose the volumes and slices to annotate under a budget.

    Parameters
    ----------
    dataset : Dataset
        Candidate cases (images are needed; labels only to derive extents for ``block``).
    budget : int, optional
        Slices to draw (border slices are free). Exactly one of ``budget`` and
        ``budget_hours`` is required.
    budget_hours : float, optional
        Annotation time instead: the largest slice budget whose estimated time (``cost``) fits.
    rho : float, optional
        Density: drawn slices / selectable slices per volume (selectable = the extent when
        known, otherwise every slice). Gives the number of volumes; exclusive with ``volumes``.
    volumes : int, optional
        Number of volumes to annotate; ``rho`` then follows. With neither, the budget is
        spread over as many volumes as possible (see :mod:`sparseslice.select.allocation`).
    strategy : {"random", "interval", "ual", "block"}
        Slice choice within a volume (:mod:`sparseslice.select.strategies`).
    seed : int
        Seeds volume order and slice choice; each volume's generator depends only on the
        seed and its case id.
    axis : int, optional
        Slice axis; default: one axis for the dataset (largest spacing, majority vote).
    cases : sequence of str, optional
        Candidate pool (default: every case), e.g. the training split.
    extents : mapping, optional
        ``case -> (first, last)`` structure slices (annotators' clicks, :func:`read_extents`,
        or :func:`extents_from_labels`). Slices are chosen inside them. For ``block`` they
        default to the labels' extents; cases without one use the whole volume.
    volume_selection : {"random", "diverse"}
        Order in which volumes receive annotation: seeded shuffle, or greedy k-center over
        volume embeddings (``volume_encoder``, default :func:`default_volume_encoder`).
    block_fraction : float, optional
        ``block`` only, exclusive with ``rho``/``volumes``: each block is this fraction of the
        volume's structure slices (Specktor-Fadida's percentage); volumes are added until the
        budget is spent, the last block takes the remainder.
    cost : CostModel, optional
        Time model for ``minutes``/``budget_hours`` (default :class:`CostModel`).
    slice_encoder : callable, optional
        ``ual`` features, ``encoder(image, axis) -> (n_slices, n_features)``; default :func:`default_slice_encoder`.
    volume_encoder : callable, optional
        ``diverse`` features, ``encoder(image) -> vector``; default :func:`default_volume_encoder`.
    exclude : Exclusion, optional
        A later round: earlier rounds' slices are not chosen again (see :class:`Exclusion`).
    progress : bool
        Show a progress bar while reading images.

    Returns
    -------
    Plan

    Examples
    --------
    >>> plan = make_plan(ds, budget=300, rho=0.1, strategy="interval", seed=0)  # doctest: +SKIP
    >>> plan.budget, plan.volumes  # doctest: +SKIP
    (300, 84)
    """
    with limited_blas(1):  # the embeddings' matrices are small: more BLAS threads only spin (2.5x the CPU time)
        return _make_plan(dataset, budget=budget, budget_hours=budget_hours, rho=rho, volumes=volumes,
                          strategy=strategy, seed=seed, axis=axis, cases=cases, extents=extents,
                          volume_selection=volume_selection, block_fraction=block_fraction, cost=cost,
                          slice_encoder=slice_encoder, volume_encoder=volume_encoder, exclude=exclude,
                          progress=progress)


def limited_blas(threads: int) -> contextlib.AbstractContextManager[Any]:
    """A context that limits the BLAS libraries loaded in this process to ``threads`` threads (threadpoolctl),
    restoring them after; no environment variable is touched. Without threadpoolctl it does nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an optional speed-up: results are the same either way
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _make_plan(dataset: Dataset, *, budget: int | None, budget_hours: float | None, rho: float | None,
               volumes: int | None, strategy: str, seed: int, axis: int | None, cases: Sequence[str] | None,
               extents: Mapping[str, tuple[int, int]] | None, volume_selection: str, block_fraction: float | None,
               cost: CostModel | None, slice_encoder: SliceEncoder | None,
               volume_encoder: Callable[[np.ndarray], np.ndarray] | None, exclude: Exclusion | None,
               progress: bool) -> Plan:
    """:func:`make_plan` with its options checked and spelled out."""
    _check_options(budget=budget, budget_hours=budget_hours, strategy=strategy, volume_selection=volume_selection)
    allocation = Allocation(rho=rho, volumes=volumes, block_fraction=block_fraction)
    allocation.check(strategy=strategy)
    axis, pool = _make_pool(dataset, _candidates(dataset, cases), axis=axis, extents=extents, strategy=strategy,
                            exclude=exclude)
    order = _volume_order(dataset, pool.ids, selection=volume_selection, seed=seed, encoder=volume_encoder,
                          progress=progress)
    planner = _Planner(dataset=dataset, pool=pool, order=order, allocation=allocation, strategy=strategy,
                       seed=int(seed), axis=axis, volume_selection=volume_selection, cost=cost or CostModel(),
                       budget_hours=budget_hours, slice_encoder=slice_encoder or default_slice_encoder,
                       progress=progress, parents=list(exclude.parents) if exclude is not None else [])
    if budget is not None:
        return planner.build(int(budget))
    return _plan_by_time(planner.build, budget_hours * 60, planner.budget_range())  # type: ignore[operator]


def _excluded(pool: _Pool, exclude: Exclusion | None, *, axis: int) -> _Pool:
    """``pool`` without the slices of ``exclude``; volumes left without a slice are no longer candidates."""
    if exclude is None:
        return pool
    if exclude.axis != axis:
        raise UserError(f"exclude was annotated along axis {exclude.axis}, got axis {axis} for this plan; plan "
                        f"along axis {exclude.axis} (--axis {exclude.axis}) so the rounds add up")
    excluded = {c: frozenset(int(s) for s in v) for c, v in exclude.slices.items() if c in pool.n_slices}
    pool = _Pool(pool.ids, pool.n_slices, pool.extents, excluded)
    ids = [c for c in pool.ids if pool.capacity(c) > 0]
    if not ids:
        raise UserError(f"exclude leaves no slice to plan, got {len(excluded)} candidate volume(s) already annotated "
                        "in full; add volumes (--cases) or stop: this dataset is annotated")
    return _Pool(ids, pool.n_slices, pool.extents, excluded)


def _check_options(*, budget: int | None, budget_hours: float | None, strategy: str, volume_selection: str) -> None:
    """Refuse an unknown strategy or volume selection and a missing, doubled or invalid budget."""
    check_strategy(strategy)
    if volume_selection not in VOLUME_SELECTIONS:
        raise UserError(f"volume_selection is unknown, got {volume_selection!r}; use one of "
                        f"{', '.join(VOLUME_SELECTIONS)}")
    if (budget is None) == (budget_hours is None):
        raise UserError(f"budget and budget_hours are exclusive and one is required, got budget={budget}, "
                        f"budget_hours={budget_hours}; give exactly one")
    if budget is not None and (not isinstance(budget, int | np.integer) or budget < 1):
        raise UserError(f"budget must be a positive whole number of slices, got {budget!r}; e.g. 300")
    if budget_hours is not None and not budget_hours > 0:
        raise UserError(f"budget_hours must be positive, got {budget_hours}; e.g. 10")


def _candidates(dataset: Dataset, cases: Sequence[str] | None) -> list[str]:
    """The candidate case ids (distinct, in the order given; default every case), each known to ``dataset``."""
    ids = list(dict.fromkeys(cases)) if cases is not None else dataset.case_ids
    if not ids:
        raise UserError("cases is empty; give at least one case to plan for")
    for cid in ids:
        dataset.case(cid)  # raises for unknown cases
    return ids


def _make_pool(dataset: Dataset, ids: list[str], *, axis: int | None,
               extents: Mapping[str, tuple[int, int]] | None, strategy: str,
               exclude: Exclusion | None = None) -> tuple[int, _Pool]:
    """The plan's slice axis and the candidates' slices and extents (``block``: the labels' by default),
    less the slices ``exclude`` names."""
    heads = {cid: read_header(dataset.case(cid).images[0]) for cid in ids}
    axis = plan_axis(dataset, axis=axis, cases=ids, headers=heads)
    n_slices = {cid: int(heads[cid].shape[axis]) for cid in ids}
    if extents is None and strategy == "block":  # unlabelled cases wait for the annotators' extent clicks
        extents = extents_from_labels(dataset, axis=axis, cases=[c for c in ids if dataset.case(c).label is not None])
    return axis, _excluded(_Pool(ids, n_slices, _checked_extents(dataset, extents, n_slices)), exclude, axis=axis)


def _checked_extents(dataset: Dataset, extents: Mapping[str, tuple[int, int]] | None,
                     n_slices: Mapping[str, int]) -> dict[str, tuple[int, int]]:
    """The extents of the candidate cases, checked against their slices; other known cases are dropped."""
    checked: dict[str, tuple[int, int]] = {}
    known = set(dataset.case_ids)
    for cid, ext in (extents or {}).items():
        if cid not in known:
            raise UserError(f"extents name case {cid!r}, which is not in the dataset; remove the row or fix "
                            "the case id")
        if cid in n_slices:
            try:
                checked[cid] = check_extent(ext, n_slices[cid])  # type: ignore[assignment]
            except UserError as exc:
                raise UserError(f"case {cid!r}: {exc}") from None
    return checked


def _volume_order(dataset: Dataset, ids: list[str], *, selection: str, seed: int,
                  encoder: Callable[[np.ndarray], np.ndarray] | None, progress: bool) -> list[str]:
    """Candidate volumes in the order they receive annotation (``diverse`` embeds every volume first)."""
    embeddings = None
    if selection == "diverse":
        enc = encoder or default_volume_encoder
        embeddings = np.stack([np.asarray(enc(load_image(dataset.case(c)).array), float).ravel()
                               for c in track(ids, "embedding volumes", progress=progress)])
    return order_volumes(ids, selection=selection, seed=seed, embeddings=embeddings)


@dataclass
class _Planner:
    """Everything fixed before the budget: builds the plan for any slice budget (``budget_hours`` tries several)."""

    dataset: Dataset
    pool: _Pool
    order: list[str]
    allocation: Allocation
    strategy: str
    seed: int
    axis: int
    volume_selection: str
    cost: CostModel
    budget_hours: float | None
    slice_encoder: SliceEncoder
    progress: bool
    parents: list[dict[str, Any]] = field(default_factory=list)  # the earlier rounds a later round excludes
    features: dict[str, np.ndarray] = field(default_factory=dict)  # ual slice features, computed once per case

    def build(self, budget: int) -> Plan:
        """The plan spending ``budget`` slices."""
        s, counts, note = self.allocation.spend(budget, [self.pool.capacity(c) for c in self.order])
        chosen = self.order[:s]
        if self.strategy == "ual":
            self._embed([c for c in chosen if c not in self.features])
        entries = [self._entry(cid, k) for cid, k in zip(chosen, counts, strict=True)]
        selectable = sum(self.pool.capacity(c) for c in chosen)
        drawn = sum(counts)
        has_ext = [c in self.pool.extents for c in chosen]
        minutes = self.cost.plan_cost([(e.slices, x) for e, x in zip(entries, has_ext, strict=True)])
        rho = self.allocation.rho
        return Plan(entries=entries, strategy=self.strategy, seed=self.seed, budget=drawn,
                    rho=rho if rho is not None else round(drawn / selectable, 6), volumes=len(entries),
                    volume_selection=self.volume_selection, axis=self.axis,
                    block_fraction=self.allocation.block_fraction, rho_effective=round(drawn / selectable, 6),
                    rho_of="extent" if all(has_ext) else ("volume" if not any(has_ext) else "extent where known"),
                    allocation=note, minutes=minutes, budget_hours=self.budget_hours, cost=self.cost,
                    dataset=str(self.dataset.root), full_volumes=rho == 1, unspent=budget - drawn,
                    parents=self.parents)

    def budget_range(self) -> tuple[int, int]:
        """Smallest and largest slice budget the ``budget_hours`` search tries."""
        return self.allocation.budget_range([self.pool.capacity(c) for c in self.order])

    def _entry(self, cid: str, k: int) -> PlanEntry:
        """Case ``cid``'s entry with ``k`` slices chosen by the strategy."""
        lo, hi = self.pool.range_of(cid)
        feats = self.features.get(cid)
        try:
            if self.pool.excluded.get(cid):  # a later round: choose among the slices still unannotated
                avail = self.pool.available(cid)
                picked = select_slices(self.strategy, k, 0, len(avail) - 1, rng=case_rng(self.seed, cid),
                                       features=None if feats is None else np.asarray(feats)[avail])
                slices = tuple(avail[i] for i in picked)
            else:
                slices = select_slices(self.strategy, k, lo, hi, rng=case_rng(self.seed, cid), features=feats)
        except UserError as exc:
            raise UserError(f"case {cid!r}: {exc}") from None
        return PlanEntry(cid, self.axis, slices, self.pool.n_slices[cid], self.pool.extents.get(cid))

    def _embed(self, cases: list[str]) -> None:
        """Compute the ``ual`` slice features of ``cases``."""
        for c in track(cases, "embedding slices", progress=self.progress):
            self.features[c] = np.asarray(self.slice_encoder(load_image(self.dataset.case(c)).array, self.axis))


def _plan_by_time(build: Callable[[int], Plan], minutes: float, bounds: tuple[int, int]) -> Plan:
    """Largest slice budget whose plan fits ``minutes`` (binary search; the plan returned always fits)."""
    lo, hi = bounds
    first = build(lo)
    if first.minutes > minutes:
        raise UserError(f"budget_hours is too small for even {lo} slice(s), got {minutes / 60:g} h; that plan "
                        f"takes {first.minutes / 60:.2f} h: raise budget_hours")
    best = first
    while lo < hi:  # time grows with the budget (almost always monotone)
        mid = (lo + hi + 1) // 2
        plan = build(mid)
        if plan.minutes <= minutes:
            lo, best = mid, plan
        else:
            hi = mid - 1
    return best
