"""Annotation planning: allocation, strategies, cost, plans (property tests with hypothesis)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset, load_label
from sparseslice.errors import UserError
from sparseslice.select import (
    STRATEGIES,
    CostModel,
    Plan,
    apportion,
    block_slices,
    default_slice_encoder,
    extents_from_labels,
    interval_slices,
    k_center_order,
    make_plan,
    random_slices,
    read_extents,
    read_plan,
    select_slices,
    ual_slices,
    write_plan,
)
from sparseslice.sparse import extent_of
from sparseslice.synthetic import write_phantom_dataset

FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight phantoms of about 20 slices along axis 2 (jittered shapes)."""
    return write_phantom_dataset(tmp_path_factory.mktemp("plan_phantoms"), cases=8, seed=3, shape=(16, 16, 20))


@pytest.fixture(scope="module")
def ds(phantoms: Path):
    return discover_dataset(phantoms)


@pytest.fixture(scope="module")
def n_slices(ds) -> dict[str, int]:
    return {c.case_id: load_label(c).shape[2] for c in ds.cases}


# ------------------------------------------------------------------------------------------- allocation


def test_apportion_known_answers() -> None:
    assert apportion(10, [10, 20, 30]) == [2, 3, 5]
    assert apportion(3, [40, 40, 40]) == [1, 1, 1]
    assert apportion(4, [5, 5, 5]) == [2, 1, 1]  # tie in remainders goes to the earlier volume
    assert apportion(15, [5, 5, 5]) == [5, 5, 5]


@FAST
@given(caps=st.lists(st.integers(1, 60), min_size=1, max_size=30), frac=st.floats(0, 1))
def test_apportion_spends_exactly_and_stays_proportional(caps: list[int], frac: float) -> None:
    budget = len(caps) + int(round(frac * (sum(caps) - len(caps))))
    counts = apportion(budget, caps)
    assert sum(counts) == budget
    assert all(1 <= n <= c for n, c in zip(counts, caps, strict=True))
    spare = sum(c - 1 for c in caps)
    if spare:
        share = [1 + (budget - len(caps)) * (c - 1) / spare for c in caps]
        assert all(abs(n - s) < 1 for n, s in zip(counts, share, strict=True))


def test_apportion_refuses_impossible_budgets() -> None:
    with pytest.raises(UserError, match="budget must lie between 3"):
        apportion(2, [5, 5, 5])
    with pytest.raises(UserError, match="budget must lie between"):
        apportion(16, [5, 5, 5])


def test_k_center_matches_brute_force_farthest_point() -> None:
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(25, 3))
    order = k_center_order(pts, start=4)
    assert sorted(order) == list(range(25))
    chosen = [4]
    for _ in range(24):  # reference: recompute min distances from scratch each step
        rest = [i for i in range(25) if i not in chosen]
        d = [min(np.linalg.norm(pts[i] - pts[j]) for j in chosen) for i in rest]
        chosen.append(rest[int(np.argmax(d))])
    assert order == chosen


# ------------------------------------------------------------------------------------------- strategies

ranges = st.tuples(st.integers(0, 30), st.integers(1, 40)).map(lambda t: (t[0], t[0] + t[1] - 1))


@FAST
@given(rng_range=ranges, frac=st.floats(0, 1), seed=st.integers(0, 2**31), strategy=st.sampled_from(STRATEGIES))
def test_strategies_pick_k_distinct_slices_inside_the_range(rng_range, frac, seed, strategy) -> None:
    lo, hi = rng_range
    k = 1 + int(frac * (hi - lo))
    feats = np.random.default_rng(1).normal(size=(hi + 1, 4))
    got = select_slices(strategy, k, lo, hi, rng=np.random.default_rng(seed), features=feats)
    assert len(got) == k == len(set(got))
    assert list(got) == sorted(got)
    assert lo <= got[0] and got[-1] <= hi
    again = select_slices(strategy, k, lo, hi, rng=np.random.default_rng(seed), features=feats)
    assert again == got
    if strategy == "interval":
        gaps = np.diff(got)
        assert gaps.size == 0 or gaps.max() - gaps.min() <= 1
        assert gaps.size == 0 or gaps.min() >= (hi - lo + 1) // k
    if strategy == "block":
        assert list(got) == list(range(got[0], got[0] + k))


