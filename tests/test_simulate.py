"""simulate: a plan applied to full labels gives exactly the planned slices, MSD and nnU-Net layouts."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset, load_label
from sparseslice.errors import UserError
from sparseslice.io import read_label
from sparseslice.select import PlanEntry, make_plan, read_plan, write_plan
from sparseslice.simulate import nnunet_ignore_value, simulate
from sparseslice.sparse import decode, extent_of, read_sparse, sidecar_path


def _assert_exact(src, out: Path, plan, *, ignore_value: int) -> None:
    """Decoding every written label gives back exactly the planned slices with the true labels."""
    written = discover_dataset(out)
    assert sorted(written.case_ids) == sorted(plan.case_ids)
    for entry in plan.entries:
        truth = load_label(src.case(entry.case_id)).array
        case = written.case(entry.case_id)
        order = json.loads(sidecar_path(case.label).read_text()).get("axis_order", [0, 1, 2])
        truth, axis = np.transpose(truth, order), order.index(entry.axis)  # nnU-Net: annotated axis last
        raw = read_label(case.label).array
        sparse = decode(raw, axis=axis, ignore_value=ignore_value)
        assert sparse.annotated_indices == list(entry.slices)
        index = [slice(None)] * 3
        index[axis] = list(entry.slices)
        assert np.array_equal(sparse.label[tuple(index)], truth[tuple(index)])
        assert np.all(raw[sparse.known_mask() == 0] == ignore_value)
        side, _ = read_sparse(case.label)
        assert side.meta["ignore_value"] == ignore_value and side.meta["drawn"] == list(entry.slices)


@pytest.fixture(scope="module")
def ds(phantom_dataset: Path):
    return discover_dataset(phantom_dataset)


def test_msd_output_holds_exactly_the_planned_slices(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=7, volumes=3, strategy="random", seed=4)
    out = simulate(ds, plan, tmp_path / "sparse")
    _assert_exact(ds, out, plan, ignore_value=255)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "part1", "2": "part2"}
    assert meta["sparse"]["ignore_value"] == 255 and meta["numTraining"] == 3
    assert read_plan(out) == plan and (out / "plan.csv").is_file()
    image = out / "imagesTr" / f"{plan.case_ids[0]}.nii.gz"
    assert image.is_symlink() and image.resolve() == ds.case(plan.case_ids[0]).images[0].resolve()


def test_copy_images_and_rerun(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=4, volumes=2, strategy="interval", seed=0)
    out = simulate(ds, plan, tmp_path / "sparse", copy_images=True)
    image = out / "imagesTr" / f"{plan.case_ids[0]}.nii.gz"
    assert not image.is_symlink() and image.read_bytes() == ds.case(plan.case_ids[0]).images[0].read_bytes()
    smaller = replace(plan, entries=plan.entries[:1], volumes=1, budget=len(plan.entries[0].slices))
    simulate(ds, smaller, out)  # an earlier simulation is replaced, stale cases are gone
    assert discover_dataset(out).case_ids == [plan.case_ids[0]]
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files simulate did not write, got \\['notes.txt'\\]"):
        simulate(ds, plan, out)
    assert (out / "dataset.json").is_file()  # refused before touching anything


def test_border_slices_are_free_background(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=4, volumes=2, strategy="block", seed=1)
    out = simulate(ds, plan, tmp_path / "sparse", border_slices=True)
    for entry in plan.entries:
        truth = load_label(ds.case(entry.case_id)).array
        first, last = extent_of(truth, axis=entry.axis)
        sparse, _ = read_sparse(out / "labelsTr" / f"{entry.case_id}.nii.gz")
        outside = [i for i in range(entry.n_slices) if not first <= i <= last]
        assert sparse.annotated_indices == sorted(set(outside) | set(entry.slices))
        assert np.flatnonzero(sparse.drawn).tolist() == list(entry.slices)
        assert np.flatnonzero(sparse.border).tolist() == outside
        assert not sparse.label[..., outside].any() and sparse.extent == (first, last)


def test_border_slices_warn_when_the_plan_drew_outside_the_extent(ds, tmp_path: Path) -> None:
    case = ds.cases[0]
    first, last = extent_of(load_label(case).array, axis=2)
    outside = 0 if first > 0 else last + 1
    plan = make_plan(ds, budget=2, volumes=1, strategy="random", seed=0, cases=[case.case_id])
    plan = replace(plan, entries=[replace(plan.entries[0], slices=tuple(sorted({outside, (first + last) // 2})))])
    with pytest.warns(UserWarning, match="drawn slices outside the structure extent.*plan with --extents"):
        simulate(ds, plan, tmp_path / "sparse", border_slices=True)
    inside = make_plan(ds, budget=2, volumes=1, strategy="random", seed=0, cases=[case.case_id],
                       extents={case.case_id: (first, last)})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        simulate(ds, inside, tmp_path / "sparse2", border_slices=True)


def test_nnunet_export_declares_the_ignore_label(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=6, volumes=3, strategy="interval", seed=2)
    out = simulate(ds, plan, tmp_path / "nn", format="nnunet")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "part1": 1, "part2": 2, "ignore": 3}
    values = sorted(meta["labels"].values())
    assert values == list(range(len(values))) and meta["labels"]["ignore"] == max(values)  # nnU-Net's rules
    assert meta["file_ending"] == ".nii.gz" and meta["numTraining"] == 3 and meta["channel_names"] == {"0": "MRI"}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == sorted(f"{c}_0000.nii.gz" for c in plan.case_ids)
    _assert_exact(ds, out, plan, ignore_value=3)
    assert discover_dataset(out).label_names == {0: "background", 1: "part1", 2: "part2"}


def test_nnunet_ignore_value_rules() -> None:
    assert nnunet_ignore_value([0, 1, 2]) == 3
    assert nnunet_ignore_value([1]) == 2
    with pytest.raises(UserError, match="labels must be consecutive"):
        nnunet_ignore_value([0, 1, 3])


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: replace(p, entries=[PlanEntry("ghost", 2, (1,), 12)]), "plan names case 'ghost'"),
    (lambda p: replace(p, entries=[replace(p.entries[0], slices=(40,), n_slices=50)]), "lie outside the volume"),
])
def test_plans_that_do_not_fit_the_data_are_refused(ds, tmp_path: Path, change, message) -> None:
    plan = make_plan(ds, budget=2, volumes=1, seed=0)
    with pytest.raises(UserError, match=message):
        simulate(ds, change(plan), tmp_path / "x")


def test_bad_options_are_refused(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=2, volumes=1, seed=0)
    with pytest.raises(UserError, match="format is unknown, got 'monai'; use one of msd, nnunet"):
        simulate(ds, plan, tmp_path / "a", format="monai")
    with pytest.raises(UserError, match="ignore_value must be the value after the highest label.*use 3"):
        simulate(ds, plan, tmp_path / "b", format="nnunet", ignore_value=9)
    with pytest.raises(UserError, match="ignore_value must exceed every label value, got 2"):
        simulate(ds, plan, tmp_path / "c", ignore_value=2)


def test_cli_simulate(phantom_dataset: Path, ds, tmp_path: Path) -> None:
    plan_path = write_plan(make_plan(ds, budget=5, volumes=2, seed=3), tmp_path / "plan.json")
    runner = CliRunner()
    res = runner.invoke(app, ["simulate", str(phantom_dataset), str(plan_path), "-o", str(tmp_path / "s"),
                              "--format", "nnunet", "--border-slices"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "dataset.json").read_text())["labels"]["ignore"] == 3
    res = runner.invoke(app, ["simulate", str(phantom_dataset), str(tmp_path / "missing.json"), "-o",
                              str(tmp_path / "t")])
    assert res.exit_code == 2 and "does not exist; make one with sparseslice plan" in res.output


def test_hippocampus_simulation_is_exact(hippocampus: Path, tmp_path: Path) -> None:
    ds = discover_dataset(hippocampus)
    plan = make_plan(ds, budget=40, rho=0.1, strategy="interval", seed=0, cases=ds.case_ids[:12])
    assert 10 <= plan.volumes <= 12 and plan.axis == 0
    _assert_exact(ds, simulate(ds, plan, tmp_path / "msd"), plan, ignore_value=255)
    out = simulate(ds, plan, tmp_path / "nn", format="nnunet")
    _assert_exact(ds, out, plan, ignore_value=3)
    labels = json.loads((out / "dataset.json").read_text())["labels"]
    assert labels == {"background": 0, "Anterior": 1, "Posterior": 2, "ignore": 3}
    assert labels["ignore"] == max(labels.values())


def test_plan_extents_reach_the_sidecar(ds, tmp_path: Path) -> None:
    plan = make_plan(ds, budget=4, volumes=2, strategy="block", seed=0)
    out = simulate(ds, plan, tmp_path / "s")
    for entry in plan.entries:
        sparse, _ = read_sparse(out / "labelsTr" / f"{entry.case_id}.nii.gz")
        assert sparse.extent == entry.extent and not sparse.border.any()
        assert sparse.annotated_indices == list(entry.slices)
