"""The ``sparseslice`` command line: one Typer app, a thin layer over the library.

User mistakes (:class:`~sparseslice.errors.UserError`) print one line and exit with
status 2; there is no traceback for them.
"""

from __future__ import annotations

import errno
import functools
import importlib
import inspect
import os
import types
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from typer.core import TyperCommand
from typer.models import OptionInfo

from sparseslice import __version__
from sparseslice.errors import UserError, unknown_choice

#: Width of piped output (not a terminal): wide enough that nothing is wrapped or cut.
PIPE_WIDTH = 4096


class _Console(Console):
    """A Console that does not wrap or cut at 80 columns when its output is not a terminal
    (an inherited ``COLUMNS``, as test runners and CI export, does not count)."""

    def __init__(self, *, width: int | None = None, **kwargs: Any) -> None:
        super().__init__(width=width, **kwargs)
        self._asked_width = width

    def _get_size(self) -> ConsoleDimensions:
        size = Console.size.fget(self)
        if self._asked_width is None and not self.is_terminal:
            return ConsoleDimensions(PIPE_WIDTH, size.height)
        return size

    size = property(_get_size, Console.size.fset)


app = typer.Typer(
    name="sparseslice",
    help="Plan sparse slice annotation, train on sparse labels, interpolate, evaluate, run studies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
console = _Console()
err_console = Console(stderr=True, soft_wrap=True, highlight=False)


def _resolve(ref: str) -> Any:
    """The object named ``"module:NAME"``, imported now."""
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Choices:
    """Marks a ``str`` option whose valid values are a registry beside the implementations.

    ``registry`` is ``"module:NAME"`` (a tuple of names); it is imported only when help is
    shown or a value is checked, so the CLI starts without importing torch. ``strict=False``
    only lists the values (an argument that also takes a file, e.g. a preset or a spec).
    """

    registry: str
    strict: bool = True
    label: str = "One of"

    def values(self) -> tuple[str, ...]:
        return tuple(_resolve(self.registry))


@dataclass(frozen=True)
class DefaultFrom:
    """Marks an option (``None``: not given) whose default is a dataclass field's, shown in help.

    ``owner`` is ``"module:Class"``; ``field`` defaults to the parameter's name.
    """

    owner: str
    field: str | None = None

    def shown(self, param: Any) -> str:
        """The default as help shows it: ``16,32`` for a tuple, the flag's name for a bool, the field's
        ``unset`` metadata (what None means) for None."""
        import dataclasses

        field = {f.name: f for f in dataclasses.fields(_resolve(self.owner))}[self.field or param.name]
        value = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if value is None and field.metadata.get("unset"):
            return field.metadata["unset"]
        if isinstance(value, bool) and getattr(param, "secondary_opts", None):
            return (param.opts if value else param.secondary_opts)[0].lstrip("-")
        return ",".join(map(str, value)) if isinstance(value, tuple | list) else str(value)


#: Every long-running command takes ``--progress/--no-progress`` (declared here only).
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress",
                                              help="Show progress bars (on stderr).")]


def _marked(fn: Callable[..., Any], kind: type) -> dict[str, tuple[str, Any]]:
    """``{parameter: (flag, mark)}`` for the options of ``fn`` annotated with a ``kind`` mark."""
    found = {}
    for name, hint in typing.get_type_hints(fn, include_extras=True).items():
        meta = getattr(hint, "__metadata__", ())
        marks = [m for m in meta if isinstance(m, kind)]
        if marks:
            found[name] = (_option_flag(name, meta), marks[0])
    return found


def _option_flag(name: str, meta: tuple[Any, ...]) -> str:
    """The long flag of option ``name`` (``--out``) from its annotation's metadata."""
    decls = [d for m in meta if isinstance(m, OptionInfo)
             for d in (m.default, *(m.param_decls or ())) if isinstance(d, str) and d.startswith("--")]
    return decls[0] if decls else "--" + name.replace("_", "-")


