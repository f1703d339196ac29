"""Study report: findings with numbers, missing pieces, paired tests, and rendering in headless Chromium."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from html import unescape
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.study import analysis
from sparseslice.study.orchestrate import run_study
from sparseslice.study.report import render_report
from sparseslice.study.results import collect_results, load_study
from sparseslice.study.spec import parse_spec
from study_fakes import crashing_run, per_label_run, reported_study

SPEC = {
    "name": "report-test",
    "dataset": {"path": "/nonexistent/data"},
    "grid": [{"budget": [12], "rho": [0.1, 0.5], "strategy": ["random", "interval", "ual"],
              "interpolation": ["none", "sdf"], "model": ["2d"]}],
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return reported_study(SPEC, tmp_path_factory.mktemp("study") / "s", crashing_run)


def _text(html: str) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"base64,[^\"']+", "", html))))


def test_report_does_not_decide_on_four_test_cases_and_lists_crashes(study):
    text = _text((study / "report.html").read_text())
    # 4 test cases: a Wilcoxon test over cases cannot reach p < 0.05, so nothing is called a win
    assert "2D, budget 12: not decided: too few test cases to test (4; a test needs 6)" in text
    assert "won" not in text and "4 test cases (the unit of every test)" in text
    assert re.search(r"rho=0\.1 \(10\.0 volumes x 1\.2 slices on average\) reached Dice 0\.\d{3} ± 0\.\d{3}", text)
    assert "For data and a budget of 12 slices (2D model): annotate 10 volumes: 2+2+1+1+1+1+1+1+1+1 = 12 slices" in text
    assert "interpolation: sdf is not decided, too few test cases" in text
    # crashed runs are listed and flagged
    assert "runs crashed" in text and "simulated crash in training" in text
    assert "Example slices: no predictions available." in text


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Ten test cases, per-label rows; label 2 fails in every sparse run."""
    return reported_study(SPEC, tmp_path_factory.mktemp("labelled") / "s", per_label_run)


def test_findings_follow_the_corrected_test_over_cases(labelled):
    text = _text((labelled / "report.html").read_text())
    tests = analysis.paired_comparisons(_cases(labelled))
    density = next(t for t in tests if t.factor == "rho")
    assert density.n == 10 and density.p_adjusted < 0.05 and density.scope == "2D, budget 12"
    assert "2D, budget 12: yes: lower density with more volumes won" in text
    assert re.search(r"per test case \(mean over seeds and other factors\): \+0\.\d{3} Dice \[95% CI \+0\.\d{3}, "
                     r"\+0\.\d{3}\], 10/10 test cases better, Wilcoxon p=0\.002, Holm-corrected p=0\.0\d+", text)
    assert "interpolation: sdf helps" in text and "10 test cases (the unit of every test)" in text
    # random and interval score alike: no verdict beside a non-significant p
    random_interval = next(t for t in tests if {t.a, t.b} == {"interval", "random"})
    assert random_interval.p_adjusted >= 0.05 and random_interval.verdict == "no significant difference"
    assert "random vs ual" in text and "Holm" in text


def test_ranking_uses_per_label_dice_and_names_the_failing_label(labelled):
    text = _text((labelled / "report.html").read_text())
    cases = _cases(labelled)
    row = cases.iloc[0]
    assert row["dice"] == pytest.approx((row["dice_label_1"] + row["dice_label_2"]) / 2)
    assert row["dice_fg"] == pytest.approx(min(row["dice_label_1"] + 0.05, 1.0))
    assert "main measure: test-set Dice (mean over labels 1, 2, each scored on its own)" in text
    assert re.search(r"Per label: label 1 0\.\d\d \(full labels 0\.9\d\), label 2 0\.3\d \(full labels 0\.\d\d\); "
                     r"foreground \(all labels together\) 0\.\d\d\. Failing: label 2 \(Dice 0\.3\d < 0\.5\)", text)
    page = (labelled / "report.html").read_text()
    for head in ("Dice (mean of labels)", "Dice label 1", "Dice label 2", "Dice foreground", "HD95 (mm)",
                 "2D ASSD (mm)"):
        assert f"<th>{head}</th>" in page
    one = analysis.case_table(collect_results(*load_study(labelled)), label=1)
    assert one["dice"].equals(one["dice_label_1"])


