"""Rich progress bars with an on/off switch, shared by every stage (tests keep them off)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def _stderr_console() -> object:
    """Progress goes to stderr, so that stdout stays the command's output (``info --json | jq``)."""
    from rich.console import Console

    return Console(stderr=True)


def track(items: Iterable[T], description: str, *, progress: bool, total: float | None = None) -> Iterator[T]:
    """Iterate ``items``, showing a transient Rich progress bar when ``progress`` is on."""
    if not progress:
        yield from items
        return
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, transient=True, total=total,
                          console=_stderr_console())


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
                  TimeElapsedColumn(), console=_stderr_console()) as bar:
        yield bar
