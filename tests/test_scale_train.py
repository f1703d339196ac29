"""Training data of CT-sized volumes (issue 14): only what training reads is kept, and batches do not change."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batch_checks import assert_same_batches
from batch_checks import draw as draw_batches
from sparseslice.datasets import discover_dataset
from sparseslice.io import read_label
from sparseslice.model import Normalization
from sparseslice.sparse import SparseLabel, write_sparse
from sparseslice.synthetic import write_phantom_dataset
from sparseslice.train.data import BlockSampler, SliceSampler, default_patch_size, load_cases


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Three phantoms of 30 slices, annotated at a few slices (one case with two far-apart slices)."""
    root = tmp_path_factory.mktemp("scale")
    full = write_phantom_dataset(root / "full", cases=3, seed=1, shape=(28, 24, 30))
    ds = discover_dataset(full)
    out = root / "sparse"
    (out / "imagesTr").mkdir(parents=True)
    for case, slices in zip(ds.cases, ([3, 25], [10, 12, 14], [15]), strict=True):
        label = read_label(case.label)
        (out / "imagesTr" / case.images[0].name).symlink_to(case.images[0])
        write_sparse(SparseLabel.from_slices(label.array, slices, axis=2), out / "labelsTr" / case.label.name,
                     like=label, extra={"interpolated": slices[1:2]})
    (out / "dataset.json").write_text((full / "dataset.json").read_text())
    return discover_dataset(out)


def draw(sampler, seed: int) -> list:
    return draw_batches(sampler, seed, batches=6)


@pytest.mark.parametrize("spacing", [None, (1.5, 1.25)])
def test_2d_keeps_only_known_slices_and_gives_the_same_batches(sparse, spacing):
    kw = {"axis": 2, "normalization": Normalization("zscore"), "spacing": spacing}
    whole, labels = load_cases(sparse, sparse.case_ids, **kw)
    kept, kept_labels = load_cases(sparse, sparse.case_ids, keep=0, **kw)
    assert kept_labels == labels
    assert [c.label.shape[2] for c in kept] == [2, 3, 1]
    assert [c.shape for c in kept] == [c.label.shape for c in whole]
    assert default_patch_size(kept, model="2d", axis=2, divisor=4) == default_patch_size(whole, model="2d", axis=2,
                                                                                           divisor=4)
    for w, k in zip(whole, kept, strict=True):  # the kept slices are the whole case's, bit for bit
        np.testing.assert_array_equal(k.image, w.image[..., w.known_slices])
        np.testing.assert_array_equal(k.slice_weight, w.slice_weight[w.known_slices])
    for patch in [(16, 16), (32, 28)]:
        assert_same_batches(draw(SliceSampler(whole, patch_size=patch), 0),
                            draw(SliceSampler(kept, patch_size=patch), 0))


@pytest.mark.parametrize("patch", [(16, 16, 8), (16, 16, 32)])
def test_3d_keeps_blocks_around_known_slices_and_gives_the_same_batches(sparse, patch):
    kw = {"axis": 2, "normalization": Normalization("zscore")}
    whole, _ = load_cases(sparse, sparse.case_ids, **kw)
    kept, _ = load_cases(sparse, sparse.case_ids, keep=patch[2] - 1, **kw)
    if patch[2] == 8:  # 7 slices of context each side (clipped at the ends), not the whole case
        want = [min(w.shape[2], int(w.known_slices[-1]) + 8) - max(0, int(w.known_slices[0]) - 7) for w in whole]
        assert [c.label.shape[2] for c in kept] == want and want[1:] == [19, 15]
    for fg in (0.0, 0.5):
        a = BlockSampler(whole, patch_size=patch, foreground=fg, mask_as_inference=0.3)
        b = BlockSampler(kept, patch_size=patch, foreground=fg, mask_as_inference=0.3)
        assert_same_batches(draw(a, 1), draw(b, 1))


