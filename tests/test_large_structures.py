"""Large structures: training at another in-plane spacing, 3D foreground oversampling, the mask channel."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.io import read_header, read_label, write_volume
from sparseslice.model import Normalization, load_checkpoint
from sparseslice.predict import predict_folder
from sparseslice.sparse import SparseLabel, read_sparse, write_sparse
from sparseslice.synthetic import write_phantom_dataset
from sparseslice.train import TrainConfig, train
from sparseslice.train.data import BlockSampler, load_cases

torch.set_num_threads(1)
TINY = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1, "num_threads": 1, "val_fraction": 0.0,
        "augment": False, "patience": 100}


@pytest.fixture(scope="module")
def fine(tmp_path_factory):
    """Phantoms at 0.5 mm in-plane (48 x 40 voxels), 2.5 mm slices."""
    return write_phantom_dataset(tmp_path_factory.mktemp("fine") / "d", cases=2, seed=3, shape=(48, 40, 10),
                                 spacing=(0.5, 0.5, 2.5))


def _sparse(full, out, slices):
    ds = discover_dataset(full)
    (out / "imagesTr").mkdir(parents=True)
    for case in ds.cases:
        label = read_label(case.label)
        (out / "imagesTr" / case.images[0].name).symlink_to(case.images[0])
        write_sparse(SparseLabel.from_slices(label.array, slices, axis=2), out / "labelsTr" / case.label.name,
                     like=label)
    (out / "dataset.json").write_text((full / "dataset.json").read_text())
    return out


@pytest.mark.parametrize("model", ["2d", "3d"])
def test_a_run_at_another_spacing_predicts_on_each_images_own_grid(fine, tmp_path, model):
    extra = {"patch_size": (16, 16, 8)} if model == "3d" else {}
    cfg = TrainConfig(model=model, epochs=2, batch_size=2, samples_per_epoch=4, spacing=(1.0, 1.25),
                      **TINY, **extra)
    result = train(fine, tmp_path / "run", config=cfg, progress=False)
    _, ckpt = load_checkpoint(result.run_dir)
    assert ckpt.spacing == (1.0, 1.25)
    assert json.loads((result.run_dir / "config.json").read_text())["spacing"] == [1.0, 1.25]
    written = predict_folder(result.run_dir, fine, tmp_path / "pred", progress=False)
    for path in written:
        image = read_header(fine / "imagesTr" / path.name)
        pred = read_header(path)
        assert pred.shape == image.shape
        np.testing.assert_allclose(pred.affine, image.affine)
    assert json.loads((tmp_path / "pred" / "predict.json").read_text())["spacing"] == [1.0, 1.25]


def test_default_spacing_keeps_small_images_and_coarsens_large_ones(fine, tmp_path):
    small = write_phantom_dataset(tmp_path / "small", cases=1, seed=0, shape=(24, 24, 8))
    cfg = TrainConfig(model="2d", epochs=1, batch_size=2, samples_per_epoch=2, **TINY)
    run = train(small, tmp_path / "r1", config=cfg, progress=False)
    assert json.loads((run.run_dir / "config.json").read_text())["spacing"] == [1.0, 1.0]
    big = write_phantom_dataset(tmp_path / "big", cases=1, seed=0, shape=(160, 144, 4), spacing=(0.5, 0.5, 3))
    run = train(big, tmp_path / "r2", config=cfg, progress=False)
    size = read_header(next((big / "imagesTr").iterdir())).shape[0]  # the phantom's largest in-plane size
    expected = pytest.approx([0.5 * size / 128] * 2)  # the median case coarsened to 128 voxels
    assert json.loads((run.run_dir / "config.json").read_text())["spacing"] == expected


def test_resampled_training_cases_keep_their_annotated_slices(fine, tmp_path):
    sparse = _sparse(fine, tmp_path / "sp", [2, 5, 7])
    ds = discover_dataset(sparse)
    cases, _ = load_cases(ds, [c.case_id for c in ds.cases], axis=2, normalization=Normalization("zscore"),
                          spacing=(1.0, 1.0))
    for case in cases:
        nx, ny, nz = read_header(ds.case(case.case_id).images[0]).shape
        assert case.image.shape[1:] == case.label.shape == (round(nx / 2), round(ny / 2), nz)
        assert case.known_slices.tolist() == [2, 5, 7]
    with pytest.raises(UserError, match="spacing is larger than case .* extent"):
        load_cases(ds, [ds.cases[0].case_id], axis=2, normalization=Normalization("zscore"), spacing=(30.0, 1.0))


def test_bad_spacing_is_refused_naming_it():
    for bad in ([0, 1], [-1.0, 1.0]):
        with pytest.raises(UserError, match="spacing must be two positive"):
            TrainConfig.from_dict({"spacing": bad})
    with pytest.raises(UserError, match=r"'spacing' must be a list of 2 numbers or null, got \[1.0\]; "
                                        r"write e.g. spacing: \[1.0, 1.0\]"):
        TrainConfig.from_dict({"spacing": [1.0]})
    with pytest.raises(UserError, match=r"foreground_fraction must lie in \[0, 1\]"):
        TrainConfig.from_dict({"foreground_fraction": 1.5})


def _block_cases(fine, tmp_path):
    sparse = _sparse(fine, tmp_path / "sp", [1, 2, 3, 4, 5, 6])
    ds = discover_dataset(sparse)
    cases, _ = load_cases(ds, [c.case_id for c in ds.cases], axis=2, normalization=Normalization("zscore"))
    return cases


@pytest.mark.parametrize("share", [0.0, 0.33, 1.0])
def test_3d_foreground_oversampling_centres_the_stated_share_on_foreground(fine, tmp_path, share):
    cases = _block_cases(fine, tmp_path)
    sampler = BlockSampler(cases, patch_size=(16, 16, 8), foreground=share)
    rng = np.random.default_rng(0)
    n = 3000
    centred = 0
    for _ in range(n):
        i = int(rng.integers(len(sampler)))
        start, centre = sampler._start(i, rng)
        if centre is not None:
            centred += 1
            case = sampler.cases[i]
            assert case.label[tuple(centre)] > 0 and case.voxel_weight()[tuple(centre)] > 0  # known foreground
            # the block holds the voxel (near the middle unless clipped at the padded volume's edge)
            offset = [c + m - b for c, m, b in zip(centre, sampler.margins[i], start, strict=True)]
            assert all(0 <= o < p for o, p in zip(offset, sampler.patch_size, strict=True))
    sd = np.sqrt(share * (1 - share) / n)
    assert abs(centred / n - share) <= 4 * sd + 1e-9
    # every block still contains a known slice, and the foreground share of voxels rises with the share
    batch = next(sampler.epoch(64, 64, np.random.default_rng(1)))
    assert (batch.weight.flatten(1).sum(1) > 0).all()


def test_foreground_oversampling_raises_the_foreground_in_blocks(fine, tmp_path):
    cases = _block_cases(fine, tmp_path)
    fractions = []
    for share in (0.0, 1.0):
        sampler = BlockSampler(cases, patch_size=(16, 16, 8), foreground=share)
        batch = next(sampler.epoch(200, 200, np.random.default_rng(0)))
        known = batch.weight > 0
        fractions.append(float((batch.label[known] > 0).float().mean()))
    assert fractions[1] > fractions[0] + 0.05


def test_mask_channel_input_is_what_inference_gives_in_the_stated_share(fine, tmp_path):
    cases = _block_cases(fine, tmp_path)
    sampler = BlockSampler(cases, patch_size=(16, 16, 16), mask_as_inference=0.5)
    batch = next(sampler.epoch(400, 400, np.random.default_rng(0)))
    inside_all = [bool(torch.equal(ann, (img[0] != 0).float()) or ann.sum() > (w > 0).sum())
                  for ann, img, w in zip(batch.annotated, batch.image, batch.weight, strict=True)]
    share = float(np.mean(inside_all))
    assert 0.4 < share < 0.6
    # the loss weights never change: unknown slices stay unknown
    assert torch.all(batch.weight[batch.annotated == 0] == 0)


def test_a_3d_patch_larger_than_every_case_is_padded_and_said_once(fine, tmp_path):
    cfg = TrainConfig(model="3d", epochs=1, batch_size=1, samples_per_epoch=1, patch_size=(16, 16, 32), **TINY)
    with pytest.warns(UserWarning, match=r"larger than every training case along patch axis 2") as seen:
        train(fine, tmp_path / "run", config=cfg, progress=False)
    assert sum("larger than every training case" in str(w.message) for w in seen) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default patch (rounded up to the divisor) says nothing
        train(fine, tmp_path / "run2", config=cfg.updated(patch_size=None), progress=False)


def test_default_3d_patch_is_capped_at_128_in_plane_and_48_slices():
    from sparseslice.train.data import CaseArrays, default_patch_size

    def case(shape, axis):
        return CaseArrays("c", np.zeros((1, *shape), np.float32), np.zeros(shape, np.uint8),
                          np.ones(shape[axis], np.float32), axis)

    assert default_patch_size([case((150, 100, 88), 2)], model="3d", axis=2, divisor=8) == (128, 104, 48)
    assert default_patch_size([case((88, 150, 100), 0)], model="3d", axis=0, divisor=8) == (48, 128, 104)
    assert default_patch_size([case((35, 50, 36), 0)], model="3d", axis=0, divisor=8) == (40, 56, 40)  # as before
    assert default_patch_size([case((300, 300, 88), 2)], model="2d", axis=2, divisor=8) == (256, 256)


def test_full_arm_with_border_slices_draws_the_extent_and_knows_the_whole_volume(tmp_path):
    """Partial-annotation design: "full" = every structure slice drawn (the extent, clicked) with the
    slices outside it free background, so 6 full volumes and 30 x 20 % blocks cost the same."""
    from sparseslice.datasets import load_label, split_cases
    from sparseslice.study.pipeline import _sparse_training_data
    from sparseslice.study.spec import parse_spec

    root = write_phantom_dataset(tmp_path / "d", cases=4, seed=2, shape=(24, 24, 16))
    ds = discover_dataset(root)
    split = split_cases(ds.case_ids, seed=0, val=0.25, test=0.25)
    extents = {}
    for cid in split.train:
        z = np.flatnonzero(load_label(ds.case(cid)).array.any(axis=(0, 1)))
        extents[cid] = (int(z[0]), int(z[-1]))
    assert all(b - a + 1 < 16 for a, b in extents.values())  # the phantoms leave slices outside the extent
    drawn = sum(b - a + 1 for a, b in extents.values())
    spec = parse_spec({"dataset": {"path": str(root), "split": {"seed": 0, "val": 0.25, "test": 0.25}},
                       "grid": [{"budget": [drawn], "rho": [1.0], "strategy": ["random"], "border_slices": [True]}],
                       "seeds": [0], "baseline": False})
    sparse_dir, info = _sparse_training_data(ds, split, spec.runs()[0], tmp_path / "run", axis=2)
    assert info["slices"] == drawn and info["n_volumes"] == len(extents)  # the budget counts structure slices
    for cid, (a, b) in extents.items():
        sparse, _ = read_sparse(sparse_dir / "labelsTr" / f"{cid}.nii.gz")
        assert sparse.annotated.all()  # drawn inside the extent, border background outside it
        assert sparse.border.sum() == sparse.annotated.size - (b - a + 1)
        np.testing.assert_array_equal(sparse.label, load_label(ds.case(cid)).array)
    # training reads the border slices from the sidecars (through the cache too): 3D blocks are drawn
    # around the drawn extent only
    sparse_ds = discover_dataset(sparse_dir)
    for cache in (None, tmp_path / "cache", tmp_path / "cache"):  # no cache, written, read back
        cases, _ = load_cases(sparse_ds, sparse_ds.case_ids, axis=2, normalization=Normalization(), keep=7,
                              cache=cache)
        for c in cases:
            a, b = extents[c.case_id]
            assert c.border is not None and c.anchor_slices.tolist() == list(range(a, b + 1))
            assert c.border.sum() == c.known_slices.size - (b - a + 1)


def test_a_block_shallower_than_the_network_trains_3d_on_its_slices_only(tmp_path):
    """A one-slice block in volumes shallower than the network's depth divisor: padded, and only
    the block's voxels carry loss (the padding and the unknown slices get none)."""
    full = write_phantom_dataset(tmp_path / "full", cases=2, seed=4, shape=(24, 24, 3))
    data = _sparse(full, tmp_path / "sparse", [1])
    ds = discover_dataset(data)
    cases, _ = load_cases(ds, ds.case_ids, axis=2, normalization=Normalization("zscore"))
    sampler = BlockSampler(cases, patch_size=(24, 24, 4))
    rng = np.random.default_rng(0)
    for _ in range(20):
        image, label, weight, _ = sampler.sample(rng)
        assert weight.shape == (24, 24, 4)
        carried = np.flatnonzero(weight.any(axis=(0, 1)))
        assert carried.size == 1 and weight[..., carried[0]].min() > 0  # the block's one slice, whole
    cfg = TrainConfig(model="3d", epochs=2, batch_size=2, samples_per_epoch=2, **TINY)
    result = train(data, tmp_path / "run", config=cfg, progress=False)
    import csv

    rows = list(csv.DictReader((result.run_dir / "history.csv").open()))
    assert len(rows) == 2 and all(np.isfinite(float(r["loss"])) for r in rows)


