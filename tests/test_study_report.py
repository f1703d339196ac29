"""Study report: findings with numbers, missing pieces, paired tests, and rendering in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.study import analysis
from sparseslice.study.engine import run_study
from sparseslice.study.report import render_report, write_report
from sparseslice.study.results import collect_results, load_study
from sparseslice.study.spec import parse_spec
from study_fakes import crashing_run, fake_run

SPEC = {
    "name": "report-test",
    "dataset": {"path": "/nonexistent/data"},
    "grid": [{"budget": [12], "rho": [0.1, 0.5], "strategy": ["random", "interval", "ual"],
              "interpolation": ["none", "sdf"], "model": ["2d"]}],
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("study") / "s"
    run_study(parse_spec(SPEC), out, run_fn=crashing_run, progress=False)
    write_report(out)
    return out


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", re.sub(r"base64,[^\"']+", "", html)))


def test_report_states_the_density_finding_with_numbers_and_recommends(study):
    text = _text((study / "report.html").read_text())
    # the fake makes lower density better: the report must say so, with the Dice values
    assert "2D, budget 12: yes: lower density with more volumes won" in text
    assert re.search(r"rho=0\.1 \(10 volumes x 1\.2 slices\) reached Dice 0\.\d{3} ± 0\.\d{3}", text)
    assert "For data and a budget of 12 slices (2D model): annotate 10 volumes at 1.2 slices each" in text
    assert "interpolation: sdf helps" in text  # the fake adds +0.02 with interpolation
    assert "ual" in text and "Wilcoxon" in text
    # crashed runs are listed and flagged
    assert "runs crashed" in text and "simulated crash in training" in text
    assert "Example slices: no predictions available." in text


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


def test_paired_comparison_matches_scipy(study):
    store, spec = load_study(study)
    cases = analysis.case_table(collect_results(store, spec))
    result = analysis.paired(cases, "strategy", "random", "ual")
    a = cases[cases.strategy == "random"].set_index(["rho", "interpolation", "seed", "case"])["dice"]
    b = cases[cases.strategy == "ual"].set_index(["rho", "interpolation", "seed", "case"])["dice"]
    diff = (a - b.reindex(a.index)).dropna()
    assert result.n == len(diff) == 2 * 2 * 2 * 4
    assert result.mean_diff == pytest.approx(diff.mean())
    assert result.p_value == pytest.approx(wilcoxon(diff).pvalue)
    assert result.verdict == "random better"


def test_report_copes_with_one_seed_no_baseline_and_nothing_finished(tmp_path):
    one = parse_spec({**SPEC, "seeds": [3], "baseline": False})
    run_study(one, tmp_path / "one", run_fn=fake_run, progress=False)
    text = _text(render_report(tmp_path / "one"))
    assert "Only one seed" in text and "No full-label baseline" in text and "absolute" in text
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
    assert "lower density with more volumes won" in result.stdout


def test_volume_count_grids_get_the_density_finding_too(tmp_path):
    spec = parse_spec({**SPEC, "grid": [{"budget": [12], "volumes": [2, 6], "strategy": ["random"], "model": ["3d"]}]})
    run_study(spec, tmp_path / "s", run_fn=fake_run, progress=False)
    text = _text(render_report(tmp_path / "s"))
    assert ("3D, budget 12: yes: lower density with more volumes won. Lowest density s=6 (6 volumes x 2.0 slices)"
            in text)


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
