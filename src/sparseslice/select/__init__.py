"""Annotation planning: spend a slice budget over volumes and pick slices within each.

- :mod:`~sparseslice.select.allocation`: which volumes, how many slices each (``rho``/``volumes``).
- :mod:`~sparseslice.select.strategies`: ``random``, ``interval``, ``ual``, ``block`` within a volume.
- :mod:`~sparseslice.select.cost`: annotation time model.
- :mod:`~sparseslice.select.plan`: :func:`make_plan`, :class:`Plan`.
- :mod:`~sparseslice.select.worklist`: ``plan.json``/``plan.csv``, extent clicks, summary.
"""

from sparseslice.select.allocation import VOLUME_SELECTIONS, apportion, default_volume_encoder, k_center_order
from sparseslice.select.cost import CostModel
from sparseslice.select.plan import Exclusion, Plan, PlanEntry, extents_from_labels, make_plan, plan_axis
from sparseslice.select.strategies import (
    STRATEGIES,
    block_slices,
    default_slice_encoder,
    interval_slices,
    random_slices,
    select_slices,
    ual_slices,
)
from sparseslice.select.worklist import (
    extent_advice,
    plan_csv,
    read_exclusions,
    read_extents,
    read_plan,
    render_plan,
    write_plan,
)

__all__ = [
    "STRATEGIES", "VOLUME_SELECTIONS", "CostModel", "Exclusion", "Plan", "PlanEntry", "apportion", "block_slices",
    "default_slice_encoder", "default_volume_encoder", "extent_advice", "extents_from_labels", "interval_slices",
    "k_center_order", "make_plan", "plan_axis", "plan_csv", "random_slices", "read_exclusions", "read_extents",
    "read_plan", "render_plan", "select_slices", "ual_slices", "write_plan",
]
