"""Rich progress bars with an on/off switch, shared by every stage (tests keep them off)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def track(items: Iterable[T], description: str, *, progress: bool) -> Iterator[T]:
    """Iterate ``items``, showing a transient Rich progress bar when ``progress`` is on."""
    if not progress:
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, transient=True)


class NullProgress:
    """Stand-in for ``rich.progress.Progress`` when progress is off."""

    def add_task(self, *args: object, **kwargs: object) -> int:
        return 0

    def update(self, *args: object, **kwargs: object) -> None:
        return None


@contextlib.contextmanager
def training_progress(progress: bool) -> Iterator[object]:
    """A Progress showing epoch, step, loss and validation Dice (or a no-op)."""
    if not progress:
        yield NullProgress()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("loss {task.fields[loss]}  val dice {task.fields[dice]}"),
                  TimeElapsedColumn()) as bar:
        yield bar
