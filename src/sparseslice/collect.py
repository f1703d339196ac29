"""``collect``: turn what annotators saved into a sparse dataset, without reading zeros as background.

Annotators draw a plan's slices in 3D Slicer or ITK-SNAP and save one label file per case
(``<case>.nii.gz``, ``<case>.nrrd`` or Slicer's ``<case>.seg.nrrd``; a ``_seg``/``-label``...
tag after the case id is allowed). Such a file holds 0 on every slice nobody drew, so read
naively it says "background everywhere else". :func:`collect` reads it against the plan:

- a **planned** slice is annotated, whatever it holds: an empty planned slice is an answer
  (background);
- a slice drawn **off the plan** (foreground on a slice no plan of this collection named) is
  annotated too, and listed;
- a planned slice that looks **forgotten** (empty, while the nearest annotated slices on both
  sides hold the structure) is listed for review and left *unknown*: read as background it
  would teach the network a false negative in the middle of the structure, while unknown costs
  only that slice. Draw it (or confirm it empty by drawing nothing and removing it from the
  plan) and collect again;
- every other voxel is unknown (the ignore value).

The output is a sparse dataset as :func:`sparseslice.simulate.simulate` writes it (MSD layout,
images linked, sidecars from :func:`sparseslice.sparse.write_sparse`, ``dataset.json`` last),
plus ``collect.json``: one record per plan collected (its path and sha256, each case's planned,
drawn, empty, off-plan, forgotten and corrected slices). Collecting again into the same folder
merges: cases already there stay (their files need not be given again), a case's newly
annotated slices replace those slices only, and collecting the same files twice gives the same
folder. With ``preannotations`` (the folder ``predict --plan`` wrote), slices the annotator
started from a predicted mask are recorded as ``corrected`` (``unchanged`` when accepted as
predicted) rather than drawn, for the cost model.

Every input is checked before anything is written; any problem is one line naming the case,
the file and the fix.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sparseslice.atomic import sha256_of, write_json
from sparseslice.datasets import Dataset
from sparseslice.errors import UserError
from sparseslice.io import Header, Volume, read_header, read_label, strip_suffix, volume_suffix
from sparseslice.outputs import MARKER, OutputFolder, claim_output, dataset_inputs
from sparseslice.progress import track
from sparseslice.segnrrd import is_segmentation, read_segmentation
from sparseslice.select.handout import segment_names
from sparseslice.select.plan import Plan, PlanEntry
from sparseslice.select.worklist import write_plan
from sparseslice.simulate import channel_names, check_plan, sparse_dataset_json, write_case_images
from sparseslice.sparse import DEFAULT_IGNORE_VALUE, SIDECAR_SUFFIX, SparseLabel, read_sparse, write_sparse

REPORT = "collect.json"
COLLECT_VERSION = 1
#: Tags an annotation file may carry after the case id (ITK-SNAP, Slicer and habit).
NAME_TAGS = ("_segmentation", "-segmentation", "_labels", "_label", "-label", "_seg", "-seg", "_mask", "-mask")


@dataclass(frozen=True)
class CaseRecord:
    """What one annotation file gave (slice indices along the plan's axis, 0-based).

    ``drawn``: planned or off-plan slices holding foreground that no pre-annotation started;
    ``empty``: planned slices answered as background; ``corrected``: annotated slices whose
    pre-annotation held a mask (``unchanged``: accepted as predicted).
    """

    case: str
    file: str
    planned: list[int]
    annotated: list[int]
    drawn: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    off_plan: list[int] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)
    corrected: list[int] = field(default_factory=list)
    unchanged: list[int] = field(default_factory=list)
    values: list[int] = field(default_factory=list)

    @property
    def new(self) -> list[int]:
        """The slices this file annotated: planned (forgotten ones left out) and off-plan."""
        return sorted((set(self.planned) - set(self.forgotten)) | set(self.off_plan))


@dataclass(frozen=True)
class CollectReport:
    """The result of :func:`collect`: this run's cases, those kept from earlier runs, the report's path."""

    records: list[CaseRecord]
    kept: list[str]
    missing: list[str]
    path: Path

    @property
    def off_plan(self) -> list[tuple[str, int]]:
        return [(r.case, s) for r in self.records for s in r.off_plan]

    @property
    def forgotten(self) -> list[tuple[str, int]]:
        return [(r.case, s) for r in self.records for s in r.forgotten]


# ------------------------------------------------------------------------------------------ files


def case_of_file(path: Path, cases: Sequence[str]) -> str | None:
    """The case a file is for: its name without the volume suffix, then without a :data:`NAME_TAGS` tag."""
    stem = strip_suffix(path)
    if stem in cases:
        return stem
    for tag in NAME_TAGS:
        if stem.lower().endswith(tag) and stem[: -len(tag)] in cases:
            return stem[: -len(tag)]
    return None


def find_files(folder: Path, plan: Plan, dataset: Dataset, *, argument: str) -> dict[str, Path]:
    """Case -> annotation file in ``folder`` (volume files only, hidden files skipped); refuses files for
    cases the plan does not name and two files for one case."""
    if not folder.is_dir():
        raise UserError(f"{argument} {str(folder)!r} is not a folder; pass the folder the annotators saved to")
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or volume_suffix(path) is None or not path.is_file():
            continue
        case = case_of_file(path, plan.case_ids)
        if case is None:
            other = case_of_file(path, dataset.case_ids)
            what = f"is for case {other!r}, which is not in the plan" if other else "names no case of the plan"
            raise UserError(f"{argument} file {str(path)!r} {what}; move it out of {str(folder)!r} or collect it "
                            f"with its own plan (planned cases: {', '.join(plan.case_ids[:5])})")
        if case in found:
            raise UserError(f"case {case!r} has two files in {argument} {str(folder)!r}, got "
                            f"{found[case].name!r} and {path.name!r}; keep the one to collect")
        found[case] = path
    return found


def read_annotation(path: Path, *, case: str, names: Mapping[int, str], head: Header) -> Volume:
    """One annotator's file as a label volume on its image's grid (``.seg.nrrd`` segments mapped by name)."""
    try:
        vol = read_segmentation(path, names=names, case=case) if is_segmentation(path) else read_label(path)
    except UserError as exc:
        text = str(exc)
        raise UserError(text if text.startswith("case ") else f"case {case!r}: {text}") from None
    return onto_image_grid(vol, head, case=case, path=path)


def onto_image_grid(vol: Volume, head: Header, *, case: str, path: Path, atol: float = 1e-3) -> Volume:
    """``vol`` on the image grid ``head``: as it is when the grids agree, padded when it is a ``.seg.nrrd``
    cropped to its segments' extent (Slicer's option); any other grid is refused."""
    shape = tuple(head.shape[:3])
    if vol.shape[:3] == shape and np.allclose(vol.affine, head.affine, atol=atol):
        return Volume(vol.array, head.affine, head.geometry)
    if np.allclose(vol.affine[:3, :3], head.affine[:3, :3], atol=atol):
        start = (np.linalg.inv(head.affine) @ np.append(vol.affine[:3, 3], 1.0))[:3]
        offset = np.round(start).astype(int)
        stop = offset + np.asarray(vol.shape[:3])
        if np.allclose(start, offset, atol=1e-3) and np.all(offset >= 0) and np.all(stop <= shape):
            full = np.zeros(shape, vol.array.dtype)
            full[tuple(slice(a, b) for a, b in zip(offset, stop, strict=True))] = vol.array
            return Volume(full, head.affine, head.geometry)
    raise UserError(f"case {case!r} file {str(path)!r} is on another grid than its image, got shape "
                    f"{vol.shape[:3]} spacing {tuple(round(s, 4) for s in vol.spacing)} vs the image's {shape} "
                    f"spacing {tuple(round(s, 4) for s in head.spacing)}; save the segmentation on the image's own "
                    "grid (do not resample it: in Slicer keep the image as the reference geometry)")


def check_values(array: np.ndarray, *, allowed: Sequence[int] | None, ignore_value: int, case: str,
                 path: Path, names: Mapping[int, str]) -> None:
    """Refuse label values the dataset does not declare (any value when it declares none) and the ignore value."""
    present = set(np.unique(array).tolist())
    bad = sorted(present - set(allowed)) if allowed is not None else sorted(v for v in present if v == ignore_value)
    if ignore_value in present and ignore_value not in bad:
        bad.append(ignore_value)
    if bad:
        declared = ", ".join(f"{v} {names.get(v, '')}".strip() for v in sorted(allowed or [0]))
        raise UserError(f"case {case!r} file {str(path)!r} holds label value(s) {bad}, which the dataset does not "
                        f"declare ({declared}); relabel them in the viewer or declare them in dataset.json")


# ---------------------------------------------------------------------------------------- one case


@dataclass(frozen=True)
class _Context:
    """What every case of one collect run shares."""

    dataset: Dataset
    plan: Plan
    names: dict[int, str]
    allowed: list[int] | None
    ignore_value: int
    preannotations: dict[str, Path]


def slice_occupied(array: np.ndarray, *, axis: int) -> np.ndarray:
    """Boolean vector: which slices along ``axis`` hold any foreground."""
    return np.any(array != 0, axis=tuple(a for a in range(array.ndim) if a != axis))


def forgotten_slices(empty: Sequence[int], known: np.ndarray, foreground: np.ndarray) -> list[int]:
    """The empty planned slices whose nearest annotated slices (other empty planned slices skipped) on both
    sides hold foreground: the structure runs through them, so they were likely skipped, not answered.

    Examples
    --------
    >>> known = np.array([1, 0, 1, 0, 1, 0, 1], bool); fg = np.array([0, 0, 1, 0, 0, 0, 1], bool)
    >>> forgotten_slices([4], known, fg), forgotten_slices([0], known, fg)
    ([4], [])
    """
    skip = set(empty)
    usable = [t for t in np.flatnonzero(known).tolist() if t not in skip]
    out = []
    for s in empty:
        below = [t for t in usable if t < s]
        above = [t for t in usable if t > s]
        if below and above and foreground[below[-1]] and foreground[above[0]]:
            out.append(int(s))
    return out


def collect_case(ctx: _Context, entry: PlanEntry, path: Path, previous: SparseLabel | None
                 ) -> tuple[SparseLabel, Volume, CaseRecord]:
    """Read one annotation file against its plan entry (and earlier collections); the merged sparse label,
    the volume it lies in and what it gave."""
    case = ctx.dataset.case(entry.case_id)
    head = read_header(case.images[0])
    vol = read_annotation(path, case=entry.case_id, names=ctx.names, head=head)
    check_values(vol.array, allowed=ctx.allowed, ignore_value=ctx.ignore_value, case=entry.case_id, path=path,
                 names=ctx.names)
    axis, n = entry.axis, entry.n_slices
    occupied = slice_occupied(vol.array, axis=axis)
    planned = set(entry.slices)
    earlier = set(previous.meta.get("planned", [])) if previous is not None else set()
    off_plan = [int(s) for s in np.flatnonzero(occupied) if s not in planned and s not in earlier]
    new = np.zeros(n, bool)
    new[list(planned) + off_plan] = True
    before = previous.annotated if previous is not None else np.zeros(n, bool)
    label = _merged(vol.array, new, previous, axis=axis)
    empty = sorted(s for s in planned if not occupied[s])
    forgotten = forgotten_slices(empty, before | new, slice_occupied(label, axis=axis))
    new[forgotten] = False
    label = _merged(vol.array, new, previous, axis=axis)
    pre = _preannotation(ctx, entry.case_id, head)
    corrected, unchanged = _corrected(vol.array, pre, new, axis=axis)
    annotated = before | new
    record = CaseRecord(
        entry.case_id, str(path.resolve()), sorted(planned), np.flatnonzero(annotated).tolist(),
        drawn=[int(s) for s in np.flatnonzero(new & occupied) if s not in corrected],
        empty=[s for s in empty if s not in forgotten], off_plan=off_plan, forgotten=forgotten,
        corrected=corrected, unchanged=unchanged,
        values=sorted(int(v) for v in np.unique(label[np.broadcast_to(_mask(annotated, axis), label.shape)])))
    sparse = SparseLabel(label, annotated, axis, extent=entry.extent if entry.extent is not None
                         else (previous.extent if previous is not None else None))
    return sparse, Volume(label, head.affine, head.geometry), record


def _merged(array: np.ndarray, new: np.ndarray, previous: SparseLabel | None, *, axis: int) -> np.ndarray:
    """The file's labels on the ``new`` slices, the earlier collection's elsewhere (0 without one)."""
    mask = _mask(new, axis)
    base = previous.label if previous is not None else np.zeros_like(array)
    out = np.where(mask, array, base)
    return out.astype(np.result_type(array.dtype, base.dtype), copy=False)


def _mask(per_slice: np.ndarray, axis: int) -> np.ndarray:
    """A per-slice boolean vector shaped to broadcast over a volume along ``axis``."""
    shape = [1, 1, 1]
    shape[axis] = len(per_slice)
    return np.asarray(per_slice, bool).reshape(shape)


def _preannotation(ctx: _Context, case: str, head: Header) -> np.ndarray | None:
    """The pre-annotation (``predict --plan``) the annotator started from, on the image grid; None without one."""
    path = ctx.preannotations.get(case)
    if path is None:
        return None
    try:
        vol = read_label(path)
    except UserError as exc:
        raise UserError(f"case {case!r} pre-annotation: {exc}") from None
    return onto_image_grid(vol, head, case=case, path=path).array


def _corrected(array: np.ndarray, pre: np.ndarray | None, new: np.ndarray, *, axis: int
               ) -> tuple[list[int], list[int]]:
    """Newly annotated slices whose pre-annotation held a mask, and those of them left as predicted."""
    if pre is None:
        return [], []
    started = slice_occupied(pre, axis=axis) & new
    corrected = np.flatnonzero(started).tolist()
    same = [s for s in corrected if np.array_equal(np.take(array, s, axis=axis), np.take(pre, s, axis=axis))]
    return corrected, same


# ------------------------------------------------------------------------------------------ a run


def collect(dataset: Dataset, plan: Plan, annotations: str | os.PathLike[str], out: str | os.PathLike[str], *,
            plan_path: str | os.PathLike[str] | None = None, preannotations: str | os.PathLike[str] | None = None,
            allow_missing: bool = False, ignore_value: int = DEFAULT_IGNORE_VALUE, copy_images: bool = False,
            progress: bool = False) -> CollectReport:
    """Collect the annotators' files for ``plan`` into the sparse dataset ``out`` (see the module docstring).

    Parameters
    ----------
    dataset : Dataset
        The images the plan was made for (labels not needed).
    plan : Plan
        The plan the annotators followed.
    annotations : path
        Folder of ``<case>.nii.gz`` / ``.nrrd`` / ``.seg.nrrd`` files (zeros off the drawn slices).
    out : path
        Sparse dataset folder: new, empty, or an earlier ``collect`` output (merged into).
    plan_path : path, optional
        The plan's file, recorded with its sha256 in ``collect.json``.
    preannotations : path, optional
        Folder of the masks annotators started from (``predict --plan``).
    allow_missing : bool
        Collect what is there when planned cases have no file yet (listed as missing); otherwise refused.
    ignore_value : int
        Value of unknown voxels.
    copy_images : bool
        Copy images instead of linking them.
    progress : bool
        Show a progress bar.

    Returns
    -------
    CollectReport
    """
    out, annotations = Path(out), Path(annotations)
    ctx, files = _prepare(dataset, plan, annotations, preannotations=preannotations, ignore_value=ignore_value)
    previous = _previous_cases(out)
    missing = [c for c in plan.case_ids if c not in files and c not in previous]
    if missing and not allow_missing:
        raise UserError(f"case {missing[0]!r} has no annotation file in ANNOTATIONS {str(annotations)!r} "
                        f"({len(missing)} planned case(s) without one), looked for {missing[0]}.nii.gz, .nrrd or "
                        ".seg.nrrd; save it there, or pass --allow-missing to collect the others now")
    inputs = [*dataset_inputs(dataset), annotations, *([Path(preannotations)] if preannotations else []),
              *([Path(plan_path)] if plan_path else [])]
    made = not out.exists()
    folder = claim_output(out, command="collect", inputs=inputs, argument="--out")
    try:
        entries = [plan.entry(c) for c in files]
        records = [collect_case(ctx, e, files[e.case_id], _previous_label(out, e.case_id, e.axis))[2]
                   for e in track(entries, "checking annotations", progress=progress)]
    except BaseException:
        folder.forget_if_unused()
        if made and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    sha = sha256_of(plan_path) if plan_path else None
    old_values = [int(v) for v in _read_json(out / "dataset.json").get("labels", {})]  # _write removes it first
    _write(ctx, folder, entries, files, plan_sha=sha, copy_images=copy_images, progress=progress)
    report = _write_report(ctx, folder, records, previous, old_values=old_values, annotations=annotations,
                           plan_path=plan_path, plan_sha=sha, preannotations=preannotations, missing=missing)
    return CollectReport(records, sorted(set(previous) - set(files)), missing, report)


def _prepare(dataset: Dataset, plan: Plan, annotations: Path, *, preannotations: str | os.PathLike[str] | None,
             ignore_value: int) -> tuple[_Context, dict[str, Path]]:
    """Check the plan against the dataset and find the files; the run's context and case -> file."""
    check_plan(plan, dataset)
    names = segment_names(dataset)
    allowed = sorted(names) if dataset.label_names else None
    if allowed is not None and ignore_value <= max(allowed):
        raise UserError(f"ignore_value must exceed every label value, got {ignore_value} with labels up to "
                        f"{max(allowed)}; use 255")
    files = find_files(annotations, plan, dataset, argument="ANNOTATIONS")
    if not files:
        raise UserError(f"ANNOTATIONS {str(annotations)!r} holds no annotation file (<case>.nii.gz, .nrrd, "
                        ".seg.nrrd); pass the folder the annotators saved to")
    pre = find_files(Path(preannotations), plan, dataset, argument="--preannotations") if preannotations else {}
    return _Context(dataset, plan, names, allowed, int(ignore_value), pre), files


