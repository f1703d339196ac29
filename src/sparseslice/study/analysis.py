"""Numbers behind the report: per-run and per-regime summaries, relative performance, paired tests.

The main measure is the test-set Dice of the union of foreground labels (``label == "fg"``);
relative performance divides a run's Dice by the mean Dice of the full-label baseline of
the same model (and schedule when there is one), as the papers plot it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparseslice.metrics import REGION_FOREGROUND
from sparseslice.study.results import FACTOR_COLUMNS

REGIME_COLUMNS = [c for c in FACTOR_COLUMNS if c != "seed"]


def main_label(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of the foreground union, or the mean over labels when there is no foreground row."""
    fg = results["region"] == REGION_FOREGROUND
    if fg.any():
        return results[fg]
    keys = [c for c in results.columns if c not in ("label", "region", "value")]
    return results.groupby(keys, dropna=False, as_index=False)["value"].mean().assign(label=0)


def case_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run x case: factors plus one column per metric (main label), and ``rel_dice``."""
    fg = main_label(results)
    index = ["run_id", *FACTOR_COLUMNS, "case"]
    wide = fg.groupby([*index, "metric"], dropna=False)["value"].mean().unstack("metric").reset_index()
    wide.columns.name = None
    base = wide[wide["baseline"].astype(bool)]
    wide["rel_dice"] = np.nan
    if not base.empty:
        for (model, schedule), rows in wide.groupby(["model", "schedule"]):
            ref = base[(base["model"] == model) & (base["schedule"] == schedule)]
            if ref.empty:
                ref = base[base["model"] == model]
            if ref.empty:
                continue
            per_case = ref.groupby("case")["dice"].mean()
            denom = rows["case"].map(per_case).replace(0, np.nan)
            wide.loc[rows.index, "rel_dice"] = rows["dice"] / denom
    return wide


def run_summary(cases: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run: factors, mean metrics over test cases, run facts."""
    metrics = [c for c in cases.columns if c not in ("run_id", *FACTOR_COLUMNS, "case")]
    per_run = cases.groupby("run_id")[metrics].mean().reset_index()
    facts = [c for c in ("n_volumes", "slices_per_volume", "slices", "rho_effective", "best_val_dice",
                         "train_seconds") if c in runs.columns]
    return runs[runs["status"] == "done"][["run_id", *FACTOR_COLUMNS, *facts]].merge(per_run, on="run_id")


def regime_label(row: pd.Series) -> str:
    """Short human name of a regime (every factor but the seed)."""
    if bool(row["baseline"]):
        parts = [f"{row['model'].upper()} full labels"]
    else:
        parts = [f"{row['model'].upper()}", f"budget {int(row['budget'])}"]
        if pd.notna(row["rho"]):
            parts.append(f"rho {row['rho']:g}")
        if pd.notna(row["volumes"]):
            parts.append(f"s {int(row['volumes'])}")
        strategy = row["strategy"] if pd.isna(row["block_fraction"]) else f"block {row['block_fraction']:g}"
        parts.append(strategy)
        if row["interpolation"] != "none":
            parts.append(f"interp {row['interpolation']}")
        if bool(row["border_slices"]):
            parts.append("border")
        if bool(row["mask_channel"]):
            parts.append("mask channel")
    if row["schedule"] != "one-step":
        parts.append(row["schedule"])
    return ", ".join(parts)


def regime_summary(per_run: pd.DataFrame) -> pd.DataFrame:
    """One row per regime: mean and std over seeds of the run means, seed count."""
    metrics = [c for c in ("dice", "rel_dice", "hd95", "assd2d", "assd", "hd", "rvd", "n_volumes",
                           "slices_per_volume") if c in per_run.columns]
    grouped = per_run.groupby(REGIME_COLUMNS, dropna=False)
    out = grouped[metrics].agg(["mean", "std"])
    out.columns = [f"{m}_{s}" for m, s in out.columns]
    out["n_seeds"] = grouped["seed"].nunique()
    out["seeds"] = grouped["seed"].apply(lambda s: ", ".join(str(int(v)) for v in sorted(s)))
    out = out.reset_index()
    out["regime"] = out.apply(regime_label, axis=1)
    return out.sort_values("dice_mean", ascending=False).reset_index(drop=True)


