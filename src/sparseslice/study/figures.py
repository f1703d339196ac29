"""The report's figures, drawn with matplotlib's Agg backend and returned as PNG bytes.

Seeds are shown as individual points around their mean, never averaged away; error bars are
95 % bootstrap intervals over test cases (:func:`sparseslice.study.plotting.case_ci`), not the
spread of a few seeds.

Every figure function takes ``render`` (keyword): what the drawn figure is turned into,
:func:`~sparseslice.study.plotting.png` bytes by default; ``render=lambda fig: fig`` gives the
matplotlib figure itself (its axes, lines and legends can then be read). ``None`` means there was nothing to draw.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.study.plotting import Render, case_ci, label_color, png, pyplot

COLORS = ("#1b6ca8", "#e4572e", "#29a36a", "#9b5de5", "#f3a712", "#5c6b73")


def relative(table: pd.DataFrame) -> bool:
    """Whether ``table`` (runs or cases) holds Dice relative to a full-label baseline."""
    return "rel_dice" in table and bool(table["rel_dice"].notna().any())


def _measure(per_run: pd.DataFrame) -> tuple[str, str]:
    if relative(per_run):
        return "rel_dice", "Dice relative to full labels"
    return "dice", "Dice (no baseline: absolute)"


def _case_errorbars(ax, cases: pd.DataFrame, runs: pd.DataFrame, x_col: str, value: str, **style) -> None:
    """Mean over test cases with its 95 % CI (each case averaged over seeds first) at each ``x_col``."""
    rows = cases[cases["run_id"].isin(runs["run_id"])]
    rows = rows.assign(_x=rows["run_id"].map(runs.set_index("run_id")[x_col]))
    ci = case_ci(rows, by=["_x"], value=value).sort_values("_x")
    if ci.empty:
        return
    yerr = np.nan_to_num(np.vstack([ci["mean"] - ci["lo"], ci["hi"] - ci["mean"]]))
    ax.errorbar(ci["_x"], ci["mean"], yerr=yerr, capsize=3, **style)


def density_figure(per_run: pd.DataFrame, cases: pd.DataFrame, *, budget: int, render: Render = png) -> bytes | None:
    """Relative performance vs density at a fixed budget: one panel per model, a line per strategy.

    Lines: mean over test cases with a 95 % CI over cases; points: the seeds' run means. None
    when no model has two densities at this budget (one point per model shows no trend).
    """
    runs = per_run[(per_run["budget"] == budget) & per_run["block_fraction"].isna()]
    if (runs["interpolation"] == "none").any():
        runs = runs[runs["interpolation"] == "none"]
    x_col = "rho" if runs["rho"].notna().all() else "slices_per_volume"
    if runs.empty or runs.groupby("model")[x_col].nunique().max() < 2:
        return None
    value, ylabel = _measure(per_run)
    models = sorted(runs["model"].unique())
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False, sharey=True)
    rng = np.random.default_rng(0)
    for ax, model in zip(axes[0], models, strict=True):
        sub = runs[runs["model"] == model]
        for color, (strategy, rows) in zip(COLORS, sub.groupby("strategy"), strict=False):
            _case_errorbars(ax, cases, rows, x_col, value, color=color, marker="o", label=strategy)
            jitter = rows[x_col] * (1 + rng.uniform(-0.03, 0.03, len(rows)))
            ax.scatter(jitter, rows[value], color=color, alpha=0.45, s=14)
        vols = sub.groupby(x_col)["n_volumes"].mean() if "n_volumes" in sub else pd.Series(dtype=float)
        for x, s in vols.items():
            ax.annotate(f"s={s:.0f}", (x, 0), xycoords=("data", "axes fraction"), xytext=(0, 3),
                        textcoords="offset points", ha="center", fontsize=8, color="#555")
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(sub[x_col].unique()))
        ax.set_xticklabels([f"{v:g}" for v in sorted(sub[x_col].unique())])
        ax.set_xlabel("density rho (annotated / slices per volume)" if x_col == "rho" else "slices per volume")
        ax.set_title(f"{model.upper()}, budget {budget} slices")
        ax.grid(alpha=0.3)
        if value == "rel_dice":
            ax.axhline(1.0, color="#888", lw=0.8, ls="--")
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(title="strategy (bars: 95 % CI over cases; points: seeds)", fontsize=8, title_fontsize=8,
                       loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    return render(fig)


def interpolation_figure(per_run: pd.DataFrame, cases: pd.DataFrame, *, render: Render = png) -> bytes | None:
    """With vs without interpolation: a line per method over density, one panel per model.

    Lines: mean over test cases with a 95 % CI over cases; points: the seeds' run means.
    """
    runs = per_run[~per_run["baseline"].astype(bool) & per_run["rho"].notna()]
    # only runs that exist with and without interpolation (same everything else), so lines are comparable
    keys = ["model", "budget", "rho", "strategy", "border_slices", "schedule", "mask_channel", "seed"]
    methods = runs.groupby(keys, dropna=False)["interpolation"].transform("nunique")
    runs = runs[methods > 1]
    if runs.empty:
        return None
    value, ylabel = _measure(per_run)
    models = sorted(runs["model"].unique())
    plt = pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.6), squeeze=False, sharey=True)
    for ax, model in zip(axes[0], models, strict=True):
        sub = runs[runs["model"] == model]
        for color, (method, rows) in zip(COLORS, sub.groupby("interpolation"), strict=False):
            _case_errorbars(ax, cases, rows, "rho", value, color=color, marker="s", label=method)
            ax.scatter(rows["rho"], rows[value], color=color, alpha=0.4, s=12)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xticks(sorted(sub["rho"].unique()))
        ax.set_xticklabels([f"{v:g}" for v in sorted(sub["rho"].unique())])
        ax.set_xlabel("density rho")
        ax.set_title(f"{model.upper()}: with vs without interpolation (matched runs)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(title="interpolation (bars: 95 % CI over cases; points: seeds)", fontsize=8,
                       title_fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=4, frameon=False)
    return render(fig)


def strategy_figure(cases: pd.DataFrame, *, render: Render = png) -> bytes | None:
    """Distribution of per-case relative performance (absolute Dice without a baseline) per strategy
    (box + points)."""
    grid = cases[~cases["baseline"].astype(bool)]
    value = "rel_dice" if relative(grid) else "dice"
    groups = [(s, rows[value].dropna().to_numpy()) for s, rows in grid.groupby("strategy")]
    groups = [(s, v) for s, v in groups if v.size]
    if not groups:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2.5, 3.6))
    ax.boxplot([v for _, v in groups], showfliers=False)
    ax.set_xticks(range(1, len(groups) + 1), [s for s, _ in groups])
    rng = np.random.default_rng(0)
    for n, (_, v) in enumerate(groups, start=1):
        ax.scatter(n + rng.uniform(-0.15, 0.15, v.size), v, s=8, alpha=0.35, color=COLORS[(n - 1) % len(COLORS)])
    ax.set_ylabel("per-case Dice relative to full labels" if value == "rel_dice" else "per-case Dice")
    ax.set_title("Distribution per strategy (all densities, seeds, cases)")
    ax.grid(alpha=0.3, axis="y")
    return render(fig)


def regime_figure(per_run: pd.DataFrame, regimes: pd.DataFrame, *, measure: str = "Dice",
                  render: Render = png) -> bytes | None:
    """Every regime's ``dice`` (the report's main ``measure``), seeds as points: the overview when the
    design is not a density sweep."""
    if regimes.empty:
        return None
    order = regimes["regime"].tolist()[::-1]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.34 * len(order) + 1.4))
    lookup = per_run.copy()
    from sparseslice.study.analysis import regime_label

    lookup["regime"] = lookup.apply(regime_label, axis=1)
    for y, name in enumerate(order):
        rows = lookup[lookup["regime"] == name]
        ax.barh(y, rows["dice"].mean(), color="#1b6ca8" if "full labels" not in name else "#888", alpha=0.6)
        ax.scatter(rows["dice"], np.full(len(rows), y), color="black", s=10, zorder=3)
    ax.set_yticks(range(len(order)), order, fontsize=8)
    ax.set_xlabel(f"test {measure}\nbar: mean over seeds, points: seeds", fontsize=8)
    ax.set_xlim(0, 1)
    ax.grid(alpha=0.3, axis="x")
    return render(fig)


def example_figure(examples: list[tuple[str, Path, Path, Path, int, float]], *,
                   label_names: dict[int, str] | None = None, render: Render = png) -> bytes | None:
    """Image, truth and prediction on the slice with most truth foreground, one row per case.

    ``examples``: ``(title, image path, label path, prediction path, slice axis, dice)``.
    Label values are drawn in fixed colours (:func:`~sparseslice.study.plotting.label_color`)
    with a legend naming each value (``label_names``, e.g. from ``dataset.json``).
    """
    from sparseslice.io import read_label, read_volume

    rows = []
    for title, image_path, label_path, pred_path, axis, dice in examples:
        try:
            image = read_volume(image_path).array
            truth = read_label(label_path).array
            pred = read_label(pred_path).array
        except Exception:  # noqa: BLE001 - an example that cannot be read is left out
            continue
        if image.ndim == 4:
            image = image[..., 0]
        other = tuple(a for a in range(3) if a != axis)
        k = int(np.argmax(np.count_nonzero(truth, axis=other)))
        take = [slice(None)] * 3
        take[axis] = k
        rows.append((f"{title} (foreground Dice {dice:.3f}, slice {k} along axis {axis})", image[tuple(take)],
                     truth[tuple(take)], pred[tuple(take)]))
    if not rows:
        return None
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch


    plt = pyplot()
    vmax = max([1, *(int(max(t.max(), p.max())) for _, _, t, p in rows)])
    cmap = ListedColormap([label_color(v) for v in range(1, vmax + 1)])
    norm = BoundaryNorm(np.arange(0.5, vmax + 1.5), cmap.N)
    fig, axes = plt.subplots(len(rows), 3, figsize=(8, 2.8 * len(rows)), squeeze=False)
    for r, (title, img, tru, prd) in enumerate(rows):
        for c, (name, overlay) in enumerate((("image", None), ("truth", tru), ("prediction", prd))):
            ax = axes[r][c]
            ax.imshow(img.T, cmap="gray", origin="lower")
            if overlay is not None:
                ax.imshow(np.ma.masked_equal(overlay.T, 0), cmap=cmap, norm=norm, alpha=0.55,
                          origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{title}\n{name}" if c == 0 else f"\n{name}", fontsize=8, loc="left")
    names = label_names or {}
    present = sorted({int(v) for _, _, t, p in rows for v in np.union1d(np.unique(t), np.unique(p)) if v > 0})
    handles = [Patch(color=label_color(v), alpha=0.7, label=f"{v}: {names.get(v, f'label {v}')}") for v in present]
    if handles:
        fig.tight_layout()
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.01), ncol=min(len(handles), 6),
                   fontsize=8, title="label value: name", title_fontsize=8, frameon=False)
    return render(fig)
