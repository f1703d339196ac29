"""Report figures per arm: learning curves, annotation hours vs Dice, per-label Dice; CIs over cases.

An *arm* is a regime (every factor but the seed, :func:`~sparseslice.study.analysis.regime_label`).
Uncertainty is a 95 % bootstrap confidence interval over **test cases**: each case is first
averaged over the arm's seeds (and anything else pooled into the arm), so that seeds and
repeated cases are not counted as independent samples (:func:`~sparseslice.study.plotting.case_ci`).
Figure functions take ``render`` like those of :mod:`sparseslice.study.figures`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.study.plotting import (  # LABEL_COLORS, label_color: still importable from curves
    CONFIDENCE,
    LABEL_COLORS,  # noqa: F401
    Render,
    case_ci,
    label_color,  # noqa: F401
    png,
    pyplot,
)


# ------------------------------------------------------------------------------------------ numbers
def with_arm(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` with an ``arm`` column: the regime's short name."""
    from sparseslice.study.analysis import REGIME_COLUMNS, regime_label

    keys = pd.Series(["|".join(map(str, row)) for row in table[REGIME_COLUMNS].itertuples(index=False)],
                     index=table.index)
    first = ~keys.duplicated()
    names = {key: regime_label(row) for key, (_, row) in zip(keys[first], table[first].iterrows(), strict=True)}
    return table.assign(arm=keys.map(names).astype(object))


def label_rows(results: pd.DataFrame) -> pd.DataFrame:
    """Rows of single labels (not the union), with an integer ``label``.

    Reads both ``metrics.csv`` forms: a ``region`` column (``label`` / ``foreground``, the
    union carrying label 0), or the older union label ``fg`` without one.
    """
    from sparseslice.metrics import REGION_LABEL
    from sparseslice.study.store import tidy_labels

    table = tidy_labels(results)  # the one reader of both forms
    return table[table["region"] == REGION_LABEL]


def label_case_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per run x case x label: factors, ``arm``, ``label`` and its ``dice``."""
    from sparseslice.study.results import FACTOR_COLUMNS

    rows = label_rows(results)
    rows = rows[rows["metric"] == "dice"]
    index = ["run_id", *FACTOR_COLUMNS, "case", "label"]
    table = rows.groupby(index, dropna=False)["value"].mean().rename("dice").reset_index()
    return with_arm(table)


# ------------------------------------------------------------------------------ files of the runs
def run_histories(store, per_run: pd.DataFrame) -> pd.DataFrame:
    """Every finished run's ``model/history.csv``, stacked, with ``run_id``, ``seed`` and ``arm``."""
    frames = []
    for _, run in with_arm(per_run).iterrows():
        path = store.run_dir(run["run_id"]) / "model" / "history.csv"
        if path.is_file():
            frames.append(pd.read_csv(path).assign(run_id=run["run_id"], seed=run["seed"], arm=run["arm"]))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def annotation_hours(store, per_run: pd.DataFrame, *, axis: int | None = None) -> pd.Series:
    """Annotation hours of each run (index ``run_id``) by the plan's time model.

    A sparse run's hours are its ``plan.json`` minutes. A full-label run draws every slice
    with foreground of every training label (``full/labelsTr``) along the plans' axis,
    priced by the same :class:`~sparseslice.select.CostModel`. Runs without these files
    are left out.
    """
    from sparseslice.select import CostModel, read_plan

    hours: dict[str, float] = {}
    cost, plan_axis = None, axis
    for run_id in per_run.loc[~per_run["baseline"].astype(bool), "run_id"]:
        if not (store.run_dir(run_id) / "plan.json").is_file():
            continue
        plan = read_plan(store.run_dir(run_id) / "plan.json")
        cost = cost or plan.cost
        plan_axis = plan.axis if plan_axis is None else plan_axis
        minutes = plan.minutes if plan.minutes is not None else plan.cost.plan_cost(
            [(e.slices, e.extent is not None) for e in plan.entries])
        hours[run_id] = minutes / 60
    done: dict[tuple[Path, ...], float | None] = {}  # baselines share the training split: read it once
    for run_id in per_run.loc[per_run["baseline"].astype(bool), "run_id"]:
        labels = store.run_dir(run_id) / "full" / "labelsTr"
        if plan_axis is not None and labels.is_dir():
            files = tuple(sorted(p.resolve() for p in labels.iterdir()))
            if files not in done:
                done[files] = _full_minutes(list(files), axis=int(plan_axis), cost=cost or CostModel())
            if done[files] is not None:
                hours[run_id] = done[files] / 60
    return pd.Series(hours, name="hours", dtype=float)


