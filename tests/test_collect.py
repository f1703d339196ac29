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
    if kind == "slicer":  # paint into the worklist's segmentation, as Slicer's Segment Editor, and save it
        return paint_in_slicer(folder.parent / "worklist" / f"{entry.case_id}.seg.nrrd", drawn, ds,
                               folder / f"{entry.case_id}.seg.nrrd")
    if kind == "nifti":  # ITK-SNAP saves labels as 16-bit integers
        return write_volume(like.like(drawn.astype(np.int16)), folder / f"{entry.case_id}.nii.gz")
    return write_volume(like, folder / f"{entry.case_id}.nrrd")


def paint_in_slicer(handout: Path, drawn: np.ndarray, ds, target: Path) -> Path:
    """The worklist's .seg.nrrd with ``drawn`` painted over it (segment values by name), header kept."""
    import SimpleITK as sitk

    img = sitk.ReadImage(str(handout))
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    keys = set(img.GetMetaDataKeys())
    value = {img.GetMetaData(f"Segment{i}_Name"): int(img.GetMetaData(f"Segment{i}_LabelValue"))
             for i in range(10) if f"Segment{i}_Name" in keys}
    for v, name in ds.label_names.items():
        if v:
            arr[drawn == v] = value[name]
    out = sitk.GetImageFromArray(np.transpose(arr, (2, 1, 0)))
    out.CopyInformation(img)
    for key in img.GetMetaDataKeys():
        out.SetMetaData(key, img.GetMetaData(key))
    sitk.WriteImage(out, str(target), useCompression=True)
    return target


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
    res = invoke("worklist", hippocampus, tmp / "plan.json", "-o", tmp / "worklist")
    assert res.exit_code == 0, res.output
    first, second, third = plan.entries
    forgotten = first.slices[len(first.slices) // 2]  # inside the extent: both neighbours hold the structure
    true2 = read_label(ds.case(second.case_id).label).array
    off_plan = next(s for s in foreground_slices(true2, second.axis) if s not in second.slices)
    notes = tmp / "annotations"
    notes.mkdir()
    annotate(ds, first, notes, kind="nifti", skip=forgotten)
    annotate(ds, second, notes, kind="nrrd", extra=off_plan)
    annotate(ds, third, notes, kind="slicer")
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


# ------------------------------------------------------------------------------------- bad input


@pytest.fixture()
def small(phantom_dataset: Path, tmp_path: Path):
    """A plan over two of four phantoms and correct annotation files for it (NIfTI)."""
    from sparseslice.select import make_plan, write_plan

    ds = discover_dataset(phantom_dataset)
    plan = make_plan(ds, budget=6, volumes=2, strategy="interval", seed=0)
    write_plan(plan, tmp_path / "plan.json")
    notes = tmp_path / "notes"
    notes.mkdir()
    for entry in plan.entries:
        annotate(ds, entry, notes, kind="nifti")
    return ds, plan, notes, tmp_path


def refused(small, *extra: object, plan: Path | None = None, notes: Path | None = None):
    """Run collect that must fail: exit 2, one error line, no output folder left behind."""
    ds, _, default_notes, tmp = small
    out = tmp / "out"
    res = invoke("collect", ds.root, plan or tmp / "plan.json", notes or default_notes, "-o", out, *extra)
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.output
    assert not out.exists()
    return " ".join(res.output.split())


def test_a_file_for_a_case_not_in_the_plan_is_refused(small) -> None:
    ds, plan, notes, _ = small
    other = next(c for c in ds.case_ids if c not in plan.case_ids)
    write_volume(read_label(ds.case(other).label), notes / f"{other}.nii.gz")
    text = refused(small)
    assert f"{other}.nii.gz" in text and f"is for case '{other}', which is not in the plan" in text


def test_an_undeclared_label_value_is_refused(small) -> None:
    ds, plan, notes, _ = small
    entry = plan.entries[0]
    path = notes / f"{entry.case_id}.nii.gz"
    vol = read_label(path)
    arr = vol.array.copy()
    index = [slice(0, 2)] * 3
    index[entry.axis] = entry.slices[0]
    arr[tuple(index)] = 7
    write_volume(vol.like(arr), path)
    text = refused(small)
    assert f"case '{entry.case_id}' file" in text and path.name in text and "label value(s) [7]" in text


def test_an_annotation_on_another_grid_is_refused(small) -> None:
    ds, plan, notes, _ = small
    entry = plan.entries[1]
    path = notes / f"{entry.case_id}.nii.gz"
    vol = read_label(path)
    resampled = Volume(vol.array[::2, ::2].copy(), vol.affine @ np.diag([2.0, 2.0, 1.0, 1.0]))
    write_volume(resampled, path)
    text = refused(small)
    assert f"case '{entry.case_id}' file" in text and path.name in text and "on another grid" in text


def test_a_missing_file_is_refused_unless_allowed(small) -> None:
    ds, plan, notes, tmp = small
    gone = plan.entries[0].case_id
    (notes / f"{gone}.nii.gz").unlink()
    text = refused(small)
    assert f"case '{gone}' has no annotation file" in text and "--allow-missing" in text
    res = invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "out", "--allow-missing")
    assert res.exit_code == 0, res.output
    assert f"missing (no file yet): {gone}" in res.output
    # the second annotator's file arrives: merged in, the first case is kept
    annotate(ds, plan.entries[0], notes, kind="nifti")
    (notes / f"{plan.entries[1].case_id}.nii.gz").unlink()
    res = invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "out")
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp / "out" / "dataset.json").read_text())
    assert sorted(t["label"] for t in meta["training"]) == sorted(f"./labelsTr/{c}.nii.gz" for c in plan.case_ids)
    for entry in plan.entries:
        sparse, _ = read_sparse(tmp / "out" / "labelsTr" / f"{entry.case_id}.nii.gz")
        assert sparse.annotated_indices == list(entry.slices)


