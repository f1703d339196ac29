"""The ``sparseslice`` command line: one Typer app, a thin layer over the library.

User mistakes (:class:`~sparseslice.errors.UserError`) print one line and exit with
status 2; there is no traceback for them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from sparseslice import __version__
from sparseslice.errors import UserError

app = typer.Typer(
    name="sparseslice",
    help="Plan sparse slice annotation, train on sparse labels, interpolate, evaluate, run studies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def command(group: typer.Typer = app, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a CLI command that turns :class:`UserError` into one line and exit code 2."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            try:
                return fn(*args, **kw)
            except UserError as exc:
                err_console.print(f"[bold red]error:[/bold red] {exc}", markup=True)
                raise typer.Exit(2) from None

        group.command(**kwargs)(wrapper)
        return fn

    return decorate


def _version(value: bool) -> None:
    if value:
        console.print(f"sparseslice {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """sparseslice: which slices to annotate, and how to train on them."""


@command()
def info(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD / nnU-Net raw, pairs) or CSV.")],
    axis: Annotated[int | None, typer.Option(help="Slice axis (default: largest spacing).")] = None,
    require_labels: Annotated[bool, typer.Option(help="Fail if a case has no label.")] = False,
    rows: Annotated[int, typer.Option(help="Cases shown in the table (0: all).")] = 0,
) -> None:
    """Describe a dataset: cases, shapes, spacing, labels, slice axis, structure slices."""
    from sparseslice.describe import describe_dataset, render_description

    desc = describe_dataset(data, axis=axis, require_labels=require_labels)
    render_description(desc, console, rows=rows)


@command()
def synth(
    out: Annotated[Path, typer.Argument(help="Output folder (MSD layout).")],
    cases: Annotated[int, typer.Option(help="Number of phantom cases.")] = 8,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    labels: Annotated[int, typer.Option(help="Foreground labels per phantom (1-4).")] = 2,
) -> None:
    """Write a synthetic phantom dataset (for tests and offline demos)."""
    from sparseslice.synthetic import write_phantom_dataset

    write_phantom_dataset(out, cases=cases, seed=seed, n_labels=labels)
    console.print(f"wrote {cases} phantom cases to {out}")


# --- plan / simulate (issue 3) ---

# --- interpolate (issue 4) ---

# --- train (issue 5) ---

# --- predict / evaluate (issue 6) ---

# --- study / demo (issue 7) ---
