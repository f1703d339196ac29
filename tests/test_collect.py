"""The annotation loop: an annotator's files collected into sparse labels, checked against simulate.

The end-to-end test plays an annotator on real hippocampus data: it draws the planned slices from
the true labels as Slicer and ITK-SNAP save them (zeros on every other slice), forgets one planned
slice and draws one slice off the plan; collect must report exactly those, and the sparse labels
must equal what simulate writes for the same plan everywhere else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset
from sparseslice.io import Volume, read_header, read_label, write_volume
from sparseslice.segnrrd import write_segmentation
from sparseslice.select import read_plan
from sparseslice.sparse import read_sparse

CASES = ["hippocampus_001", "hippocampus_003", "hippocampus_004"]


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def annotate(ds, entry, folder: Path, *, kind: str, skip: int | None = None, extra: int | None = None) -> Path:
    """Save what an annotator draws for ``entry``: the true labels on the planned slices (minus ``skip``,
    plus ``extra``), zeros elsewhere, on the image's grid; ``kind`` is nifti (ITK-SNAP), nrrd or seg."""
    case = ds.case(entry.case_id)
    true = read_label(case.label).array
    head = read_header(case.images[0])
    drawn = np.zeros_like(true)
    for s in [*(t for t in entry.slices if t != skip), *([extra] if extra is not None else [])]:
        index = [slice(None)] * 3
        index[entry.axis] = s
        drawn[tuple(index)] = true[tuple(index)]
    like = Volume(drawn, head.affine)
    if kind == "seg":
        return write_segmentation(folder / f"{entry.case_id}.seg.nrrd", drawn, like=like, names=ds_names(ds),
                                  planned=list(entry.slices), axis=entry.axis)
    if kind == "nifti":  # ITK-SNAP saves labels as 16-bit integers
        return write_volume(like.like(drawn.astype(np.int16)), folder / f"{entry.case_id}.nii.gz")
    return write_volume(like, folder / f"{entry.case_id}.nrrd")


def ds_names(ds) -> dict[int, str]:
    return {0: "background", **ds.label_names}


def foreground_slices(label: np.ndarray, axis: int) -> list[int]:
    return [s for s in range(label.shape[axis]) if np.take(label, s, axis=axis).any()]


@pytest.fixture(scope="module")
def loop(hippocampus: Path, tmp_path_factory: pytest.TempPathFactory):
    """plan -> annotate (one forgotten, one off-plan slice) -> collect, and simulate of the same plan."""
    tmp = tmp_path_factory.mktemp("loop")
    res = invoke("plan", hippocampus, "--cases", ",".join(CASES), "--budget", 12, "--volumes", 3,
                 "--strategy", "interval", "--extents", "labels", "-o", tmp / "plan.json")
    assert res.exit_code == 0, res.output
    ds = discover_dataset(hippocampus)
    plan = read_plan(tmp / "plan.json")
    first, second, third = plan.entries
    forgotten = first.slices[len(first.slices) // 2]  # inside the extent: both neighbours hold the structure
    true2 = read_label(ds.case(second.case_id).label).array
    off_plan = next(s for s in foreground_slices(true2, second.axis) if s not in second.slices)
    notes = tmp / "annotations"
    notes.mkdir()
    annotate(ds, first, notes, kind="nifti", skip=forgotten)
    annotate(ds, second, notes, kind="nrrd", extra=off_plan)
    annotate(ds, third, notes, kind="seg")
    res = invoke("collect", hippocampus, tmp / "plan.json", notes, "-o", tmp / "sparse")
    assert res.exit_code == 0, res.output
    sim = invoke("simulate", hippocampus, tmp / "plan.json", "-o", tmp / "sim")
    assert sim.exit_code == 0, sim.output
    return {"tmp": tmp, "ds": ds, "plan": plan, "forgotten": (first.case_id, forgotten),
            "off_plan": (second.case_id, off_plan), "output": res.output, "notes": notes}


def test_collect_reports_exactly_the_forgotten_and_the_off_plan_slice(loop) -> None:
    report = json.loads((loop["tmp"] / "sparse" / "collect.json").read_text())
    assert report["review"]["forgotten"] == [list(loop["forgotten"])]
    assert report["review"]["off_plan"] == [list(loop["off_plan"])]
    text = " ".join(loop["output"].split())
    case, s = loop["forgotten"]
    assert f"forgotten?: {case} slice {s} ({s + 1} 1-based)" in text


def test_collected_labels_equal_simulate_except_the_two_slices(loop) -> None:
    tmp, ds = loop["tmp"], loop["ds"]
    for entry in loop["plan"].entries:
        col, col_vol = read_sparse(tmp / "sparse" / "labelsTr" / f"{entry.case_id}.nii.gz")
        sim, sim_vol = read_sparse(tmp / "sim" / "labelsTr" / f"{entry.case_id}.nii.gz")
        expected = set(sim.annotated_indices)
        if entry.case_id == loop["forgotten"][0]:
            expected.discard(loop["forgotten"][1])
        if entry.case_id == loop["off_plan"][0]:
            expected.add(loop["off_plan"][1])
        assert set(col.annotated_indices) == expected
        assert np.allclose(col_vol.affine, sim_vol.affine)
        true = read_label(ds.case(entry.case_id).label).array
        known = col.known_mask()
        assert np.array_equal(col.label[known], true[known])  # every annotated voxel is the truth
        if entry.case_id not in (loop["forgotten"][0], loop["off_plan"][0]):  # the .seg.nrrd case: identical
            assert np.array_equal(read_label(tmp / "sparse" / "labelsTr" / f"{entry.case_id}.nii.gz").array,
                                  read_label(tmp / "sim" / "labelsTr" / f"{entry.case_id}.nii.gz").array)
            assert col.extent == sim.extent


def test_collect_twice_gives_the_same_folder(loop, tmp_path: Path) -> None:
    tmp = loop["tmp"]
    before = {p.name: p.read_bytes() for p in (tmp / "sparse").rglob("*.json")}
    arrays = {c: read_label(tmp / "sparse" / "labelsTr" / f"{c}.nii.gz").array for c in CASES}
    res = invoke("collect", loop["ds"].root, tmp / "plan.json", loop["notes"], "-o", tmp / "sparse")
    assert res.exit_code == 0, res.output
    after = {p.name: p.read_bytes() for p in (tmp / "sparse").rglob("*.json")}
    assert after == before
    for c in CASES:
        assert np.array_equal(read_label(tmp / "sparse" / "labelsTr" / f"{c}.nii.gz").array, arrays[c])