def test_random_is_uniform_over_slices() -> None:
    counts = np.zeros(10)
    rng = np.random.default_rng(0)
    for _ in range(3000):
        counts[list(random_slices(3, 0, 9, rng=rng))] += 1
    assert np.allclose(counts / counts.sum(), 0.1, atol=0.01)


def test_interval_offset_covers_every_slice_and_block_centre_is_uniform() -> None:
    rng = np.random.default_rng(0)
    hit = np.zeros(20)
    for _ in range(400):
        hit[list(interval_slices(4, 0, 19, rng=rng))] += 1
    assert hit.min() > 0 and np.allclose(hit / hit.sum(), 1 / 20, atol=0.02)
    starts = [block_slices(5, 10, 29, rng=rng)[0] for _ in range(2000)]
    assert min(starts) == 10 and max(starts) == 25  # clamped into the range, never shortened


def test_ual_takes_one_slice_per_appearance_mode() -> None:
    # three groups of slices with distinct appearance; k=3 must pick one slice from each group
    rng = np.random.default_rng(0)
    feats = np.concatenate([rng.normal(c, 0.05, size=(n, 2)) for c, n in ((0, 6), (5, 3), (10, 8))])
    for seed in range(5):
        got = ual_slices(3, 0, 16, rng=np.random.default_rng(seed), features=feats)
        groups = {0 if s < 6 else 1 if s < 9 else 2 for s in got}
        assert groups == {0, 1, 2}
    # the pick in each cluster is the member nearest the centre (k-means found the groups)
    assert ual_slices(1, 6, 8, rng=np.random.default_rng(0), features=feats) in ((6,), (7,), (8,))


def test_slice_encoder_matches_plain_pca() -> None:
    image = np.random.default_rng(0).normal(size=(10, 16, 16))
    feats = default_slice_encoder(image, 0, size=16, components=3)
    assert feats.shape == (10, 3)
    # with size == slice size the rows are the robust-normalised slices: compare with plain PCA
    q25, med, q75 = np.percentile(image[::2, ::2, ::2], [25, 50, 75])
    rows = ((image - med) / (q75 - q25)).reshape(10, -1)
    rows -= rows.mean(0)
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    ref = rows @ vt[:3].T
    assert np.allclose(np.abs(feats), np.abs(ref), atol=1e-8)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategies_refuse_more_slices_than_the_range(strategy: str) -> None:
    with pytest.raises(UserError, match=f"{strategy} was asked for 6 slices but the range \\[2, 6\\] holds 5"):
        select_slices(strategy, 6, 2, 6, rng=np.random.default_rng(0), features=np.zeros((10, 2)))


def test_wrong_calls_by_code_are_programmer_errors_not_user_errors() -> None:
    """Missing or misshapen features/embeddings come from code, never from a user's input: no UserError."""
    from sparseslice.select.allocation import order_volumes

    rng = np.random.default_rng(0)
    with pytest.raises(TypeError, match="features is None for strategy 'ual'") as missing:
        select_slices("ual", 2, 0, 5, rng=rng)
    with pytest.raises(ValueError, match="features must have one row per slice") as short:
        ual_slices(2, 0, 5, rng=rng, features=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="embeddings must have one row per case") as embeddings:
        order_volumes(["a", "b"], selection="diverse", seed=0, embeddings=np.zeros((1, 4)))
    assert not any(isinstance(e.value, UserError) for e in (missing, short, embeddings))


def test_unknown_strategy_lists_the_valid_ones(ds) -> None:
    with pytest.raises(UserError, match="use one of random, interval, ual, block"):
        make_plan(ds, budget=5, strategy="smart")


# ------------------------------------------------------------------------------------------- cost


def test_cost_model_known_answers() -> None:
    cost = CostModel(volume_minutes=2, slice_minutes=1.5, consecutive_discount=0.4, extent_minutes=0.25)
    assert cost.volume_cost([]) == 0
    assert cost.volume_cost([5]) == pytest.approx(3.5)
    assert cost.volume_cost([1, 2, 3]) == pytest.approx(2 + 1.5 * (3 - 0.8))
    assert cost.volume_cost([1, 3, 5], extent=True) == pytest.approx(2.25 + 4.5)
    with pytest.raises(UserError, match="consecutive_discount must be a fraction"):
        CostModel(consecutive_discount=1.5)


# ------------------------------------------------------------------------------------------- plans


