"""The partial-annotation claims: known answers on hand-made case tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from sparseslice.study.claims import partial_annotation_claims, std_difference

CASES = [f"c{i}" for i in range(10)]


def _rows(dice: np.ndarray, *, strategy: str, rho=None, fraction=None, border=False, schedule="one-step",
          mask=False, model="3d") -> list[dict]:
    out = []
    for seed in range(2):
        for case, value in zip(CASES, dice, strict=True):
            out.append({"run_id": f"{strategy}{fraction}{border}{schedule}{mask}{seed}", "model": model,
                        "budget": 360, "rho": rho, "volumes": None, "strategy": strategy, "block_fraction": fraction,
                        "interpolation": "none", "border_slices": border, "schedule": schedule, "mask_channel": mask,
                        "seed": seed, "baseline": False, "case": case, "dice": value + 0.001 * seed})
    return out


def _table() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    full = 0.85 + rng.normal(0, 0.06, len(CASES))  # wide spread
    partial = 0.9 + 0.2 * (full - 0.85)  # better, and tighter
    rows = (_rows(full, strategy="random", rho=1.0)
            + _rows(partial, strategy="block", fraction=0.2, border=True)
            + _rows(partial - 0.05, strategy="block", fraction=0.2, border=False)  # border helps by 0.05
            + _rows(partial + 0.002, strategy="block", fraction=0.2, border=True, schedule="two-step")  # negligible
            + _rows(partial - 0.03 + rng.normal(0, 0.03, len(CASES)), strategy="block", fraction=0.2, border=True,
                    mask=True))
    return pd.DataFrame(rows)


def test_each_claim_gets_the_verdict_its_numbers_call_for():
    found = {c.claim: c for c in partial_annotation_claims(_table())}
    assert set(found) == {"partial >= full", "smaller std over test cases", "border slices help", "two-step helps",
                          "mask channel helps (ablation)"}
    assert found["partial >= full"].verdict == "reproduced" and found["partial >= full"].n == len(CASES)
    assert found["smaller std over test cases"].verdict == "reproduced"
    assert found["smaller std over test cases"].diff < 0
    border = found["border slices help"]
    assert border.verdict == "reproduced" and abs(border.diff - 0.05) < 1e-9 and border.a == "True"
    assert found["two-step helps"].verdict == "not reproduced"  # +0.002 for every case: below the margin
    assert found["mask channel helps (ablation)"].verdict == "not reproduced"  # worse on average


def test_full_arm_better_is_not_reproduced_and_models_are_kept_apart():
    table = _table()
    table_2d = table.assign(model="2d", dice=np.where(table["strategy"] == "random", table["dice"] + 0.2,
                                                      table["dice"]))
    found = partial_annotation_claims(pd.concat([table, table_2d]))
    by = {(c.claim, c.model): c for c in found}
    assert by[("partial >= full", "3d")].verdict == "reproduced"
    assert by[("partial >= full", "2d")].verdict == "not reproduced"
    assert by[("partial >= full", "2d")].ci_high < 0


def test_no_block_arm_means_no_claims():
    table = _table()
    assert partial_annotation_claims(table[table["strategy"] != "block"]) == []


def test_std_difference_matches_numpy_and_its_interval_covers_it():
    a = pd.Series([0.9, 0.8, 0.85, 0.95, 0.7], index=list("abcde"))
    b = pd.Series([0.9, 0.5, 0.85, 0.99, 0.6], index=list("abcde"))
    diff, low, high = std_difference(a, b)
    assert np.isclose(diff, a.std() - b.std()) and low <= diff <= high


def test_a_full_arm_is_recommended_as_the_whole_volumes_that_fit(monkeypatch):
    """rho 1 spends whole volumes (the allocation's rule), never a budget spread thinner."""
    from sparseslice.study import analysis
    from sparseslice.study.report import _plan_text

    assert analysis.plan_volumes(350, rho=1.0, volumes=None, capacity=58, seen=[6, 6, 6]) == 6
    assert analysis.plan_volumes(350, rho=0.5, volumes=None, capacity=58, seen=[]) == 13  # fewest reaching it
    best = pd.Series({"budget": 350, "rho": 1.0, "volumes": None, "strategy": "random", "regime": "r"})
    runs = pd.DataFrame({"run_id": ["a"], "seed": [0], "n_volumes": [6]})
    monkeypatch.setattr(analysis, "regime_label", lambda row: "r")
    text = _plan_text(best, runs, {"a": [(58, 58)] * 6})
    assert text.startswith("6 volumes: 58+58+58+58+58+58 = 348 slices (whole volumes; 2 of the 350 slices unspent)")