def _two_layer_segmentation(path: Path, like: Volume, a: np.ndarray, b: np.ndarray, names: tuple[str, str]) -> None:
    """A .seg.nrrd as Slicer writes overlapping segments: one layer each (a vector image)."""
    import SimpleITK as sitk

    stacked = np.stack([a, b], axis=-1).astype(np.uint8)
    img = sitk.GetImageFromArray(np.transpose(stacked, (2, 1, 0, 3)), isVector=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    img.SetSpacing([float(s) for s in like.spacing])
    img.SetOrigin([float(v) for v in lps @ like.affine[:3, 3]])
    img.SetDirection([float(v) for v in (lps @ like.affine[:3, :3] / np.asarray(like.spacing)).ravel()])
    for i, name in enumerate(names):
        img.SetMetaData(f"Segment{i}_Name", name)
        img.SetMetaData(f"Segment{i}_LabelValue", "1")
        img.SetMetaData(f"Segment{i}_Layer", str(i))
    sitk.WriteImage(img, str(path), useCompression=True)


def test_overlapping_or_misnamed_segments_are_refused(small) -> None:
    ds, plan, notes, _ = small
    entry = plan.entries[0]
    (notes / f"{entry.case_id}.nii.gz").unlink()
    path = notes / f"{entry.case_id}.seg.nrrd"
    true = read_label(ds.case(entry.case_id).label)
    head = read_header(ds.case(entry.case_id).images[0])
    like = Volume(true.array, head.affine)
    a = (true.array == 1).astype(np.uint8)
    b = a.copy()  # the same voxels painted into the second segment too
    _two_layer_segmentation(path, like, a, b, ("part1", "part2"))
    text = refused(small)
    assert f"case '{entry.case_id}' file" in text and path.name in text
    assert "segments 'part1' and 'part2' overlap" in text
    write_segmentation(path, np.zeros_like(true.array), like=like, names={1: "part1", 2: "Part 2"})
    text = refused(small)
    assert "has segment 'Part 2', which the dataset does not name" in text and "'part2'" in text


@pytest.mark.parametrize("edit", ["out of range", "duplicate"])
def test_a_hand_edited_plan_is_refused_naming_case_and_file(small, edit: str) -> None:
    _, plan, _, tmp = small
    record = json.loads((tmp / "plan.json").read_text())
    entry = record["entries"][0]
    entry["slices"].append(entry["n_slices"] + 3 if edit == "out of range" else entry["slices"][0])
    bad = tmp / "edited.json"
    bad.write_text(json.dumps(record))
    text = refused(small, plan=bad)
    assert f"plan '{bad}'" in text and f"case '{entry['case']}'" in text and "fix the plan" in text


def test_collect_refuses_a_folder_it_did_not_write(small) -> None:
    ds, _, notes, tmp = small
    (tmp / "other").mkdir()
    (tmp / "other" / "keep.txt").write_text("mine")
    res = invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "other")
    assert res.exit_code == 2 and "was not written by sparseslice collect" in " ".join(res.output.split())
    assert sorted(p.name for p in (tmp / "other").iterdir()) == ["keep.txt"]


