"""The worklist on disk: ``plan.json`` + ``plan.csv``, the annotators' extent clicks, a Rich summary.

``plan.csv`` has one row per volume (case, axis, slice count, extent, slice indices 0-based
and 1-based as ITK-SNAP shows them), so an annotator can work through it in 3D Slicer or
ITK-SNAP; ``plan.json`` is the complete record :func:`read_plan` reads back.

Without extents a plan spreads its slices over whole volumes, and many land outside the
structure (on MSD hippocampus about 4 in 10). The extent step comes first then: annotators
click the first and last structure slice of each volume into ``plan.csv``'s empty
``first``/``last`` columns, and ``plan --extents plan.csv`` (another ``--out``) re-plans the
slices inside them; :func:`extent_advice` says so, or, when the dataset has labels (a
simulation), how many drawn slices ``--extents labels`` would move inside.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparseslice.atomic import sha256_of, write_json, write_text
from sparseslice.errors import UserError
from sparseslice.select.plan import Exclusion, Plan

if TYPE_CHECKING:
    from sparseslice.datasets import Dataset


def _plan_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(plan.json, plan.csv)`` for a path naming either file (same stem) or a folder holding them."""
    p = Path(path)
    if p.suffix.lower() not in (".json", ".csv"):
        p = p / "plan.json"
    return p.with_suffix(".json"), p.with_suffix(".csv")


