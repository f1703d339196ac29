"""What annotators get for a plan: a worklist they can follow and a file 3D Slicer opens ready to draw in.

:func:`write_handout` writes, into one folder:

- ``worklist.csv`` (and ``worklist.json``, the same rows plus the steps): per case the image path, the
  step (``draw``, or ``extent`` first), the slices to draw 0-based and 1-based (ITK-SNAP and Slicer
  count from 1), the label values and names, and the file name to save as;
- ``<case>.seg.nrrd`` per case (:func:`sparseslice.segnrrd.write_segmentation`): one empty, named and
  coloured segment per label on the image's own grid, the planned slices outlined by a frame segment
  and listed in the header. Loaded over the image in Slicer (drag both in), the annotator paints the
  planned slices into the named segments and saves the file under the same name: ``collect`` maps the
  segment names back to label values and drops the frame. A segmentation rather than markups: the
  annotator needs the segments anyway, and starting from this file keeps the grid and names right.

``block`` plans need the structure's extent first (the two clicks of Specktor-Fadida's workflow): a
case without one gets the step ``extent`` and no slices; the annotators click first/last into
``plan.csv`` and ``plan --extents plan.csv`` draws the block (:func:`sparseslice.select.worklist.extent_advice`).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from sparseslice.atomic import write_json, write_text
from sparseslice.datasets import Dataset
from sparseslice.errors import UserError
from sparseslice.io import Header, Volume, check_same_space, read_header, read_label
from sparseslice.outputs import claim_output, dataset_inputs
from sparseslice.progress import track
from sparseslice.segnrrd import write_segmentation
from sparseslice.select.plan import Plan, PlanEntry

COLUMNS = ("case", "image", "step", "axis", "n_slices", "first", "last", "n_drawn", "slices", "slices_1based",
           "labels", "segmentation", "save_as")


def segment_names(dataset: Dataset) -> dict[int, str]:
    """Label value -> segment name for annotation files: the dataset's names, else one ``foreground``."""
    return {0: "background", **(dataset.label_names or {1: "foreground"})}


def handout_rows(plan: Plan, dataset: Dataset) -> list[dict[str, Any]]:
    """One worklist row per planned case (see the module docstring)."""
    names = segment_names(dataset)
    labels = "; ".join(f"{v}={n}" for v, n in sorted(names.items()) if v)
    rows = []
    for e in plan.entries:
        step = "extent" if _needs_extent(plan, e) else "draw"
        slices = [] if step == "extent" else list(e.slices)
        first, last = e.extent if e.extent is not None else ("", "")
        rows.append({"case": e.case_id, "image": str(Path(dataset.case(e.case_id).images[0]).resolve()),
                     "step": step, "axis": e.axis, "n_slices": e.n_slices, "first": first, "last": last,
                     "n_drawn": len(slices), "slices": " ".join(map(str, slices)),
                     "slices_1based": " ".join(str(s + 1) for s in slices), "labels": labels,
                     "segmentation": f"{e.case_id}.seg.nrrd", "save_as": f"{e.case_id}.seg.nrrd"})
    return rows


def _needs_extent(plan: Plan, entry: PlanEntry) -> bool:
    """Whether the case's block waits for the annotator's extent clicks."""
    return plan.strategy == "block" and entry.extent is None


def worklist_csv(rows: list[dict[str, Any]]) -> str:
    """The rows as CSV text (:data:`COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_handout(plan: Plan, dataset: Dataset, out: str | os.PathLike[str], *,
                  plan_path: str | os.PathLike[str] | None = None,
                  preannotations: str | os.PathLike[str] | None = None, progress: bool = False) -> Path:
    """Write ``worklist.csv``, ``worklist.json`` and one ``<case>.seg.nrrd`` per case into ``out``.

    With ``preannotations`` (the folder ``predict --plan`` wrote), each segmentation starts from the
    case's ``<case>.nii.gz`` there, for the annotator to correct. ``out`` must be new, empty or an
    earlier worklist (:mod:`sparseslice.outputs`); returns the CSV's path.
    """
    rows = handout_rows(plan, dataset)
    pre = Path(preannotations) if preannotations is not None else None
    folder = claim_output(out, command="worklist", inputs=[*dataset_inputs(dataset), *([pre] if pre else []),
                                                           *([plan_path] if plan_path else [])])
    names = segment_names(dataset)
    for row, entry in track(list(zip(rows, plan.entries, strict=True)), "writing segmentations", progress=progress):
        head = read_header(dataset.case(entry.case_id).images[0])
        like = Volume(_starting_mask(pre, entry.case_id, head, names), head.affine)
        write_segmentation(folder.path(row["segmentation"]), like.array, like=like, names=names,
                           planned=[int(s) for s in row["slices"].split()], axis=entry.axis,
                           metadata={"sparseslice_case": entry.case_id, "sparseslice_step": row["step"]})
    steps = _steps(plan, any(r["step"] == "extent" for r in rows))
    write_json(folder.path("worklist.json"), {"plan": str(plan_path) if plan_path else None,
                                              "strategy": plan.strategy, "steps": steps, "cases": rows})
    return write_text(folder.path("worklist.csv"), worklist_csv(rows))


def _starting_mask(pre: Path | None, case: str, head: Header, names: dict[int, str]) -> np.ndarray:
    """The pre-annotation of ``case`` to start from (zeros without one), checked against the image and labels."""
    path = pre / f"{case}.nii.gz" if pre is not None else None
    if path is None or not path.is_file():
        return np.zeros(head.shape[:3], np.uint8)
    vol = read_label(path)
    try:
        check_same_space(head, vol, name=case)
    except UserError as exc:
        raise UserError(f"--preannotations file {str(path)!r}: {exc}") from None
    extra = sorted(set(np.unique(vol.array).tolist()) - set(names))
    if extra:
        raise UserError(f"--preannotations file {str(path)!r} holds label values {extra} the dataset does not "
                        f"declare ({sorted(names)}); predict with a model trained on this dataset")
    return vol.array


def _steps(plan: Plan, extents_first: bool) -> list[str]:
    """What the annotators do, in order."""
    steps = []
    if extents_first:
        steps.append("extent: for each case with step 'extent', find the first and last slice that holds the "
                     "structure and write them (0-based: the viewer's slice number - 1) into plan.csv's first,last "
                     "columns; then run sparseslice plan --extents plan.csv -o round.json and sparseslice worklist "
                     "again for the slices to draw")
    steps += ["draw: open the image and <case>.seg.nrrd in 3D Slicer (or the image in ITK-SNAP); on each listed "
              "slice (the framed ones in Slicer) paint every structure into its named segment, leaving nothing "
              "undrawn; an empty listed slice means 'no structure here'",
              "save: keep the file name (<case>.seg.nrrd from Slicer; <case>.nii.gz from ITK-SNAP), on the image's "
              "own grid, into the shared annotations folder",
              "collect: sparseslice collect DATA plan.json ANNOTATIONS -o SPARSE"]
    return steps