def test_a_cropped_segmentation_is_placed_on_the_image_grid(small) -> None:
    """Slicer may save a .seg.nrrd cropped to its segments' extent: the offset grid is padded back."""
    ds, plan, notes, tmp = small
    entry = plan.entries[0]
    full = read_label(notes / f"{entry.case_id}.nii.gz")
    (notes / f"{entry.case_id}.nii.gz").unlink()
    head = read_header(ds.case(entry.case_id).images[0])
    crop = full.array[2:-3, 4:, :].copy()
    affine = head.affine.copy()
    affine[:3, 3] = (head.affine @ np.array([2, 4, 0, 1.0]))[:3]
    assert full.array[:2].sum() == 0 and full.array[-3:].sum() == 0 and full.array[:, :4].sum() == 0
    write_segmentation(notes / f"{entry.case_id}.seg.nrrd", crop, like=Volume(crop, affine), names=ds_names(ds))
    res = invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "out")
    assert res.exit_code == 0, res.output
    sparse, _ = read_sparse(tmp / "out" / "labelsTr" / f"{entry.case_id}.nii.gz")
    known = sparse.known_mask()
    assert np.array_equal(sparse.label[known], full.array[known]) and sparse.annotated_indices == list(entry.slices)


def test_a_written_segmentation_opens_in_simpleitk_with_slicer_keys(tmp_path: Path) -> None:
    import SimpleITK as sitk

    arr = np.zeros((6, 7, 8), np.uint8)
    arr[2:4, 2:4, 3] = 1
    arr[2:4, 2:4, 5] = 2
    like = Volume(arr, np.diag([-1.0, -1.5, 2.0, 1.0]))
    path = write_segmentation(tmp_path / "c.seg.nrrd", arr, like=like, names={0: "background", 1: "a", 2: "b"},
                              planned=[3, 5], axis=2)
    img = sitk.ReadImage(str(path))
    meta = {k: img.GetMetaData(k) for k in img.GetMetaDataKeys()}
    assert (meta["Segment0_Name"], meta["Segment0_LabelValue"], meta["Segment0_Layer"]) == ("a", "1", "0")
    assert (meta["Segment1_Name"], meta["Segment1_LabelValue"]) == ("b", "2")
    assert meta["Segment0_Extent"] == "2 3 2 3 3 3" and meta["Segment2_Name"].startswith("planned slices")
    assert meta["sparseslice_planned_slices"] == "3 5" and meta["sparseslice_planned_slices_1based"] == "4 6"
    values = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    assert np.array_equal(values[values < 3], arr[values < 3]) and set(np.unique(values)) == {0, 1, 2, 3}
    assert np.allclose(img.GetSpacing(), (1.0, 1.5, 2.0))
    assert (values == 3).sum() == 2 * (2 * 6 + 2 * 7 - 4)  # the frame of the two planned slices


# ------------------------------------------------------------------------------------------ rounds


