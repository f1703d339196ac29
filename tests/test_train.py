"""Training on sparse labels: config errors, samplers, augmentation, overfitting, resume, CLI."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sparseslice.datasets import discover_dataset
from sparseslice.errors import UserError
from sparseslice.io import read_label
from sparseslice.model import Normalization, load_checkpoint
from sparseslice.sparse import SparseLabel, write_sparse
from sparseslice.synthetic import write_phantom_dataset
from sparseslice.train import TrainConfig, load_config, train
from sparseslice.train.augment import AugmentSettings, augment_batch, random_affine, resample, resample_in_plane
from sparseslice.train.data import BlockSampler, SliceSampler, load_cases, resolve_axis

torch.set_num_threads(1)
TINY = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1, "num_threads": 1, "val_fraction": 0.0,
        "augment": False, "patience": 100}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantom_dataset(tmp_path_factory.mktemp("ph") / "full", cases=2, seed=0, shape=(24, 24, 12))


def make_sparse(full, out, slices_of, *, extra=None):
    """Sparse copy of ``full``: ``slices_of(n_slices)`` annotated along axis 2 (phantom slice axis)."""
    ds = discover_dataset(full)
    for case in ds.cases:
        label = read_label(case.label)
        (out / "imagesTr").mkdir(parents=True, exist_ok=True)
        (out / "imagesTr" / case.images[0].name).symlink_to(case.images[0])
        sparse = SparseLabel.from_slices(label.array, slices_of(label.shape[2]), axis=2)
        write_sparse(sparse, out / "labelsTr" / case.label.name, like=label, extra=extra)
    (out / "dataset.json").write_text((full / "dataset.json").read_text())
    return out


# --- config ---------------------------------------------------------------------------------

def test_unknown_config_key_names_the_nearest():
    with pytest.raises(UserError, match=r"'epoch' does not exist.*did you mean 'epochs'"):
        TrainConfig.from_dict({"epoch": 3})
    with pytest.raises(UserError, match="did you mean 'mask_channel'"):
        TrainConfig.from_dict({"mask_chanel": True})


@pytest.mark.parametrize("bad, match", [
    ({"model": "4d"}, "model must be one of 2d, 3d"),
    ({"schedule": "three-step"}, "schedule must be one of"),
    ({"lr": 0}, "lr must be positive"),
    ({"patch_size": [30, 30]}, "multiples of 4"),  # 30 -> 3.75 at the fourth level: 3 levels
    ({"arch": "resnet"}, "arch must be one of unet, dynunet, got 'resnet'; e.g. arch: unet"),
    ({"channels": [16, 32, 64, 128], "strides": [2, 2]}, r"strides must have len\(channels\) - 1 = 3 values"),
    ({"patch_size": [120, 120]}, "multiples of 16"),  # 120 -> 7.5 at the fifth level: 5 levels, divisor 16
    ({"model": "3d", "patch_size": [32, 32]}, "3 positive sizes"),
    ({"interpolated_weight": 2}, r"interpolated_weight must lie in \[0, 1\]"),
])
def test_bad_config_values(bad, match):
    with pytest.raises(UserError, match=match):
        TrainConfig.from_dict(bad)


def test_config_round_trip_and_yaml(tmp_path):
    cfg = TrainConfig(model="3d", patch_size=(16, 16, 8), channels=(8, 16, 32), strides=(2, 2))
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    path = tmp_path / "c.yaml"
    path.write_text("model: 3d\nepochs: 7\nchannels: [8, 16]\nstrides: [2]\n")
    loaded = load_config(path)
    assert (loaded.model, loaded.epochs, loaded.channels) == ("3d", 7, (8, 16))


# --- data -----------------------------------------------------------------------------------

def test_slice_sampler_keeps_only_annotated_slices_and_weights_interpolated(phantoms, tmp_path):
    sparse = make_sparse(phantoms, tmp_path / "sp", lambda n: [2, 5, 8], extra={"interpolated": [5]})
    ds = discover_dataset(sparse)
    axis = resolve_axis(ds, None)
    assert axis == 2
    cases, labels = load_cases(ds, ds.case_ids, axis=axis, normalization=Normalization(), interpolated_weight=0.25)
    assert labels == (0, 1, 2)
    assert [c.slice_weight[[2, 5, 8]].tolist() for c in cases] == [[1.0, 0.25, 1.0]] * 2
    assert [c.validation_slices.tolist() for c in cases] == [[2, 8]] * 2
    sampler = SliceSampler(cases, patch_size=(24, 24))
    assert len(sampler) == 6  # 3 known slices x 2 cases, nothing else
    full = read_label(ds.case(ds.case_ids[0]).label).array
    _, stored_labels, stored_weights = sampler.stored(np.arange(len(sampler)))
    assert set(np.unique(stored_weights)) <= {0.0, 0.25, 1.0}
    # stored slice 0 is slice 2 of case 0 (centred in the padded store)
    stored = stored_labels[0].numpy()
    assert (stored == 0).sum() + (stored > 0).sum() == stored.size
    assert stored.sum() == full[..., 2].astype(int).sum() and (stored > 0).sum() == (full[..., 2] > 0).sum()
    zero, _ = load_cases(ds, ds.case_ids, axis=axis, normalization=Normalization(), interpolated_weight=0.0)
    assert len(SliceSampler(zero, patch_size=(24, 24))) == 4


@pytest.mark.parametrize("model", ["2d", "3d"])
def test_no_batch_holds_an_all_unknown_sample(phantoms, tmp_path, model):
    sparse = make_sparse(phantoms, tmp_path / "one", lambda n: [n // 2])  # one annotated slice per volume
    ds = discover_dataset(sparse)
    cases, _ = load_cases(ds, ds.case_ids, axis=2, normalization=Normalization())
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    if model == "2d":
        sampler = SliceSampler(cases, patch_size=(16, 16))  # crops smaller than the slices
        batches = list(sampler.epoch(200, 4, rng))
    else:
        sampler = BlockSampler(cases, patch_size=(16, 16, 4))
        batches = list(sampler.epoch(200, 4, rng))
    for batch in batches:
        for b in (batch, augment_batch(batch, axis=2 if model == "3d" else None, gen=gen)):
            known = (b.weight > 0).flatten(1).sum(1)
            assert torch.all(known > 0)
    if model == "3d":
        # the block's annotated slice carries exactly the known voxels
        for batch in batches[:10]:
            per_slice = (batch.weight > 0).sum((1, 2))
            assert torch.all((per_slice > 0).sum(1) == 1)
            assert torch.equal(batch.annotated > 0, batch.weight > 0)


def test_augmentation_identity_and_label_values():
    gen = torch.Generator().manual_seed(0)
    img = torch.randn(3, 1, 16, 12)
    lab = torch.randint(0, 3, (3, 16, 12))
    w = torch.ones(3, 16, 12)
    from sparseslice.train.data import Batch

    batch = Batch(img, lab, w, w.clone())
    off = AugmentSettings(p_flip=0, p_rotate=0, p_scale=0, p_intensity=0, p_noise=0)
    same = augment_batch(batch, axis=None, gen=gen, settings=off)
    assert torch.allclose(same.image, img, atol=1e-5) and torch.equal(same.label, lab)
    flip = AugmentSettings(p_flip=1, p_rotate=0, p_scale=0, p_intensity=0, p_noise=0)
    flipped = augment_batch(batch, axis=None, gen=gen, settings=flip)
    assert torch.equal(flipped.label, lab.flip(1, 2)) and torch.allclose(flipped.image, img.flip(2, 3), atol=1e-5)
    heavy = AugmentSettings(p_rotate=1, p_scale=1)
    out = augment_batch(batch, axis=None, gen=gen, settings=heavy)
    assert set(out.label.unique().tolist()) <= {0, 1, 2} and set(out.weight.unique().tolist()) <= {0.0, 1.0}
    assert torch.all(out.label[out.weight == 0] == 0)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_in_plane_resampling_equals_the_3d_grid_sample(axis):
    """3D patches are rotated and scaled slice by slice (2D grid_sample, nearest maps by row gathers):
    the same voxels as one trilinear/nearest 3D grid_sample call, mirrored slice axes included."""
    gen = torch.Generator().manual_seed(axis)
    shape = (20, 18, 10)
    image = torch.randn(6, 1, *shape, generator=gen)
    maps = torch.stack([torch.randint(0, 3, (6, *shape), generator=gen).float(),
                        torch.rand(6, *shape, generator=gen), torch.ones(6, *shape)], 1)
    theta = random_affine(6, shape, axis=axis, gen=gen,
                          settings=AugmentSettings(p_flip=0.5, p_rotate=1, p_scale=1, max_degrees=30))
    assert bool((theta[:, 2 - axis, 2 - axis] < 0).any()) and bool((theta[:, 2 - axis, 2 - axis] > 0).any())
    want_image, want_maps = resample(image, maps, theta)
    got_image, got_maps = resample_in_plane(image, maps, theta, axis=axis)
    assert torch.allclose(got_image, want_image, atol=1e-5)
    assert torch.equal(got_maps, want_maps)
    assert bool((want_maps[:, 2] == 0).any())  # some voxels came from outside the patch: unknown


def test_3d_augmentation_keeps_unknown_unknown():
    gen = torch.Generator().manual_seed(0)
    from sparseslice.train.data import Batch

    shape = (16, 14, 8)
    known = torch.zeros(4, *shape)
    known[..., 3] = 1  # one annotated slice
    label = (torch.rand(4, *shape, generator=gen) < 0.5).long() * known.long()
    batch = Batch(torch.randn(4, 1, *shape, generator=gen), label, known, known.clone())
    for _ in range(5):
        out = augment_batch(batch, axis=2, gen=gen, settings=AugmentSettings(p_rotate=1, p_scale=1))
        per_slice = (out.weight > 0).any(1).any(1)  # in-plane only: the known slice stays one slice (3, or 4 mirrored)
        assert torch.all(per_slice.sum(1) == 1) and not bool(per_slice[..., [0, 1, 2, 5, 6, 7]].any())
        assert torch.all(out.label[out.weight == 0] == 0) and bool((out.weight > 0).any())


def test_missing_class_warns_naming_it(phantoms, tmp_path):
    data = write_phantom_dataset(tmp_path / "one", cases=2, seed=0, shape=(24, 24, 12), n_labels=1)
    meta = json.loads((data / "dataset.json").read_text())
    (data / "dataset.json").write_text(json.dumps({**meta, "labels": {**meta["labels"], "2": "part2"}}))
    with pytest.warns(UserWarning) as record:  # class 2 is declared but never drawn
        train(data, tmp_path / "run", config=TrainConfig(epochs=1, samples_per_epoch=4, batch_size=4, **TINY),
              progress=False)
    messages = [str(w.message) for w in record]
    assert any("class 2 ('part2') has no annotated voxel" in m for m in messages)
    assert not any("class 1 " in m for m in messages)


# --- training -------------------------------------------------------------------------------

@pytest.mark.parametrize("model, extra", [
    ("2d", {"batch_size": 12, "samples_per_epoch": 24, "epochs": 30, "lr": 1e-2}),
    ("3d", {"batch_size": 2, "samples_per_epoch": 4, "epochs": 30, "lr": 1e-2, "mask_channel": True}),
])
def test_overfits_a_tiny_phantom(tmp_path, model, extra):
    data = write_phantom_dataset(tmp_path / "one", cases=1, seed=0, shape=(24, 24, 12))
    result = train(data, tmp_path / "run", config=TrainConfig(model=model, **{**TINY, **extra}), progress=False)
    assert result.best_val_dice > 0.9
    net, ckpt = load_checkpoint(result.run_dir)
    assert ckpt.labels == (0, 1, 2) and ckpt.axis == 2 and ckpt.spec.mask_channel == extra.get("mask_channel", False)
    assert len(ckpt.patch_size) == (2 if model == "2d" else 3)
    assert ckpt.metrics["val_dice"] == pytest.approx(result.best_val_dice)
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["model"] == model and saved["axis"] == 2 and saved["normalization"] == "zscore"
    assert (result.run_dir / "history.csv").read_text().count("\n") == 31


def test_resume_continues_from_the_last_epoch(phantoms, tmp_path):
    sparse = make_sparse(phantoms, tmp_path / "sp", lambda n: list(range(1, n, 2)))
    cfg = TrainConfig(model="2d", batch_size=4, samples_per_epoch=8,
                      **{**TINY, "augment": True, "val_fraction": 0.5})
    straight = train(sparse, tmp_path / "a", config=cfg.updated(epochs=3), progress=False)
    train(sparse, tmp_path / "b", config=cfg.updated(epochs=2), progress=False)
    with pytest.raises(UserError, match="pass --resume"):
        train(sparse, tmp_path / "b", config=cfg.updated(epochs=3), progress=False)
    with pytest.raises(UserError, match="config lr differs"):
        train(sparse, tmp_path / "b", config=cfg.updated(epochs=3, lr=0.1), progress=False, resume=True)
    resumed = train(sparse, tmp_path / "b", config=cfg.updated(epochs=3), progress=False, resume=True)
    assert resumed.epochs == 3
    rows_a = (tmp_path / "a" / "history.csv").read_text().splitlines()
    rows_b = (tmp_path / "b" / "history.csv").read_text().splitlines()
    assert [r.split(",")[:5] for r in rows_a] == [r.split(",")[:5] for r in rows_b]  # same losses and Dice
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=False)["model"]
    if torch.cuda.is_available():  # GPU backward passes are not bit-reproducible; a fresh start is far off
        assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-2) for k in a)
    else:
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert straight.best_val_dice == pytest.approx(resumed.best_val_dice)


def test_prefetched_batches_train_exactly_like_inline_ones(phantoms, tmp_path):
    """The background thread (used on GPUs) draws the same batches in the same order."""
    sparse = make_sparse(phantoms, tmp_path / "sp", lambda n: list(range(1, n, 2)))
    cfg = TrainConfig(model="2d", batch_size=4, samples_per_epoch=12, epochs=2, device="cpu",
                      **{**TINY, "augment": True, "val_fraction": 0.5})
    train(sparse, tmp_path / "inline", config=cfg, progress=False)  # CPU: inline by default
    train(sparse, tmp_path / "ahead", config=cfg, progress=False, prefetch=True)
    a = torch.load(tmp_path / "inline" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "ahead" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failing_step_stops_the_prefetch_thread(phantoms, tmp_path, monkeypatch):
    import threading

    import sparseslice.train.trainer as trainer

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(trainer, "selective_loss", broken)
    try:
        train(phantoms, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=40, **TINY),
              progress=False, prefetch=True)
    except RuntimeError as exc:  # checked while the traceback (and the loop's frame) is still alive
        assert "out of memory" in str(exc)
        assert not any(t.name == "sparseslice-prefetch" for t in threading.enumerate())
    else:
        pytest.fail("the failing step did not raise")


def test_prefetch_keeps_order_raises_errors_and_stops_when_left():
    import threading

    from sparseslice.train.data import Batch, prefetch

    def source(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise ValueError("broken sample")
            drawn.append(i)
            yield Batch(torch.tensor(i), torch.tensor(0), torch.tensor(0), torch.tensor(0))

    drawn = []
    assert [int(b.image) for b in prefetch(source(7))] == list(range(7))
    drawn = []
    with pytest.raises(ValueError, match="broken sample"):
        list(prefetch(source(7, fail_at=3)))
    drawn = []
    for b in prefetch(source(1000), depth=2):
        if int(b.image) == 1:
            break
    assert not any(t.name == "sparseslice-prefetch" for t in threading.enumerate())  # stopped on leaving
    assert len(drawn) <= 2 + 2 + 1  # consumed, waiting in the queue, one being put


def test_prefetch_thread_sets_its_thread_count_once_and_leaves_the_callers():
    import threading

    from sparseslice.train.data import Batch, prefetch

    seen = []

    def transform(batch):
        seen.append(torch.get_num_threads())
        return batch

    torch.set_num_threads(2)
    try:
        source = (Batch(torch.tensor(i), torch.tensor(0), torch.tensor(0), torch.tensor(0)) for i in range(4))
        for _ in prefetch(source, transform=transform, threads=1):
            assert torch.get_num_threads() == 2  # the caller's own count
        assert seen == [1, 1, 1, 1]
        later = []  # a thread started afterwards inherits the caller's count, not the prefetch thread's
        thread = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        thread.start()
        thread.join()
        assert later == [2]
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("ahead", [False, True])
def test_augmentation_runs_on_one_thread_and_the_step_on_num_threads(phantoms, tmp_path, monkeypatch, ahead):
    import sparseslice.train.trainer as trainer
    from sparseslice.train.losses import selective_loss

    counts = {"augment": set(), "step": set()}

    def augment(*args, **kwargs):
        counts["augment"].add(torch.get_num_threads())
        return augment_batch(*args, **kwargs)

    def loss(*args, **kwargs):
        counts["step"].add(torch.get_num_threads())
        return selective_loss(*args, **kwargs)

    monkeypatch.setattr(trainer, "augment_batch", augment)
    monkeypatch.setattr(trainer, "selective_loss", loss)
    try:
        train(phantoms, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=6,
                                                             **{**TINY, "augment": True, "num_threads": 2}),
              progress=False, prefetch=ahead)
        assert counts == {"augment": {1}, "step": {2}} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_a_large_batch_augments_inline_on_num_threads(phantoms, tmp_path, monkeypatch):
    """From AUGMENT_THREADED_VOXELS voxels a batch (a 3D left-atrium batch), inline augmentation keeps
    the run's threads; a prefetching run (above) still augments on its one thread."""
    import sparseslice.train.trainer as trainer

    counts = set()

    def augment(*args, **kwargs):
        counts.add(torch.get_num_threads())
        return augment_batch(*args, **kwargs)

    monkeypatch.setattr(trainer, "augment_batch", augment)
    monkeypatch.setattr(trainer, "AUGMENT_THREADED_VOXELS", 1)  # every batch is large
    try:
        train(phantoms, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=6,
                                                             **{**TINY, "augment": True, "num_threads": 2}),
              progress=False, prefetch=False)
        assert counts == {2}
    finally:
        torch.set_num_threads(1)


