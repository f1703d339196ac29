"""Shared fixtures. Tests stay small; real data is read from ../shared when present.

Tests on real data skip, with the reason in the summary, when ../shared is absent; with
``SPARSESLICE_REQUIRE_DATA=1`` (set by ``.ci/run``) they fail instead, so CI cannot pass
without having run them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sparseslice.synthetic import write_phantom_dataset

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"
REQUIRE_DATA = "SPARSESLICE_REQUIRE_DATA"  # "1": a missing real dataset fails its tests instead of skipping them

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    """The real MSD hippocampus dataset (skips, or fails under ``SPARSESLICE_REQUIRE_DATA=1``, when absent)."""
    return real_dataset(HIPPOCAMPUS)


def real_dataset(root: Path) -> Path:
    """``root`` if it holds an MSD dataset (``imagesTr``); else skip the test saying so, or fail it when
    the environment requires real data."""
    if (root / "imagesTr").is_dir():
        return root
    why = f"real data not found: {root} has no imagesTr (put the datasets in ../shared/data beside the repository)"
    if os.environ.get(REQUIRE_DATA) == "1":
        pytest.fail(f"{why}; {REQUIRE_DATA}=1 requires it", pytrace=False)
    pytest.skip(f"{why}; {REQUIRE_DATA}=1 makes this a failure")


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small phantom cases in MSD layout (shared, read-only)."""
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out, cases=4, seed=0, shape=(32, 32, 12))