def _unoptional(hint: Any) -> Any:
    """``X`` for the type hint ``X | None``, else the hint itself."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def _field_flag(field: Any) -> str:
    """The flag of a dataclass field's option: its ``flag`` metadata, else ``--`` and the name with dashes."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _field_option(owner: str, field: Any, hint: Any, panel: str) -> Any:
    """The annotation of the option for one field of ``owner``: ``--x/--no-x`` for a bool, text
    (``16,32``) for a tuple; None means "not given"; help, choices and default from the field."""
    base = _unoptional(hint)
    flag = _field_flag(field)
    kind, decl, metavar = base, flag, None
    if base is bool:
        decl = f"{flag}/--no-{flag[2:]}"
    elif typing.get_origin(base) is tuple:
        kind, metavar = str, "<ints>" if typing.get_args(base)[0] is int else "<numbers>"
    marks = [DefaultFrom(owner, field.name)]
    if field.metadata.get("choices"):
        marks.append(Choices(field.metadata["choices"]))
    option = typer.Option(decl, help=field.metadata.get("help", ""), rich_help_panel=panel, metavar=metavar)
    return Annotated[(kind | None, option, *marks)]


def config_options(owner: str, *, panel: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command one option per field of the dataclass ``owner`` (``"module:Class"``), in place
    of its ``**settings`` parameter, so each field is declared once: in the dataclass.

    Each option (:func:`_field_option`) is ``--name-with-dashes`` (or the field's ``flag``
    metadata), with the field's ``help``, its ``choices`` registry and its default shown, listed
    under ``panel`` in help. The command receives every field in ``settings``, None when not
    given (a config file or the dataclass default applies); :func:`given_fields` keeps those given.
    Reading the fields must not import heavy modules: it happens when the CLI starts.
    """

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        import dataclasses

        cls = _resolve(owner)
        hints = typing.get_type_hints(cls)
        added = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                   annotation=_field_option(owner, f, hints[f.name], panel))
                 for f in dataclasses.fields(cls)]
        params = [p for p in inspect.signature(fn, eval_str=True).parameters.values()
                  if p.kind is not inspect.Parameter.VAR_KEYWORD]
        at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.KEYWORD_ONLY), len(params))
        fn.__signature__ = inspect.Signature([*params[:at], *added, *params[at:]], return_annotation=None)
        fn.__annotations__ = {**{p.name: p.annotation for p in params}, **{p.name: p.annotation for p in added},
                              "return": None}
        return fn

    return decorate


def given_fields(owner: str, settings: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``owner`` given on the command line (not None), a tuple's ``64,64`` text as a list."""
    import dataclasses

    declared = {f.name: f for f in dataclasses.fields(_resolve(owner))}
    hints = typing.get_type_hints(_resolve(owner))
    given = {}
    for name, value in settings.items():
        if value is None:
            continue
        base = _unoptional(hints[name])
        if typing.get_origin(base) is tuple:
            value = _number_list(value, typing.get_args(base)[0], _field_flag(declared[name])[2:])
        given[name] = value
    return given


def _number_list(value: str, item: type, name: str) -> list[Any]:
    """``"64,64"`` (or ``64x64``) as ``[64, 64]`` of ``item`` (int or float)."""
    try:
        return [item(v) for v in value.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        what, example = ("integers", "64,64") if item is int else ("numbers", "-1000,1000")
        raise UserError(f"{name} must be comma-separated {what}, got {value!r}; e.g. {example}") from None


class SparseCommand(TyperCommand):
    """A command whose help shows text literally (``[default: 50]`` is not Rich markup), lists
    the valid values of every choice option from its registry and shows config defaults."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = escape(self.help) if self.help else self.help
        for param in self.params:
            if getattr(param, "help", None):
                param.help = escape(param.help)
        self._help_completed = False

    def format_help(self, ctx: Any, formatter: Any) -> None:
        if not self._help_completed and self.callback is not None:
            fn = inspect.unwrap(self.callback)
            choices, defaults = _marked(fn, Choices), _marked(fn, DefaultFrom)
            for param in self.params:
                extra = []
                if param.name in choices:
                    mark = choices[param.name][1]
                    extra.append(f"{mark.label}: {', '.join(mark.values())}.")
                if param.name in defaults:
                    extra.append(f"[default: {defaults[param.name][1].shown(param)}]")
                param.help = " ".join([param.help or "", *map(escape, extra)]).strip()
            self._help_completed = True
        super().format_help(ctx, formatter)


def command(group: typer.Typer = app, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a CLI command: a :class:`UserError` becomes one ``error:`` line and exit code 2,
    a warning one ``warning:`` line on stderr (no file/line noise). Options marked with
    :class:`Choices` are checked against their registry before the command runs."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kw: Any) -> Any:
            with warnings.catch_warnings():
                warnings.showwarning = _show_warning
                try:
                    _check_choices(fn, kw)
                    return fn(*args, **kw)
                except UserError as exc:
                    _print_error(str(exc))
                    raise typer.Exit(2) from None
                except OSError as exc:
                    line = os_error_line(exc, fn, kw)
                    if line is None:
                        raise
                    _print_error(line)
                    raise typer.Exit(2) from None

        group.command(cls=SparseCommand, **kwargs)(wrapper)
        return fn

    return decorate


def _print_error(message: str) -> None:
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", markup=True)


#: What to do about an operating-system error on a user's path, by errno.
_OS_FIXES = {
    errno.ENOTDIR: "a part of the path is a file, not a folder: pass a path whose parents are folders",
    errno.EISDIR: "it is a folder where a file is expected: pass a file name",
    errno.EEXIST: "a file is in the way where a folder is needed: pass another path or move that file",
    errno.ENOTEMPTY: "the folder is not empty: pass a new or empty folder",
    errno.EACCES: "pass a path you may write to, or change its permissions",
    errno.EPERM: "pass a path you may write to, or change its permissions",
    errno.EROFS: "the file system is read-only: pass a folder on a writable disk",
    errno.ENOSPC: "the disk is full: free space or pass a folder on another disk",
    errno.EDQUOT: "the disk quota is used up: free space or pass a folder on another disk",
    errno.ENOENT: "a parent folder is missing and cannot be made: pass a path in an existing folder",
    errno.ENAMETOOLONG: "pass a shorter path",
}


def os_error_line(exc: OSError, fn: Callable[..., Any], given: dict[str, Any]) -> str | None:
    """The one-line message for an ``OSError`` on a path the user gave (None: not the user's path).

    The error's file is matched to the command argument it is, lies inside or contains (a
    parent that is a file); a full or read-only disk is the user's to fix even without a file.
    """
    files = [f for f in (exc.filename2, exc.filename) if isinstance(f, str | bytes | os.PathLike)]
    for file in files:
        found = _argument_of(os.fsdecode(file), given)
        if found is not None:
            name, value = found
            verb = "write" if name == "out" else "read"
            where = f" ({os.fsdecode(file)!r})" if os.path.abspath(os.fsdecode(file)) != os.path.abspath(value) else ""
            fix = _OS_FIXES.get(exc.errno, "check the path")
            if verb == "read" and exc.errno in (errno.EACCES, errno.EPERM):
                fix = "pass a path you may read, or change its permissions"
            return f"cannot {verb} {_flag(fn, name)} {str(value)!r}: {exc.strerror}{where}; {fix}"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return f"cannot write: {exc.strerror}; {_OS_FIXES[exc.errno]}"
    return None


def _argument_of(file: str, given: dict[str, Any]) -> tuple[str, Path] | None:
    """The path argument that ``file`` is, lies inside, contains or is written beside (``plan.csv`` beside
    ``plan.json``); the closest one."""
    target = Path(os.path.abspath(file))
    best: tuple[int, str, Path] | None = None
    for name, value in given.items():
        if not isinstance(value, Path):
            continue
        path = Path(os.path.abspath(value))
        beside = target.parent == path.parent and target.name.split(".")[0] == path.name.split(".")[0]
        if target == path or path in target.parents or target in path.parents or beside:
            score = -abs(len(path.parts) - len(target.parts))
            if best is None or score > best[0]:
                best = (score, name, value)
    return None if best is None else best[1:]


def _flag(fn: Callable[..., Any], name: str) -> str:
    """How the user writes parameter ``name`` of ``fn``: ``--out`` for an option, ``OUT`` for an argument."""
    meta = getattr(typing.get_type_hints(fn, include_extras=True).get(name), "__metadata__", ())
    return _option_flag(name, meta) if any(isinstance(m, OptionInfo) for m in meta) else name.upper()


def _check_choices(fn: Callable[..., Any], given: dict[str, Any]) -> None:
    for name, (flag, choices) in _marked(fn, Choices).items():
        value = given.get(name)
        if choices.strict and value is not None and value not in (allowed := choices.values()):
            raise unknown_choice(flag, value, allowed)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    err_console.print(f"[yellow]warning:[/yellow] {escape(str(message))}", markup=True)


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
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON (every case) "
                                                         "instead of tables.")] = False,
    check: Annotated[bool, typer.Option(
        "--check", help="Read everything (as nnU-Net's --verify_dataset_integrity): listed files exist, every "
                        "image and label decodes, equal channel counts, label grids equal image grids, label "
                        "values declared, finite intensities. Lists each problem and exits 1 if any.")] = False,
    progress: ProgressOption = True,
) -> None:
    """Describe a dataset: cases, shapes, spacing, labels, slice axis, structure slices.

    Without --check, image headers are read (labels in full) and the output says what was not checked.
    """
    import json
    from dataclasses import replace

    from sparseslice.info import check_dataset, describe_dataset, description_record, render_description

    if check:
        problems = check_dataset(data, progress=progress)
        if problems:
            if as_json:
                typer.echo(json.dumps({"root": str(data), "checked": "everything", "problems": problems}, indent=2))
            else:
                for problem in problems:
                    console.print(f"problem: {problem}", markup=False, highlight=False, soft_wrap=True)
            err_console.print(f"[bold red]error:[/bold red] {len(problems)} problem(s) in {escape(repr(str(data)))}; "
                              "fix them (each is listed above) and run info --check again", markup=True)
            raise typer.Exit(1)
    desc = describe_dataset(data, axis=axis, require_labels=require_labels, progress=progress)
    desc = replace(desc, checked=check)
    if as_json:
        typer.echo(json.dumps({**description_record(desc), **({"problems": []} if check else {})}, indent=2))
        return
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


@command()
def plan(
    data: Annotated[Path, typer.Argument(help="Dataset folder (MSD / nnU-Net raw, pairs) or CSV.")],
    budget: Annotated[int | None, typer.Option(help="Slices to draw (border slices are free).")] = None,
    budget_hours: Annotated[float | None, typer.Option(
        help="Plan by annotation time instead of slices: the largest budget whose estimate fits.")] = None,
    rho: Annotated[float | None, typer.Option(
        help="Density: drawn / selectable slices per volume (the extent when known); sets the volume count.")] = None,
    volumes: Annotated[int | None, typer.Option(
        help="Volumes to annotate (rho follows). Default with neither: as many volumes as the budget allows.")] = None,
    strategy: Annotated[str, typer.Option(help="Slice selection strategy."),
                        Choices("sparseslice.select.strategies:STRATEGIES")] = "random",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    axis: Annotated[int | None, typer.Option(help="Slice axis (default: the dataset's, largest spacing).")] = None,
    cases: Annotated[str | None, typer.Option(help="Comma-separated candidate cases (default: all).")] = None,
    extents: Annotated[str | None, typer.Option(
        help="CSV case,first,last of the structure's slices (annotators' two clicks), or 'labels' to take "
             "them from the dataset's labels. Slices are then chosen inside them.")] = None,
    volume_selection: Annotated[str, typer.Option(help="Volume selection (diverse: k-center over volumes)."),
                                Choices("sparseslice.select.allocation:VOLUME_SELECTIONS")] = "random",
    block_fraction: Annotated[float | None, typer.Option(
        help="block only: each block is this fraction of the structure slices (instead of rho/volumes).")] = None,
    volume_minutes: Annotated[float, typer.Option(help="Cost model: minutes of overhead per volume.")] = 2.0,
    slice_minutes: Annotated[float, typer.Option(help="Cost model: minutes to draw one slice.")] = 1.5,
    consecutive_discount: Annotated[float, typer.Option(
        help="Cost model: fraction saved on a slice next to the previous drawn one.")] = 0.4,
    extent_minutes: Annotated[float, typer.Option(
        help="Cost model: minutes for the two extent clicks per volume (when extents are used).")] = 0.25,
    out: Annotated[Path, typer.Option("--out", "-o", help="Plan file: NAME.json or NAME.csv (both are written, "
                                                          "same stem), or a folder.")] = Path("plan.json"),
    rows: Annotated[int, typer.Option(help="Volumes shown in the summary (0: all).")] = 20,
    exclude: Annotated[list[Path] | None, typer.Option(
        help="A later round: a previous plan.json or sparse dataset (collect's output) whose slices are not "
             "planned again; repeatable; recorded as the plan's parents (default: none, a first round).")] = None,
    progress: ProgressOption = True,
) -> None:
    """Choose which volumes and slices to annotate under a budget; write plan.json + plan.csv."""
    from sparseslice.datasets import discover_dataset
    from sparseslice.outputs import dataset_inputs
    from sparseslice.select import (
        CostModel,
        extent_advice,
        make_plan,
        read_exclusions,
        read_extents,
        render_plan,
        write_plan,
    )
    from sparseslice.select.worklist import check_plan_out

    ds = discover_dataset(data)
    check_plan_out(out, keep=extents if extents not in (None, "labels") else None,
                   inputs=[*dataset_inputs(ds), *(exclude or [])])
    excluded = read_exclusions(exclude) if exclude else None
    if axis is None and excluded is not None:  # a later round slices as the earlier ones did
        axis = excluded.axis
    ids = _case_list(cases)
    ext = None
    if extents == "labels":
        from sparseslice.select import extents_from_labels
        from sparseslice.select.plan import plan_axis

        ext = extents_from_labels(ds, axis=plan_axis(ds, axis=axis, cases=ids), cases=ids)
    elif extents is not None:
        ext = read_extents(extents)
    cost = CostModel(volume_minutes=volume_minutes, slice_minutes=slice_minutes,
                     consecutive_discount=consecutive_discount, extent_minutes=extent_minutes)
    result = make_plan(ds, budget=budget, budget_hours=budget_hours, rho=rho, volumes=volumes, strategy=strategy,
                       seed=seed, axis=axis, cases=ids, extents=ext, volume_selection=volume_selection,
                       block_fraction=block_fraction, cost=cost, exclude=excluded, progress=progress)
    path = write_plan(result, out)  # before any output: a path that cannot be written is the only line
    render_plan(result, console, rows=rows)
    advice = extent_advice(result, ds, progress=progress)
    if advice:
        console.print(advice, markup=False, highlight=False)
    console.print(f"wrote {path} and {path.with_suffix('.csv')}")


@command()
def simulate(
    data: Annotated[Path, typer.Argument(help="Fully labelled dataset the plan was made for.")],
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.json from sparseslice plan.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the sparse dataset.")],
    format: Annotated[str, typer.Option(
        "--format", help="Output layout: msd (ignore value 255) or nnunet (nnU-Net v2 raw; ignore = highest "
                         "label + 1)."), Choices("sparseslice.simulate:FORMATS")] = "msd",
    border_slices: Annotated[bool, typer.Option(
        help="Mark slices outside the structure's extent as annotated background (free).")] = False,
    ignore_value: Annotated[int, typer.Option(help="Value of unknown voxels (msd format).")] = 255,
    copy_images: Annotated[bool, typer.Option(
        help="Copy images instead of absolute symbolic links to the originals.")] = False,
    modality: Annotated[list[str] | None, typer.Option(
        help="Channel modality (MSD modality, nnU-Net channel_names; CT gets CT normalisation): once for all "
             "channels or once per channel. Default: the source dataset.json's, else unknown.")] = None,
    progress: ProgressOption = True,
) -> None:
    """Apply a plan to full labels: write the sparse labels an annotator would produce.

    OUT must be new, empty or an earlier simulation (which is replaced).
    """
    from sparseslice.datasets import discover_dataset
    from sparseslice.select import read_plan
    from sparseslice.simulate import simulate as run_simulate

    ds = discover_dataset(data, require_labels=True)
    the_plan = read_plan(plan_file)
    run_simulate(ds, the_plan, out, format=format, border_slices=border_slices, ignore_value=ignore_value,
                 copy_images=copy_images, modality=modality, progress=progress)
    console.print(f"wrote {the_plan.volumes} sparse cases ({the_plan.budget} drawn slices) to {out}")


# --- worklist / collect (issue 15) ---


@command()
def worklist(
    data: Annotated[Path, typer.Argument(help="Dataset the plan was made for.")],
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.json from sparseslice plan.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for worklist.csv/.json and one <case>.seg.nrrd "
                                                          "per case (3D Slicer).")],
    preannotations: Annotated[Path | None, typer.Option(
        help="Folder from predict --plan: each .seg.nrrd starts from its case's mask, to correct (default: "
             "empty segments).")] = None,
    progress: ProgressOption = True,
) -> None:
    """Write what annotators follow: worklist.csv (image, slices 0- and 1-based, labels) and Slicer files."""
    from sparseslice.datasets import discover_dataset
    from sparseslice.select import read_plan
    from sparseslice.select.handout import write_handout

    the_plan = read_plan(plan_file)
    path = write_handout(the_plan, discover_dataset(data), out, plan_path=plan_file, preannotations=preannotations,
                         progress=progress)
    console.print(f"wrote {path}, {path.with_suffix('.json').name} and {the_plan.volumes} .seg.nrrd files to {out}")




@command()
def collect(
    data: Annotated[Path, typer.Argument(help="Dataset the plan was made for (images; labels not needed).")],
    plan_file: Annotated[Path, typer.Argument(metavar="PLAN", help="plan.json the annotators followed.")],
    annotations: Annotated[Path, typer.Argument(help="Folder of the annotators' files: <case>.nii.gz, .nrrd or "
                                                     "Slicer .seg.nrrd (zeros off the drawn slices).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Sparse dataset folder (an earlier collect output is "
                                                          "merged into).")],
    preannotations: Annotated[Path | None, typer.Option(
        help="Folder of the masks annotators started from (predict --plan): their slices are recorded as "
             "corrected (default: none, every slice was drawn).")] = None,
    allow_missing: Annotated[bool, typer.Option(help="Collect the files there are when planned cases have "
                                                     "none yet.")] = False,
    ignore_value: Annotated[int, typer.Option(help="Value of unknown voxels.")] = 255,
    copy_images: Annotated[bool, typer.Option(
        help="Copy images instead of absolute symbolic links to the originals.")] = False,
    progress: ProgressOption = True,
) -> None:
    """Turn what annotators saved into sparse labels: planned slices annotated, the rest unknown.

    Off-plan slices are kept and listed; planned slices that look forgotten are listed and left unknown.
    """
    from sparseslice.collect import collect as run_collect
    from sparseslice.collect import render_collect
    from sparseslice.datasets import discover_dataset
    from sparseslice.select import read_plan

    ds = discover_dataset(data)
    report = run_collect(ds, read_plan(plan_file), annotations, out, plan_path=plan_file,
                         preannotations=preannotations, allow_missing=allow_missing, ignore_value=ignore_value,
                         copy_images=copy_images, progress=progress)
    render_collect(report, console)


# --- interpolate (issue 4) ---


@command()
def interpolate(
    sparse_dir: Annotated[Path, typer.Argument(help="Sparse dataset (e.g. written by sparseslice simulate).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (same layout, labels filled).")],
    method: Annotated[str, typer.Option(help="Interpolation method (mci needs the ITK extra)."),
                      Choices("sparseslice.interpolate.methods:METHODS")] = "sdf",
    progress: ProgressOption = True,
) -> None:
    """Fill the slices between annotated slices; sidecars record which were interpolated."""
    from sparseslice.interpolate import interpolate_dataset

    interpolate_dataset(sparse_dir, out, method=method, progress=progress)
    console.print(f"interpolated labels ({method}) written to {out}")

# --- train (issue 5) ---


#: The training options: one per field of this dataclass (its defaults, help and choices).
_TRAIN_CONFIG = "sparseslice.train.config:TrainConfig"


@command()
@config_options(_TRAIN_CONFIG, panel="Training options (also the keys of a -c config)")
def train(
    sparse_dir: Annotated[Path, typer.Argument(help="Training dataset: sparse (with .sparse.json sidecars) or full.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder (config.json, best.pt, last.pt, "
                                                          "history.csv).")],
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config; options below override it.")]
    = None,
    *,
    val_dir: Annotated[Path | None, typer.Option(help="Validation dataset (default: hold out val-fraction).")]
    = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from last.pt.")] = False,
    progress: ProgressOption = True,
    **settings: Any,
) -> None:
    """Train a 2D or 3D network on sparse labels (unknown slices are never background)."""
    from sparseslice.train import TrainConfig, load_config
    from sparseslice.train import train as run_training

    base = load_config(config).to_dict() if config else {}
    given = given_fields(_TRAIN_CONFIG, settings)
    if "channels" in given and "strides" not in given and "strides" not in base:
        given["strides"] = [2] * (len(given["channels"]) - 1)
    cfg = TrainConfig.from_dict({**base, **given})
    result = run_training(sparse_dir, out, config=cfg, val_dir=val_dir, progress=progress, resume=resume)
    console.print(f"best validation Dice {result.best_val_dice:.4f} after {result.epochs} epochs "
                  f"({result.seconds / 60:.1f} min); checkpoint {result.checkpoint}")


# --- predict / evaluate (issue 6) ---


def _case_list(cases: str | None, *, files: bool = False) -> list[str] | None:
    """``a,b,c``; with ``files``, also a file with one case id per line (blank lines, ``#`` comments skipped)."""
    if cases is None or not (cases or files):  # --test-cases "" is refused by the spec, not dropped
        return None
    if files and Path(cases).is_file():
        items = [s for s in Path(cases).read_text().splitlines() if not s.strip().startswith("#")]
    else:
        items = cases.split(",")
    return [c.strip() for c in items if c.strip()]


@command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder from sparseslice train (best.pt) or a .pt file.")],
    images: Annotated[Path, typer.Argument(help="Images: dataset folder (MSD / nnU-Net raw, pairs) or CSV.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for <case>.nii.gz label maps.")],
    cases: Annotated[str | None, typer.Option(help="Comma-separated cases (default: all).")] = None,
    tta: Annotated[bool, typer.Option(help="Test-time augmentation: average over flips.")] = False,
    tta_axes: Annotated[str | None, typer.Option(help="Axes to flip for TTA, e.g. 0,1 (default: all "
                                                      "for 3D, in-plane for 2D).")] = None,
    fill_holes: Annotated[bool, typer.Option(help="Fill enclosed holes of each label.")] = True,
    largest_component: Annotated[bool, typer.Option(help="Keep each label's largest component.")] = True,
    overlap: Annotated[float, typer.Option(help="Sliding-window overlap in [0, 1).")] = 0.5,
    batch_size: Annotated[int, typer.Option(
        help="Windows or slices per forward pass (2D on a CPU: at most 2^18 pixels a pass).")] = 16,
    window: Annotated[str, typer.Option(help="whole: 2D whole slices, 3D the largest window that fits memory; "
                                             "patch: sliding windows of the training patch."),
                      Choices("sparseslice.predict:WINDOWS")] = "whole",
    device: Annotated[str | None, typer.Option(help="cpu, cuda or cuda:N (default: CUDA if present).")] = None,
    plan: Annotated[Path | None, typer.Option(
        "--plan", help="Pre-annotation: predict only the plan's cases, keeping only their planned slices, for "
                       "annotators to correct (default: every case, every slice).")] = None,
    progress: ProgressOption = True,
) -> None:
    """Predict label maps for a folder of images, in each image's own space."""
    from sparseslice.predict import predict_folder

    axes = None
    if tta_axes:
        try:
            axes = [int(a) for a in tta_axes.split(",") if a.strip()]
        except ValueError:
            raise UserError(f"--tta-axes must be comma-separated integers, got {tta_axes!r}; e.g. 0,1") from None
    from sparseslice.select import read_plan

    written = predict_folder(run, images, out, cases=_case_list(cases), tta=tta, fill_holes=fill_holes,
                             largest_component=largest_component, device=device, tta_axes=axes,
                             overlap=overlap, batch_size=batch_size, window=window, progress=progress,
                             plan=read_plan(plan) if plan is not None else None)
    console.print(f"wrote {len(written)} label maps to {out}")


def _check_metrics_out(out: Path, pred: Path, ref: Path) -> None:
    """Refuse a metrics output (the CSV or the JSON beside it) that is a folder, an input, lies inside
    the reference, or would overwrite a file evaluate did not write.

    A metrics file beside the predictions (``pred/metrics.csv``) is fine: only the prediction
    files themselves count as inputs there.
    """
    from sparseslice.datasets import discover_dataset
    from sparseslice.evaluate import check_metrics_out, prediction_files
    from sparseslice.outputs import dataset_inputs

    check_metrics_out(out, inputs=[*prediction_files(pred).values(), *dataset_inputs(discover_dataset(ref))])


@command()
def evaluate(
    pred: Annotated[Path, typer.Argument(help="Folder of predicted label maps <case>.nii.gz.")],
    ref: Annotated[Path, typer.Argument(help="Reference: dataset with labels, or a folder of label files.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Tidy CSV of per-case values, with a JSON "
                                                                 "summary of the same stem (NAME.json names both).")]
    = None,
    cases: Annotated[str | None, typer.Option(help="Comma-separated cases (default: all).")] = None,
    allow_missing: Annotated[bool, typer.Option(help="Succeed even if some cases have no prediction.")] = False,
    axis: Annotated[int | None, typer.Option(help="Slice axis for 2D ASSD (default: dataset's).")] = None,
    progress: ProgressOption = True,
) -> None:
    """Score predictions: Dice, HD, HD95, ASSD, 2D slice ASSD, RVD per label and foreground."""
    from sparseslice.evaluate import evaluate_folder, render_summary, summarize, write_metrics

    if out is not None:
        _check_metrics_out(out, pred, ref)
    df = evaluate_folder(pred, ref, cases=_case_list(cases), allow_missing=True, axis=axis, progress=progress)
    missing = df.attrs.get("missing", [])
    shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
    if df.empty:  # a table without rows is no result: nothing is written
        raise UserError(f"pred has no prediction for any of the {len(missing)} reference case(s), got none of "
                        f"{shown} in {str(pred)!r}; pass the folder sparseslice predict wrote (<case>.nii.gz)")
    if missing and not allow_missing:  # refused before --out is written: a failure leaves no result file
        render_summary(summarize(df), console, title=f"{df['case'].nunique()} cases")
        raise UserError(f"pred is missing {len(missing)} case(s), got no prediction for {shown} in "
                        f"{str(pred)!r}; predict them or pass --allow-missing (the rest is shown above, "
                        "--out was not written)")
    written = None if out is None else write_metrics(df, out)  # before any output: a path that cannot be
    render_summary(summarize(df), console, title=f"{df['case'].nunique()} cases")  # written is the only line
    if written is not None:
        console.print(f"wrote {written} and {written.with_suffix('.json')}")
    if missing:
        err_console.print(f"[yellow]warning:[/yellow] no prediction for {shown} in {str(pred)!r}", markup=True)

# --- study / demo (issue 7) ---

study_app = typer.Typer(help="Run a grid of experiments (a study) and report on it.", no_args_is_help=True)
app.add_typer(study_app, name="study")


@command(study_app, name="run")
def study_run(
    spec: Annotated[str, typer.Argument(help="Spec YAML file, or a preset."),
                    Choices("sparseslice.study.spec:PRESETS", strict=False, label="Presets")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Study folder (resumed if it holds this study).")],
    data: Annotated[Path | None, typer.Option(help="Dataset folder; replaces the spec's dataset.path.")] = None,
    test_cases: Annotated[str | None, typer.Option(
        help="Held-out test cases, comma-separated or a file with one per line (default: the spec's split).")] = None,
    executor: Annotated[str, typer.Option(help="Where runs execute: local (worker processes) or ray."),
                        Choices("sparseslice.study.executors:EXECUTORS")] = "local",
    workers: Annotated[int, typer.Option(help="Local worker processes; torch threads are split among them.")] = 1,
    address: Annotated[str | None, typer.Option(help="Ray cluster address (with --executor ray).")] = None,
    force: Annotated[bool, typer.Option(help="Use a folder that holds another study (unchanged runs are kept).")]
    = False,
    results_format: Annotated[str, typer.Option("--format", help="Format of the results table."),
                              Choices("sparseslice.study.results:RESULTS_FORMATS")] = "csv",
    report: Annotated[bool, typer.Option(help="Write STUDY/report.html at the end.")] = True,
    progress: ProgressOption = True,
) -> None:
    """Run every unfinished run of a study; finished runs are skipped, crashed runs recorded (exit 1)."""
    from sparseslice.study import load_spec, run_study

    study = load_spec(spec, data=data, test_cases=_case_list(test_cases, files=True))
    summary = run_study(study, out, executor=executor, workers=workers, address=address,
                        force=force, results_format=results_format, progress=progress)
    console.print(f"study {out}: {len(summary.ran) - len(summary.failed)} runs finished, "
                  f"{len(summary.skipped)} already done, {len(summary.failed)} failed")
    if report:
        from sparseslice.study.report import write_report

        console.print(f"report: {write_report(out)}")
    for run_id, message in summary.failed.items():
        err_console.print(f"[red]failed:[/red] {run_id}: {message}", markup=True)
    if summary.failed:
        err_console.print(f"{len(summary.failed)} runs failed (errors in {out}/runs/<run>/error.json); "
                          "rerun the same command to retry them")
        raise typer.Exit(1)


@command(study_app, name="report")
def study_report(
    study: Annotated[Path, typer.Argument(help="Study folder written by sparseslice study run.")],
) -> None:
    """Write STUDY/report.html: findings, recommendation, figures, tables (self-contained)."""
    from sparseslice.study.report import write_report

    console.print(f"report: {write_report(study)}")


@command()
def demo(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (phantoms, study, report).")]
    = Path("demo-output"),
    workers: Annotated[int, typer.Option(help="Local worker processes.")] = 2,
    progress: ProgressOption = True,
) -> None:
    """Offline demo: synthetic phantoms, a small study and its report (a few minutes on 2 cores)."""
    from sparseslice.study.demo import run_demo

    report, summary = run_demo(out, workers=workers, progress=progress)
    console.print(f"demo report: {report}")
    if summary.failed:
        err_console.print(f"{len(summary.failed)} demo runs failed; see the report's last table")
        raise typer.Exit(1)
