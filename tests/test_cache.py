"""The on-disk cache of preprocessed training cases (issue 14): same batches as without it, read from
disk the second time, keyed by content and settings, and safe when a writer is killed mid-entry."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from batch_checks import assert_same_batches
from batch_checks import draw as draw_batches
from sparseslice.datasets import discover_dataset
from sparseslice.io import read_label, read_volume, write_volume
from sparseslice.locking import Holder
from sparseslice.model import Normalization
from sparseslice.sparse import SparseLabel, write_sparse
from sparseslice.synthetic import write_phantom_dataset
from sparseslice.train import TrainConfig, train
from sparseslice.train import cache as cache_module
from sparseslice.train import data as data_module
from sparseslice.train.cache import TMP_PREFIX, case_key, clean_stale, source_files
from sparseslice.train.data import BlockSampler, SliceSampler, load_cases

torch.set_num_threads(1)
SRC = Path(__file__).resolve().parents[1] / "src"
KW = {"axis": 2, "normalization": Normalization("zscore")}


@pytest.fixture(scope="module")
def sparse(tmp_path_factory):
    """Three phantoms of 20 slices annotated at a few slices (one interpolated slice each)."""
    root = tmp_path_factory.mktemp("cache-data")
    full = write_phantom_dataset(root / "full", cases=3, seed=2, shape=(22, 20, 20))
    return write_sparse_copy(full, root / "sparse")


def write_sparse_copy(full: Path, out: Path) -> object:
    ds = discover_dataset(full)
    (out / "imagesTr").mkdir(parents=True)
    for case, slices in zip(ds.cases, ([2, 15], [8, 10, 12], [9]), strict=True):
        label = read_label(case.label)
        shutil.copy(case.images[0], out / "imagesTr" / case.images[0].name)
        write_sparse(SparseLabel.from_slices(label.array, slices, axis=2), out / "labelsTr" / case.label.name,
                     like=label, extra={"interpolated": slices[1:2]})
    (out / "dataset.json").write_text((full / "dataset.json").read_text())
    return discover_dataset(out)


@pytest.fixture(scope="module")
def ignored(tmp_path_factory):
    """nnU-Net's ignore label with a partly labelled slice per case (the cache's partial.npy)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from nnunet_fakes import write_ignore_dataset

    return discover_dataset(write_ignore_dataset(tmp_path_factory.mktemp("ignore") / "ds", cases=2))


def entries(cache: Path) -> list[str]:
    """The cache's entries: folders named by a key (64 hex digits)."""
    if not cache.is_dir():
        return []
    return sorted(p.name for p in cache.iterdir() if p.is_dir() and len(p.name) == 64
                  and set(p.name) <= set("0123456789abcdef"))


def assert_same_cases(a: list, b: list) -> None:
    assert [c.case_id for c in a] == [c.case_id for c in b]
    for x, y in zip(a, b, strict=True):
        for name in ("image", "label", "slice_weight", "interpolated", "partial"):
            u, v = getattr(x, name), getattr(y, name)
            assert (u is None) == (v is None), name
            if u is not None:
                assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v), name
        assert (x.axis, x.full_shape, x.shape) == (y.axis, y.full_shape, y.shape)


def draw(sampler, seed: int) -> list:
    return draw_batches(sampler, seed, batches=5)


# --- same data, same batches ----------------------------------------------------------------------

@pytest.mark.parametrize("spacing", [None, (1.5, 1.25)])
@pytest.mark.parametrize("which", ["sparse", "ignored"])
def test_2d_batches_are_bit_identical_with_the_cache(request, tmp_path, which, spacing):
    ds = request.getfixturevalue(which)
    kw = {**KW, "spacing": spacing, "keep": 0}
    plain, labels = load_cases(ds, ds.case_ids, **kw)
    first, first_labels = load_cases(ds, ds.case_ids, cache=tmp_path / "c", **kw)  # built and written
    again, again_labels = load_cases(ds, ds.case_ids, cache=tmp_path / "c", **kw)  # read back
    assert labels == first_labels == again_labels
    assert len(entries(tmp_path / "c")) == len(ds.case_ids)
    assert all(isinstance(c.image, np.memmap) and not c.image.flags.writeable for c in again)
    if which == "ignored":
        assert all(c.partial is not None for c in again)  # partly labelled slices went through partial.npy
    for cases in (first, again):
        assert_same_cases(plain, cases)
        for patch in [(16, 16), (32, 24)]:
            assert_same_batches(draw(SliceSampler(plain, patch_size=patch), 0),
                                draw(SliceSampler(cases, patch_size=patch), 0))