def test_run_files_hold_only_tensors_and_plain_data(phantoms, tmp_path):
    cfg = TrainConfig(model="2d", batch_size=4, samples_per_epoch=4, epochs=1, schedule="two-step",
                      finetune_epochs=1, **TINY)
    train(phantoms, tmp_path / "run", config=cfg, progress=False)
    for name in ("best.pt", "last.pt"):  # no pickled objects: loadable without running code from the file
        assert isinstance(torch.load(tmp_path / "run" / name, weights_only=True), dict)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert last["state"]["phase"] == 2 and last["state"]["epoch"] == 2 and last["state"]["steps"] == 2


def test_train_state_round_trips_and_counts_steps_of_an_old_last_pt():
    from sparseslice.train.trainer import TrainState

    state = TrainState(epoch=2, phase=2, phase_start=1, best_dice=0.5, best_epoch=1, bad_epochs=1, elapsed=3.0,
                       history=[{"samples": 5}, {"samples": 3}], steps=3, samples_seen=8, cut_short=["early_stop"])
    assert TrainState.from_dict(json.loads(json.dumps(state.to_dict())), batch_size=4) == state
    old = {k: v for k, v in state.to_dict().items() if k not in ("steps", "samples_seen", "cut_short")}
    restored = TrainState.from_dict(old, batch_size=4)
    assert (restored.steps, restored.samples_seen, restored.cut_short) == (2 + 1, 8, [])


