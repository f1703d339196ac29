"""``STUDY/report.html``: findings, a recommendation, figures and tables in one file.

The page is self-contained (figures are base64 PNG, no external resources) and says what is
missing: crashed or unfinished runs, a missing baseline, a single seed.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.atomic import write_text
from sparseslice.study import analysis, claims, curves, figures
from sparseslice.study.results import collect_results, load_study, run_table
from sparseslice.study.spec import StudySpec
from sparseslice.study.store import StudyStore


@dataclass
class Findings:
    """Sentences of the report, in order, and the warnings about missing pieces."""

    recommendation: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _pm(mean: float, std: float, digits: int = 3) -> str:
    if pd.isna(mean):
        return "n/a"
    return f"{mean:.{digits}f}" + ("" if pd.isna(std) else f" ± {std:.{digits}f}")


def _p(p: float) -> str:
    return "n/a" if pd.isna(p) else (f"{p:.2g}" if p >= 1e-3 else "<0.001")


def _p_is(p: float) -> str:
    """Inline form: ``p=0.012`` or ``p<0.001``."""
    text = _p(p)
    return f"p{text}" if text.startswith("<") else f"p={text}"


def _ci(t: analysis.Paired) -> str:
    return "" if np.isnan(t.ci_low) else f" [95% CI {t.ci_low:+.3f}, {t.ci_high:+.3f}]"


def test_text(t: analysis.Paired) -> str:
    """``+0.021 Dice [95% CI ...], 5/8 test cases better, Wilcoxon p=..., Holm p=...``."""
    holm = "" if np.isnan(t.p_adjusted) else f", Holm-corrected {_p_is(t.p_adjusted)}"
    test = f", Wilcoxon {_p_is(t.p_value)}{holm}" if t.testable else ", no test"
    return f"{t.mean_diff:+.3f} Dice{_ci(t)}, {t.wins}/{t.n} test cases better{test}"


def density_finding(per_run: pd.DataFrame, tests: list[analysis.Paired], budget: int, model: str) -> str | None:
    """Did lower density with more volumes win at this budget and model? With the numbers.

    The verdict is the Holm-corrected paired test over test cases (density extremes, see
    :func:`sparseslice.study.analysis.density_test`); the per-arm means are shown beside it.
    """
    scope = f"{model.upper()}, budget {int(budget)}"
    test = next((t for t in tests if t.factor in ("rho", "volumes") and t.scope == scope), None)
    if test is None:
        return None
    factor = test.factor
    runs = per_run[(per_run["budget"] == budget) & (per_run["model"] == model) & per_run["block_fraction"].isna()
                   & ~per_run["baseline"].astype(bool)]
    if (runs["interpolation"] == "none").any():
        runs = runs[runs["interpolation"] == "none"]
    runs = runs[runs[factor].notna()]
    by = runs.groupby(factor).agg(dice=("dice", "mean"), sd=("dice", "std"), s=("n_volumes", "mean"),
                                  k=("slices_per_volume", "mean"))
    name = "rho" if factor == "rho" else "s"
    sparse, dense = float(test.a), float(test.b)
    lo, hi = by.loc[sparse], by.loc[dense]
    if not test.testable:
        verdict = f"not decided: {test.verdict}"
    elif not test.significant:
        verdict = "no significant difference between lower and higher density"
    elif test.mean_diff > 0:
        verdict = "yes: lower density with more volumes won"
    else:
        verdict = "no: higher density with fewer volumes won"
    curve = ", ".join(f"{name} {r:g} ({row.s:.1f} vol x {row.k:.1f} sl): {_pm(row.dice, row.sd)}"
                      for r, row in by.iterrows())
    return (f"{scope}: {verdict}. Lowest density {name}={sparse:g} "
            f"({lo.s:.1f} volumes x {lo.k:.1f} slices on average) reached Dice {_pm(lo.dice, lo.sd)} vs "
            f"{_pm(hi.dice, hi.sd)} at {name}={dense:g} ({hi.s:.1f} volumes x {hi.k:.1f} slices); per test case "
            f"(mean over seeds and other factors): {test_text(test)}. Mean ± std over seeds: {curve}.")


def _interpolation_verdict(tests: list[analysis.Paired]) -> str:
    interp = [t for t in tests if t.factor == "interpolation"]
    if not interp:
        return "not tested"
    parts = []
    for t in interp:
        if not t.testable:
            word = f"is not decided, {t.verdict}"
        elif not t.significant:
            word = "makes no significant difference"
        else:
            word = "helps" if t.mean_diff > 0 else "hurts"
        parts.append(f"{t.a} {word} ({test_text(t)})")
    return "; ".join(parts)


#: Factors chosen one by one for the recommendation, each by its mean Dice over every other factor.
CHOICE_FACTORS = ("strategy", "rho", "volumes", "block_fraction", "interpolation", "border_slices",
                  "mask_channel", "schedule")
#: Options that add work (an interpolation step, extra clicks, a second training phase): the
#: recommendation takes them only when a corrected test says they help, else the plain level.
PLAIN_LEVELS = {"interpolation": "none", "border_slices": False, "mask_channel": False, "schedule": "one-step"}


def _supported(factor: str, level, tests: Sequence[analysis.Paired]) -> bool:
    """Whether a significant (corrected) comparison of ``factor`` has ``level`` as the better arm."""
    return any(t.factor == factor and t.testable and t.significant
               and str(t.a if t.mean_diff > 0 else t.b) == str(level) for t in tests)


def recommended_regime(regimes: pd.DataFrame, per_run: pd.DataFrame, *,
                       tests: Sequence[analysis.Paired] = ()) -> pd.Series:
    """The regime to recommend, chosen factor by factor rather than as the single best cell.

    Each factor's level is the one with the highest mean Dice over all runs of the group
    (pooled over the other factors), which is less exposed to the luck of one cell than
    the maximum over many cells. An option that adds work (:data:`PLAIN_LEVELS`) is taken
    only when one of ``tests`` finds it significantly better. The regime matching most of the
    chosen levels wins; ties go to the higher Dice.
    """
    chosen = {}
    for factor in CHOICE_FACTORS:
        values = per_run[per_run[factor].notna()]
        if values[factor].nunique() > 1:
            level = values.groupby(factor)["dice"].mean().idxmax()
            plain = PLAIN_LEVELS.get(factor)
            if (plain is not None and level != plain and (values[factor] == plain).any()
                    and not _supported(factor, level, tests)):
                level = plain
            chosen[factor] = level
    score = sum((regimes[f] == v).astype(int) for f, v in chosen.items()) if chosen else 0
    ranked = regimes.assign(_match=score).sort_values(["_match", "dice_mean"], ascending=False)
    return ranked.iloc[0]


def measure_name(cases: pd.DataFrame, label: int | None = None) -> str:
    """What ``dice`` means in this report: one label, the mean over labels, or the foreground."""
    labels = [c.rsplit("_", 1)[1] for c in analysis.label_columns(cases)]
    if label is not None:
        return f"Dice of label {label}"
    if labels:
        return f"Dice (mean over labels {', '.join(labels)}, each scored on its own)"
    return "foreground Dice"


def _plan_text(best: pd.Series, runs: pd.DataFrame, plans: dict[str, list[tuple[int, int]]]) -> str:
    """``4 volumes: 3+3+3+3 = 12 slices`` by the project's allocation, and what the seeds' plans did."""
    budget = int(best["budget"])
    mine = runs[runs.apply(analysis.regime_label, axis=1) == best["regime"]]
    seen = {r.seed: plans[r.run_id] for r in mine.itertuples() if r.run_id in plans}
    caps = [cap for entries in seen.values() for _, cap in entries]
    capacity = int(np.median(caps)) if caps else None
    n = analysis.plan_volumes(budget, rho=best["rho"], volumes=best["volumes"], capacity=capacity,
                              seen=mine["n_volumes"] if "n_volumes" in mine else [])
    full = capacity is not None and pd.notna(best["rho"]) and float(best["rho"]) >= 1 and n * capacity <= budget
    counts = [capacity] * n if full else analysis.integer_plan(budget, volumes=n, capacity=capacity)
    text = f"{n} volumes: {analysis.spread_text(counts)}"
    if full and budget > sum(counts):
        text += f" (whole volumes; {budget - sum(counts)} of the {budget} slices unspent)"
    text += f", slices chosen by {best['strategy']}"
    notes = []
    if capacity is not None and pd.notna(best["rho"]):
        notes.append(f"rho {best['rho']:g} of a typical volume's {capacity} selectable slices")
    if seen:
        notes.append("the seeds' plans: " + "; ".join(
            f"seed {int(seed)} {len(e)} volumes {analysis.spread_text([c for c, _ in e])}"
            for seed, e in sorted(seen.items())))
    return text + (f" ({'; '.join(notes)})" if notes else "")


def _label_check(best: pd.Series, reference: pd.Series | None) -> str:
    cols = [c[: -len("_mean")] for c in best.index if c.startswith("dice_label_") and c.endswith("_mean")]
    if not cols:
        return ""
    per = ", ".join(f"label {c.rsplit('_', 1)[1]} {best[c + '_mean']:.2f}" + (
        f" (full labels {reference[c + '_mean']:.2f})" if reference is not None
        and pd.notna(reference.get(c + "_mean", np.nan)) else "") for c in cols)
    fg = best.get("dice_fg_mean", np.nan)
    text = f" Per label: {per}" + (f"; foreground (all labels together) {fg:.2f}" if pd.notna(fg) else "") + "."
    failing = analysis.failing_labels(best, reference)
    return text + (f" Failing: {', '.join(failing)}." if failing else
                   f" No label fails (each has Dice ≥ {analysis.FAIL_DICE:g} and ≥ "
                   f"{analysis.FAIL_RELATIVE:.0%} of its full-label Dice).")


def recommendation(regimes: pd.DataFrame, tests: list[analysis.Paired], dataset: str,
                   per_run: pd.DataFrame, *, plans: dict[str, list[tuple[int, int]]] | None = None,
                   n_cases: int | None = None, measure: str = "Dice") -> list[str]:
    """One sentence per budget (and model): the recommended regime in plain words.

    ``plans`` maps run ids to their plan's ``(slices, selectable slices)`` per volume; the
    volume count and the slices per volume follow the project's allocation, so they add up
    to the budget.
    """
    out = []
    grid = regimes[~regimes["baseline"].astype(bool)]
    runs = per_run[~per_run["baseline"].astype(bool)]
    interp = _interpolation_verdict(tests)
    for (budget, model), rows in grid.groupby(["budget", "model"]):
        best = recommended_regime(rows, runs[(runs["budget"] == budget) & (runs["model"] == model)],
                                  tests=tests)
        base = regimes[regimes["baseline"].astype(bool) & (regimes["model"] == model)]
        reference = base.iloc[0] if len(base) else None
        if pd.notna(best["block_fraction"]):
            how = (f"{best.get('n_volumes_mean', np.nan):.0f} volumes in blocks of {best['block_fraction']:g} of "
                   "the structure's slices")
        else:
            how = _plan_text(best, runs, plans or {})
        extras = [x for x, on in ((f"with {best['interpolation']} interpolation", best["interpolation"] != "none"),
                                  ("with border slices", bool(best["border_slices"])),
                                  ("with the annotated-slice mask as input", bool(best["mask_channel"])),
                                  (f"{best['schedule']} training", best["schedule"] != "one-step")) if on]
        rel = best.get("rel_dice_mean", np.nan)
        rel_text = f", {rel:.0%} of the full-label Dice" if pd.notna(rel) else ""
        cases_text = f" and {n_cases} test cases" if n_cases else ""
        out.append(
            f"For {dataset} and a budget of {int(budget)} slices ({model.upper()} model): annotate "
            f"{how}{(' ' + ', '.join(extras)) if extras else ''}; "
            f"interpolation: {interp}. Expected test {measure} {_pm(best['dice_mean'], best['dice_std'])}"
            f" over {int(best['n_seeds'])} seed(s){cases_text}{rel_text}.{_label_check(best, reference)} "
            "(Each factor is chosen by its mean Dice over all the other factors, and an option that adds work "
            "only when a corrected test finds it better; the single best cell of the table may differ by chance.)")
    return out


def _plans(store: StudyStore, run_ids: list[str]) -> dict[str, list[tuple[int, int]]]:
    """``{run: [(slices, selectable slices) per volume]}`` from the runs' ``plan.json``."""
    out = {}
    for run_id in run_ids:
        path = store.run_dir(run_id) / "plan.json"
        if not path.is_file():
            continue
        entries = json.loads(path.read_text()).get("entries", [])
        out[run_id] = [(len(e["slices"]), (e["extent"][1] - e["extent"][0] + 1) if e.get("extent")
                        else int(e["n_slices"])) for e in entries]
    return out