@pytest.mark.parametrize("spacing", [None, (1.5, 1.25)])
@pytest.mark.parametrize("which", ["sparse", "ignored"])
def test_3d_batches_are_bit_identical_with_the_cache(request, tmp_path, which, spacing):
    ds = request.getfixturevalue(which)
    for patch in [(16, 16, 8), (16, 16, 32)]:  # the second is deeper than every case: the sampler pads
        kw = {**KW, "spacing": spacing, "keep": patch[2] - 1}
        plain, _ = load_cases(ds, ds.case_ids, **kw)
        load_cases(ds, ds.case_ids, cache=tmp_path / "c", **kw)
        cached, _ = load_cases(ds, ds.case_ids, cache=tmp_path / "c", **kw)
        assert_same_cases(plain, cached)
        for fg in (0.0, 0.5):
            a = BlockSampler(plain, patch_size=patch, foreground=fg, mask_as_inference=0.3)
            b = BlockSampler(cached, patch_size=patch, foreground=fg, mask_as_inference=0.3)
            if patch[2] == 8 and which == "sparse" and spacing is None:  # no padding: blocks read from the map
                assert all(isinstance(img, np.memmap) for img in b.images)
            assert_same_batches(draw(a, 1), draw(b, 1))
    assert all(not c.image.flags.writeable for c in cached)


# --- read from disk ---------------------------------------------------------------------------------

def test_a_second_load_reads_nothing_but_the_cache(sparse, tmp_path, monkeypatch):
    kw = {**KW, "spacing": (1.5, 1.25), "keep": 3}
    first, labels = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **kw)

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(data_module, "load_image", no_decoding)
    monkeypatch.setattr(data_module, "read_case_label", no_decoding)
    with pytest.raises(AssertionError, match="decoded"):  # the seam is the one load_cases uses
        load_cases(sparse, sparse.case_ids, **kw)
    again, again_labels = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **kw)
    assert again_labels == labels
    assert_same_cases(first, again)
    with pytest.raises(AssertionError, match="decoded"):  # other settings: another key, not in the cache
        load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **{**kw, "keep": 0})


def test_entries_hold_the_raw_label_values_and_the_lut_comes_after(sparse, tmp_path):
    load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **KW)
    meta = [json.loads((tmp_path / "c" / e / "meta.json").read_text()) for e in entries(tmp_path / "c")]
    assert sorted({v for m in meta for v in m["found"]}) == [0, 1, 2]
    # a run with another label list maps the same entries to other classes (here 1 <-> 2)
    cases, labels = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", labels=(0, 2, 1), **KW)
    plain, _ = load_cases(sparse, sparse.case_ids, labels=(0, 2, 1), **KW)
    default, _ = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **KW)
    assert labels == (0, 2, 1) and len(entries(tmp_path / "c")) == len(sparse.case_ids)
    assert_same_cases(plain, cases)
    swap = np.array([0, 2, 1], np.uint8)
    assert all(np.array_equal(c.label, swap[d.label]) for c, d in zip(cases, default, strict=True))


# --- keys -----------------------------------------------------------------------------------------

def test_the_key_changes_with_each_file_and_each_setting(sparse, tmp_path):
    copy = write_sparse_copy(Path(sparse.root).parent / "full", tmp_path / "copy")
    case = copy.cases[1]
    assert [role for role, _ in source_files(case)] == ["image0", "label", "sidecar"]
    params = {**KW, "interpolated_weight": 0.5, "nonfinite": "error", "spacing": None, "keep": None,
              "ignore_value": None}
    base = case_key(case, params)
    assert base == case_key(sparse.cases[1], params)  # the same bytes elsewhere: the same key
    changed = {"axis": 1, "normalization": Normalization("zscore", clip=(1.0, 99.0)), "interpolated_weight": 0.25,
               "nonfinite": "zero", "spacing": (1.5, 1.25), "keep": 0, "ignore_value": 3}
    keys = {case_key(case, {**params, k: v}) for k, v in changed.items()}
    assert len(keys) == len(changed) and base not in keys
    case.images[0].write_bytes(case.images[0].read_bytes())  # same content, new time: same key
    os.utime(case.images[0], (1, 1))
    assert case_key(case, params) == base
    image = read_volume(case.images[0])
    array = image.array.copy()
    array[0, 0, 0] += 1
    write_volume(image.like(array), case.images[0])
    assert case_key(case, params) != base
    sidecar = case.label.with_name(case.label.name.replace(".nii.gz", ".sparse.json"))
    before = case_key(case, params)
    record = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**record, "interpolated": []}))
    assert case_key(case, params) != before