def test_checkpoint_files_refuse_pickled_objects(tmp_path):
    from sparseslice.model import load_plain, save_plain

    with pytest.raises(TypeError, match=r"payload\['extra'\]\['n'\] must be a tensor or plain data.*numpy"):
        save_plain(tmp_path / "a.pt", {"w": torch.zeros(2), "extra": {"n": np.float64(1.0)}})
    with pytest.raises(TypeError, match="Normalization"):
        save_plain(tmp_path / "a.pt", {"norm": Normalization()})
    assert not (tmp_path / "a.pt").exists()
    torch.save({"format": "sparseslice-checkpoint-1", "norm": Normalization()}, tmp_path / "b.pt")
    with pytest.raises(UserError, match="could not be read"):  # weights_only: the object is never unpickled
        load_checkpoint(tmp_path / "b.pt")
    save_plain(tmp_path / "c.pt", {"w": torch.ones(2), "rng": (3, (1, 2), None), "n": [1, 2.5, "x", True]})
    back = load_plain(tmp_path / "c.pt")
    assert torch.equal(back["w"], torch.ones(2)) and back["rng"] == (3, (1, 2), None)


def test_two_step_fine_tunes_from_best_with_restarts(phantoms, tmp_path):
    # also exercises bf16 autocast and channels-last memory format
    cfg = TrainConfig(model="2d", batch_size=4, samples_per_epoch=4, epochs=2, schedule="two-step",
                      finetune_epochs=4, restart_every=2, bf16=True, channels_last=True, **TINY)
    train(phantoms, tmp_path / "run", config=cfg, progress=False)
    rows = [r.split(",") for r in (tmp_path / "run" / "history.csv").read_text().splitlines()[1:]]
    assert [r[1] for r in rows] == ["1", "1", "2", "2", "2", "2"]
    lrs = [float(r[2]) for r in rows[2:]]
    assert lrs[0] == pytest.approx(1e-3) and lrs[1] < lrs[0] and lrs[2] == pytest.approx(1e-3)  # restart