def build_findings(store: StudyStore, spec, runs: pd.DataFrame, per_run: pd.DataFrame, cases: pd.DataFrame,
                   regimes: pd.DataFrame, tests: list[analysis.Paired], *, label: int | None = None) -> Findings:
    f = Findings()
    dataset = Path(str(spec.dataset.path)).name if spec.dataset.path else "this dataset"
    failed = runs[runs["status"] == "failed"]
    unfinished = runs[runs["status"].isin(["pending", "interrupted"])]
    if not failed.empty:
        f.warnings.append(f"{len(failed)} of {len(runs)} runs crashed; they are left out of every number below "
                          "(errors in the table at the end). Rerun the study to retry them.")
    if not unfinished.empty:
        f.warnings.append(f"{len(unfinished)} of {len(runs)} runs have not finished (study interrupted or still "
                          "running); numbers use the finished runs only.")
    short = analysis.cut_short(runs)
    if not short.empty:
        reasons = sorted({str(r) for r in short.get("cut_short_reason", pd.Series(dtype=str)).dropna() if str(r)})
        f.warnings.append(f"{len(short)} of {int((runs['status'] == 'done').sum())} finished runs were cut short "
                          "(trained fewer gradient steps than planned" + (f": {'; '.join(reasons)}" if reasons else "")
                          + "); they are left out of every comparison and number below (listed at the end).")
    if per_run.empty:
        f.warnings.append("No run has finished: there is nothing to report yet.")
        return f
    if not spec.baseline:
        f.warnings.append("No full-label baseline in this study (the spec sets baseline: false; an arm that draws "
                          "every slice, such as rho 1, is one of the compared arms, not the baseline): figures show "
                          "absolute Dice, not Dice relative to full labels.")
    elif not per_run["baseline"].astype(bool).any():
        f.warnings.append("No full-label baseline finished: relative performance cannot be computed; figures "
                          "show absolute Dice.")
    if len(spec.seeds) < 2:
        f.warnings.append("Only one seed: the spread between seeds cannot be shown, and small differences may be "
                          "noise.")
    elif (regimes.loc[~regimes["baseline"].astype(bool), "n_seeds"] < len(spec.seeds)).any():
        f.warnings.append("Some regimes have fewer finished seeds than the spec asks for (see the n seeds column).")
    if spec.name == "demo" or "phantom" in dataset:
        f.warnings.append("Synthetic phantoms with very short training: this shows the pipeline, not evidence "
                          "about real data.")
    n_cases = int(cases["case"].nunique())
    f.recommendation = recommendation(regimes, tests, dataset, per_run, plans=_plans(store, list(per_run["run_id"])),
                                      n_cases=n_cases, measure=measure_name(cases, label))
    for budget in sorted(per_run["budget"].dropna().unique()):
        for model in sorted(per_run["model"].unique()):
            text = density_finding(per_run, tests, int(budget), model)
            if text:
                f.findings.append(text)
    strategy_tests = [t for t in tests if t.factor == "strategy"]
    if strategy_tests:
        means = per_run[~per_run["baseline"].astype(bool)].groupby("strategy")["dice"].mean().sort_values()
        f.findings.append("Strategies (mean test Dice over every other factor): "
                          + ", ".join(f"{s} {v:.3f}" for s, v in means[::-1].items()) + ". Paired: "
                          + "; ".join(f"{t.a} vs {t.b} {test_text(t)}: {t.verdict}"
                                      for t in strategy_tests) + ".")
    interp = _interpolation_verdict(tests)
    if interp != "not tested":
        f.findings.append(f"Interpolation: {interp}.")
    for t in tests:
        if t.factor in ("arm", "border_slices", "schedule", "mask_channel", "model"):
            f.findings.append(f"{t.factor}: {t.a} vs {t.b}: {test_text(t)}: {t.verdict}.")
    return f


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


