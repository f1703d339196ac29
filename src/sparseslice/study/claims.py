"""The partial-annotation paper's claims, checked on a study's test cases.

Specktor-Fadida et al. claim that, at the same number of drawn slices, (1) blocks of
consecutive slices in many volumes reach at least the Dice of a few fully annotated volumes,
(2) with a smaller spread over test cases, (3) border slices help and (4) two-step
optimisation helps. Each claim is a paired comparison per model (2D and 3D apart) on
per-case means (seeds averaged first, :func:`sparseslice.study.analysis.paired`), with a
bootstrap interval over test cases; the mean claims are Holm-corrected together. The mask
channel is reported as an ablation with the same rule as the "helps" claims.

The verdict rules are :data:`RULES` (the report states them) and :func:`_at_least`,
:func:`_helps` and the spread rule in :func:`partial_annotation_claims`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pandas as pd

from sparseslice.study import analysis

#: Dice difference treated as negligible: the non-inferiority margin and the smallest gain that counts.
MARGIN = 0.01
#: The verdict rules in words, as the report states them.
RULES = (f"'at least' is reproduced when the 95% interval of a − b stays above −{MARGIN:g} Dice (not worse by "
         "more than the margin) and not reproduced when it lies below 0; 'smaller std' (the difference of the stds "
         "over test cases, cases resampled in pairs) when its interval lies below 0, not reproduced above 0; "
         "'helps' when the Holm-corrected Wilcoxon test is significant in its favour with a mean gain of at least "
         f"{MARGIN:g}, not reproduced when the interval stays below +{MARGIN:g} Dice (any gain is smaller than the "
         "margin) or the option is significantly worse; anything else is inconclusive.")


@dataclass(frozen=True)
class Claim:
    """One claim of the paper, measured: ``a - b`` over test cases, with its verdict."""

    claim: str
    model: str
    a: str
    b: str
    a_mean: float
    b_mean: float
    n: int
    diff: float
    ci_low: float
    ci_high: float
    p_adjusted: float
    verdict: str


def std_difference(a: pd.Series, b: pd.Series) -> tuple[float, float, float]:
    """``std(a) - std(b)`` over the test cases both have, with a paired percentile bootstrap interval.

    Examples
    --------
    >>> a = pd.Series([0.90, 0.91, 0.89, 0.90], index=list("wxyz"))
    >>> b = pd.Series([0.80, 0.95, 0.70, 0.99], index=list("wxyz"))
    >>> round(std_difference(a, b)[0], 3)
    -0.126
    """
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2:
        return np.nan, np.nan, np.nan
    x, y = both["a"].to_numpy(), both["b"].to_numpy()
    low, high = analysis.bootstrap_ci(x, y, statistic=_std_gap)
    return float(_std_gap(x, y)), low, high


def _std_gap(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.std(a, axis=axis, ddof=1) - np.std(b, axis=axis, ddof=1)


def _arm(frame: pd.DataFrame, name: str) -> pd.DataFrame:
    return frame.assign(arm=name)


def _per_case(frame: pd.DataFrame) -> pd.Series:
    return frame.groupby("case")["dice"].mean()


def _helps(t: analysis.Paired) -> str:
    if t.significant and t.mean_diff >= MARGIN:
        return "reproduced"
    if (t.significant and t.mean_diff < 0) or (not np.isnan(t.ci_high) and t.ci_high < MARGIN):
        return "not reproduced"
    return "inconclusive"


def _at_least(t: analysis.Paired) -> str:
    if not np.isnan(t.ci_low) and t.ci_low > -MARGIN:
        return "reproduced"
    if not np.isnan(t.ci_high) and t.ci_high < 0:
        return "not reproduced"
    return "inconclusive"


def _comparisons(cases: pd.DataFrame, model: str) -> list[tuple[str, analysis.Paired, pd.DataFrame, pd.DataFrame]]:
    """``(claim, paired test, rows of a, rows of b)`` for one model's arms that the grid holds."""
    grid = cases[(cases["model"] == model) & ~cases["baseline"].astype(bool)]
    blocks, slices = grid[grid["strategy"] == "block"], grid[grid["strategy"] != "block"]
    plain = blocks[(blocks["schedule"] == "one-step") & ~blocks["mask_channel"].astype(bool)]
    border = plain[plain["border_slices"].astype(bool)]
    partial = border if not border.empty else plain
    full = slices[(slices["rho"] == 1.0) & (slices["schedule"] == "one-step") & ~slices["mask_channel"].astype(bool)]
    out = []
    match = ["budget", "seed", "case"]
    for fraction, rows in partial.groupby("block_fraction"):
        a = f"block {fraction:g}" + (" + border" if not border.empty else "")
        both = pd.concat([_arm(rows, a), _arm(full, "full (rho 1)")])
        t = analysis.paired(both, "arm", a, "full (rho 1)", match=match)
        if t is not None:
            out.append(("partial >= full", t, rows, full))
    tests = (("border slices help", plain, "border_slices", True, False),
             ("two-step helps", blocks[~blocks["mask_channel"].astype(bool)
                                       & (blocks["border_slices"].astype(bool) | border.empty)],
              "schedule", "two-step", "one-step"),
             ("mask channel helps (ablation)", blocks[blocks["schedule"] == "one-step"], "mask_channel", True, False))
    for claim, rows, factor, yes, no in tests:
        t = analysis.paired(rows, factor, yes, no, match=["budget", "block_fraction", "seed", "case"])
        if t is not None:
            out.append((claim, t, rows[rows[factor] == yes], rows[rows[factor] == no]))
    return out


def partial_annotation_claims(cases: pd.DataFrame) -> list[Claim]:
    """Every claim the study's grid can check, per model; empty when it has no block arm.

    ``cases`` is :func:`sparseslice.study.analysis.case_table`'s output (cut-short runs removed).
    """
    if cases.empty or not (cases["strategy"] == "block").any():
        return []
    found = [(model, *c) for model in sorted(cases["model"].unique()) for c in _comparisons(cases, model)]
    adjusted = analysis.with_holm([t for _, _, t, _, _ in found])
    claims = []
    for (model, claim, _, a_rows, b_rows), t in zip(found, adjusted, strict=True):
        verdict = _at_least(t) if claim == "partial >= full" else _helps(t)
        claims.append(Claim(claim, model, t.a, t.b, float(_per_case(a_rows).mean()), float(_per_case(b_rows).mean()),
                            t.n, t.mean_diff, t.ci_low, t.ci_high, t.p_adjusted, verdict))
        if claim == "partial >= full":
            diff, low, high = std_difference(_per_case(a_rows), _per_case(b_rows))
            spread = ("reproduced" if high < 0 else "not reproduced" if low > 0 else "inconclusive") \
                if np.isfinite(low) else "inconclusive"
            claims.append(dataclasses.replace(
                claims[-1], claim="smaller std over test cases", a_mean=float(_per_case(a_rows).std(ddof=1)),
                b_mean=float(_per_case(b_rows).std(ddof=1)), diff=diff, ci_low=low, ci_high=high,
                p_adjusted=np.nan, verdict=spread))
    return claims