def test_val_dir_dense_and_full_labels_with_ignore_value(phantoms, tmp_path):
    # a label file without sidecar holding 255 is decoded with the dataset slice axis
    sparse = make_sparse(phantoms, tmp_path / "sp", lambda n: [3, 6])
    for side in (sparse / "labelsTr").glob("*.sparse.json"):
        side.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = train(sparse, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=4, samples_per_epoch=4, **TINY),
                    val_dir=phantoms, progress=False)
    split = json.loads((res.run_dir / "split.json").read_text())
    assert split["val"] == discover_dataset(phantoms).case_ids and split["labels"] == [0, 1, 2]


# --- CLI ------------------------------------------------------------------------------------

def test_cli_train_and_errors(phantoms, tmp_path):
    from sparseslice.cli import app

    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("channels: [8, 16, 32]\nstrides: [2, 2]\nepochs: 1\nsamples_per_epoch: 4\nbatch_size: 4\n"
                   "num_threads: 1\n")
    ok = runner.invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "run"), "--config", str(cfg),
                             "--no-progress", "--lr", "0.002"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["lr"] == 0.002
    bad = tmp_path / "bad.yaml"
    bad.write_text("epoch: 3\n")
    res = runner.invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "r2"), "--config", str(bad)])
    assert res.exit_code == 2 and "did you mean 'epochs'" in res.output
    res = runner.invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "r3"), "--model", "4d"])
    assert res.exit_code == 2 and "model must be one of 2d, 3d" in res.output
    res = runner.invoke(app, ["train", str(phantoms), "-o", str(tmp_path / "run"), "--config", str(cfg)])
    assert res.exit_code == 2 and "--resume" in res.output