def _check_plan(plan: Plan, budget: int, n_slices: dict[str, int]) -> None:
    assert plan.budget == budget == sum(len(e.slices) for e in plan.entries)
    assert len({e.case_id for e in plan.entries}) == len(plan.entries) == plan.volumes
    for e in plan.entries:
        assert len(e.slices) >= 1 and len(set(e.slices)) == len(e.slices)
        lo, hi = e.extent if e.extent else (0, n_slices[e.case_id] - 1)
        assert lo <= min(e.slices) and max(e.slices) <= hi < n_slices[e.case_id]


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(strategy=st.sampled_from(STRATEGIES), seed=st.integers(0, 10_000),
       budget=st.integers(8, 100), mode=st.sampled_from(("rho", "volumes", "none")),
       use_extents=st.booleans(), selection=st.sampled_from(("random", "diverse")))
def test_plans_spend_exactly_the_budget_and_are_seeded(ds, n_slices, strategy, seed, budget, mode, use_extents,
                                                       selection) -> None:
    extents = extents_from_labels(ds, axis=2) if use_extents else None
    known = extents or (extents_from_labels(ds, axis=2) if strategy == "block" else None)
    caps = [hi - lo + 1 for lo, hi in known.values()] if known else list(n_slices.values())
    rho = max(0.3, 1 / min(caps))  # rho * slices >= 1 for every volume, as make_plan demands
    budget = min(budget, sum(caps) // 2)  # leave every plan a real choice, so another seed can differ
    budget = min(budget, int(rho * sum(caps))) if mode == "rho" else budget
    kw: dict = {"rho": rho} if mode == "rho" else {"volumes": 8} if mode == "volumes" else {}
    plan = make_plan(ds, budget=budget, strategy=strategy, seed=seed, extents=extents, volume_selection=selection,
                     **kw)
    _check_plan(plan, budget, n_slices)
    if strategy == "block" or use_extents:
        assert all(e.extent is not None for e in plan.entries)
    if strategy == "block":
        assert all(list(e.slices) == list(range(e.slices[0], e.slices[-1] + 1)) for e in plan.entries)
    same = make_plan(ds, budget=budget, strategy=strategy, seed=seed, extents=extents, volume_selection=selection,
                     **kw)
    assert same.to_dict() == plan.to_dict()
    others = [make_plan(ds, budget=budget, strategy=strategy, seed=seed + d, extents=extents,
                        volume_selection=selection, **kw).to_dict()["entries"] for d in (1, 2, 3)]
    if strategy != "ual" or selection == "random":  # k-means may converge to the same clusters for every seed
        assert any(o != plan.to_dict()["entries"] for o in others)  # all three equal by chance: < 1e-6 here


def test_rho_and_volumes_derive_each_other(ds, n_slices) -> None:
    plan = make_plan(ds, budget=20, rho=0.25, strategy="interval", seed=0)
    chosen = sum(n_slices[c] for c in plan.case_ids)
    # the fewest volumes whose rho-share reaches the budget
    assert 0.25 * chosen >= 20 > 0.25 * (chosen - n_slices[plan.case_ids[-1]])
    assert plan.rho == 0.25 and plan.rho_effective == pytest.approx(20 / chosen, abs=1e-6)
    by_volumes = make_plan(ds, budget=20, volumes=plan.volumes, strategy="interval", seed=0)
    assert [e.slices for e in by_volumes.entries] == [e.slices for e in plan.entries]
    assert by_volumes.rho == pytest.approx(20 / chosen, abs=1e-6)
    spread = make_plan(ds, budget=20, seed=0)
    assert spread.volumes == 8


def test_ual_plan_and_plan_files_round_trip(ds, n_slices, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=24, volumes=6, strategy="ual", seed=2)
    _check_plan(plan, 24, n_slices)
    path = write_plan(plan, tmp_path / "p.json")
    assert read_plan(path) == plan
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert rows[0] == "case,axis,n_slices,first,last,n_drawn,slices,slices_1based"
    first = rows[1].split(",")
    assert first[0] == plan.entries[0].case_id
    assert [int(s) for s in first[6].split()] == list(plan.entries[0].slices)
    assert [int(s) - 1 for s in first[7].split()] == list(plan.entries[0].slices)


def test_block_fraction_follows_structure_slices(ds) -> None:
    extents = extents_from_labels(ds, axis=2)
    plan = make_plan(ds, budget=12, strategy="block", block_fraction=0.6, seed=1)
    for e in plan.entries[:-1]:
        assert len(e.slices) == max(1, round(0.6 * (e.extent[1] - e.extent[0] + 1)))
        assert e.extent == extents[e.case_id]
    assert plan.budget == 12 and plan.volumes < 8


def test_budget_hours_plans_the_most_slices_that_fit(ds) -> None:
    cost = CostModel(volume_minutes=2, slice_minutes=1, consecutive_discount=0)
    plan = make_plan(ds, budget_hours=0.5, volumes=4, strategy="random", cost=cost)
    # 4 volumes x 2 min + n slices x 1 min <= 30 min  ->  22 slices
    assert plan.budget == 22 and plan.minutes == pytest.approx(30)
    with pytest.raises(UserError, match="budget_hours is too small"):
        make_plan(ds, budget_hours=0.1, volumes=4, cost=cost)


def test_allocation_modes_known_answers() -> None:
    from sparseslice.select.allocation import Allocation

    caps = [10, 20, 30]
    assert [Allocation(**kw).mode for kw in ({}, {"rho": 1}, {"rho": 0.5}, {"volumes": 2},
                                               {"block_fraction": 0.5})] == [
        "spread", "full", "rho", "volumes", "block_fraction"]
    assert Allocation().spend(10, caps)[:2] == (3, [2, 3, 5])  # apportion's known answer
    assert Allocation(volumes=2).spend(5, caps)[:2] == (2, [2, 3])
    assert Allocation(rho=0.5).spend(15, caps)[:2] == (2, [5, 10])  # 0.5*10 + 0.5*20 reaches 15
    assert Allocation(rho=1).spend(35, caps)[:2] == (2, [10, 20])  # 5 slices unspent
    assert Allocation(block_fraction=0.5).spend(12, caps)[:2] == (2, [5, 7])  # blocks 5, 10, 15
    assert Allocation(rho=1).budget_range(caps) == (10, 60)
    assert Allocation(rho=0.5).budget_range(caps) == (1, 30)
    assert Allocation(volumes=2).budget_range(caps) == (2, 30)
    assert Allocation(block_fraction=0.5).budget_range(caps) == (1, 30)
    with pytest.raises(UserError, match="block_fraction only applies to strategy 'block'"):
        Allocation(block_fraction=0.5).check(strategy="random")


def test_budget_hours_with_rho_1_plans_the_most_whole_volumes_that_fit(ds, n_slices) -> None:
    # the time search used to start at a 1-slice budget, which no whole volume fits (always refused)
    cost = CostModel(volume_minutes=2, slice_minutes=1, consecutive_discount=0)
    everything = make_plan(ds, budget=sum(n_slices.values()), rho=1, cost=cost)  # all 8, in selection order
    minutes = np.cumsum([2 + n_slices[c] for c in everything.case_ids])
    expected = int(np.searchsorted(minutes, 60, side="right"))  # whole volumes within one hour
    plan = make_plan(ds, budget_hours=1.0, rho=1, cost=cost)
    assert 1 <= expected < 8 and plan.full_volumes
    assert plan.case_ids == everything.case_ids[:expected]
    assert all(e.slices == tuple(range(n_slices[e.case_id])) for e in plan.entries)
    assert plan.minutes == pytest.approx(minutes[expected - 1]) and plan.minutes <= 60


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"budget": 10_000}, "budget is larger than the data"),
    ({"budget": 10, "rho": 1.5}, "rho must be a fraction in \\(0, 1\\], got 1.5"),
    ({"budget": 10, "rho": 0.01}, "rho times the selectable slices must be at least 1"),
    ({"budget": 150, "rho": 0.5}, "budget exceeds what rho=0.5 can use"),
    ({"budget": 10, "volumes": 9}, "volumes must be between 1 and the 8 candidate cases, got 9"),
    ({"budget": 3, "volumes": 5}, "budget must give each of the 5 volumes at least one slice"),
    ({"budget": 10, "rho": 0.2, "volumes": 3}, "rho and volumes are exclusive"),
    ({}, "budget and budget_hours are exclusive and one is required"),
    ({"budget": 10, "cases": ["nope"]}, "case 'nope' is not in the dataset"),
    ({"budget": 10, "extents": {"nope": (0, 3)}}, "extents name case 'nope'"),
    ({"budget": 10, "extents": {"phantom_000": (5, 99)}}, "case 'phantom_000': extent must satisfy"),
    ({"budget": 10, "extents": {"phantom_000": (6, 2)}}, "extent must satisfy 0 <= first <= last"),
    ({"budget": 10, "volume_selection": "best"}, "volume_selection is unknown"),
    ({"budget": 10, "block_fraction": 0.2}, "block_fraction only applies to strategy 'block'"),
])
def test_impossible_requests_are_refused(ds, kwargs, message) -> None:
    with pytest.raises(UserError, match=message):
        make_plan(ds, **kwargs)


