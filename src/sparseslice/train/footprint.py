"""How much memory the training data will take, checked before reading it.

A dataset that does not fit in RAM would be read for minutes and then killed by the system
(nothing said, nothing saved). :func:`check_fits_memory` estimates, from headers and sidecars
only, what :func:`sparseslice.train.data.load_cases` will hold, and refuses up front, pointing
to the on-disk cache (``--cache``), whose memory-mapped images need not fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sparseslice.datasets import Dataset
from sparseslice.errors import UserError
from sparseslice.io import read_header
from sparseslice.resample import needs_resampling, resampled_shape
from sparseslice.sparse import read_sidecar
from sparseslice.train.data import kept_slices

#: Share of the available memory the training data may take (the network, batches and one case being
#: read need the rest).
MEMORY_SHARE = 0.8


def data_bytes(dataset: Dataset, case_ids: Sequence[str], *, axis: int, spacing: tuple[float, float] | None,
               keep: int | None) -> float:
    """Bytes :func:`~sparseslice.train.data.load_cases` holds for ``case_ids``: float32 images and uint8
    labels of the slices it keeps (``keep``, from the sidecars' annotated slices; a label without a
    sidecar counts whole), at the training ``spacing``."""
    total = 0.0
    for cid in case_ids:
        case = dataset.case(cid)
        head = read_header(case.images[0])
        shape = head.shape[:3]
        if needs_resampling(head.spacing, spacing, axis=axis):
            shape = resampled_shape(shape, head.spacing, spacing, axis=axis, name=f"case {cid!r}")
        channels = len(case.images) if len(case.images) > 1 else int(np.prod(head.shape[3:], dtype=int))
        slices = int(shape[axis])
        record = read_sidecar(case.label) if case.label is not None else None
        if record is not None and keep is not None:
            known = np.zeros(slices, bool)
            known[[i for i in record.get("annotated", []) if 0 <= i < slices]] = True
            kept = kept_slices(known, keep=keep)
            slices = slices if kept is None else len(kept)
        plane = float(np.prod(shape)) / shape[axis]
        total += plane * slices * (4 * channels + 1)
    return total


def available_bytes() -> float | None:
    """Memory the system can give this process now (Linux ``MemAvailable``; None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits_memory(needed: float, *, cases: int, available: float | None) -> None:
    """Refuse (:class:`UserError`) training data of ``needed`` bytes that does not fit ``available``.

    Examples
    --------
    >>> check_fits_memory(1e9, cases=10, available=8e9)
    >>> check_fits_memory(1e9, cases=10, available=None)  # unknown: not checked
    """
    if available is None or needed <= MEMORY_SHARE * available:
        return
    raise UserError(f"training data needs about {needed / 1e9:.1f} GB in memory ({cases} cases), more than "
                    f"{MEMORY_SHARE:.0%} of the {available / 1e9:.1f} GB available; pass --cache FOLDER to train "
                    "from memory-mapped arrays on disk, or train on fewer or sparser cases")