def test_a_changed_file_is_a_miss_and_gives_the_new_arrays(sparse, tmp_path):
    copy = write_sparse_copy(Path(sparse.root).parent / "full", tmp_path / "copy")
    load_cases(copy, copy.case_ids, cache=tmp_path / "c", **KW)
    image = read_volume(copy.cases[0].images[0])
    write_volume(image.like(image.array * 2 + 5), copy.cases[0].images[0])
    cached, _ = load_cases(copy, copy.case_ids, cache=tmp_path / "c", **KW)
    plain, _ = load_cases(copy, copy.case_ids, **KW)
    assert_same_cases(plain, cached)
    assert len(entries(tmp_path / "c")) == len(copy.case_ids) + 1  # the old entry stays, unused


def test_detached_headers_hash_their_voxel_file(tmp_path):
    from sparseslice.train.cache import detached_data_files

    vol = read_volume(write_volume_for(tmp_path / "a.nii.gz"))
    header = write_volume(vol, tmp_path / "b.mhd")
    (data,) = detached_data_files(header)
    assert data.is_file() and data.parent == tmp_path and data != header
    (tmp_path / "list.mhd").write_text("NDims = 3\nElementDataFile = LIST\na.raw\n")
    assert detached_data_files(tmp_path / "list.mhd") is None  # never cached
    assert detached_data_files(tmp_path / "a.nii.gz") == []


def write_volume_for(path: Path) -> Path:
    from sparseslice.io import Volume

    return write_volume(Volume(np.arange(24, dtype=np.float32).reshape(2, 3, 4)), path)


# --- broken entries and killed writers ------------------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "shape", "meta"])
def test_a_damaged_entry_is_a_miss_and_is_rebuilt(sparse, tmp_path, damage):
    kw = {**KW, "keep": 0}
    plain, _ = load_cases(sparse, sparse.case_ids, **kw)
    load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **kw)
    entry = tmp_path / "c" / entries(tmp_path / "c")[0]
    if damage == "truncate":
        path = entry / "image.npy"
        path.write_bytes(path.read_bytes()[:-40])
    elif damage == "shape":
        meta = json.loads((entry / "meta.json").read_text())
        meta["arrays"]["image"]["shape"][1] += 1
        (entry / "meta.json").write_text(json.dumps(meta))
    else:
        (entry / "meta.json").write_text("{")
    again, _ = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **kw)
    assert_same_cases(plain, again)
    assert len(entries(tmp_path / "c")) == len(sparse.case_ids)
    meta = json.loads((entry / "meta.json").read_text())  # rebuilt: meta.json agrees with the arrays again
    assert list(np.load(entry / "image.npy", mmap_mode="r").shape) == meta["arrays"]["image"]["shape"]
    assert not [p for p in (tmp_path / "c").iterdir() if p.name.startswith(TMP_PREFIX)]
    third, _ = load_cases(sparse, sparse.case_ids, cache=tmp_path / "c", **kw)
    assert_same_cases(plain, third)


KILLED_WRITER = """
import functools, sys, time
from pathlib import Path
from sparseslice.datasets import discover_dataset
from sparseslice.model import Normalization
from sparseslice.train import cache
from sparseslice.train.data import load_cases

ready = Path(sys.argv[3])

def block(name):  # after the first file is written and synced: wait to be killed
    ready.write_text(name)
    time.sleep(600)

cache.write_entry = functools.partial(cache.write_entry, after_file=block)
ds = discover_dataset(sys.argv[1])
load_cases(ds, ds.case_ids[:1], axis=2, normalization=Normalization("zscore"), spacing=(1.5, 1.25),
           keep=0, cache=Path(sys.argv[2]))
"""


