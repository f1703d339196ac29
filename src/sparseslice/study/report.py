"""``STUDY/report.html``: findings, a recommendation, figures and tables in one file.

The page is self-contained (figures are base64 PNG, no external resources) and says what is
missing: crashed or unfinished runs, a missing baseline, a single seed.
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.atomic import write_text
from sparseslice.study import analysis, figures
from sparseslice.study.results import collect_results, load_study, run_table
from sparseslice.study.store import StudyStore

#: Dice differences smaller than this are not called a win.
MARGIN = 0.01


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


def density_finding(per_run: pd.DataFrame, cases: pd.DataFrame, budget: int, model: str) -> str | None:
    """Did lower density with more volumes win at this budget and model? With the numbers.

    Uses the density ``rho`` when the grid sets it, else the volume count ``s`` (at a fixed
    budget, more volumes means fewer slices per volume).
    """
    runs = per_run[(per_run["budget"] == budget) & (per_run["model"] == model) & per_run["block_fraction"].isna()]
    if (runs["interpolation"] == "none").any():
        runs = runs[runs["interpolation"] == "none"]
    factor = "rho" if runs["rho"].nunique() >= 2 else "volumes"
    runs = runs[runs[factor].notna()]
    if runs[factor].nunique() < 2:
        return None
    by = runs.groupby(factor).agg(dice=("dice", "mean"), sd=("dice", "std"), s=("n_volumes", "mean"),
                                  k=("slices_per_volume", "mean"), n=("run_id", "count"))
    # the sparsest arm: lowest rho, or most volumes
    sparse, dense = (by.index.min(), by.index.max()) if factor == "rho" else (by.index.max(), by.index.min())
    name = "rho" if factor == "rho" else "s"
    best = by["dice"].idxmax()
    lo, hi = by.loc[sparse], by.loc[dense]
    diff = lo["dice"] - hi["dice"]
    sub = cases[(cases["budget"] == budget) & (cases["model"] == model)
                & cases["interpolation"].isin(runs["interpolation"].unique())]
    test = analysis.paired(sub, factor, sparse, dense)
    test_text = (f"; paired per case: {test.mean_diff:+.3f}, {test.wins}/{test.n} cases better, "
                 f"Wilcoxon {_p_is(test.p_value)}") if test else ""
    if diff > MARGIN:
        verdict = "yes: lower density with more volumes won"
    elif diff < -MARGIN:
        verdict = "no: higher density with fewer volumes won"
    else:
        verdict = f"no clear winner (difference under {MARGIN})"
    curve = ", ".join(f"{name} {r:g} ({row.s:.0f} vol x {row.k:.1f} sl): {_pm(row.dice, row.sd)}"
                      for r, row in by.iterrows())
    return (f"{model.upper()}, budget {budget}: {verdict}. Lowest density {name}={sparse:g} "
            f"({lo.s:.0f} volumes x {lo.k:.1f} slices) reached Dice {_pm(lo.dice, lo.sd)} vs "
            f"{_pm(hi.dice, hi.sd)} at {name}={dense:g} ({hi.s:.0f} volumes x {hi.k:.1f} slices), "
            f"difference {diff:+.3f}{test_text}. Best: {name}={best:g}. Mean over strategies and seeds: "
            f"{curve}.")


def _interpolation_verdict(tests: list[analysis.Paired]) -> str:
    interp = [t for t in tests if t.factor == "interpolation"]
    if not interp:
        return "not tested"
    parts = []
    for t in interp:
        if t.n < 6 or np.isnan(t.p_value):
            look = "better" if t.mean_diff > MARGIN else "worse" if t.mean_diff < -MARGIN else "no different"
            word = f"looks {look} but there are too few pairs to test;"
        elif t.mean_diff > MARGIN and t.p_value < 0.05:
            word = "helps"
        elif t.mean_diff < -MARGIN and t.p_value < 0.05:
            word = "hurts"
        else:
            word = "does not help"
        parts.append(f"{t.a} {word} ({t.mean_diff:+.3f} Dice, {_p_is(t.p_value)}, {t.n} pairs)")
    return "; ".join(parts)


#: Factors chosen one by one for the recommendation, each by its mean Dice over every other factor.
CHOICE_FACTORS = ("strategy", "rho", "volumes", "block_fraction", "interpolation", "border_slices",
                  "mask_channel", "schedule")


def recommended_regime(regimes: pd.DataFrame, per_run: pd.DataFrame) -> pd.Series:
    """The regime to recommend, chosen factor by factor rather than as the single best cell.

    Each factor's level is the one with the highest mean Dice over all runs of the group
    (pooled over the other factors), which is less exposed to the luck of one cell than
    the maximum over many cells. The regime matching most of the chosen levels wins; ties
    go to the higher Dice.
    """
    chosen = {}
    for factor in CHOICE_FACTORS:
        values = per_run[per_run[factor].notna()]
        if values[factor].nunique() > 1:
            chosen[factor] = values.groupby(factor)["dice"].mean().idxmax()
    score = sum((regimes[f] == v).astype(int) for f, v in chosen.items()) if chosen else 0
    ranked = regimes.assign(_match=score).sort_values(["_match", "dice_mean"], ascending=False)
    return ranked.iloc[0]


def recommendation(regimes: pd.DataFrame, tests: list[analysis.Paired], dataset: str,
                   per_run: pd.DataFrame) -> list[str]:
    """One sentence per budget (and model): the recommended regime in plain words."""
    out = []
    grid = regimes[~regimes["baseline"].astype(bool)]
    runs = per_run[~per_run["baseline"].astype(bool)]
    interp = _interpolation_verdict(tests)
    for (budget, model), rows in grid.groupby(["budget", "model"]):
        best = recommended_regime(rows, runs[(runs["budget"] == budget) & (runs["model"] == model)])
        n, k = best.get("n_volumes_mean", np.nan), best.get("slices_per_volume_mean", np.nan)
        how = (f"blocks of {best['block_fraction']:g} of the structure's slices" if pd.notna(best["block_fraction"])
               else f"{k:.1f} slices each" if pd.notna(k) else "")
        chosen = "" if pd.notna(best["block_fraction"]) else f", chosen by {best['strategy']}"
        extras = [x for x, on in ((f"with {best['interpolation']} interpolation", best["interpolation"] != "none"),
                                  ("with border slices", bool(best["border_slices"])),
                                  ("with the annotated-slice mask as input", bool(best["mask_channel"])),
                                  (f"{best['schedule']} training", best["schedule"] != "one-step")) if on]
        rel = best.get("rel_dice_mean", np.nan)
        rel_text = f", {rel:.0%} of the full-label Dice" if pd.notna(rel) else ""
        out.append(
            f"For {dataset} and a budget of {int(budget)} slices ({model.upper()} model): annotate "
            f"{n:.0f} volumes at {how}{chosen}{(' ' + ', '.join(extras)) if extras else ''}; "
            f"interpolation: {interp}. Expected test Dice {_pm(best['dice_mean'], best['dice_std'])}"
            f" over {int(best['n_seeds'])} seed(s){rel_text}. (Each factor is chosen by its mean Dice over "
            "all the other factors; the single best cell of the table may differ by chance.)")
    return out


def build_findings(store: StudyStore, spec, runs: pd.DataFrame, per_run: pd.DataFrame, cases: pd.DataFrame,
                   regimes: pd.DataFrame, tests: list[analysis.Paired]) -> Findings:
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
    if per_run.empty:
        f.warnings.append("No run has finished: there is nothing to report yet.")
        return f
    if not per_run["baseline"].astype(bool).any():
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
    f.recommendation = recommendation(regimes, tests, dataset, per_run)
    for budget in sorted(per_run["budget"].dropna().unique()):
        for model in sorted(per_run["model"].unique()):
            text = density_finding(per_run, cases, int(budget), model)
            if text:
                f.findings.append(text)
    strategy_tests = [t for t in tests if t.factor == "strategy"]
    if strategy_tests:
        means = per_run[~per_run["baseline"].astype(bool)].groupby("strategy")["dice"].mean().sort_values()
        f.findings.append("Strategies (mean test Dice over every other factor): "
                          + ", ".join(f"{s} {v:.3f}" for s, v in means[::-1].items()) + ". Paired: "
                          + "; ".join(f"{t.a} vs {t.b} {t.mean_diff:+.3f} ({_p_is(t.p_value)}, {t.verdict})"
                                      for t in strategy_tests) + ".")
    interp = _interpolation_verdict(tests)
    if interp != "not tested":
        f.findings.append(f"Interpolation: {interp}.")
    for t in tests:
        if t.factor in ("arm", "border_slices", "schedule", "mask_channel", "model"):
            f.findings.append(f"{t.factor}: {t.a} vs {t.b}: {t.mean_diff:+.3f} Dice over {t.n} paired cases "
                              f"({_p_is(t.p_value)}, {t.verdict}).")
    return f


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">' \
           f"<figcaption>{html.escape(alt)}</figcaption></figure>"


def _regime_table(regimes: pd.DataFrame, metrics: list[str]) -> str:
    head = ["regime", "n seeds", "volumes", "slices / volume", *[m.upper() if m != "assd2d" else "2D ASSD"
                                                                for m in metrics], "relative Dice"]
    rows = []
    for _, r in regimes.iterrows():
        cells = [r["regime"], f"{int(r['n_seeds'])} ({r['seeds']})",
                 _pm(r.get("n_volumes_mean", np.nan), np.nan, 0),
                 "all" if bool(r["baseline"]) else _pm(r.get("slices_per_volume_mean", np.nan), np.nan, 1)]
        for m in metrics:
            cells.append(_pm(r.get(f"{m}_mean", np.nan), r.get(f"{m}_std", np.nan), 3 if m == "dice" else 2))
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
    return figures.example_figure(examples) if examples else None


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
    if results.empty:
        cases = per_run = regimes = pd.DataFrame()
        tests: list[analysis.Paired] = []
    else:
        cases = analysis.case_table(results)
        per_run = analysis.run_summary(cases, runs)
        regimes = analysis.regime_summary(per_run)
        tests = analysis.paired_comparisons(cases)
    f = build_findings(store, spec, runs, per_run, cases, regimes, tests)
    parts = [f"<h1>Study report: {html.escape(spec.name)}</h1>",
             f"<p>{html.escape(spec.description)}</p>" if spec.description else "",
             f"<p>Dataset <code>{html.escape(str(spec.dataset.path))}</code>; split seed {spec.dataset.split_seed} "
             f"(val {spec.dataset.val:g}, test {spec.dataset.test:g}); {len(runs)} runs "
             f"({(runs['status'] == 'done').sum()} finished); seeds {', '.join(map(str, spec.seeds))}; "
             f"main measure: test-set Dice of the foreground (all labels together).</p>",
             f"<p>Training: {html.escape(_training_text(store, spec, runs))}.</p>"]
    if f.warnings:
        parts.append("<div class='warn'><b>Read with care</b><ul>"
                     + "".join(f"<li>{html.escape(w)}</li>" for w in f.warnings) + "</ul></div>")
    if f.recommendation:
        parts.append("<h2>Recommendation</h2><div class='rec'>"
                     + "".join(f"<p>{html.escape(r)}</p>" for r in f.recommendation) + "</div>")
    if f.findings:
        parts.append("<h2>Findings</h2><ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in f.findings) + "</ul>")
    if not per_run.empty:
        parts.append("<h2>Figures</h2>")
        for budget in sorted(per_run["budget"].dropna().unique()):
            parts.append(_img(figures.density_figure(per_run, budget=int(budget)),
                              f"Relative performance vs density at a budget of {int(budget)} slices "
                              "(mean ± std over seeds; points: seeds; s: volumes annotated)"))
        parts.append(_img(figures.interpolation_figure(per_run), "With vs without interpolation"))
        parts.append(_img(figures.strategy_figure(cases), "Distribution of relative performance per strategy"))
        parts.append(_img(figures.regime_figure(per_run, regimes), "Every regime (seeds as points)"))
        example = _examples(store, spec, per_run, cases)
        parts.append(_img(example, "Example slices (image, truth, prediction) of the best and worst test case "
                                   "of the best run") if example else
                     "<p>Example slices: no predictions available.</p>")
        parts.append("<h2>Mean ± std per regime</h2><p>Std is over seeds (of each run's mean over test cases); "
                     "a regime with one seed shows no std.</p>" + _regime_table(regimes, metrics))
        if tests:
            parts.append("<h2>Paired comparisons</h2><p>Per test case, same seed and other factors; "
                         "Wilcoxon signed-rank test (SciPy) on the Dice differences.</p>"
                         + _table(["factor", "a", "b", "pairs", "mean Dice a − b", "a better in", "p", "verdict"],
                                  [[t.factor, t.a, t.b, t.n, f"{t.mean_diff:+.4f}", f"{t.wins}/{t.n}",
                                    _p(t.p_value), t.verdict] for t in tests]))
    problems = runs[runs["status"] != "done"]
    if not problems.empty:
        parts.append("<h2>Runs that did not finish</h2>"
                     + _table(["run", "status", "error"], problems[["run_id", "status", "error"]].values.tolist()))
    parts.append(f"<h2>Reproduce</h2><p>Every number comes from <code>results.csv</code> and the runs' "
                 f"<code>config.json</code>. Spec:</p><pre>{html.escape(_yaml(spec.to_dict()))}</pre>")
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>sparseslice study {html.escape(spec.name)}</title><style>{CSS}</style></head><body>"
            + "\n".join(p for p in parts if p) + "</body></html>")


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
    done = runs[runs["status"] == "done"]
    if "gradient_steps" in done and len(done) and done["gradient_steps"].notna().all():
        short = done[done["cut_short"].astype(bool)]
        steps = done.groupby("model")["gradient_steps"].unique()
        if len(short):
            text += (f"; {len(short)} of {len(done)} runs stopped short of their planned gradient steps "
                     f"({', '.join(sorted(set(short['cut_short_reason'])))}): they are marked cut_short in runs.csv")
        elif all(len(v) == 1 for v in steps):
            text += "; every run of a model took the same number of gradient steps, fine-tuning included (" + \
                ", ".join(f"{m}: {int(v[0])}" for m, v in steps.items()) + ")"
    return text


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=110)


def write_report(root: str | os.PathLike[str]) -> Path:
    """Write ``root/report.html`` atomically and return its path."""
    return write_text(Path(root) / "report.html", render_report(root))