def test_a_structure_touching_the_first_and_last_slice_has_a_valid_extent(tmp_path):
    """Extent clicks at the volume's border are valid: the block lies inside, no border slice is free."""
    from sparseslice.select import make_plan
    from sparseslice.simulate import simulate

    root = write_phantom_dataset(tmp_path / "d", cases=2, seed=5, shape=(24, 24, 10))
    ds = discover_dataset(root)
    for case in ds.cases:  # the structure on every slice, first and last included
        vol = read_label(case.label)
        arr = vol.array.copy()
        arr[10:14, 10:14, :] = 1
        write_volume(vol.like(arr), case.label)
    plan = make_plan(ds, budget=4, strategy="block", block_fraction=0.2, seed=0, axis=2)
    assert [e.extent for e in plan.entries] == [(0, e.n_slices - 1) for e in plan.entries]
    out = simulate(ds, plan, tmp_path / "sparse", border_slices=True)
    for e in plan.entries:
        sparse, _ = read_sparse(out / "labelsTr" / f"{e.case_id}.nii.gz")
        assert not sparse.border.any() and sparse.annotated_indices == sorted(e.slices)


def test_3d_blocks_are_drawn_around_drawn_slices_not_free_border_slices():
    """A 20 % block with border slices: 2 drawn slices, 14 free background ones. Blocks are drawn around
    the drawn slices (every block holds one), and the border slices they cover still carry loss."""
    from sparseslice.train.data import CaseArrays

    n = 20
    label = np.zeros((12, 12, n), np.uint8)
    label[3:9, 3:9, 5:15] = 1  # the structure's extent: slices 5..14
    weight = np.zeros(n, np.float32)
    border = np.zeros(n, bool)
    border[:5] = border[15:] = True
    weight[border] = 1
    weight[[9, 10]] = 1  # the drawn block
    image = np.zeros((1, 12, 12, n), np.float32)
    case = CaseArrays("c", image, label, weight, axis=2, border=border)
    assert case.anchor_slices.tolist() == [9, 10] and case.known_slices.size == 12
    sampler = BlockSampler([case], patch_size=(12, 12, 8))
    rng = np.random.default_rng(0)
    covered_border = False
    for _ in range(200):
        start, _ = sampler._start(0, rng)
        depth = range(start[2], start[2] + 8)
        assert 9 in depth or 10 in depth
        covered_border |= any(border[s] for s in depth)
    assert covered_border
    batch = next(sampler.epoch(64, 64, np.random.default_rng(1)))
    assert torch.all(((batch.label > 0) & (batch.weight > 0)).flatten(1).any(1))  # known foreground in each
    # only border slices known: they are the anchors (a volume without the structure still trains)
    only = CaseArrays("o", image, np.zeros_like(label), border.astype(np.float32), axis=2, border=border)
    assert only.anchor_slices.tolist() == np.flatnonzero(border).tolist()