def test_a_second_round_plans_only_new_slices_and_collect_merges_it(loop, tmp_path: Path) -> None:
    import shutil

    from sparseslice.select.worklist import sha256_of

    tmp, ds = loop["tmp"], loop["ds"]
    sparse = tmp_path / "sparse"
    shutil.copytree(tmp / "sparse", sparse, symlinks=True)
    first = {c: read_sparse(sparse / "labelsTr" / f"{c}.nii.gz")[0] for c in CASES}
    res = invoke("plan", ds.root, "--cases", ",".join(CASES), "--budget", 9, "--volumes", 3, "--strategy", "interval",
                 "--extents", "labels", "--exclude", sparse, "-o", tmp_path / "round2.json")
    assert res.exit_code == 0, res.output
    round2 = read_plan(tmp_path / "round2.json")
    assert round2.budget == 9
    for e in round2.entries:
        assert not set(e.slices) & set(first[e.case_id].annotated_indices), e
    assert [p["kind"] for p in round2.parents] == ["sparse dataset"]
    assert round2.parents[0]["plan_sha256"] == sha256_of(tmp / "plan.json")
    # the round-2 annotator draws the new slices (files hold zeros on round 1's slices)
    notes = tmp_path / "notes2"
    notes.mkdir()
    for e in round2.entries:
        annotate(ds, e, notes, kind="nifti")
    res = invoke("collect", ds.root, tmp_path / "round2.json", notes, "-o", sparse)
    assert res.exit_code == 0, res.output
    report = json.loads((sparse / "collect.json").read_text())
    assert [r["plan_sha256"] for r in report["rounds"]] == [sha256_of(tmp / "plan.json"),
                                                             sha256_of(tmp_path / "round2.json")]
    assert report["review"]["forgotten"] == [list(loop["forgotten"])]  # still to draw: round 2 did not plan it
    for e in round2.entries:
        merged, _ = read_sparse(sparse / "labelsTr" / f"{e.case_id}.nii.gz")
        before = first[e.case_id]
        assert set(merged.annotated_indices) == set(before.annotated_indices) | set(e.slices)
        true = read_label(ds.case(e.case_id).label).array
        assert np.array_equal(merged.label[merged.known_mask()], true[merged.known_mask()])


def test_exclude_drops_volumes_annotated_in_full_and_records_the_parent_plan(phantom_dataset: Path,
                                                                            tmp_path: Path) -> None:
    from sparseslice.select import Exclusion, make_plan, read_exclusions, write_plan
    from sparseslice.select.worklist import sha256_of

    ds = discover_dataset(phantom_dataset)
    full = make_plan(ds, budget=10, volumes=1, seed=0)
    whole = full.entries[0]
    done = Exclusion(whole.axis, {whole.case_id: list(range(whole.n_slices))})
    again = make_plan(ds, budget=8, volumes=2, seed=0, exclude=done)
    assert whole.case_id not in again.case_ids and again.budget == 8
    write_plan(full, tmp_path / "r1.json")
    excl = read_exclusions([tmp_path / "r1.json"])
    assert excl.slices == {whole.case_id: list(whole.slices)}
    assert excl.parents == [{"path": str((tmp_path / "r1.json").resolve()), "kind": "plan",
                             "sha256": sha256_of(tmp_path / "r1.json")}]
    for strategy in ("random", "interval", "block", "ual"):
        later = make_plan(ds, budget=12, volumes=4, seed=1, strategy=strategy, exclude=excl)
        for e in later.entries:
            assert not set(e.slices) & set(excl.slices.get(e.case_id, [])), (strategy, e)
        assert later.budget == 12 and later.parents == excl.parents


# ---------------------------------------------------------------------------------------- worklist


