"""Planning CT-sized volumes (issue 14): embeddings in bounded memory, the same features, BLAS threads limited."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

import sparseslice.select.allocation as allocation_module
import sparseslice.select.strategies as strategies_module
from sparseslice.datasets import discover_dataset
from sparseslice.select import make_plan
from sparseslice.select.allocation import default_volume_encoder
from sparseslice.select.plan import limited_blas
from sparseslice.select.strategies import default_slice_encoder


def ct_like(shape=(40, 36, 30), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=shape), 3)
    return (1000 * smooth / np.abs(smooth).max() + rng.normal(0, 20, shape)).astype(np.int16)


@pytest.mark.parametrize("axis", [0, 2])
def test_slice_features_do_not_depend_on_the_chunk(monkeypatch, axis):
    """Slices a few at a time give the features of the whole volume at once, bit for bit."""
    image = ct_like()
    whole = default_slice_encoder(image, axis)
    monkeypatch.setattr(strategies_module, "CHUNK_VOXELS", 1)  # one slice per chunk
    np.testing.assert_array_equal(default_slice_encoder(image, axis), whole)
    # and those of a float64 copy of the volume (what the encoder used to make)
    np.testing.assert_array_equal(default_slice_encoder(image.astype(np.float64), axis), whole)


def test_large_volume_embedding_matches_the_exact_one(monkeypatch):
    image = ct_like((48, 44, 40), seed=1)
    exact = default_volume_encoder(image)
    monkeypatch.setattr(allocation_module, "LARGE_VOLUME", 0)  # every volume takes the bounded-memory path
    lean = default_volume_encoder(image)
    assert lean.shape == exact.shape == (12**3,)
    assert np.corrcoef(lean, exact)[0, 1] > 0.999
    assert np.max(np.abs(lean - exact)) < 0.1 * np.std(exact)
    # channels are averaged the same way
    two = np.stack([image, image], axis=-1)
    np.testing.assert_allclose(default_volume_encoder(two), lean, atol=1e-9)


def test_plan_limits_blas_threads_inside_and_restores_them(phantom_dataset, monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads() -> list[int]:
        return [p["num_threads"] for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]

    before = blas_threads()
    if not before:
        pytest.skip("no BLAS library loaded that threadpoolctl sees")
    seen = []

    def encoder(image, axis):
        seen.extend(blas_threads())
        return default_slice_encoder(image, axis)

    make_plan(discover_dataset(phantom_dataset), budget=4, strategy="ual", seed=0, slice_encoder=encoder)
    assert seen and set(seen) == {1}
    assert blas_threads() == before
    with limited_blas(1):
        assert set(blas_threads()) == {1}


def reference_slice_encoder(image, axis, *, size=16, components=16):
    """The encoder as first written: a float64 copy of the whole volume, zoomed in one go."""
    arr = np.asarray(image, dtype=np.float64)
    arr = arr[..., None] if arr.ndim == 3 else arr
    arr = np.moveaxis(arr, axis, 0)
    q25, med, q75 = np.percentile(arr[::2, ::2, ::2], [25, 50, 75])
    arr = (arr - med) / max(q75 - q25, 1e-6)
    n, a, b, _ = arr.shape
    small = ndimage.zoom(arr, (1.0, size / a, size / b, 1.0), order=1, grid_mode=True, mode="nearest")
    rows = small.reshape(n, -1)
    rows = rows - rows.mean(axis=0, keepdims=True)
    evals, evecs = np.linalg.eigh(rows @ rows.T)
    top = np.argsort(evals)[::-1][:min(components, n)]
    return evecs[:, top] * np.sqrt(np.clip(evals[top], 0.0, None))


@pytest.mark.parametrize("shape", [(40, 36, 30), (35, 50, 36), (64, 64, 9), (10, 7, 12), (97, 61, 5), (33, 17, 40, 2)])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_features_read_only_what_the_zoom_reads_and_match_the_whole_volume_zoom(monkeypatch, shape, axis):
    """Normalising only the voxels the linear zoom reads gives the features of the whole float64 volume."""
    image = ct_like(shape[:3], seed=sum(shape))
    if len(shape) == 4:
        image = np.stack([image, -image // 2], axis=-1)
    want = reference_slice_encoder(image, axis)
    np.testing.assert_array_equal(default_slice_encoder(image, axis), want)
    np.testing.assert_array_equal(default_slice_encoder(image.astype(np.float32) / 7, axis),
                                  reference_slice_encoder(image.astype(np.float32) / 7, axis))
    monkeypatch.setattr(strategies_module, "CHUNK_VOXELS", 1)
    np.testing.assert_array_equal(default_slice_encoder(image, axis), want)


def test_zoom_reads_covers_every_voxel_the_zoom_reads():
    """Voxels outside zoom_reads set to NaN never reach the zoom's output."""
    from sparseslice.select.strategies import zoom_reads

    rng = np.random.default_rng(0)
    for length in (3, 10, 16, 17, 35, 50, 64, 97, 300, 512):
        for size in (4, 12, 16):
            x = rng.normal(size=length)
            keep = np.full(length, np.nan)
            keep[zoom_reads(length, size)] = x[zoom_reads(length, size)]
            zoom = dict(zoom=size / length, order=1, grid_mode=True, mode="nearest")
            np.testing.assert_array_equal(ndimage.zoom(keep, **zoom), ndimage.zoom(x, **zoom))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.uint16, np.int32, np.uint32, np.float32])
def test_robust_quartiles_are_numpys_float64_percentiles(dtype):
    from sparseslice.select.strategies import robust_quartiles

    info = np.iinfo(dtype) if np.dtype(dtype).kind in "iu" else np.finfo(dtype)
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 1000, 4097):
        sample = rng.uniform(float(info.min), float(info.max), n).astype(dtype)
        sample[: n // 3] = np.asarray(info.max, dtype)  # neighbours far apart
        want = np.percentile(sample.astype(np.float64), [25, 50, 75])
        assert robust_quartiles(sample) == tuple(float(v) for v in want)