def test_label_on_another_grid_than_its_image_is_refused(phantoms, tmp_path):
    import nibabel as nib

    moved = make_sparse(phantoms, tmp_path / "sp", lambda n: [3, 6])
    case = discover_dataset(moved).cases[0]
    img = nib.load(case.label)
    affine = img.affine.copy()
    affine[:3, 3] += 5.0  # same shape, shifted origin: the label would land on the wrong anatomy
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), affine), case.label)
    with pytest.raises(UserError, match=rf"case '{case.case_id}': label affine must match the image"):
        train(moved, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=4, samples_per_epoch=4, **TINY),
              progress=False)


# --- nnU-Net's ignore label without sidecars ------------------------------------------------

def test_nnunet_ignore_label_is_unknown_never_a_class(tmp_path):
    from nnunet_fakes import IGNORE, PARTIAL, write_ignore_dataset
    from sparseslice.train.losses import selective_loss

    data = write_ignore_dataset(tmp_path / "nn")
    ds = discover_dataset(data)
    assert ds.ignore_value == IGNORE and ds.label_names == {0: "background", 1: "part1", 2: "part2"}
    cases, labels = load_cases(ds, ds.case_ids, axis=2, normalization=Normalization())
    assert labels == (0, 1, 2)
    raw = read_label(ds.cases[0].label).array
    case = cases[0]
    np.testing.assert_array_equal(case.voxel_weight(), (raw != IGNORE).astype(np.float32))
    assert PARTIAL in case.known_slices.tolist() and PARTIAL not in case.validation_slices.tolist()
    # a block covering the whole volume: its weights are 0 exactly at the ignore voxels, and so is the gradient
    sampler = BlockSampler(cases[:1], patch_size=raw.shape)
    batch = next(sampler.epoch(1, 1, np.random.default_rng(0)))
    np.testing.assert_array_equal(batch.weight[0].numpy(), (raw != IGNORE).astype(np.float32))
    logits = torch.randn(1, len(labels), *raw.shape, requires_grad=True)
    selective_loss(logits, batch.label, batch.weight).backward()
    grad = logits.grad.abs().sum(1)[0].numpy()
    assert np.all(grad[raw == IGNORE] == 0) and np.all(grad[raw != IGNORE] > 0)
    # 2D: the partly labelled slice is sampled with its ignored half at weight 0
    slices = SliceSampler(cases[:1], patch_size=raw.shape[:2])
    assert len(slices) == 3 and sorted(slices.stored(np.arange(3))[2].sum((1, 2)).tolist()) == [
        (raw[..., PARTIAL] != IGNORE).sum(), raw[..., 0].size, raw[..., 0].size]
    # one epoch of training: the model's outputs are the three real classes, not four
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = train(data, tmp_path / "run", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=2, **TINY),
                    progress=False)
    net, ckpt = load_checkpoint(res.run_dir)
    assert ckpt.labels == (0, 1, 2) and ckpt.spec.out_channels == 3
    assert json.loads((res.run_dir / "split.json").read_text())["labels"] == [0, 1, 2]


