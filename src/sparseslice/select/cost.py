"""Annotation time: per-volume overhead plus per-slice drawing time, cheaper for consecutive slices.

Neither paper models time; this module gives planning a currency users can budget in
(``plan --budget-hours``). The defaults are rough figures for drawing one structure by hand in
a desktop tool (3D Slicer, ITK-SNAP); calibrate them with your own annotators' timings.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields

from sparseslice.errors import UserError


@dataclass(frozen=True)
class CostModel:
    """Minutes an annotator needs for a volume.

    ``minutes = volume_minutes + extent_minutes (if the extent is clicked)
    + sum over drawn slices of slice_minutes * (1 - consecutive_discount if the slice
    directly follows another drawn slice else 1)``. Border slices cost nothing.

    Parameters
    ----------
    volume_minutes : float
        Overhead per volume: open it, set the window, find the structure (default 2.0).
    slice_minutes : float
        Drawing one slice from scratch (default 1.5).
    consecutive_discount : float
        Fraction saved on a slice adjacent to the previous drawn slice, whose contour can be
        copied and adjusted (default 0.4, so 0.9 min).
    extent_minutes : float
        The two clicks marking the first and last slice of the structure, charged once per
        volume when the plan uses extents (default 0.25).

    Examples
    --------
    >>> CostModel().volume_cost([3, 4, 5, 10])
    6.8
    """

    volume_minutes: float = 2.0
    slice_minutes: float = 1.5
    consecutive_discount: float = 0.4
    extent_minutes: float = 0.25

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int | float) or value < 0:
                raise UserError(f"{f.name} must be a non-negative number of minutes, got {value!r}; "
                                f"e.g. {f.default}")
        if self.consecutive_discount > 1:
            raise UserError(f"consecutive_discount must be a fraction in [0, 1], got "
                            f"{self.consecutive_discount}; e.g. 0.4 saves 40% on adjacent slices")

    def volume_cost(self, slices: Iterable[int], *, extent: bool = False) -> float:
        """Minutes to draw ``slices`` (indices) of one volume; no slices costs nothing."""
        drawn = sorted(set(int(s) for s in slices))
        if not drawn:
            return 0.0
        consecutive = sum(1 for a, b in zip(drawn, drawn[1:], strict=False) if b == a + 1)
        minutes = (self.volume_minutes + (self.extent_minutes if extent else 0.0)
                   + self.slice_minutes * (len(drawn) - self.consecutive_discount * consecutive))
        return round(minutes, 6)

    def plan_cost(self, volumes: Sequence[tuple[Sequence[int], bool]]) -> float:
        """Total minutes over ``(slices, extent_known)`` pairs."""
        return round(sum(self.volume_cost(s, extent=e) for s, e in volumes), 6)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"cost has unknown key {unknown[0]!r}; valid keys: {', '.join(sorted(known))}")
        return cls(**data)
