"""Plotting primitives shared by the report's figures (:mod:`~sparseslice.study.figures`,
:mod:`~sparseslice.study.curves`): the matplotlib backend, PNG rendering, label colours and
the confidence interval over test cases every error bar shows.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pandas as pd

from sparseslice.study.analysis import BOOTSTRAP_RESAMPLES as N_RESAMPLES
from sparseslice.study.analysis import BOOTSTRAP_SEED, bootstrap_ci

#: What a drawn figure is turned into: :func:`png` bytes by default, ``lambda fig: fig`` for the figure.
Render = Callable[[Any], Any]

#: Confidence level of every interval in the report's figures.
CONFIDENCE = 0.95
#: Label value -> colour on example slices (value 1 takes the first colour; cycles beyond ten).
LABEL_COLORS = ("#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#ffff33", "#a65628", "#f781bf",
                "#00ced1", "#999999")


def label_color(value: int) -> str:
    """Colour of label ``value`` (>= 1) on the example slices."""
    return LABEL_COLORS[(int(value) - 1) % len(LABEL_COLORS)]


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:  # noqa: ANN001 - a matplotlib Figure
    """The figure as PNG bytes (96 dpi, tight box); the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=96, bbox_inches="tight")
    pyplot().close(fig)
    return buffer.getvalue()


def case_ci(cases: pd.DataFrame, *, by: list[str], value: str = "dice", confidence: float = CONFIDENCE,
            n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> pd.DataFrame:
    """Mean and bootstrap CI over test cases of ``value`` per group ``by``.

    Each case is averaged over every row of its group first (the seeds, and any factor
    pooled into the group); the mean and its interval are then taken over those per-case
    means, so the sample size is the number of test cases.

    Returns
    -------
    DataFrame
        ``by`` columns, ``mean``, ``lo``, ``hi``, ``n_cases``.
    """
    rows = cases.dropna(subset=[value])
    columns = [*by, "mean", "lo", "hi", "n_cases"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    per_case = rows.groupby([*by, "case"], dropna=False)[value].mean().reset_index()
    out = []
    for key, grp in per_case.groupby(by, dropna=False):
        v = grp[value].to_numpy(float)
        lo, hi = bootstrap_ci(v, confidence=confidence, resamples=n_resamples, seed=seed)
        key = key if isinstance(key, tuple) else (key,)
        out.append([*key, float(v.mean()), lo, hi, int(v.size)])
    return pd.DataFrame(out, columns=columns)
