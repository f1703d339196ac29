"""Shared fixtures. Tests stay small; real data is read from ../shared when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparseslice.synthetic import write_phantom_dataset

HIPPOCAMPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "msd-hippocampus"

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def hippocampus() -> Path:
    """The real MSD hippocampus dataset (skips when it is not beside the repository)."""
    if not (HIPPOCAMPUS / "imagesTr").is_dir():
        pytest.skip(f"real data not found at {HIPPOCAMPUS}")
    return HIPPOCAMPUS


@pytest.fixture(scope="session")
def phantom_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four small phantom cases in MSD layout (shared, read-only)."""
    out = tmp_path_factory.mktemp("phantoms")
    return write_phantom_dataset(out, cases=4, seed=0, shape=(32, 32, 12))
