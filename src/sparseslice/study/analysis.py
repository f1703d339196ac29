"""Numbers behind the report: per-run and per-regime summaries, relative performance, paired tests.

The main measure of a run on a test case is the mean of its per-label Dice (each label
scored on its own, ``region == "label"``), or the Dice of one label the spec chooses
(``analysis.label``); the foreground union (``region == "foreground"``) is kept beside it
as ``dice_fg``, and every label's Dice as ``dice_label_<k>``. Relative performance divides a
run's Dice by the mean Dice of the full-label baseline of the same model (and schedule when
there is one), as the papers plot it.

Tests are at the level of test cases, the independent units: paired differences are matched
on every other factor and the seed, then averaged per case, so seeds and other factors do
not count as extra samples (no pseudo-replication). Each comparison has a Wilcoxon
signed-rank test on the per-case means, a percentile bootstrap 95 % interval over cases,
and the report's family of comparisons is Holm-corrected.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparseslice.errors import UserError
from sparseslice.metrics import REGION_FOREGROUND, REGION_LABEL
from sparseslice.study.results import FACTOR_COLUMNS

REGIME_COLUMNS = [c for c in FACTOR_COLUMNS if c != "seed"]
#: Fewest test cases a paired test is run on (a two-sided Wilcoxon test on 5 cases cannot reach p < 0.05).
MIN_CASES = 6
#: Significance level of the Holm-corrected tests.
ALPHA = 0.05
#: A label fails when its Dice is below this...
FAIL_DICE = 0.5
#: ... or below this fraction of the full-label baseline's Dice for the same label.
FAIL_RELATIVE = 0.8
#: Bootstrap resamples and seed of every interval (seeded: a report is reproducible).
BOOTSTRAP_RESAMPLES = 9999
BOOTSTRAP_SEED = 0


def main_rows(results: pd.DataFrame, *, label: int | None = None) -> pd.DataFrame:
    """Rows of the main measure: per-label rows (or one chosen label), else the foreground union.

    ``label`` restricts the measure to one label; results without per-label rows (a single
    foreground) use the foreground rows.
    """
    per_label = results[results["region"] == REGION_LABEL]
    if label is not None:
        chosen = per_label[per_label["label"] == int(label)]
        if chosen.empty:
            raise UserError(f"analysis.label is not a label of the results, got {label}; use one of "
                            f"{', '.join(map(str, sorted(per_label['label'].unique()))) or 'none (no per-label rows)'}")
        return chosen
    return per_label if not per_label.empty else results[results["region"] == REGION_FOREGROUND]


def label_columns(frame: pd.DataFrame) -> list[str]:
    """The ``dice_label_<k>`` columns of a table, in label order."""
    cols = [c for c in frame.columns if c.startswith("dice_label_") and not c.endswith(("_mean", "_std"))]
    return sorted(cols, key=lambda c: int(c.rsplit("_", 1)[1]))


def case_table(results: pd.DataFrame, *, label: int | None = None) -> pd.DataFrame:
    """One row per run x case: factors, one column per metric (the main measure: mean over labels,
    or ``label``), ``dice_fg`` (foreground union), ``dice_label_<k>`` per label, and ``rel_dice``."""
    index = ["run_id", *FACTOR_COLUMNS, "case"]
    rows = main_rows(results, label=label)
    wide = rows.groupby([*index, "metric"], dropna=False)["value"].mean().unstack("metric").reset_index()
    wide.columns.name = None
    dice_rows = results[results["metric"] == "dice"]
    extra = []
    fg = dice_rows[dice_rows["region"] == REGION_FOREGROUND]
    if not fg.empty:
        extra.append(fg.groupby(["run_id", "case"])["value"].mean().rename("dice_fg"))
    per_label = dice_rows[dice_rows["region"] == REGION_LABEL]
    if not per_label.empty:
        pivot = per_label.groupby(["run_id", "case", "label"])["value"].mean().unstack("label")
        extra.append(pivot.rename(columns=lambda k: f"dice_label_{int(k)}"))
    if extra:
        wide = wide.merge(pd.concat(extra, axis=1).reset_index(), on=["run_id", "case"], how="left")
    wide["rel_dice"] = _relative(wide)
    return wide


def _relative(wide: pd.DataFrame) -> pd.Series:
    """Each row's Dice over the same case's mean baseline Dice (same model, and schedule if any)."""
    out = pd.Series(np.nan, index=wide.index)
    base = wide[wide["baseline"].astype(bool)]
    if base.empty:
        return out
    for (model, schedule), rows in wide.groupby(["model", "schedule"]):
        ref = base[(base["model"] == model) & (base["schedule"] == schedule)]
        if ref.empty:
            ref = base[base["model"] == model]
        if ref.empty:
            continue
        per_case = ref.groupby("case")["dice"].mean()
        out.loc[rows.index] = rows["dice"] / rows["case"].map(per_case).replace(0, np.nan)
    return out


def cut_short(runs: pd.DataFrame) -> pd.DataFrame:
    """Finished runs marked ``cut_short`` (training stopped before its planned steps)."""
    if "cut_short" not in runs.columns:
        return runs.iloc[0:0]
    flag = runs["cut_short"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
    return runs[(runs["status"] == "done") & flag]


def run_summary(cases: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """One row per finished run: factors, mean metrics over test cases, run facts.

    Runs marked ``cut_short`` are left out (they trained less than planned)."""
    metrics = [c for c in cases.columns if c not in ("run_id", *FACTOR_COLUMNS, "case")]
    per_run = cases.groupby("run_id")[metrics].mean().reset_index()
    facts = [c for c in ("n_volumes", "slices_per_volume", "slices", "rho_effective", "best_val_dice",
                         "train_seconds") if c in runs.columns]
    done = runs[(runs["status"] == "done") & ~runs["run_id"].isin(cut_short(runs)["run_id"])]
    return done[["run_id", *FACTOR_COLUMNS, *facts]].merge(per_run, on="run_id")


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
    metrics = [c for c in ("dice", "rel_dice", "dice_fg", *label_columns(per_run), "hd95", "assd2d", "assd", "hd",
                           "rvd", "n_volumes", "slices_per_volume") if c in per_run.columns]
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
    """A paired comparison of two arms on the same test cases.

    ``n`` is the number of test cases (the unit of the test); ``n_pairs`` the matched
    (case, seed, other factors) cells averaged into them. ``mean_diff`` is the mean over
    cases of ``a - b``, ``ci_low, ci_high`` its bootstrap 95 % interval over cases, ``wins``
    the cases where ``a`` is better, ``p_value`` the Wilcoxon signed-rank p on the per-case
    means and ``p_adjusted`` the Holm-corrected p within the report's comparisons.
    """

    factor: str
    a: str
    b: str
    n: int
    mean_diff: float
    wins: int
    p_value: float
    n_pairs: int = 0
    ci_low: float = np.nan
    ci_high: float = np.nan
    p_adjusted: float = np.nan
    scope: str = ""

    @property
    def p(self) -> float:
        """The p that decides: Holm-corrected when the comparison is in a corrected family."""
        return self.p_value if np.isnan(self.p_adjusted) else self.p_adjusted

    @property
    def testable(self) -> bool:
        return self.n >= MIN_CASES and not np.isnan(self.p_value)

    @property
    def significant(self) -> bool:
        return self.testable and self.p < ALPHA

    @property
    def verdict(self) -> str:
        if not self.testable:
            return f"too few test cases to test ({self.n}; a test needs {MIN_CASES})"
        if not self.significant:
            return "no significant difference"
        return f"{self.a if self.mean_diff > 0 else self.b} better"


def bootstrap_ci(*samples: Sequence[float], statistic=np.mean, confidence: float = 0.95, seed: int = BOOTSTRAP_SEED,
                 resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic`` (SciPy, seeded); NaN below 2 finite values.

    The one interval of the study report: paired differences, the figures' error bars and,
    with two samples resampled as pairs (``statistic(a, b, axis=)``), the difference of spreads.
    """
    from scipy.stats import bootstrap

    data = np.asarray(samples, dtype=float)
    data = data[:, np.isfinite(data).all(axis=0)]
    if data.shape[1] < 2:
        return np.nan, np.nan
    if np.all(np.ptp(data, axis=1) <= 1e-12):
        value = float(statistic(*data, axis=-1))
        return value, value
    res = bootstrap(tuple(data), statistic, paired=len(data) > 1, confidence_level=confidence, n_resamples=resamples,
                    method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN, uncounted.

    Examples
    --------
    >>> holm([0.01, 0.04, 0.03, 0.005]).round(3).tolist()
    [0.03, 0.06, 0.06, 0.02]
    """
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(~np.isnan(p))
    order = idx[np.argsort(p[idx], kind="stable")]
    m = order.size
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def with_holm(tests: list[Paired]) -> list[Paired]:
    """The tests with ``p_adjusted`` set by Holm's method over the whole list."""
    adjusted = holm([t.p_value for t in tests])
    return [dataclasses.replace(t, p_adjusted=float(q)) for t, q in zip(tests, adjusted, strict=True)]


def paired(cases: pd.DataFrame, factor: str, a: object, b: object, *, value: str = "dice",
           match: list[str] | None = None, scope: str = "") -> Paired | None:
    """Per-case paired differences ``a - b`` of ``value`` between two levels of ``factor``.

    Cells are matched on every other factor (``match``, default every regime factor but
    ``factor`` and those tied to it), the seed and the case; the matched differences are then
    averaged per test case, and the test (Wilcoxon signed-rank, SciPy) and the bootstrap
    interval run on those per-case means: one value per independent case.
    """
    from scipy.stats import wilcoxon

    tied = {"rho": ["volumes"], "volumes": ["rho"]}.get(factor, [])
    keys = match or [c for c in [*FACTOR_COLUMNS, "case"] if c not in (factor, *tied)]
    if "case" not in keys:
        keys = [*keys, "case"]
    keyed = cases.assign(**{k: cases[k].astype(str) for k in keys})  # NaN factors must match too
    left = keyed[keyed[factor] == a].set_index(keys)[value]
    right = keyed[keyed[factor] == b].set_index(keys)[value]
    left, right = left[~left.index.duplicated()], right[~right.index.duplicated()]
    both = pd.concat([left.rename("a"), right.rename("b")], axis=1, join="inner").dropna()
    if both.empty:
        return None
    per_case = (both["a"] - both["b"]).groupby(level="case").mean()
    p = np.nan
    if len(per_case) >= MIN_CASES and np.any(per_case != 0):
        p = float(wilcoxon(per_case).pvalue)
    low, high = bootstrap_ci(per_case.to_numpy())
    return Paired(factor, str(a), str(b), int(len(per_case)), float(per_case.mean()), int((per_case > 0).sum()), p,
                  n_pairs=int(len(both)), ci_low=low, ci_high=high, scope=scope)


def density_test(cases: pd.DataFrame, *, budget: int, model: str) -> Paired | None:
    """Sparsest vs densest arm at one budget and model (``rho``, else the volume count ``s``).

    Slice arms only (no blocks); without interpolation when the grid has such runs.
    """
    sub = cases[(cases["budget"] == budget) & (cases["model"] == model) & cases["block_fraction"].isna()
                & ~cases["baseline"].astype(bool)]
    if (sub["interpolation"] == "none").any():
        sub = sub[sub["interpolation"] == "none"]
    factor = "rho" if sub["rho"].nunique() >= 2 else "volumes"
    levels = sorted(sub[factor].dropna().unique())
    if len(levels) < 2:
        return None
    sparse, dense = (levels[0], levels[-1]) if factor == "rho" else (levels[-1], levels[0])
    return paired(sub, factor, sparse, dense, scope=f"{model.upper()}, budget {int(budget)}")


def paired_comparisons(cases: pd.DataFrame) -> list[Paired]:
    """Every paired comparison the design allows, Holm-corrected together: strategies, densities
    (extremes, per budget and model), interpolation, border slices, schedules, mask channel."""
    grid = cases[~cases["baseline"].astype(bool)]
    out: list[Paired] = []
    strategies = sorted(grid["strategy"].dropna().unique())
    for a, b in itertools.combinations(strategies, 2):
        out.append(paired(grid, "strategy", a, b))
    if "block" in strategies and len(strategies) > 1:
        out.extend(block_vs_dense(grid))
    for budget in sorted(grid["budget"].dropna().unique()):
        for model in sorted(grid["model"].unique()):
            out.append(density_test(grid, budget=int(budget), model=model))
    for method in sorted(set(grid["interpolation"]) - {"none"}):
        out.append(paired(grid, "interpolation", method, "none"))
    for factor, a, b in (("border_slices", True, False), ("schedule", "two-step", "one-step"),
                         ("mask_channel", True, False), ("model", "3d", "2d")):
        if {a, b} <= set(grid[factor]):
            out.append(paired(grid, factor, a, b))
    return with_holm([p for p in out if p is not None])


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


def integer_plan(budget: int, *, volumes: int, capacity: int | None = None) -> list[int]:
    """Slices per volume when ``budget`` is spread over ``volumes`` alike volumes of ``capacity``
    selectable slices: the project's allocation (:func:`sparseslice.select.allocation.apportion`),
    so the counts are integers that add up to the budget."""
    from sparseslice.select.allocation import apportion

    cap = capacity if capacity is not None and capacity * volumes >= budget else budget
    return apportion(int(budget), [int(cap)] * int(volumes))


def plan_volumes(budget: int, *, rho: float | None, volumes: float | None, capacity: int | None,
                 seen: Sequence[int]) -> int:
    """How many volumes the plan annotates: ``volumes`` when set; for ``rho``, the allocation's
    rule on volumes of the typical ``capacity`` (``rho=1``: the whole volumes that fit); else
    (or without a capacity) the most common count of the runs (``seen``, ties to the larger)."""
    from sparseslice.select.allocation import volumes_for_rho

    if volumes is not None and not pd.isna(volumes):
        return int(volumes)
    if rho is not None and not pd.isna(rho) and float(rho) >= 1 and capacity and budget >= capacity:
        return int(budget) // int(capacity)  # full annotation: the whole volumes that fit (allocation's rule)
    if rho is not None and not pd.isna(rho) and capacity:
        try:
            return volumes_for_rho(float(rho), [int(capacity)] * int(budget), int(budget))
        except UserError:
            pass
    counts = pd.Series(list(seen), dtype=float).dropna().round().astype(int)
    if counts.empty:
        raise UserError(f"volumes of the plan are unknown for budget {budget}; the runs recorded no n_volumes")
    modes = counts.value_counts()
    return int(max(modes[modes == modes.max()].index))


def spread_text(counts: Sequence[int]) -> str:
    """``3+3+2+2 = 10 slices``, or ``40 x 3 + 60 x 2 = 240 slices`` (volumes x slices) for long plans."""
    total = int(sum(counts))
    if len(counts) <= 12:
        return "+".join(str(int(c)) for c in counts) + f" = {total} slices"
    groups = pd.Series(list(counts)).value_counts().sort_index(ascending=False)
    return " + ".join(f"{n} x {c}" for c, n in groups.items()) + f" = {total} slices"


def failing_labels(row: pd.Series, reference: pd.Series | None) -> list[str]:
    """Labels of a regime (its ``dice_label_<k>_mean``) that fail: Dice under :data:`FAIL_DICE`,
    or under :data:`FAIL_RELATIVE` of the same label's Dice in the full-label ``reference``."""
    out = []
    for col in [c[: -len("_mean")] for c in row.index if c.startswith("dice_label_") and c.endswith("_mean")]:
        value = row[f"{col}_mean"]
        if pd.isna(value):
            continue
        name = f"label {col.rsplit('_', 1)[1]}"
        ref = reference.get(f"{col}_mean", np.nan) if reference is not None else np.nan
        if value < FAIL_DICE:
            out.append(f"{name} (Dice {value:.2f} < {FAIL_DICE:g})")
        elif pd.notna(ref) and ref > 0 and value < FAIL_RELATIVE * ref:
            out.append(f"{name} (Dice {value:.2f}, {value / ref:.0%} of its full-label {ref:.2f})")
    return out