def test_validation_subset_fits_the_share_by_sizes_and_keeps_what_fits_whole():
    from sparseslice.train.data import CaseArrays
    from sparseslice.train.validation import TRAIN_PASSES, validation_subset

    rng = np.random.default_rng(0)
    cases = [CaseArrays(f"c{n}", rng.normal(size=(1, 16, 16, 10)).astype(np.float32),
                        np.zeros((16, 16, 10), np.uint8), np.ones(10, np.float32), axis=2) for n in range(4)]
    # 40 validation slices of 16 x 16 = patch; an epoch of 100 samples allows 0.2 * 2 * 100 = 40 slices
    same, info = validation_subset(cases, dims=2, patch=(16, 16), samples=100)
    assert all(a is b for a, b in zip(same, cases, strict=True)) and info["every"] == 1
    few, info = validation_subset(cases, dims=2, patch=(16, 16), samples=20)  # allows 8 slices
    kept = [i for c in few for i in c.validation_slices]
    assert info == {"share": 0.2, "slices": len(kept), "of_slices": 40, "every": 5} and len(kept) == 8
    assert len(kept) * 16 * 16 <= 0.2 * TRAIN_PASSES * 20 * 16 * 16
    assert [c.validation_slices.tolist() for c in few] == [[0, 5]] * 4
    assert all(c.image is o.image for c, o in zip(few, cases, strict=True))  # arrays shared, not copied
    assert validation_subset(cases, dims=2, patch=(16, 16), samples=1, share=None)[0] is cases
    # 3D: whole cases in order, at least one
    cases3 = [CaseArrays(f"v{n}", np.zeros((1, 16, 16, 10), np.float32), np.zeros((16, 16, 10), np.uint8),
                         np.ones(10, np.float32), axis=2) for n in range(3)]
    two, info = validation_subset(cases3, dims=3, patch=(16, 16, 10), samples=6)  # 2.4 cases' worth
    assert [c.case_id for c in two] == ["v0", "v1"] and info["cases"] == 2
    assert len(validation_subset(cases3, dims=3, patch=(16, 16, 10), samples=1)[0]) == 1