#: Column names of the metrics in the tables; distances are in millimetres.
METRIC_NAMES = {"dice": "Dice", "hd95": "HD95 (mm)", "assd2d": "2D ASSD (mm)", "assd": "ASSD (mm)",
                "hd": "HD (mm)", "rvd": "RVD"}


def _regime_table(regimes: pd.DataFrame, metrics: list[str]) -> str:
    labels = analysis.label_columns(regimes.rename(columns=lambda c: c[: -len("_mean")] if c.endswith("_mean") else c))
    dice_cols = (["dice", *labels, "dice_fg"] if labels else ["dice"]) if "dice" in metrics else []
    dice_cols = [c for c in dice_cols if c == "dice" or f"{c}_mean" in regimes.columns]
    names = {"dice": "Dice (mean of labels)" if labels else "Dice", "dice_fg": "Dice foreground",
             **{c: f"Dice label {c.rsplit('_', 1)[1]}" for c in labels}}
    others = [m for m in metrics if m != "dice"]
    head = ["regime", "n seeds", "volumes", "slices / volume", *[names[c] for c in dice_cols],
            *[METRIC_NAMES.get(m, m) for m in others], "relative Dice"]
    rows = []
    for _, r in regimes.iterrows():
        cells = [r["regime"], f"{int(r['n_seeds'])} ({r['seeds']})",
                 _pm(r.get("n_volumes_mean", np.nan), np.nan, 0 if float(r.get("n_volumes_mean", 0)).is_integer()
                     else 1),
                 "all" if bool(r["baseline"]) else _pm(r.get("slices_per_volume_mean", np.nan), np.nan, 1)]
        for m in [*dice_cols, *others]:
            cells.append(_pm(r.get(f"{m}_mean", np.nan), r.get(f"{m}_std", np.nan), 3 if m.startswith("dice") else 2))
        cells.append(_pm(r.get("rel_dice_mean", np.nan), r.get("rel_dice_std", np.nan)))
        rows.append(cells)
    return _table(head, rows)


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f"<th>{html.escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _examples(store: StudyStore, spec, per_run: pd.DataFrame, cases: pd.DataFrame) -> bytes | None:
    grid = per_run[~per_run["baseline"].astype(bool)]
    if grid.empty or spec.dataset.path is None:
        return None
    best_run = grid.sort_values("dice", ascending=False).iloc[0]["run_id"]
    run_cases = cases[cases["run_id"] == best_run].dropna(subset=["dice"]).sort_values("dice")
    if run_cases.empty:
        return None
    from sparseslice.datasets import discover_dataset

    try:
        dataset = discover_dataset(spec.dataset.path)
        axis = int(store.result(best_run).get("axis", spec.dataset.axis if spec.dataset.axis is not None else 0))
    except Exception:  # noqa: BLE001 - dataset moved: no examples
        return None
    picks = [("best case", run_cases.iloc[-1]), ("worst case", run_cases.iloc[0])]
    examples = []
    for title, row in picks:
        pred = store.run_dir(best_run) / "pred" / f"{row['case']}.nii.gz"
        try:
            case = dataset.case(str(row["case"]))
        except Exception:  # noqa: BLE001
            continue
        if pred.is_file() and case.label is not None:
            examples.append((f"{title} {row['case']}", case.images[0], case.label, pred, axis, float(row["dice"])))
    return figures.example_figure(examples, label_names=curves.dataset_label_names(spec)) if examples else None


CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
.rec{background:#eef6ee;border-left:4px solid #29a36a;padding:.6em 1em}
.warn{background:#fff4e5;border-left:4px solid #f3a712;padding:.6em 1em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .5em}
th{background:#f3f3f3}figure{margin:1em 0}img{max-width:100%}figcaption{font-size:.85em;color:#555}
code{background:#f3f3f3;padding:0 .2em}"""


def render_report(root: str | os.PathLike[str]) -> str:
    """The report of a study folder as one HTML string."""
    store, spec = load_study(root)
    runs = run_table(store, spec)
    results = collect_results(store, spec)
    metrics = [m for m in ("dice", "hd95", "assd2d", "assd", "hd", "rvd") if m in spec.metrics]
    label = analysis_label(spec)
    if results.empty:
        cases = per_run = regimes = pd.DataFrame()
        tests: list[analysis.Paired] = []
    else:
        cases = analysis.case_table(results, label=label)
        cases = cases[~cases["run_id"].isin(analysis.cut_short(runs)["run_id"])]
        per_run = analysis.run_summary(cases, runs)
        regimes = analysis.regime_summary(per_run)
        tests = analysis.paired_comparisons(cases)
    f = build_findings(store, spec, runs, per_run, cases, regimes, tests, label=label)
    n_cases = int(cases["case"].nunique()) if not cases.empty else 0
    parts = [f"<h1>Study report: {html.escape(spec.name)}</h1>",
             f"<p>{html.escape(spec.description)}</p>" if spec.description else "",
             f"<p>Dataset <code>{html.escape(str(spec.dataset.path))}</code>; split seed {spec.dataset.split_seed} "
             f"(val {spec.dataset.val:g}, {_test_text(spec)}); {len(runs)} runs "
             f"({(runs['status'] == 'done').sum()} finished); seeds {', '.join(map(str, spec.seeds))}; "
             f"main measure: test-set {html.escape(measure_name(cases, label) if not cases.empty else 'Dice')}, "
             f"ranked and recommended by it; {n_cases} test cases (the unit of every test).</p>",
             f"<p>Training: {html.escape(_training_text(store, spec, runs))}.</p>"]
    if f.warnings:
        parts.append("<div class='warn'><b>Read with care</b><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in f.warnings) + "</ul></div>")
    if f.recommendation:
        parts.append("<h2>Recommendation</h2><div class='rec'>"
                     + "".join(f"<p>{html.escape(r)}</p>" for r in f.recommendation) + "</div>")
    if f.findings:
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in f.findings) + "</ul>")
    parts.append(_claims_part(cases))
    if not per_run.empty:
        parts.extend(_figures_part(store, spec, results, per_run, cases, regimes, label=label))
        parts.append(f"<h2>Mean ± std per regime</h2><p>Each run's mean over {n_cases} test cases; mean ± std over "
                     "seeds (a regime with one seed shows no std). Per-label Dice scores each label on its own; "
                     "distances in millimetres.</p>" + _regime_table(regimes, metrics))
        if tests:
            parts.append("<h2>Paired comparisons</h2><p>Differences a − b are matched on seed and every other "
                         "factor, then averaged per test case, so each test case counts once (seeds and other "
                         "factors are not independent samples). Wilcoxon signed-rank test (SciPy) on the per-case "
                         f"means (at least {analysis.MIN_CASES} cases); 95% percentile bootstrap interval over "
                         f"cases; Holm correction over the {len(tests)} comparisons of this report, which decides "
                         f"the verdict (p &lt; {analysis.ALPHA:g}).</p>"
                         + _table(["factor", "scope", "a", "b", "test cases (matched runs)", "mean Dice a − b",
                                   "95% CI", "a better in", "p", "Holm p", "verdict"],
                                  [[t.factor, t.scope, t.a, t.b, f"{t.n} ({t.n_pairs})", f"{t.mean_diff:+.4f}",
                                    "n/a" if np.isnan(t.ci_low) else f"{t.ci_low:+.4f} to {t.ci_high:+.4f}",
                                    f"{t.wins}/{t.n}", _p(t.p_value), _p(t.p_adjusted), t.verdict] for t in tests]))
    problems = runs[runs["status"] != "done"][["run_id", "status", "error"]]
    short = analysis.cut_short(runs)
    if not short.empty:
        reason = short["cut_short_reason"] if "cut_short_reason" in short else ""
        problems = pd.concat([problems, short.assign(status="cut short", error=reason)[["run_id", "status", "error"]]])
    if not problems.empty:
        parts.append("<h2>Runs that did not finish or were cut short</h2>"
                     + _table(["run", "status", "error"], problems.fillna("").values.tolist()))
    parts.append(f"<h2>Reproduce</h2><p>Every number comes from <code>results.csv</code> and the runs' "
                 f"<code>config.json</code>. Spec:</p><pre>{html.escape(_yaml(spec.to_dict()))}</pre>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sparseslice study {html.escape(spec.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(p for p in parts if p) + "</body></html>")


def _figures_part(store: StudyStore, spec: StudySpec, results: pd.DataFrame, per_run: pd.DataFrame, cases: pd.DataFrame,
                  regimes: pd.DataFrame, *, label: int | None) -> list[str]:
    """The report's figures with their captions (a figure with nothing to show is left out)."""
    parts = ["<h2>Figures</h2>"]
    shown = "Relative performance" if figures.relative(per_run) else "Test Dice"
    for budget in sorted(per_run["budget"].dropna().unique()):
        parts.append(_img(figures.density_figure(per_run, cases, budget=int(budget)),
                          f"{shown} vs density at a budget of {int(budget)} slices (mean over "
                          "test cases, bars: 95 % bootstrap CI over test cases, each case averaged over seeds "
                          "first; points: seeds; s: volumes annotated)"))
    parts.append(_img(figures.interpolation_figure(per_run, cases),
                      "With vs without interpolation (bars: 95 % bootstrap CI over test cases)"))
    parts.append(_img(figures.strategy_figure(cases),
                      f"Distribution of {shown[0].lower()}{shown[1:]} per strategy"))
    parts.append(_img(figures.regime_figure(per_run, regimes, measure=measure_name(cases, label)),
                      "Every regime (seeds as points)"))
    parts.extend(_img(png, caption) for png, caption in curves.report_figures(store, spec, results, per_run, cases))
    example = _examples(store, spec, per_run, cases)
    parts.append(_img(example, "Example slices (image, truth, prediction; colours: label values, see the "
                               "legend) of the best and worst test case of the best run") if example else
                 "<p>Example slices: no predictions available.</p>")
    return parts


def _claims_part(cases: pd.DataFrame) -> str:
    """The partial-annotation paper's claims (:mod:`sparseslice.study.claims`), when the grid has blocks."""
    found = claims.partial_annotation_claims(cases)
    if not found:
        return ""
    rows = [[c.claim, c.model.upper(), f"{c.a} vs {c.b}", f"{c.a_mean:.3f} vs {c.b_mean:.3f}", f"{c.n}",
             f"{c.diff:+.4f}", "n/a" if np.isnan(c.ci_low) else f"{c.ci_low:+.4f} to {c.ci_high:+.4f}",
             _p(c.p_adjusted), c.verdict] for c in found]
    return ("<h2>The partial-annotation paper's claims</h2><p>Specktor-Fadida et al.: at equal drawn slices, blocks "
            "in many volumes reach at least the Dice of few fully annotated volumes, with a smaller std over test "
            "cases; border slices help; two-step optimisation helps (the mask channel is an ablation). Each row "
            "pairs per-case means (seeds averaged first) of one model; 95% bootstrap interval over test cases; "
            f"Holm correction over the mean comparisons. Verdicts: {html.escape(claims.RULES)}</p>"
            + _table(["claim", "model", "a vs b", "mean Dice (std for the std row) a vs b", "test cases",
                      "a − b", "95% CI", "Holm p", "verdict"], rows))


def analysis_label(spec) -> int | None:
    """The label the spec's ``analysis.label`` chooses as the main measure, or None (mean of labels)."""
    value = (getattr(spec, "analysis", None) or {}).get("label")
    return None if value is None else int(value)


def _training_text(store: StudyStore, spec, runs: pd.DataFrame) -> str:
    """The training options the runs used (from a finished run's config.json when there is one)."""
    options = spec.training_config(spec.runs()[0])
    for run in spec.runs():
        path = store.run_dir(run.run_id) / "config.json"
        if store.status(run) == "done" and path.is_file():
            options = json.loads(path.read_text())["training"]
            break
    shown = {k: v for k, v in options.items() if k not in ("model", "schedule", "mask_channel", "seed", "preset")}
    text = f"preset {options.get('preset', spec.training.get('preset', 'quick'))}" + (
        " (" + ", ".join(f"{k} {v}" for k, v in shown.items()) + ")" if shown else " (TrainConfig defaults)")
    steps = _steps_text(runs)
    if steps:
        return f"{text}; {steps}"
    if "epochs" in runs and "epochs" in options:
        short = runs[(runs["status"] == "done") & (runs["epochs"] < int(options["epochs"]))]
        if len(short):
            text += (f"; {len(short)} of {int((runs['status'] == 'done').sum())} runs stopped before "
                     f"{options['epochs']} epochs (time cap or early stopping), so they are compared at unequal "
                     "training")
    return text


def _steps_text(runs: pd.DataFrame) -> str:
    """What the finished runs' ``gradient_steps`` (fine-tuning included) say about equal training."""
    if "gradient_steps" not in runs:
        return ""
    done = runs[(runs["status"] == "done") & runs["gradient_steps"].notna()
                & ~runs["run_id"].isin(analysis.cut_short(runs)["run_id"])]  # compared runs only
    if done.empty:
        return ""
    parts, equal = [], True
    for model, group in done.groupby("model") if "model" in done else [("all", done)]:
        steps = group["gradient_steps"].astype(int)
        samples = group["samples_seen"].dropna().astype(int) if "samples_seen" in group else pd.Series(dtype=int)
        seen = "" if samples.empty else (f", {samples.iloc[0]} samples each" if samples.nunique() == 1 else
                                         f", {samples.min()} to {samples.max()} samples")
        equal &= steps.nunique() == 1
        name = "" if model == "all" else f"{model}: "
        parts.append(f"{name}{steps.iloc[0]}{seen}" if steps.nunique() == 1 else
                     f"{name}{steps.min()} to {steps.max()}{seen}")
    if equal:
        return ("every finished run of a model took the same number of gradient steps, fine-tuning included ("
                + "; ".join(parts) + ")")
    return ("gradient steps differ between runs of a model (fine-tuning included; " + "; ".join(parts)
            + "), so arms are compared at unequal training")


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


def write_report(root: str | os.PathLike[str]) -> Path:
    """Write ``root/report.html`` atomically and return its path."""
    return write_text(Path(root) / "report.html", render_report(root))


def _test_text(spec: StudySpec) -> str:
    """How the study's test cases were chosen: a fraction, or fixed cases."""
    fixed = spec.dataset.test_cases
    if fixed is None:
        return f"test {spec.dataset.test:g}"
    return f"test: {len(fixed)} fixed cases, {fixed[0]} .. {fixed[-1]}" if len(fixed) > 1 else f"test: {fixed[0]}"