def plan_csv(plan: Plan) -> str:
    """The worklist as CSV: one row per volume, slice indices 0-based and 1-based (ITK-SNAP)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["case", "axis", "n_slices", "first", "last", "n_drawn", "slices", "slices_1based"])
    for e in plan.entries:
        first, last = e.extent if e.extent is not None else ("", "")
        w.writerow([e.case_id, e.axis, e.n_slices, first, last, len(e.slices),
                    " ".join(map(str, e.slices)), " ".join(str(s + 1) for s in e.slices)])
    return buf.getvalue()


def check_plan_out(path: str | os.PathLike[str], *, keep: str | os.PathLike[str] | None,
                   inputs: Sequence[str | os.PathLike[str]] = ()) -> None:
    """Refuse a plan output whose ``plan.csv`` would overwrite ``keep`` (the annotators' extents file),
    whose files are folders, are, hold or lie inside ``inputs``, or would overwrite files that are
    not an earlier plan exactly as ``plan`` wrote it (:func:`sparseslice.outputs.check_file_output`):
    a ``plan.csv`` the annotators filled in differs from its ``plan.json`` and is kept."""
    from sparseslice.outputs import check_file_output

    json_path, csv_path = _plan_paths(path)
    if keep is not None and csv_path.resolve() == Path(keep).resolve():
        raise UserError(f"out {str(path)!r} would overwrite the extents file {str(keep)!r} (its plan.csv); "
                        "pass another --out, e.g. plan2.json")
    check_file_output([json_path, csv_path], command="plan", ours=is_written_plan, given=path,
                      inputs=[*inputs, *([keep] if keep is not None else [])], argument="--out")


def is_written_plan(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` (a ``.json`` or ``.csv``) is half of a plan as :func:`write_plan` wrote it: a
    ``plan.json`` that reads as a plan, a ``plan.csv`` equal to the worklist of the ``plan.json`` beside it."""
    json_path, csv_path = _plan_paths(path)
    try:
        plan = Plan.from_dict(json.loads(json_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, ValueError, UserError):
        return False
    if Path(path).suffix.lower() == ".json":
        return True
    with open(csv_path, encoding="utf-8", newline="") as fh:
        return fh.read() == plan_csv(plan)


def write_plan(plan: Plan, path: str | os.PathLike[str]) -> Path:
    """Write ``plan.json`` and ``plan.csv`` (same stem) atomically; returns the JSON path.

    ``path`` names either file (``plan.csv`` gives ``plan.json`` beside it) or a folder (then
    ``folder/plan.json``).
    """
    json_path, csv_path = _plan_paths(path)
    write_text(csv_path, plan_csv(plan))
    try:
        write_json(json_path, plan.to_dict())
    except BaseException:  # half a pair (or a new worklist beside an old plan) is no result
        csv_path.unlink(missing_ok=True)
        json_path.unlink(missing_ok=True)
        raise
    return json_path


def read_plan(path: str | os.PathLike[str]) -> Plan:
    """Read a plan written by :func:`write_plan` (a ``.json`` file or a folder holding ``plan.json``)."""
    json_path, _ = _plan_paths(path)
    if not json_path.is_file():
        raise UserError(f"plan {str(json_path)!r} does not exist; make one with sparseslice plan")
    try:
        data = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"plan {str(json_path)!r} is not valid JSON ({exc}); rewrite it with "
                        "sparseslice plan") from None
    try:
        return Plan.from_dict(data)
    except UserError as exc:  # a hand-edited plan: say which file
        raise UserError(f"plan {str(json_path)!r}: {exc}") from None


def read_extents(path: str | os.PathLike[str]) -> dict[str, tuple[int, int]]:
    """Read the annotators' clicks: a CSV with columns ``case,first,last`` (0-based slices).

    Other columns are ignored, so a ``plan.csv`` whose ``first``/``last`` the annotators
    filled in is an extents file; rows with both left empty (not clicked yet) are skipped.
    The file is UTF-8, with or without Excel's byte-order mark.
    Checked here for shape (integers, ``0 <= first <= last``, one row per case); checked
    against each volume's slice count by :func:`make_plan`.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"extents file {str(p)!r} does not exist; pass a CSV with case,first,last")
    try:  # utf-8-sig: Excel's "CSV UTF-8" starts with a byte-order mark
        with p.open(newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.DictReader(fh))
    except UnicodeDecodeError as exc:
        raise UserError(f"extents file {str(p)!r} must be UTF-8 text, got byte {exc.object[exc.start]:#04x} at "
                        f"offset {exc.start}; save it as 'CSV UTF-8' (Excel) or convert it, e.g. "
                        f"iconv -f latin1 -t utf-8") from None
    if not rows or not {"case", "first", "last"} <= set(rows[0]):
        raise UserError(f"extents file {str(p)!r} must have columns case,first,last; add that header line")
    out: dict[str, tuple[int, int]] = {}
    for n, row in enumerate(rows, start=2):
        case = (row["case"] or "").strip()
        if not (row["first"] or "").strip() and not (row["last"] or "").strip():
            continue  # not clicked yet: the volume keeps its whole range
        try:
            first, last = int(row["first"]), int(row["last"])
        except (TypeError, ValueError):
            raise UserError(f"extents file {str(p)!r} line {n}: first/last must be integers, got "
                            f"{row['first']!r}, {row['last']!r}; give 0-based slice indices") from None
        if not 0 <= first <= last:
            raise UserError(f"extents file {str(p)!r} line {n}: extent must satisfy 0 <= first <= last, got "
                            f"({first}, {last}) for case {case!r}; swap or fix the clicks")
        if case in out:
            raise UserError(f"extents file {str(p)!r} line {n}: case {case!r} appears twice; keep one row")
        out[case] = (first, last)
    return out


def render_plan(plan: Plan, console: Any, *, rows: int = 20) -> None:
    """Print a Rich summary: volumes, slices each, total, estimated annotation time."""
    from rich.table import Table

    counts = [len(e.slices) for e in plan.entries]
    table = Table(title=f"plan: {plan.strategy}, seed {plan.seed}", show_lines=False)
    for col in ("case", "n_slices", "extent", "drawn", "slices"):
        table.add_column(col, justify="left" if col in ("case", "slices") else "right")
    shown = plan.entries if rows <= 0 else plan.entries[:rows]
    for e in shown:
        ext = f"{e.extent[0]}-{e.extent[1]}" if e.extent else "-"
        table.add_row(e.case_id, str(e.n_slices), ext, str(len(e.slices)), " ".join(map(str, e.slices)))
    if len(shown) < len(plan.entries):
        table.add_row(f"... {len(plan.entries) - len(shown)} more", "", "", "", "")
    console.print(table)
    rho = f"{plan.rho:.3g}" if plan.rho is not None else "-"
    console.print(
        f"[bold]{plan.volumes}[/bold] volumes, [bold]{plan.budget}[/bold] slices "
        f"({min(counts)}-{max(counts)} per volume), axis {plan.axis}, rho {rho} of {plan.rho_of} slices "
        f"(effective {plan.rho_effective:.3g})")
    if plan.minutes is not None:
        console.print(f"estimated annotation time: [bold]{plan.minutes / 60:.1f} h[/bold] "
                      f"({plan.minutes:.0f} min; {plan.cost.volume_minutes:g} min/volume, "
                      f"{plan.cost.slice_minutes:g} min/slice, {plan.cost.consecutive_discount:.0%} off "
                      "consecutive slices)")
    console.print(f"allocation: {plan.allocation}")
    for parent in plan.parents:
        console.print(f"a later round: slices of {parent.get('kind', 'plan')} {parent.get('path')} "
                      f"(sha256 {str(parent.get('sha256', ''))[:12]}) are not planned again", markup=False,
                      highlight=False)


def extent_advice(plan: Plan, dataset: Dataset, *, progress: bool = False) -> str | None:
    """What to do about a plan's volumes without an extent; None when every volume has one.

    When those volumes have labels (a simulation), counts the drawn slices outside each
    label's extent (reads those labels) and offers ``--extents labels``; otherwise gives
    the annotators' extent step.
    """
    from sparseslice.io import read_label
    from sparseslice.progress import track
    from sparseslice.sparse import extent_of

    missing = [e for e in plan.entries if e.extent is None]
    if not missing:
        return None
    labelled = [e for e in missing if dataset.case(e.case_id).label is not None]
    if len(labelled) == len(missing):
        outside = 0
        for e in track(labelled, "checking extents", progress=progress):
            ext = extent_of(read_label(dataset.case(e.case_id).label).array, axis=e.axis,
                            ignore_value=dataset.ignore_value)
            outside += sum(1 for s in e.slices if ext is None or not ext[0] <= s <= ext[1])
        return (f"the dataset has labels: {outside} of {plan.budget} drawn slices lie outside the structure "
                f"(labels' extent) in {len(missing)} volumes without an extent; plan with --extents labels "
                "to choose them inside it (a simulation)")
    return (f"{len(missing)} volumes have no extent, so their slices are spread over the whole volume. "
            "Extent step first: annotators click the first and last slice holding the structure of each "
            "volume into plan.csv's first,last columns (0-based: ITK-SNAP's slice number - 1), then plan "
            "again with --extents plan.csv and another --out to choose the slices inside them")


def read_exclusions(paths: Sequence[str | os.PathLike[str]]) -> Exclusion:
    """What earlier rounds covered, for ``plan --exclude``: each path a ``plan.json`` (its planned slices)
    or a sparse dataset folder (``labelsTr/*.sparse.json``: its annotated slices, as ``collect`` and
    ``simulate`` write them). Each becomes a parent of the new plan: path, kind and sha256 (of the plan
    file; of the sidecars, in name order, for a folder, plus its ``plan.json``'s when it has one)."""
    slices: dict[str, set[int]] = {}
    axes: dict[int, str] = {}
    parents = []
    for given in paths:
        p = Path(given)
        if p.is_dir() and (p / "labelsTr").is_dir():
            axis, found, parent = _sparse_folder_slices(p)
        else:
            plan = read_plan(p)
            json_path, _ = _plan_paths(p)
            axis = int(plan.axis if plan.axis is not None else plan.entries[0].axis)
            found = {e.case_id: list(e.slices) for e in plan.entries}
            parent = {"path": str(json_path.resolve()), "kind": "plan", "sha256": sha256_of(json_path)}
        axes.setdefault(axis, str(given))
        for case, values in found.items():
            slices.setdefault(case, set()).update(values)
        parents.append(parent)
    if len(axes) > 1:
        raise UserError(f"exclude paths use different slice axes, got {axes}; exclude rounds made along one axis")
    return Exclusion(next(iter(axes)), {c: sorted(v) for c, v in slices.items()}, parents)


def _sparse_folder_slices(folder: Path) -> tuple[int, dict[str, list[int]], dict[str, Any]]:
    """Axis, case -> annotated slices and parent record of a sparse dataset folder."""
    from sparseslice.sparse import SIDECAR_SUFFIX

    sidecars = sorted((folder / "labelsTr").glob(f"*{SIDECAR_SUFFIX}"))
    if not sidecars:
        raise UserError(f"exclude folder {str(folder)!r} has no labelsTr/*{SIDECAR_SUFFIX}; pass a sparse dataset "
                        "written by sparseslice collect or simulate, or a plan.json")
    digest = hashlib.sha256()
    found: dict[str, list[int]] = {}
    axes = set()
    for side in sidecars:
        data = side.read_bytes()
        digest.update(side.name.encode() + b"\0" + data)
        record = json.loads(data)
        if "source_axis" in record:
            raise UserError(f"exclude folder {str(folder)!r} is an nnU-Net export (axes reordered); exclude its "
                            "plan.json instead")
        axes.add(int(record["axis"]))
        found[side.name[: -len(SIDECAR_SUFFIX)]] = [int(s) for s in record.get("annotated", [])]
    if len(axes) > 1:
        raise UserError(f"exclude folder {str(folder)!r} mixes slice axes {sorted(axes)}; exclude one round at a time")
    parent: dict[str, Any] = {"path": str(folder.resolve()), "kind": "sparse dataset", "sha256": digest.hexdigest()}
    if (folder / "plan.json").is_file():
        parent["plan_sha256"] = sha256_of(folder / "plan.json")
    return axes.pop(), found, parent