def test_plan_with_a_bad_slice_is_refused(tmp_path: Path) -> None:
    bad = {"strategy": "random", "entries": [{"case": "a", "axis": 2, "n_slices": 10, "slices": [3, 12]}]}
    (tmp_path / "plan.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="case 'a' names slices outside \\[0, 9\\]"):
        read_plan(tmp_path)


def test_read_extents_checks_the_csv(tmp_path: Path) -> None:
    good = tmp_path / "clicks.csv"
    good.write_text("case,first,last\nphantom_000,3,9\n")
    assert read_extents(good) == {"phantom_000": (3, 9)}
    bad = tmp_path / "bad.csv"
    bad.write_text("case,first,last\nphantom_000,9,3\n")
    with pytest.raises(UserError, match="line 2: extent must satisfy 0 <= first <= last, got \\(9, 3\\)"):
        read_extents(bad)


def test_extents_from_labels_match_extent_of(ds) -> None:
    ext = extents_from_labels(ds, axis=2)
    for c in ds.cases:
        assert ext[c.case_id] == extent_of(load_label(c).array, axis=2)


# ------------------------------------------------------------------------------------------- CLI


def test_cli_plan_writes_files_and_summary(phantoms: Path, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    res = CliRunner().invoke(app, ["plan", str(phantoms), "--budget", "12", "--rho", "0.2", "--strategy",
                                   "interval", "--seed", "1", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "12 slices" in res.output and "estimated annotation time" in res.output
    plan = read_plan(out)
    assert plan.budget == 12 and plan.strategy == "interval" and plan.rho == 0.2
    assert (tmp_path / "plan.csv").is_file()


def test_cli_plan_with_clicks_csv(phantoms: Path, tmp_path: Path) -> None:
    clicks = tmp_path / "clicks.csv"
    clicks.write_text("case,first,last\nphantom_000,4,10\nphantom_001,5,9\n")
    res = CliRunner().invoke(app, ["plan", str(phantoms), "--budget", "6", "--cases", "phantom_000,phantom_001",
                                   "--extents", str(clicks), "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = read_plan(tmp_path / "p.json")
    assert {e.case_id: e.extent for e in plan.entries} == {"phantom_000": (4, 10), "phantom_001": (5, 9)}
    assert all(4 <= s <= 10 for s in plan.entry("phantom_000").slices)


@pytest.mark.parametrize(("args", "message"), [
    (["--budget", "5", "--strategy", "smart"], "--strategy must be one of random, interval, ual, block, got 'smart'"),
    (["--budget", "5", "--rho", "2"], "rho must be a fraction"),
    (["--budget", "100000"], "budget is larger than the data"),
])
def test_cli_plan_errors_are_one_line(phantoms: Path, tmp_path: Path, args, message) -> None:
    res = CliRunner().invoke(app, ["plan", str(phantoms), *args, "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 2
    assert message in res.output and "Traceback" not in res.output


# ------------------------------------------------------------------------------------------- real data


def test_ual_plan_on_hippocampus_is_fast(hippocampus: Path) -> None:
    ds = discover_dataset(hippocampus)
    ids = ds.case_ids[:40]
    t0 = time.perf_counter()
    plan = make_plan(ds, budget=150, strategy="ual", seed=0, cases=ids)
    seconds = time.perf_counter() - t0
    assert plan.volumes == 40 and plan.budget == 150 and plan.axis == 0
    assert seconds < 20 * 40 / 260 * 3  # 3x slack over the 20 s / 260 volume target (shared CPU)


def test_cli_plan_by_hours_with_label_extents(phantoms: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["plan", str(phantoms), "--budget-hours", "0.5", "--volumes", "4", "--extents",
                                   "labels", "--volume-minutes", "2", "--slice-minutes", "1", "--consecutive-discount",
                                   "0", "--extent-minutes", "0", "-o", str(tmp_path / "p.json")])
    assert res.exit_code == 0, res.output
    plan = read_plan(tmp_path / "p.json")
    assert plan.minutes <= 30 and plan.volumes == 4 and all(e.extent is not None for e in plan.entries)
    assert plan.budget == min(22, sum(e.extent[1] - e.extent[0] + 1 for e in plan.entries))
