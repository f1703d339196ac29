"""Report figures per arm: learning curves, hours vs Dice, per-label Dice, CIs over cases, label legend."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from scipy.stats import bootstrap

from sparseslice.select import CostModel
from sparseslice.study import analysis, curves, figures
from sparseslice.study.results import collect_results, load_study, run_table
from study_fakes import FULL_SLICES, FULL_VOLUMES, fake_history, fake_run_with_files, reported_study

SPEC = {
    "name": "figures-test",
    "dataset": {"path": "/nonexistent/data"},
    "grid": [{"budget": [12], "rho": [0.1, 0.5], "strategy": ["random", "interval"], "model": ["2d"]}],
    "seeds": [0, 1],
}


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    return reported_study(SPEC, tmp_path_factory.mktemp("figs") / "s", fake_run_with_files)


@pytest.fixture(scope="module")
def tables(study):
    store, spec = load_study(study)
    results = collect_results(store, spec)
    cases = analysis.case_table(results)
    per_run = analysis.run_summary(cases, run_table(store, spec))
    return store, spec, results, cases, per_run


class Captured(list):
    """The matplotlib figures drawn by figure functions given ``render=captured`` (PNG bytes stand-in)."""

    def __call__(self, fig):
        self.append(fig)
        return b"png"


@pytest.fixture
def captured():
    return Captured()


def _captions(html: str) -> list[str]:
    return re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', html)


def test_ci_over_cases_averages_seeds_first_known_answer():
    # two seeds of three cases; the CI is over the three per-case means, not over six rows
    cases = pd.DataFrame({"arm": ["a"] * 6, "seed": [0, 0, 0, 1, 1, 1], "case": ["x", "y", "z"] * 2,
                          "dice": [0.6, 0.7, 0.9, 0.8, 0.7, 0.5]})
    out = curves.case_ci(cases, by=["arm"], n_resamples=999, seed=3).iloc[0]
    # per case: x (0.6 + 0.8) / 2, y 0.7, z (0.9 + 0.5) / 2, all 0.7
    assert out["mean"] == pytest.approx(0.7) and out["n_cases"] == 3
    assert (out["lo"], out["hi"]) == pytest.approx((0.7, 0.7))  # the cases agree: no width from seeds
    assert cases["dice"].std() > 0.1  # the std of the rows would have given a wide bar
    # non-degenerate: scipy's seeded percentile bootstrap of the per-case means
    cases.loc[cases["case"] == "z", "dice"] = [0.95, 0.85]
    out = curves.case_ci(cases, by=["arm"], n_resamples=999, seed=3).iloc[0]
    ref = bootstrap((np.array([0.7, 0.7, 0.9]),), np.mean, confidence_level=0.95, n_resamples=999,
                    method="percentile", rng=np.random.default_rng(3)).confidence_interval
    assert out["mean"] == pytest.approx(0.7 + 0.2 / 3)
    assert (out["lo"], out["hi"]) == pytest.approx((ref.low, ref.high))
    # repeating every case under more seeds (pseudo-replication) does not narrow the interval
    more = pd.concat([cases, cases.assign(seed=cases["seed"] + 2)])
    again = curves.case_ci(more, by=["arm"], n_resamples=999, seed=3).iloc[0]
    assert (again["lo"], again["hi"]) == pytest.approx((out["lo"], out["hi"]))
    assert np.isnan(curves.case_ci(cases[cases["case"] == "x"], by=["arm"]).iloc[0]["lo"])  # one case


def test_label_rows_reads_both_metrics_forms():
    old = pd.DataFrame({"case": ["a"] * 3, "label": ["1", "2", "fg"], "metric": "dice", "value": [0.5, 0.6, 0.7]})
    new = old.assign(label=[1, 2, 0], region=["label", "label", "foreground"])
    for table in (old, new, new.assign(label=new["label"].astype(str))):
        rows = curves.label_rows(table)
        assert rows["label"].tolist() == [1, 2] and rows["value"].tolist() == [0.5, 0.6]
        assert (rows["label"] == 1).sum() == 1  # integers: label == 1 matches


def test_density_figure_error_bars_are_cis_over_cases_not_std_of_seeds(tables, captured):
    _, _, _, cases, per_run = tables
    figures.density_figure(per_run, cases, budget=12, render=captured)
    ax = captured[-1].axes[0]
    rows = cases[cases["run_id"].isin(per_run["run_id"]) & ~cases["baseline"].astype(bool)]
    ci = curves.case_ci(rows, by=["strategy", "rho"], value="rel_dice").set_index(["strategy", "rho"])
    bars = sorted(tuple(np.round(seg[:, 1], 9)) for c in ax.collections if hasattr(c, "get_segments")
                  for seg in c.get_segments())
    expected = sorted((round(r.lo, 9), round(r.hi, 9)) for r in ci.itertuples())
    assert bars == expected
    std = per_run[~per_run["baseline"].astype(bool)].groupby(["strategy", "rho"])["rel_dice"].std()
    assert not np.allclose([hi - lo for lo, hi in bars], sorted(2 * std.to_numpy()))


def test_learning_curves_show_every_run_per_epoch_by_arm(tables, captured):
    store, _, _, _, per_run = tables
    history = curves.run_histories(store, per_run)
    assert set(history["run_id"]) == set(per_run["run_id"])
    curves.learning_curve_figure(history, render=captured)
    loss_ax, dice_ax = captured[-1].axes[:2]
    lines = [ln for ln in dice_ax.lines if len(ln.get_xdata()) > 1]
    assert len(lines) == len(per_run)  # one curve per run
    run = per_run.iloc[0]
    level = store.metrics(run["run_id"]).query("metric == 'dice'")["value"].mean()
    curve = fake_history(level)["val_dice"].to_numpy()
    assert any(np.allclose(ln.get_ydata(), curve) for ln in lines)
    # seeds of one arm share a colour, arms differ
    colors = {ln.get_label(): ln.get_color() for ln in loss_ax.lines if not ln.get_label().startswith("_")}
    assert len(colors) == per_run.assign(a=curves.with_arm(per_run)["arm"])["a"].nunique()
    assert len(set(colors.values())) == len(colors)


def test_annotation_hours_follow_the_plan_time_model(tables, captured):
    store, spec, _, cases, per_run = tables
    hours = curves.annotation_hours(store, per_run)
    cost = CostModel()
    full = FULL_VOLUMES * cost.volume_cost(FULL_SLICES) / 60  # 2 x 6.2 min
    for run in per_run.itertuples():
        if run.baseline:
            assert hours[run.run_id] == pytest.approx(full)
        else:  # 12 slices over n volumes, consecutive from slice 0
            groups = np.array_split(np.arange(12), int(run.n_volumes))
            assert hours[run.run_id] == pytest.approx(sum(cost.volume_cost(range(len(g))) for g in groups) / 60)
    curves.hours_figure(cases, hours, render=captured)
    ax = captured[-1].axes[0]
    ci = curves.case_ci(curves.with_arm(cases), by=["arm"]).set_index("arm")
    points = {c.get_label().rsplit(" (", 1)[0]: c for c in ax.containers}
    assert set(points) == set(ci.index)
    for arm, container in points.items():
        y = container.lines[0].get_ydata()[0]
        assert y == pytest.approx(ci.loc[arm, "mean"])


def test_per_label_figure_boxes_each_label_over_cases(tables, captured):
    _, _, results, _, _ = tables
    labels = curves.label_case_table(results)
    assert sorted(labels["label"].unique()) == [1, 2]
    curves.label_figure(labels, {1: "left", 2: "right"}, render=captured)
    axes = captured[-1].axes
    assert [a.get_title() for a in axes] == ["label 1 (left)", "label 2 (right)"]
    arms = labels["arm"].nunique()
    assert len(axes[0].get_yticklabels()) == arms
    n_cases = labels["case"].nunique()
    points = sum(len(c.get_offsets()) for c in axes[0].collections)
    assert points == arms * n_cases  # one point per case (seeds averaged), not per case x seed


def test_density_figure_needs_two_densities_in_a_model(tables, captured):
    _, _, _, cases, per_run = tables
    one = per_run[per_run["baseline"].astype(bool) | (per_run["rho"] == 0.5)]  # the partial-annotation shape
    assert figures.density_figure(one, cases, budget=12, render=captured) is None and not captured
    figures.density_figure(per_run, cases, budget=12, render=captured)
    assert len(captured) == 1


def test_report_embeds_every_figure_with_captions(study):
    html = (study / "report.html").read_text()
    captions = _captions(html)
    for start in ("Learning curves", "Annotation hours vs test Dice", "Per-label test Dice",
                  "Relative performance vs density"):
        assert any(c.startswith(start) for c in captions), (start, captions)
    assert not any("std" in c for c in captions)
    assert "95 % bootstrap CI over test cases" in " ".join(captions)


def test_example_slices_have_a_label_colour_legend(tmp_path, captured):
    truth = np.zeros((8, 8, 4), np.uint8)
    truth[1:4, 1:4, 2], truth[4:7, 4:7, 2] = 1, 2
    pred = truth.copy()
    pred[4:7, 4:7, 2] = 3  # a value the truth does not have still gets a colour and a name
    for name, arr in (("img", truth.astype(np.float32)), ("lab", truth), ("pred", pred)):
        nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp_path / f"{name}.nii.gz")
    figures.example_figure([("case", tmp_path / "img.nii.gz", tmp_path / "lab.nii.gz", tmp_path / "pred.nii.gz",
                             2, 0.5)], label_names={1: "liver", 2: "tumour"},
                           render=captured)
    fig = captured[-1]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["1: liver", "2: tumour", "3: label 3"]
    colors = [h.get_facecolor()[:3] for h in legend.legend_handles]
    import matplotlib.colors as mcolors

    assert colors == [mcolors.to_rgb(curves.label_color(v)) for v in (1, 2, 3)]
    overlay = fig.axes[1].images[1]  # the truth panel's label overlay uses the same colours
    assert mcolors.to_hex(overlay.cmap(overlay.norm(2))) == curves.label_color(2)