@pytest.mark.parametrize("native", [True, False])
def test_bf16_defaults_to_what_the_device_computes_natively_and_is_recorded(phantoms, tmp_path, monkeypatch, native):
    from sparseslice.train import trainer

    monkeypatch.setattr(trainer, "native_bf16", lambda device: native)
    res = train(phantoms, tmp_path / "auto", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=2, **TINY),
                progress=False)
    stored = json.loads((res.run_dir / "config.json").read_text())
    assert stored["bf16"] is native and stored["channels_last"] is True
    off = train(phantoms, tmp_path / "off", config=TrainConfig(epochs=1, batch_size=2, samples_per_epoch=2, bf16=False,
                                                                **TINY), progress=False)
    assert json.loads((off.run_dir / "config.json").read_text())["bf16"] is False


def test_native_bf16_follows_the_cpu_flags(monkeypatch):
    from sparseslice.model import native_bf16

    for avx512_bf16, amx, want in [(True, False, True), (False, True, True), (False, False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert native_bf16(torch.device("cpu")) is want
    assert native_bf16(torch.device("meta")) is False


@pytest.mark.parametrize("spatial", [(12, 10, 8), (9, 14, 11)])
def test_mirrored_only_samples_are_flipped_as_grid_sample_would(spatial):
    """A batch mixing rotated/scaled samples and only mirrored ones (the defaults) equals resampling every
    sample with its affine grid: images to float rounding, labels, weights and masks exactly."""
    from sparseslice.train.augment import random_affine, resample
    from sparseslice.train.data import Batch

    n, axis = 12, (None if len(spatial) == 2 else 2)
    g = torch.Generator().manual_seed(3)
    img = torch.randn(n, 1, *spatial, generator=g)
    lab = torch.randint(0, 3, (n, *spatial), generator=g)
    w = (torch.rand(n, *spatial, generator=g) > 0.3).float()
    quiet = AugmentSettings(p_intensity=0, p_noise=0)
    out = augment_batch(Batch(img, lab, w, w.clone()), axis=axis, gen=torch.Generator().manual_seed(5), settings=quiet)
    theta = random_affine(n, spatial, axis=axis, settings=quiet, gen=torch.Generator().manual_seed(5))
    warped = (theta[:, :, :-1].abs() != torch.eye(len(spatial))).any(dim=(1, 2))
    assert 0 < int(warped.sum()) < n  # both kinds in the batch
    want_img, want_maps = resample(img, torch.stack([lab.float(), w, w], 1), theta)
    torch.testing.assert_close(out.image, want_img, rtol=0, atol=1e-5)
    assert torch.equal(out.label, want_maps[:, 0].round().long()) and torch.equal(out.weight, want_maps[:, 1])
    assert torch.equal(out.annotated, want_maps[:, 2])


def test_the_default_2d_depth_follows_the_slices(tmp_path):
    """Unset channels: nnU-Net's rule in 2D (halve while the smaller side stays >= 4 voxels, 2 to 5
    levels), 4 levels in 3D; strides alone set the depth; the resolved network is in config.json."""
    from sparseslice.train.config import default_levels

    assert default_levels("2d", (160, 112)) == 5  # left atrium slices: 112 -> 7 at the fifth level
    assert default_levels("2d", (50, 48)) == 4  # hippocampus: 48 -> 6, one more would give 3
    assert default_levels("2d", (24, 31)) == 3 and default_levels("2d", (5, 5)) == 2
    assert default_levels("3d", (512, 512)) == 4
    assert TrainConfig(strides=(2, 2)).network() == ((16, 32, 64), (2, 2))
    assert TrainConfig(channels=(8, 16)).network() == ((8, 16), (2,))
    data = write_phantom_dataset(tmp_path / "one", cases=2, seed=0, shape=(24, 24, 12))
    config = TrainConfig(epochs=1, samples_per_epoch=4, batch_size=4, augment=False, num_threads=1)
    run = train(data, tmp_path / "run", config=config, progress=False)
    saved = json.loads((run.run_dir / "config.json").read_text())
    assert (saved["channels"], saved["strides"]) == ([16, 32, 64], [2, 2])
    _, ckpt = load_checkpoint(run.run_dir)
    assert ckpt.spec.channels == (16, 32, 64)
