"""Exports that tools we did not write read back: MSD multi-channel (MONAI), modality, channel names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from sparseslice.atomic import write_json
from sparseslice.cli import app
from sparseslice.datasets import discover_dataset, load_image
from sparseslice.errors import UserError
from sparseslice.io import read_label, write_volume
from sparseslice.select import make_plan, write_plan
from sparseslice.simulate import simulate
from sparseslice.sparse import read_sparse
from sparseslice.synthetic import make_phantom


def _two_channel_dataset(root: Path, *, cases: int = 2, source_json: bool = True) -> Path:
    """nnU-Net-style raw folder: ``<case>_0000`` (image) and ``<case>_0001`` (image * -2 + 7)."""
    for n in range(cases):
        ph = make_phantom((20, 18, 10), n_labels=2, seed=n)
        cid = f"case_{n:03d}"
        write_volume(ph.image, root / "imagesTr" / f"{cid}_0000.nii.gz")
        write_volume(ph.image.like((ph.image.array * -2 + 7).astype(np.float32)),
                     root / "imagesTr" / f"{cid}_0001.nii.gz")
        write_volume(ph.label, root / "labelsTr" / f"{cid}.nii.gz")
    if source_json:
        write_json(root / "dataset.json", {"channel_names": {"0": "T2", "1": "ADC"},
                                           "labels": {"background": 0, "a": 1, "b": 2}, "file_ending": ".nii.gz"})
    return root


@pytest.fixture
def two_channel(tmp_path: Path) -> Path:
    return _two_channel_dataset(tmp_path / "src")


def test_msd_export_of_two_channels_is_one_4d_image_monai_reads(two_channel: Path, tmp_path: Path) -> None:
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImaged

    ds = discover_dataset(two_channel)
    plan = make_plan(ds, budget=4, strategy="interval", seed=0)
    out = simulate(ds, plan, tmp_path / "sparse", format="msd")
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["tensorImageSize"] == "4D" and meta["modality"] == {"0": "T2", "1": "ADC"}
    items = load_decathlon_datalist(str(out / "dataset.json"), data_list_key="training", base_dir=str(out))
    assert len(items) == 2
    loader = LoadImaged(keys=["image", "label"], ensure_channel_first=True, image_only=True)
    for item in items:
        data = loader(item)
        cid = Path(item["label"]).name.removesuffix(".nii.gz")
        image, label = np.asarray(data["image"]), np.asarray(data["label"])
        assert image.shape[0] == 2 and label.shape[0] == 1 and image.shape[1:] == label.shape[1:]
        src = load_image(ds.case(cid)).array
        np.testing.assert_allclose(image[0], src[..., 0], rtol=1e-6)
        np.testing.assert_allclose(image[1], src[..., 1], rtol=1e-6)
        # the label is aligned: known voxels equal the full label there, on the same grid as both channels
        full = read_label(ds.case(cid).label).array
        known = label[0] != 255
        assert known.any() and np.array_equal(label[0][known], full[known])
        np.testing.assert_allclose(data["image"].affine, data["label"].affine)


def test_our_reader_reads_the_4d_msd_export_back(two_channel: Path, tmp_path: Path) -> None:
    ds = discover_dataset(two_channel)
    plan = make_plan(ds, budget=4, seed=1)
    out = simulate(ds, plan, tmp_path / "sparse", format="msd")
    back = discover_dataset(out)
    assert back.case_ids == ds.case_ids and back.modality == "T2"
    for cid in ds.case_ids:
        case = back.case(cid)
        assert len(case.images) == 1
        image = load_image(case)
        assert image.array.shape[3] == 2
        np.testing.assert_array_equal(image.array, load_image(ds.case(cid)).array)
        sparse, _ = read_sparse(case.label)
        assert sparse.label.shape == image.array.shape[:3]
        assert tuple(np.flatnonzero(sparse.annotated)) == plan.entry(cid).slices


def test_modality_option_reaches_both_formats(two_channel: Path, tmp_path: Path) -> None:
    ds = discover_dataset(two_channel)
    plan = make_plan(ds, budget=4, seed=0)
    nn = simulate(ds, plan, tmp_path / "nn", format="nnunet", modality=["CT"])
    assert json.loads((nn / "dataset.json").read_text())["channel_names"] == {"0": "CT", "1": "CT"}
    msd = simulate(ds, plan, tmp_path / "msd", format="msd", modality=["T2", "ADC2"])
    assert json.loads((msd / "dataset.json").read_text())["modality"] == {"0": "T2", "1": "ADC2"}
    with pytest.raises(UserError, match="modality must name one modality or one per channel"):
        simulate(ds, plan, tmp_path / "bad", format="msd", modality=["T2", "ADC", "DWI"])


def test_modality_defaults_to_unknown_with_a_warning_for_nnunet(tmp_path: Path) -> None:
    root = _two_channel_dataset(tmp_path / "src", source_json=False)
    ds = discover_dataset(root)
    plan = make_plan(ds, budget=4, seed=0)
    with pytest.warns(UserWarning, match="pass --modality CT for CT"):
        out = simulate(ds, plan, tmp_path / "nn", format="nnunet")
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "unknown", "1": "unknown"}


def test_cli_simulate_modality(phantom_dataset: Path, tmp_path: Path) -> None:
    ds = discover_dataset(phantom_dataset)
    plan_path = write_plan(make_plan(ds, budget=4, seed=0), tmp_path / "plan.json")
    res = CliRunner().invoke(app, ["simulate", str(phantom_dataset), str(plan_path), "-o", str(tmp_path / "nn"),
                                   "--format", "nnunet", "--modality", "CT"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "nn" / "dataset.json").read_text())["channel_names"] == {"0": "CT"}