def test_2d_sampler_reads_the_cases_own_arrays_and_pads_unknown(sparse):
    """No stacked copy of the slices (a CT dataset would hold its known slices twice): the sampler's own
    arrays are per-sample bookkeeping, and a batch is each case's slice, centred, with zero padding."""
    cases, _ = load_cases(sparse, sparse.case_ids, axis=2, normalization=Normalization("zscore"), keep=0)
    sampler = SliceSampler(cases, patch_size=(32, 32))
    own = sum(v.nbytes if isinstance(v, np.ndarray) else v.element_size() * v.nelement()
              for v in vars(sampler).values() if isinstance(v, np.ndarray | torch.Tensor))
    assert own < 0.1 * sum(c.image.nbytes for c in cases)
    image, label, weight = sampler.stored(np.arange(len(sampler)))
    assert image.shape == (6, 1, 32, 32)
    for k, (i, s) in enumerate(sampler.rows):
        c = cases[i]
        (h, w), (oy, ox) = c.label.shape[:2], sampler.offsets[k]
        assert (oy, ox) == ((32 - h) // 2, (32 - w) // 2)
        inside = np.zeros((32, 32), bool)
        inside[oy:oy + h, ox:ox + w] = True
        np.testing.assert_array_equal(image[k][:, inside].numpy(), c.image[..., s].reshape(1, -1))
        np.testing.assert_array_equal(label[k][inside].numpy(), c.label[..., s].ravel())
        np.testing.assert_array_equal(weight[k][inside].numpy(), c.voxel_weight()[..., s].ravel())
        assert not image[k][:, ~inside].any() and not weight[k][~inside].any()
    assert sorted(set(weight.unique().tolist())) == [0.0, 0.5, 1.0]  # interpolated slices weigh 0.5


def test_2d_validation_reads_annotated_slices_only_and_scores_the_same(sparse):
    from sparseslice.model import ModelSpec, build_model
    from sparseslice.train.validation import validate

    kw = {"axis": 2, "normalization": Normalization("zscore")}
    whole, _ = load_cases(sparse, sparse.case_ids, **kw)
    kept, _ = load_cases(sparse, sparse.case_ids, keep=0, **kw)
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.manual_seed(0)
    model = build_model(spec)
    args = {"spec": spec, "patch_size": (16, 16), "device": torch.device("cpu"), "batch_size": 2}
    assert validate(model, kept, **args) == validate(model, whole, **args)


@pytest.mark.parametrize("patch", [(32, 32), (16, 16)])
def test_2d_validation_stacked_across_cases_scores_each_case_as_alone(sparse, patch):
    """Stacking the slices of cases that share a window (padded as MONAI pads) changes no case's score;
    (32, 32) pads every slice, (16, 16) slides windows over slices of different sizes."""
    from sparseslice.model import ModelSpec, build_model
    from sparseslice.train.validation import validate

    cases, _ = load_cases(sparse, sparse.case_ids, axis=2, normalization=Normalization("zscore"), keep=0)
    assert len({c.label.shape[:2] for c in cases}) > 1  # slices of different sizes
    spec = ModelSpec(dims=2, in_channels=1, out_channels=3, channels=(4, 8), strides=(2,), num_res_units=0)
    torch.manual_seed(0)
    model = build_model(spec)
    args = {"spec": spec, "patch_size": patch, "device": torch.device("cpu"), "batch_size": 2}
    together, per_class = validate(model, cases, **args)
    alone = [validate(model, [c], **args) for c in cases]
    assert together == pytest.approx(np.mean([a[0] for a in alone]), abs=1e-6)
    assert per_class == pytest.approx(np.nanmean([a[1] for a in alone], axis=0).tolist(), abs=1e-6, nan_ok=True)
    # and each case's class maps are those of MONAI's sliding window over that case alone (its own padding)
    from sparseslice.inference import Window, classes, model_inputs, window_size
    from sparseslice.train.validation import _slice_classes

    window = Window(overlap=0.25, blend="constant", images_per_pass=4)
    stacked = _slice_classes(model, cases, spec=spec, patch_size=patch, window=window, bf16=False,
                             device=torch.device("cpu"))
    for n, c in enumerate(cases):
        images = model_inputs(c.image, dims=2, axis=2, slices=c.validation_slices)
        roi = window_size(patch, dims=2, axis=2, divisor=spec.divisor, plane=images.shape[2:])
        assert torch.equal(stacked[n], classes(model, images, roi=roi, window=window))


@pytest.mark.parametrize(("keep", "spacing"), [(0, None), (7, None), (None, None), (0, (1.5, 1.25))])
def test_memory_estimate_is_what_load_cases_holds(sparse, keep, spacing):
    from sparseslice.train.footprint import data_bytes

    cases, _ = load_cases(sparse, sparse.case_ids, axis=2, normalization=Normalization("zscore"), keep=keep,
                          spacing=spacing)
    held = sum(c.image.nbytes + c.label.nbytes for c in cases)
    assert data_bytes(sparse, sparse.case_ids, axis=2, spacing=spacing, keep=keep) == held


def test_training_data_beyond_memory_is_refused_up_front_unless_cached(sparse, tmp_path, monkeypatch):
    from sparseslice.errors import UserError
    from sparseslice.train import TrainConfig, train, trainer

    monkeypatch.setattr(trainer, "available_bytes", lambda: 1e4)
    read = []
    monkeypatch.setattr(trainer, "load_cases", lambda *a, **k: read.append(1))
    config = TrainConfig(epochs=1, batch_size=2, samples_per_epoch=2, channels=(4, 8), strides=(2,),
                         num_res_units=0, num_threads=1, val_fraction=0.0)
    with pytest.raises(UserError, match=r"training data needs about .* GB in memory \(3 cases\), more than 80% "
                                         r"of the 0.0 GB available; pass --cache FOLDER"):
        train(sparse.root, tmp_path / "run", config=config, progress=False)
    assert read == []  # nothing was read
    monkeypatch.undo()
    monkeypatch.setattr(trainer, "available_bytes", lambda: 1e4)
    res = train(sparse.root, tmp_path / "cached", config=config.updated(cache=str(tmp_path / "cache")),
                progress=False)
    assert res.checkpoint.exists()