def _previous_cases(out: Path) -> dict[str, Any]:
    """Case -> its record in an earlier ``collect.json`` in ``out`` ({} when there is none)."""
    if not (out / MARKER).is_file():
        return {}
    cases = _read_json(out / REPORT).get("cases", {})
    return dict(cases) if isinstance(cases, dict) else {}


def _previous_label(out: Path, case: str, axis: int) -> SparseLabel | None:
    """The sparse label an earlier collect wrote for ``case`` in ``out``, or None."""
    path = out / "labelsTr" / f"{case}.nii.gz"
    if not (out / REPORT).is_file() or not path.is_file():
        return None
    sparse, _ = read_sparse(path)
    if sparse.axis != axis:
        raise UserError(f"case {case!r} was collected along axis {sparse.axis} in {str(out)!r}, the plan uses "
                        f"axis {axis}; plan along axis {sparse.axis} or collect into another --out")
    return sparse


def _write(ctx: _Context, folder: OutputFolder, entries: list[PlanEntry], files: Mapping[str, Path], *,
           plan_sha: str | None, copy_images: bool, progress: bool) -> None:
    """Write each collected case: images, merged sparse label and its sidecar (``dataset.json`` goes first)."""
    folder.path("dataset.json").unlink(missing_ok=True)  # written again last: until then, not complete
    for entry in track(entries, "collecting", progress=progress):
        previous = _previous_label(folder.root, entry.case_id, entry.axis)
        sparse, like, record = collect_case(ctx, entry, files[entry.case_id], previous)
        case = ctx.dataset.case(entry.case_id)
        write_case_images(case, folder, nnunet=False, copy=copy_images)
        folder.path(f"labelsTr/{case.case_id}{SIDECAR_SUFFIX}")
        write_sparse(sparse, folder.path(f"labelsTr/{case.case_id}.nii.gz"), like=like,
                     ignore_value=ctx.ignore_value,
                     extra=_sidecar_extra(record, previous, plan_sha=plan_sha, image=case.images[0]))