def test_regime_table_shows_seed_spread(study):
    store, spec = load_study(study)
    cases = analysis.case_table(collect_results(store, spec))
    per_run = analysis.run_summary(cases, pd.read_csv(study / "runs.csv"))
    regimes = analysis.regime_summary(per_run).set_index("regime")
    row = regimes.loc["2D, budget 12, rho 0.1, random"]
    seeds = per_run[(per_run.rho == 0.1) & (per_run.strategy == "random") & (per_run.interpolation == "none")]
    assert row["n_seeds"] == 2 and row["dice_std"] == pytest.approx(seeds["dice"].std())
    assert regimes.loc["2D full labels", "rel_dice_mean"] == pytest.approx(1.0)
    crashed = regimes.loc["2D, budget 12, rho 0.1, interval"]
    assert crashed["n_seeds"] == 1 and np.isnan(crashed["dice_std"])  # the seed-1 run crashed


def _cases(root: Path) -> pd.DataFrame:
    store, spec = load_study(root)
    return analysis.case_table(collect_results(store, spec))


def test_paired_comparison_is_over_test_cases_and_matches_scipy(study, labelled):
    from scipy.stats import bootstrap

    for root, n_cases in ((study, 4), (labelled, 10)):
        cases = _cases(root)
        result = analysis.paired(cases, "strategy", "random", "ual")
        a = cases[cases.strategy == "random"].set_index(["rho", "interpolation", "seed", "case"])["dice"]
        b = cases[cases.strategy == "ual"].set_index(["rho", "interpolation", "seed", "case"])["dice"]
        diff = (a - b.reindex(a.index)).dropna()
        per_case = diff.groupby(level="case").mean()  # seeds and other factors are not independent samples
        assert result.n == len(per_case) == n_cases and result.n_pairs == len(diff) == 2 * 2 * 2 * n_cases
        assert result.mean_diff == pytest.approx(per_case.mean())
        ci = bootstrap((per_case.to_numpy(),), np.mean, method="percentile", n_resamples=9999,
                       rng=np.random.default_rng(0)).confidence_interval
        assert (result.ci_low, result.ci_high) == pytest.approx((ci.low, ci.high))
        assert result.ci_low < result.mean_diff < result.ci_high
    assert result.p_value == pytest.approx(wilcoxon(per_case).pvalue) and result.verdict == "random better"
    few = analysis.paired(_cases(study), "strategy", "random", "ual")
    assert np.isnan(few.p_value) and few.verdict == "too few test cases to test (4; a test needs 6)"


def test_holm_correction_known_answer_and_applied_to_the_report_family(labelled):
    assert analysis.holm([0.01, 0.04, 0.03, 0.005]).tolist() == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert np.isnan(analysis.holm([np.nan, 0.02])[0]) and analysis.holm([np.nan, 0.02])[1] == 0.02
    tests = analysis.paired_comparisons(_cases(labelled))
    raw = [t.p_value for t in tests]
    assert [t.p_adjusted for t in tests] == pytest.approx(analysis.holm(raw).tolist(), nan_ok=True)
    assert len(tests) == 5  # 3 strategy pairs, density, interpolation


def test_report_copes_with_one_seed_no_baseline_and_nothing_finished(tmp_path):
    one = parse_spec({**SPEC, "seeds": [3], "baseline": False})
    run_study(one, tmp_path / "one", run_fn=per_label_run, progress=False)
    html = render_report(tmp_path / "one")
    text = _text(html)
    assert "Only one seed" in text and "No full-label baseline in this study (the spec sets baseline: false" in text
    assert "absolute Dice" in text and "baseline finished" not in text  # none was asked for, so none is missing
    captions = re.findall(r'<img alt="([^"]*)"', html)
    assert any(c.startswith("Test Dice vs density") for c in captions), captions
    assert "Distribution of test Dice per strategy" in captions
    assert not any("elative performance" in c for c in captions)
    assert "lower density with more volumes won" in text

    def boom(run, config, run_dir):
        raise ValueError("no data")

    summary = run_study(one, tmp_path / "none", run_fn=boom, progress=False)
    assert len(summary.failed) == len(one.runs())
    text = _text(render_report(tmp_path / "none"))
    assert "No run has finished" in text and "no data" in text