def _full_minutes(labels: list[Path], *, axis: int, cost) -> float | None:
    from sparseslice.io import read_label

    total = 0.0
    for path in labels:
        try:
            array = read_label(path).array
        except Exception:  # noqa: BLE001 - a label that moved: no full-label hours
            return None
        other = tuple(a for a in range(array.ndim) if a != axis)
        total += cost.volume_cost(np.flatnonzero(np.any(array > 0, axis=other)))
    return total


# ------------------------------------------------------------------------------------------ figures
def arm_colors(arms) -> dict[str, str]:
    """A stable colour per arm (sorted names; full-label arms grey)."""
    import matplotlib

    cmap = matplotlib.colormaps["tab10" if len(set(arms)) <= 10 else "tab20"]
    names = sorted(set(arms))
    out, n = {}, 0
    for name in names:
        if "full labels" in name:
            out[name] = "#555555"
        else:
            out[name] = matplotlib.colors.to_hex(cmap(n % cmap.N))
            n += 1
    return out


def _legend_below(fig, ax, ncol: int = 2) -> None:
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=ncol, fontsize=8,
                   frameon=False)


def learning_curve_figure(history: pd.DataFrame, *, render: Render = png) -> bytes | None:
    """Training loss and validation Dice per epoch, a line per run, coloured by arm (seeds: line styles)."""
    if history.empty or "epoch" not in history:
        return None
    plt = pyplot()
    colors = arm_colors(history["arm"])
    styles = ("-", "--", ":", "-.")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    seeds = sorted(history["seed"].unique())
    for (arm, seed, _), rows in history.groupby(["arm", "seed", "run_id"], sort=True):
        style = styles[seeds.index(seed) % len(styles)]
        label = arm if seed == seeds[0] else None
        for ax, col in zip(axes, ("loss", "val_dice"), strict=True):
            if col in rows:
                ax.plot(rows["epoch"], rows[col], color=colors[arm], ls=style, lw=1.2, alpha=0.85, label=label)
                ax.plot(rows["epoch"].iloc[-1:], rows[col].iloc[-1:], "o", color=colors[arm], ms=3)
    axes[0].set_ylabel("training loss")
    axes[1].set_ylabel("validation Dice (mean over labels)")
    axes[1].set_ylim(0, 1)
    for ax, title in zip(axes, ("Training loss", "Validation Dice"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(title + " per epoch (dot: last epoch)", fontsize=10)
        ax.grid(alpha=0.3)
    _legend_below(fig, axes[0], ncol=2)
    fig.text(0.5, 1.0, "line style: seed (" + ", ".join(f"{s}: {styles[n % 4]}" for n, s in enumerate(seeds))
             + ")", ha="center", fontsize=8, color="#555")
    return render(fig)


def hours_figure(cases: pd.DataFrame, hours: pd.Series, *, render: Render = png) -> bytes | None:
    """Test Dice vs annotation hours, a point per arm with its 95 % CI over test cases.

    x: mean hours over the arm's seeds (horizontal bar: the seeds' range).
    """
    rows = with_arm(cases[cases["run_id"].isin(hours.index)])
    if rows.empty:
        return None
    ci = case_ci(rows, by=["arm"]).set_index("arm")
    arm_of = rows.drop_duplicates("run_id").set_index("run_id")["arm"]
    span = hours.groupby(arm_of.reindex(hours.index)).agg(h_mean="mean", h_min="min", h_max="max")
    colors = arm_colors(ci.index)
    plt = pyplot()
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for arm, r in ci.join(span, how="inner").iterrows():
        yerr = None if np.isnan(r["lo"]) else [[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]]
        xerr = [[r["h_mean"] - r["h_min"]], [r["h_max"] - r["h_mean"]]]
        ax.errorbar([r["h_mean"]], [r["mean"]], yerr=yerr, xerr=xerr, fmt="D" if "full labels" in arm else "o",
                    color=colors[arm], capsize=3, ms=6, label=f"{arm} ({int(r['n_cases'])} cases)")
    spread = span["h_max"].max() / max(span["h_min"].min(), 1e-9)
    if spread > 8:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("annotation hours (plan's time model" + ("; log scale)" if spread > 8 else ")"))
    ax.set_ylabel("test Dice (mean over cases)")
    ax.set_title("Annotation time vs test Dice (95 % CI over test cases)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    _legend_below(fig, ax, ncol=2)
    return render(fig)


def label_figure(labels: pd.DataFrame, names: dict[int, str] | None = None, *,
                 render: Render = png) -> bytes | None:
    """Per-label test Dice: a panel per label, a box per arm over test cases (each averaged over seeds)."""
    if labels.empty:
        return None
    per_case = labels.groupby(["label", "arm", "case"])["dice"].mean().reset_index()
    values = sorted(per_case["label"].unique())
    arms = sorted(per_case["arm"].unique(), reverse=True)
    colors = arm_colors(arms)
    names = names or {}
    plt = pyplot()
    fig, axes = plt.subplots(1, len(values), figsize=(3.6 * len(values) + 3.2, 0.32 * len(arms) + 1.6),
                             squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    for ax, value in zip(axes[0], values, strict=True):
        sub = per_case[per_case["label"] == value]
        data = [sub.loc[sub["arm"] == a, "dice"].to_numpy() for a in arms]
        ax.boxplot(data, vert=False, showfliers=False, widths=0.6)
        for n, (arm, v) in enumerate(zip(arms, data, strict=True), start=1):
            ax.scatter(v, n + rng.uniform(-0.15, 0.15, v.size), s=9, alpha=0.6, color=colors[arm], zorder=3)
        ax.set_yticks(range(1, len(arms) + 1), arms, fontsize=8)
        ax.set_xlim(-0.02, 1.02)
        ax.set_xlabel("test Dice")
        name = names.get(int(value))
        ax.set_title(f"label {value}" + (f" ({name})" if name else ""), fontsize=10)
        ax.grid(alpha=0.3, axis="x")
    return render(fig)


# ------------------------------------------------------------------------------------- the report
def dataset_label_names(spec) -> dict[int, str]:
    """Label value -> name from the study's dataset (``dataset.json``), or nothing if unreadable."""
    from sparseslice.datasets import discover_dataset

    try:
        names = discover_dataset(spec.dataset.path).label_names if spec.dataset.path else {}
    except Exception:  # noqa: BLE001 - dataset moved: values without names
        return {}
    return {int(k): str(v) for k, v in names.items() if int(k) > 0}


def report_figures(store, spec, results: pd.DataFrame, per_run: pd.DataFrame,
                   cases: pd.DataFrame) -> list[tuple[bytes | None, str]]:
    """The per-arm figures of the report with their captions: ``(png or None, caption)``."""
    ci = f"{CONFIDENCE * 100:g} % bootstrap CI over test cases (each case averaged over seeds first)"
    history = run_histories(store, per_run)
    out = [(learning_curve_figure(history),
            "Learning curves: training loss and validation Dice (the trainer's: mean over labels) per epoch of "
            "every run (colour: arm; line style: seed). A validation Dice still rising at the last epoch means "
            "the run was undertrained.")]
    hours = annotation_hours(store, per_run, axis=spec.dataset.axis)
    cost = _cost_text(store, per_run)
    out.append((hours_figure(cases, hours),
                f"Annotation hours vs test Dice per arm: mean over test cases with its {ci}; horizontal bar: "
                f"the seeds' range of hours. Hours follow the plan's time model ({cost}); the full-label arm "
                "draws every slice with foreground of every training volume."))
    labels = label_case_table(results)
    out.append((label_figure(labels, dataset_label_names(spec)),
                "Per-label test Dice per arm: box over test cases (each averaged over seeds), points: cases. "
                "The headline Dice may hide a label that fails."))
    return out


def _cost_text(store, per_run: pd.DataFrame) -> str:
    from sparseslice.select import CostModel, read_plan

    cost = CostModel()
    for run_id in per_run["run_id"]:
        if (store.run_dir(run_id) / "plan.json").is_file():
            cost = read_plan(store.run_dir(run_id) / "plan.json").cost
            break
    return (f"{cost.volume_minutes:g} min per volume, {cost.slice_minutes:g} min per slice, "
            f"{cost.consecutive_discount:.0%} less for a slice next to a drawn one")