def _sidecar_extra(record: CaseRecord, previous: SparseLabel | None, *, plan_sha: str | None,
                   image: Path) -> dict[str, Any]:
    """The sidecar entries collect adds: what this file gave, merged with what earlier collections recorded."""
    old = previous.meta if previous is not None else {}
    new = set(record.new)

    def merged(key: str) -> list[int]:
        return sorted((set(old.get(key, [])) - new) | set(getattr(record, key)))

    plans = [p for p in old.get("plans", []) if p != plan_sha] + ([plan_sha] if plan_sha else [])
    return {"case": record.case, "source_image": str(Path(image).resolve()), "collected_from": record.file,
            "plans": plans, "planned": sorted(set(old.get("planned", [])) | set(record.planned)),
            "off_plan": merged("off_plan"), "corrected": merged("corrected"), "unchanged": merged("unchanged"),
            "forgotten": sorted((set(old.get("forgotten", [])) - set(record.annotated)) | set(record.forgotten))}


def _write_report(ctx: _Context, folder: OutputFolder, records: list[CaseRecord], previous: Mapping[str, Any], *,
                  old_values: list[int], annotations: Path, plan_path: str | os.PathLike[str] | None,
                  plan_sha: str | None,
                  preannotations: str | os.PathLike[str] | None, missing: list[str]) -> Path:
    """Write ``plan.json``/``plan.csv`` (the plan of this run), ``collect.json`` and, last, ``dataset.json``."""
    old = _read_json(folder.root / REPORT)
    cases = sorted(set(previous) | {r.case for r in records})
    sidecars = {c: _read_json(folder.root / "labelsTr" / f"{c}{SIDECAR_SUFFIX}") for c in cases}
    this = {"plan": str(plan_path) if plan_path else None, "plan_sha256": plan_sha, "strategy": ctx.plan.strategy,
            "seed": ctx.plan.seed, "annotations": str(annotations.resolve()),
            "preannotations": str(Path(preannotations).resolve()) if preannotations else None, "missing": missing,
            "cases": {r.case: asdict(r) for r in records}}
    rounds = list(old.get("rounds", []))
    at = next((i for i, r in enumerate(rounds) if plan_sha is not None and r.get("plan_sha256") == plan_sha), None)
    if at is None:
        rounds.append(this)
    else:
        this["cases"] = {**rounds[at].get("cases", {}), **this["cases"]}
        rounds[at] = this
    summary = {c: {"annotated": len(sc.get("annotated", [])), **{k: sc.get(k, []) for k in
               ("off_plan", "forgotten", "corrected", "unchanged")}, "plans": sc.get("plans", [])}
               for c, sc in sidecars.items()}
    report = {"version": COLLECT_VERSION, "dataset": str(Path(ctx.dataset.root).resolve()), "axis": ctx.plan.axis,
              "ignore_value": ctx.ignore_value, "rounds": rounds, "cases": summary,
              "review": {"forgotten": [[c, s] for c in cases for s in summary[c]["forgotten"]],
                         "off_plan": [[c, s] for c in cases for s in summary[c]["off_plan"]]}}
    folder.path("plan.csv")
    write_plan(ctx.plan, folder.path("plan.json"))
    path = write_json(folder.path(REPORT), report)
    values = ctx.allowed or sorted({0, *old_values, *(v for r in records for v in r.values)})
    training = [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in cases]
    meta = sparse_dataset_json(ctx.dataset, ctx.plan, values, training, channel_names(ctx.dataset, cases),
                               format="msd", ignore_value=ctx.ignore_value, border_slices=False)
    meta["description"] = (f"sparse slice labels collected from annotators by sparseslice collect; unknown voxels "
                           f"hold {ctx.ignore_value} (collect.json lists what each file gave)")
    meta["sparse"].update(collected=True, volumes=len(cases))
    write_json(folder.path("dataset.json"), meta)
    return path


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path`` ({} when absent or not an object)."""
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def render_collect(report: CollectReport, console: Any) -> None:
    """Print a Rich table, one row per case collected, then what to review."""
    from rich.table import Table

    table = Table(title="collect")
    for col in ("case", "file", "planned", "drawn", "empty", "off-plan", "forgotten", "corrected"):
        table.add_column(col, justify="left" if col in ("case", "file") else "right")
    for r in report.records:
        table.add_row(r.case, Path(r.file).name, str(len(r.planned)), str(len(r.drawn)), str(len(r.empty)),
                      " ".join(map(str, r.off_plan)) or "-", " ".join(map(str, r.forgotten)) or "-",
                      str(len(r.corrected)) if r.corrected else "-")
    console.print(table)
    if report.kept:
        console.print(f"{len(report.kept)} case(s) kept from earlier collections: {', '.join(report.kept[:8])}",
                      markup=False, highlight=False)
    if report.missing:
        console.print(f"missing (no file yet): {', '.join(report.missing)}", markup=False, highlight=False)
    for what, items, note in (("off-plan", report.off_plan, "kept as annotated"),
                              ("forgotten?", report.forgotten, "left unknown: draw them and collect again")):
        if items:
            shown = ", ".join(f"{c} slice {s} ({s + 1} 1-based)" for c, s in items)
            console.print(f"{what}: {shown}; {note}", markup=False, highlight=False)
    console.print(f"report: {report.path}", markup=False, highlight=False)