def test_a_writer_killed_mid_entry_leaves_no_entry_and_the_next_load_rebuilds(sparse, tmp_path):
    cache = tmp_path / "c"
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(sparse.root), str(cache), str(ready)],
                            env={**os.environ, "PYTHONPATH": str(SRC)})
    try:
        deadline = time.monotonic() + 300
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists() and ready.read_text() == "image", "the writer did not reach its first file"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    (tmp,) = [p for p in cache.iterdir()]
    assert tmp.name.startswith(TMP_PREFIX) and (tmp / "image.npy").is_file() and not (tmp / "meta.json").exists()
    assert entries(cache) == []
    # beside it, what the cleaner must leave: a live writer's folder, an unnamed one, a file of the user's
    live = cache / f"{TMP_PREFIX}live"
    live.mkdir()
    (live / cache_module.WRITER).write_text(json.dumps(asdict(Holder.me())))
    (cache / f"{TMP_PREFIX}unnamed").mkdir()
    (cache / "notes.txt").write_text("mine")

    kw = {**KW, "spacing": (1.5, 1.25), "keep": 0}
    cases, _ = load_cases(sparse, sparse.case_ids[:1], cache=cache, **kw)
    plain, _ = load_cases(sparse, sparse.case_ids[:1], **kw)
    assert_same_cases(plain, cases)
    assert isinstance(cases[0].image, np.memmap)
    assert not tmp.exists()  # its writer is gone: removed
    assert len(entries(cache)) == 1
    assert sorted(p.name for p in cache.iterdir()) == sorted([f"{TMP_PREFIX}live", f"{TMP_PREFIX}unnamed",
                                                             "notes.txt", *entries(cache)])
    assert clean_stale(cache) == []


def test_of_two_writers_the_second_discards_its_copy(sparse, tmp_path):
    kw = {**KW, "keep": 0}
    (case,) = load_cases(sparse, sparse.case_ids[:1], cache=tmp_path / "c", **kw)[0]
    (name,) = entries(tmp_path / "c")
    entry = tmp_path / "c" / name
    before = (entry / "image.npy").stat().st_ino
    prepared = cache_module.read_entry(entry, case_id=case.case_id)
    # a second process that built the same case writes it under the same key: the first entry stays
    assert cache_module.write_entry(tmp_path / "c", name, prepared) == entry
    assert (entry / "image.npy").stat().st_ino == before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [name]
    umask = os.umask(0)
    os.umask(umask)
    assert entry.stat().st_mode & 0o777 == 0o777 & ~umask  # not a private temporary folder: others may read it


# --- training -------------------------------------------------------------------------------------------

TINY = {"channels": (8, 16, 32), "strides": (2, 2), "num_res_units": 1, "num_threads": 1, "augment": False,
        "patience": 100, "device": "cpu"}


def losses(run: Path) -> list[list[str]]:
    with open(run / "history.csv", newline="") as fh:
        return [[r["epoch"], r["phase"], r["lr"], r["loss"], r["val_dice"], r["samples"]] for r in csv.DictReader(fh)]


@pytest.mark.parametrize("model", ["2d", "3d"])
def test_training_with_the_cache_gives_the_same_history(sparse, tmp_path, model):
    extra = {"patch_size": (16, 16, 8)} if model == "3d" else {}
    cfg = TrainConfig(model=model, epochs=2, batch_size=2, samples_per_epoch=4, val_fraction=0.34,
                      spacing=(1.5, 1.25), **TINY, **extra)
    train(sparse.root, tmp_path / "plain", config=cfg, progress=False)
    cached = cfg.updated(cache=str(tmp_path / "cache"))
    train(sparse.root, tmp_path / "cold", config=cached, progress=False)  # writes the entries
    n = len(entries(tmp_path / "cache"))
    assert n == len(sparse.case_ids)  # training and validation cases
    train(sparse.root, tmp_path / "warm", config=cached, progress=False)  # reads them
    assert len(entries(tmp_path / "cache")) == n
    assert losses(tmp_path / "plain") == losses(tmp_path / "cold") == losses(tmp_path / "warm")
    assert len(losses(tmp_path / "plain")) == 2


def test_a_cache_inside_the_dataset_is_refused(sparse, tmp_path):
    from sparseslice.errors import UserError

    with pytest.raises(UserError, match="cache .* lies inside the input"):
        train(sparse.root, tmp_path / "run", config=TrainConfig(cache=str(Path(sparse.root) / "cache"), **TINY),
              progress=False)
    assert not (Path(sparse.root) / "cache").exists()


def test_a_missing_file_is_refused_as_without_the_cache(sparse, tmp_path):
    from sparseslice.errors import UserError

    copy = write_sparse_copy(Path(sparse.root).parent / "full", tmp_path / "copy")
    copy.cases[0].images[0].unlink()
    with pytest.raises(UserError) as plain:
        load_cases(copy, copy.case_ids, **KW)
    with pytest.raises(UserError) as cached:
        load_cases(copy, copy.case_ids, cache=tmp_path / "c", **KW)
    assert str(cached.value) == str(plain.value) and "does not exist" in str(plain.value)
    assert entries(tmp_path / "c") == []