@dataclass(frozen=True)
class Paired:
    """A paired comparison of two arms on the same cases (and seeds, and other factors)."""

    factor: str
    a: str
    b: str
    n: int
    mean_diff: float
    wins: int
    p_value: float

    @property
    def verdict(self) -> str:
        if self.n < 6 or np.isnan(self.p_value):
            return "too few pairs to test"
        if self.p_value >= 0.05:
            return "no significant difference"
        return f"{self.a if self.mean_diff > 0 else self.b} better"


def paired(cases: pd.DataFrame, factor: str, a: object, b: object, *, value: str = "dice",
           match: list[str] | None = None) -> Paired | None:
    """Per-case paired differences ``a - b`` of ``value`` between two levels of ``factor``.

    Pairs share every other factor (``match``, default every regime factor but ``factor``
    and those tied to it), the seed and the case. Wilcoxon signed-rank test (SciPy).
    """
    from scipy.stats import wilcoxon

    tied = {"rho": ["volumes"], "volumes": ["rho"]}.get(factor, [])
    keys = match or [c for c in [*FACTOR_COLUMNS, "case"] if c not in (factor, *tied)]
    keyed = cases.assign(**{k: cases[k].astype(str) for k in keys})  # NaN factors must match too
    left = keyed[keyed[factor] == a].set_index(keys)[value]
    right = keyed[keyed[factor] == b].set_index(keys)[value]
    left, right = left[~left.index.duplicated()], right[~right.index.duplicated()]
    both = pd.concat([left.rename("a"), right.rename("b")], axis=1, join="inner").dropna()
    if both.empty:
        return None
    diff = both["a"] - both["b"]
    p = np.nan
    if len(diff) >= 6 and np.any(diff != 0):
        try:
            p = float(wilcoxon(diff).pvalue)
        except ValueError:
            p = np.nan
    return Paired(factor, str(a), str(b), int(len(diff)), float(diff.mean()), int((diff > 0).sum()), p)


def paired_comparisons(cases: pd.DataFrame) -> list[Paired]:
    """Every paired comparison the design allows: strategies, densities (extremes), interpolation,
    border slices, schedules, mask channel."""
    grid = cases[~cases["baseline"].astype(bool)]
    out: list[Paired] = []
    strategies = sorted(grid["strategy"].dropna().unique())
    for a, b in itertools.combinations(strategies, 2):
        out.append(paired(grid, "strategy", a, b))
    if "block" in strategies and len(strategies) > 1:
        out.extend(block_vs_dense(grid))
    rhos = sorted(grid["rho"].dropna().unique())
    if len(rhos) >= 2:
        out.append(paired(grid, "rho", rhos[0], rhos[-1]))
    vols = sorted(grid["volumes"].dropna().unique())
    if len(vols) >= 2:
        out.append(paired(grid, "volumes", vols[-1], vols[0]))
    for method in sorted(set(grid["interpolation"]) - {"none"}):
        out.append(paired(grid, "interpolation", method, "none"))
    for factor, a, b in (("border_slices", True, False), ("schedule", "two-step", "one-step"),
                         ("mask_channel", True, False), ("model", "3d", "2d")):
        if {a, b} <= set(grid[factor]):
            out.append(paired(grid, factor, a, b))
    return [p for p in out if p is not None]


def block_vs_dense(grid: pd.DataFrame) -> list[Paired]:
    """Partial-annotation design: each block arm vs the densest slice arm at the same budget.

    Pairs share budget, model, schedule, seed and case (the arms differ in how slices are
    spread, and may differ in border slices and the mask channel).
    """
    blocks = grid[grid["strategy"] == "block"]
    dense = grid[grid["strategy"] != "block"]
    top = dense["rho"].max() if dense["rho"].notna().any() else None
    if top is not None:
        dense = dense[dense["rho"] == top]
    name = f"rho {top:g}" if top is not None else "slices"
    out = []
    for (fraction, border, mask), rows in blocks.groupby(["block_fraction", "border_slices", "mask_channel"]):
        arm = f"block {fraction:g}" + (" + border" if border else "") + (" + mask" if mask else "")
        both = pd.concat([rows.assign(arm=arm), dense.assign(arm=name)])
        result = paired(both, "arm", arm, name, match=["budget", "model", "schedule", "seed", "case"])
        if result is not None:
            out.append(result)
    return out
