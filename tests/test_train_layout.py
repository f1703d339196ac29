"""2D training cases are laid out slice-major (issue 14): same values, same batches, contiguous slices."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np

from sparseslice.datasets import discover_dataset
from sparseslice.model import Normalization
from sparseslice.train.data import SliceSampler, load_cases, slice_major, slice_of

sys.path.insert(0, str(Path(__file__).parent))
from batch_checks import assert_same_batches, draw  # noqa: E402


def test_slice_major_keeps_values_and_makes_each_slice_contiguous():
    a = np.random.default_rng(0).normal(size=(2, 5, 6, 7)).astype(np.float32)
    for axis in (1, 2, 3):
        b = slice_major(a, axis)
        assert b.shape == a.shape and np.array_equal(a, b) and not np.shares_memory(a, b)
        for k in (0, a.shape[axis] - 1):
            s = slice_of(b, k, axis=axis)
            assert s.flags.c_contiguous and np.array_equal(s, np.take(a, k, axis=axis))


def test_2d_cases_are_slice_major_and_give_the_batches_of_c_ordered_ones(phantom_dataset):
    ds = discover_dataset(phantom_dataset)
    kw = dict(axis=2, normalization=Normalization("zscore"))
    cases, _ = load_cases(ds, ds.case_ids, keep=0, **kw)
    whole, _ = load_cases(ds, ds.case_ids, **kw)  # 3D: every slice, C order
    for c in cases:
        assert slice_of(c.image, 0, axis=3).flags.c_contiguous and slice_of(c.label, 0, axis=2).flags.c_contiguous
    assert all(w.image.flags.c_contiguous for w in whole)
    c_ordered = [dataclasses.replace(c, image=np.ascontiguousarray(c.image), label=np.ascontiguousarray(c.label))
                 for c in cases]
    for patch in [(16, 16), (32, 40)]:
        assert_same_batches(draw(SliceSampler(cases, patch_size=patch), 0, batches=4),
                            draw(SliceSampler(c_ordered, patch_size=patch), 0, batches=4))
