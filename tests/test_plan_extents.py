"""Planning and extents: plan says when labels could give extents, and the worklist's extent step."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.io import read_label
from sparseslice.select import extent_advice, make_plan, read_extents, read_plan
from sparseslice.sparse import extent_of


def _outside(plan, ds) -> int:
    """Drawn slices outside each label's extent, counted here independently of extent_advice."""
    n = 0
    for e in plan.entries:
        lab = read_label(ds.case(e.case_id).label).array
        occupied = [k for k in range(lab.shape[e.axis]) if lab.take(k, axis=e.axis).any()]
        n += sum(1 for s in e.slices if not occupied or not occupied[0] <= s <= occupied[-1])
    return n


def test_plan_on_labelled_data_counts_slices_outside_and_offers_extents_labels(phantom_dataset: Path,
                                                                                tmp_path: Path) -> None:
    ds = discover_dataset(phantom_dataset)
    plan = make_plan(ds, budget=8, volumes=2, seed=0)
    expected = _outside(plan, ds)
    assert expected > 0  # 12-slice phantoms have free slices above and below the structure
    advice = extent_advice(plan, ds)
    assert f"{expected} of 8 drawn slices lie outside" in advice and "--extents labels" in advice
    res = CliRunner().invoke(app, ["plan", str(phantom_dataset), "--budget", "8", "--volumes", "2",
                                   "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    assert "--extents labels" in " ".join(res.output.split())
    res = CliRunner().invoke(app, ["plan", str(phantom_dataset), "--budget", "8", "--volumes", "2",
                                   "--extents", "labels", "-o", str(tmp_path / "inside.json")])
    assert res.exit_code == 0, res.output
    inside = read_plan(tmp_path / "inside.json")
    assert _outside(inside, ds) == 0 and extent_advice(inside, ds) is None


def test_unlabelled_plan_gives_the_extent_step_and_reads_the_clicks_back(phantom_dataset: Path,
                                                                        tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    shutil.copytree(phantom_dataset / "imagesTr", pool / "imagesTr")
    res = CliRunner().invoke(app, ["plan", str(pool), "--budget", "12", "--volumes", "3",
                                   "-o", str(tmp_path / "plan.json")])
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())
    assert "Extent step first" in text and "--extents plan.csv" in text
    # the annotators click the extents into plan.csv (here: the hidden labels'), leaving one volume unclicked
    full = discover_dataset(phantom_dataset)
    with (tmp_path / "plan.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    clicked = {}
    for row in rows[:2]:
        lo, hi = extent_of(read_label(full.case(row["case"]).label).array, axis=int(row["axis"]))
        row["first"], row["last"] = lo, hi
        clicked[row["case"]] = (lo, hi)
    with (tmp_path / "plan.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    assert read_extents(tmp_path / "plan.csv") == clicked  # the unclicked row is skipped
    refused = CliRunner().invoke(app, ["plan", str(pool), "--budget", "12", "--volumes", "3",
                                       "--extents", str(tmp_path / "plan.csv"), "-o", str(tmp_path / "plan.json")])
    assert refused.exit_code == 2 and "would overwrite the extents file" in refused.output
    res = CliRunner().invoke(app, ["plan", str(pool), "--budget", "12", "--volumes", "3",
                                   "--extents", str(tmp_path / "plan.csv"), "-o", str(tmp_path / "plan2.json")])
    assert res.exit_code == 0, res.output
    again = read_plan(tmp_path / "plan2.json")
    for e in again.entries:
        if e.case_id in clicked:
            lo, hi = clicked[e.case_id]
            assert e.extent == (lo, hi) and all(lo <= s <= hi for s in e.slices)
    assert "1 volumes have no extent" in " ".join(res.output.split())
    half = tmp_path / "half.csv"  # one click of two is a mistake, not "not clicked yet"
    half.write_text("case,first,last\na,3,\n")
    with pytest.raises(UserError, match="first/last must be integers"):
        read_extents(half)


def test_hippocampus_plan_without_extents_draws_outside(hippocampus: Path) -> None:
    ds = discover_dataset(hippocampus)
    plan = make_plan(ds, budget=300, volumes=30, seed=0)
    advice = extent_advice(plan, ds)
    assert f"{_outside(plan, ds)} of 300 drawn slices lie outside" in advice