def test_the_worklist_lists_image_slices_and_labels_and_its_segmentation_frames_the_plan(loop) -> None:
    import csv

    import SimpleITK as sitk

    tmp, ds, plan = loop["tmp"], loop["ds"], loop["plan"]
    with (tmp / "worklist" / "worklist.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["case"] for r in rows] == plan.case_ids
    for row, e in zip(rows, plan.entries, strict=True):
        assert Path(row["image"]) == Path(ds.case(e.case_id).images[0]).resolve()
        assert row["step"] == "draw" and row["labels"] == "1=Anterior; 2=Posterior"
        assert [int(s) for s in row["slices"].split()] == list(e.slices)
        assert [int(s) - 1 for s in row["slices_1based"].split()] == list(e.slices)
        img = sitk.ReadImage(str(tmp / "worklist" / row["segmentation"]))
        assert img.GetMetaData("sparseslice_planned_slices") == row["slices"]
        arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
        assert arr.shape == read_header(ds.case(e.case_id).images[0]).shape[:3]
        framed = [s for s in range(arr.shape[e.axis]) if np.take(arr, s, axis=e.axis).any()]
        assert framed == list(e.slices)  # only the planned slices carry the frame


def test_a_block_plan_without_extents_asks_for_the_clicks_first(phantom_dataset: Path, tmp_path: Path) -> None:
    import shutil

    pool = tmp_path / "pool"
    shutil.copytree(phantom_dataset / "imagesTr", pool / "imagesTr")
    res = invoke("plan", pool, "--budget", 6, "--volumes", 2, "--strategy", "block", "-o", tmp_path / "plan.json")
    assert res.exit_code == 0, res.output
    assert "Extent step first" in " ".join(res.output.split())  # plan asks for the clicks
    res = invoke("worklist", pool, tmp_path / "plan.json", "-o", tmp_path / "wl")
    assert res.exit_code == 0, res.output
    record = json.loads((tmp_path / "wl" / "worklist.json").read_text())
    assert {c["step"] for c in record["cases"]} == {"extent"} and all(c["slices"] == "" for c in record["cases"])
    assert record["steps"][0].startswith("extent:") and "--extents plan.csv" in record["steps"][0]


# ---------------------------------------------------------------------------------- pre-annotation


def test_predict_with_a_plan_writes_masks_on_the_planned_slices_only(small, tmp_path: Path) -> None:
    import torch

    from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint

    ds, plan, _, tmp = small
    torch.manual_seed(0)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    save_checkpoint(tmp_path / "run" / "best.pt", Checkpoint(
        spec=spec, normalization=Normalization("zscore"), axis=2, labels=(0, 1, 2), patch_size=(16, 16),
        state_dict=build_model(spec).state_dict()))
    res = invoke("predict", tmp_path / "run", ds.root, "-o", tmp_path / "full", "--no-largest-component",
                 "--no-fill-holes")
    assert res.exit_code == 0, res.output
    res = invoke("predict", tmp_path / "run", ds.root, "-o", tmp_path / "pre", "--plan", tmp / "plan.json",
                 "--no-largest-component", "--no-fill-holes")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "pre").glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in plan.case_ids)
    for e in plan.entries:
        pre = read_label(tmp_path / "pre" / f"{e.case_id}.nii.gz").array
        full = read_label(tmp_path / "full" / f"{e.case_id}.nii.gz").array
        for s in range(e.n_slices):
            expected = np.take(full, s, axis=e.axis) if s in e.slices else 0
            assert np.array_equal(np.take(pre, s, axis=e.axis), np.broadcast_to(expected, pre.shape[:2]))
    record = json.loads((tmp_path / "pre" / "predict.json").read_text())
    assert record["planned_slices"] == {e.case_id: list(e.slices) for e in plan.entries}


def test_predict_refuses_a_plan_made_for_other_images_before_any_inference(small, tmp_path: Path,
                                                                           monkeypatch) -> None:
    import torch

    import sparseslice.predict as predict_module
    from sparseslice.model import Checkpoint, ModelSpec, Normalization, build_model, save_checkpoint

    ds, _, _, tmp = small
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,))
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "run" / "best.pt", Checkpoint(
        spec=spec, normalization=Normalization("zscore"), axis=2, labels=(0, 1, 2), patch_size=(16, 16),
        state_dict=build_model(spec).state_dict()))
    record = json.loads((tmp / "plan.json").read_text())
    last = record["entries"][-1]  # the last case: a check after inference would first predict the others
    last["n_slices"] += 3
    (tmp_path / "plan.json").write_text(json.dumps(record))
    calls = []
    monkeypatch.setattr(predict_module, "predict_volume", lambda *a, **k: calls.append(1) or 1 / 0)
    res = invoke("predict", tmp_path / "run", ds.root, "-o", tmp_path / "pre", "--plan", tmp_path / "plan.json")
    assert res.exit_code == 2 and calls == [], res.output
    message = " ".join(res.output.split())
    assert f"plan entry for case '{last['case']}' has {last['n_slices']} slices" in message
    assert "pass the plan made for these images" in message and "Traceback" not in res.output
    assert not (tmp_path / "pre").exists()  # nothing was written, not even the folder