def test_cli_study_report_and_missing_study(study, tmp_path):
    result = CliRunner().invoke(app, ["study", "report", str(study)])
    assert result.exit_code == 0 and "report.html" in result.output
    result = CliRunner().invoke(app, ["study", "report", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "does not exist" in result.output


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_report_renders_in_headless_chromium_with_every_figure(study, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI for the report test; .ci/run installs it")
        pytest.skip("chromium not installed")
    page = (study / "report.html").read_text()
    n_images = page.count("<img ")
    assert n_images >= 4
    check = ("<script>window.addEventListener('load', () => { const im = [...document.images]; "
             "document.title = 'IMAGES ' + im.length + ' ' + im.filter(i => i.complete && i.naturalWidth > 0 "
             "&& i.naturalHeight > 0).length; });</script>")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", check + "</body>"))
    result = subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()], capture_output=True, text=True, timeout=60)
    title = re.search(r"<title>IMAGES (\d+) (\d+)</title>", result.stdout)
    assert title, result.stderr[-2000:]
    assert int(title.group(1)) == n_images and int(title.group(2)) == n_images
    assert "not decided: too few test cases" in result.stdout


def test_volume_count_grids_get_the_density_finding_too(tmp_path):
    spec = parse_spec({**SPEC, "grid": [{"budget": [12], "volumes": [2, 6], "strategy": ["random"], "model": ["3d"]}]})
    run_study(spec, tmp_path / "s", run_fn=per_label_run, progress=False)
    text = _text(render_report(tmp_path / "s"))
    assert ("3D, budget 12: yes: lower density with more volumes won. Lowest density s=6 (6.0 volumes x 2.0 slices"
            in text)
    assert "annotate 6 volumes: 2+2+2+2+2+2 = 12 slices" in text


def test_recommendation_chooses_factor_by_factor_not_the_luckiest_cell():
    from sparseslice.study.report import recommended_regime
    from sparseslice.study.spec import RunSpec

    dice = {("a", 0.1): 0.80, ("a", 0.5): 0.78, ("b", 0.1): 0.70, ("b", 0.5): 0.81}
    rows = []
    for (strategy, rho), value in dice.items():
        run = RunSpec(budget=10, rho=rho, volumes=None, strategy=strategy, block_fraction=None,
                      interpolation="none", border_slices=False, model="2d", schedule="one-step",
                      mask_channel=False, seed=0)
        rows.append({"run_id": run.run_id, **run.to_dict(), "baseline": False, "dice": value})
    per_run = pd.DataFrame(rows)
    regimes = analysis.regime_summary(per_run)
    assert regimes.iloc[0]["strategy"] == "b"  # the best single cell
    best = recommended_regime(regimes, per_run)
    assert (best["strategy"], best["rho"]) == ("a", 0.5)  # strategy a and rho 0.5 are better on average


def test_metrics_csv_label_is_an_integer_with_a_region_column(study):
    run_dir = next(p for p in (study / "runs").iterdir() if (p / "done.json").is_file())
    table = pd.read_csv(run_dir / "metrics.csv")  # plain pandas, no dtype hints
    assert table["label"].dtype == np.int64 and list(table.columns) == ["case", "label", "region", "metric", "value"]
    assert len(table[table.label == 1]) == 4 * 3 and set(table.loc[table.label == 1, "region"]) == {"label"}
    assert set(table.loc[table.region == "foreground", "label"]) == {0}
    assert pd.read_csv(study / "results.csv")["label"].dtype == np.int64


def test_cut_short_runs_are_left_out_and_the_steps_sentence_is_computed(tmp_path):
    from study_fakes import cut_short_run

    run_study(parse_spec(SPEC), tmp_path / "s", run_fn=cut_short_run, progress=False)
    text = _text(render_report(tmp_path / "s"))
    runs = pd.read_csv(tmp_path / "s" / "runs.csv")
    short = runs[runs.cut_short.astype(bool)]
    assert len(short) == 4 and set(short.strategy) == {"interval"} and set(short.seed) == {1}
    assert (f"4 of {len(runs)} finished runs were cut short (trained fewer gradient steps than planned: max_minutes "
            "0.5 reached); they are left out of every comparison") in text
    assert ("every finished run of a model took the same number of gradient steps, fine-tuning included "
            "(2d: 100, 400 samples each)") in text
    assert short.run_id.iloc[0] in text and "cut short" in text
    cases = analysis.case_table(collect_results(*load_study(tmp_path / "s")))
    per_run = analysis.run_summary(cases, runs)
    assert not per_run.run_id.isin(short.run_id).any() and len(per_run) == len(runs) - 4
    regimes = analysis.regime_summary(per_run).set_index("regime")
    assert regimes.loc["2D, budget 12, rho 0.1, interval", "n_seeds"] == 1
    # the report's comparisons do not see the cut-short runs: seed 1 drops out of interval vs random
    kept = analysis.paired(cases[~cases.run_id.isin(short.run_id)], "strategy", "interval", "random")
    assert kept.n_pairs == 2 * 2 * 2 * 10 - 4 * 10 and kept.n == 10
    page = render_report(tmp_path / "s")
    assert f"<td>{kept.n} ({kept.n_pairs})</td>" in page


def test_steps_sentence_says_when_training_differs():
    from sparseslice.study.report import _steps_text

    runs = pd.DataFrame({"run_id": ["a", "b"], "status": "done", "gradient_steps": [73, 88],
                         "samples_seen": [292, 352], "cut_short": [False, False]})
    assert _steps_text(runs) == ("gradient steps differ between runs of a model (fine-tuning included; 73 to 88, "
                                 "292 to 352 samples), so arms are compared at unequal training")
    assert _steps_text(runs.drop(columns=["gradient_steps"])) == ""


def test_spec_analysis_label_chooses_the_measure(tmp_path):
    spec = parse_spec({**SPEC, "analysis": {"label": 2}})
    assert spec.fingerprint() == parse_spec(SPEC).fingerprint()  # a report choice, not a new study
    run_study(spec, tmp_path / "s", run_fn=per_label_run, progress=False)
    text = _text(render_report(tmp_path / "s"))
    assert "main measure: test-set Dice of label 2, ranked and recommended by it" in text
    assert re.search(r"Expected test Dice of label 2 0\.3\d\d ± 0\.\d{3}", text)
    with pytest.raises(Exception, match="analysis has an unknown key, got 'lable'"):
        parse_spec({**SPEC, "analysis": {"lable": 2}})
    run_study(parse_spec({**SPEC, "analysis": {"label": 5}}), tmp_path / "s", run_fn=per_label_run, progress=False)
    result = CliRunner().invoke(app, ["study", "report", str(tmp_path / "s")])
    assert result.exit_code == 2
    assert "analysis.label is not a label of the results, got 5; use one of 1, 2" in result.output


def test_recommendation_takes_interpolation_only_when_a_corrected_test_says_it_helps():
    from sparseslice.study.report import recommended_regime
    from sparseslice.study.spec import RunSpec

    rows = []
    for interpolation, value in (("none", 0.70), ("sdf", 0.72)):  # sdf higher on average, by chance
        run = RunSpec(budget=10, rho=0.5, volumes=None, strategy="random", block_fraction=None,
                      interpolation=interpolation, border_slices=False, model="2d", schedule="one-step",
                      mask_channel=False, seed=0)
        rows.append({"run_id": run.run_id, **run.to_dict(), "baseline": False, "dice": value})
    per_run = pd.DataFrame(rows)
    regimes = analysis.regime_summary(per_run)
    noise = analysis.Paired("interpolation", "sdf", "none", n=10, mean_diff=0.02, wins=6, p_value=0.3,
                            p_adjusted=0.6)
    assert not noise.significant
    assert recommended_regime(regimes, per_run, tests=[noise])["interpolation"] == "none"
    helps = dataclasses.replace(noise, p_value=0.002, p_adjusted=0.004)
    assert recommended_regime(regimes, per_run, tests=[helps])["interpolation"] == "sdf"
