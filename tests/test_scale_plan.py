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