def test_collect_records_corrected_and_unchanged_pre_annotated_slices(small) -> None:
    ds, plan, notes, tmp = small
    pre = tmp / "pre"
    pre.mkdir()
    entry = plan.entries[0]
    true = read_label(ds.case(entry.case_id).label)
    accepted, fixed, blank = entry.slices[0], entry.slices[1], entry.slices[2]
    guess = np.zeros_like(true.array)
    for s, how in ((accepted, "same"), (fixed, "wrong")):
        index = [slice(None)] * 3
        index[entry.axis] = s
        guess[tuple(index)] = true.array[tuple(index)] if how == "same" else (true.array[tuple(index)] > 0)
    assert not np.array_equal(np.take(guess, fixed, axis=entry.axis), np.take(true.array, fixed, axis=entry.axis))
    write_volume(true.like(guess), pre / f"{entry.case_id}.nii.gz")
    res = invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "out", "--preannotations", pre)
    assert res.exit_code == 0, res.output
    side = json.loads((tmp / "out" / "labelsTr" / f"{entry.case_id}.sparse.json").read_text())
    assert side["corrected"] == sorted([accepted, fixed]) and side["unchanged"] == [accepted]
    record = json.loads((tmp / "out" / "collect.json").read_text())["rounds"][0]["cases"][entry.case_id]
    assert blank not in record["corrected"] and set(record["drawn"]).isdisjoint({accepted, fixed})


def test_the_worklist_starts_from_the_pre_annotations_when_given(small, tmp_path: Path) -> None:
    import SimpleITK as sitk

    ds, plan, notes, tmp = small
    entry = plan.entries[0]
    pre = tmp_path / "pre"
    pre.mkdir()
    mask = read_label(notes / f"{entry.case_id}.nii.gz")  # the truth on the planned slices, as a prediction
    write_volume(mask, pre / f"{entry.case_id}.nii.gz")
    res = invoke("worklist", ds.root, tmp / "plan.json", "--preannotations", pre, "-o", tmp_path / "wl")
    assert res.exit_code == 0, res.output
    img = sitk.ReadImage(str(tmp_path / "wl" / f"{entry.case_id}.seg.nrrd"))
    arr = np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0))
    assert np.array_equal(np.where(arr == 3, 0, arr), mask.array)  # the masks, plus the frame (value 3)
    other = plan.entries[1].case_id  # no pre-annotation: empty segments
    img = sitk.ReadImage(str(tmp_path / "wl" / f"{other}.seg.nrrd"))
    assert set(np.unique(sitk.GetArrayFromImage(img)).tolist()) == {0, 3}


def test_training_on_collected_labels_equals_training_on_simulated_ones(small) -> None:
    """Same plan, annotators drawing exactly the planned slices: the same losses, epoch by epoch, with one seed."""
    import csv

    from sparseslice.train import TrainConfig, train

    ds, _, notes, tmp = small
    assert invoke("collect", ds.root, tmp / "plan.json", notes, "-o", tmp / "col").exit_code == 0
    assert invoke("simulate", ds.root, tmp / "plan.json", "-o", tmp / "sim").exit_code == 0
    cfg = TrainConfig(model="2d", channels=(4, 8), strides=(2,), epochs=2, samples_per_epoch=8, batch_size=4,
                      augment=False, num_threads=1, device="cpu", seed=0, val_fraction=0.5)
    histories = []
    for name in ("col", "sim"):
        train(tmp / name, tmp / f"run_{name}", config=cfg, progress=False)
        with (tmp / f"run_{name}" / "history.csv").open(newline="") as fh:
            histories.append([{k: v for k, v in row.items() if "second" not in k and "time" not in k}
                              for row in csv.DictReader(fh)])
    assert len(histories[0]) == 2 and histories[0] == histories[1]
