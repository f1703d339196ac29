"""A tiny nnU-Net v2 raw dataset whose dataset.json declares an ignore label, and no sidecars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sparseslice.io import write_volume
from sparseslice.synthetic import make_phantom

IGNORE = 3  # nnU-Net: the value after the highest class (classes 0, 1, 2)
ANNOTATED = (3, 6)  # whole slices along axis 2
PARTIAL = 8  # the slice whose first half (axis 0) is ignored: partly labelled


def write_ignore_dataset(out: Path, *, cases: int = 2, shape: tuple[int, int, int] = (24, 24, 12),
                         axis: int = 2) -> Path:
    """nnU-Net v2 raw layout (``imagesTr/<case>_0000``, ``labelsTr``) with ``"ignore": 3``.

    Every case has slices ``ANNOTATED`` (along ``axis``; the spacing makes 2 the default axis)
    fully labelled, slice ``PARTIAL`` labelled on its second half only, and every other voxel
    is ``IGNORE``. The full labels are saved as ``full/<case>.nii.gz`` beside (for tests that
    need the truth).
    """
    out = Path(out)
    for n in range(cases):
        cid = f"case_{n:03d}"
        ph = make_phantom(shape, spacing=(1.0, 1.0, 2.5), n_labels=2, seed=n)
        sparse = np.full(shape, IGNORE, np.uint8)
        view, full = np.moveaxis(sparse, axis, -1), np.moveaxis(ph.label.array, axis, -1)
        for s in ANNOTATED:
            view[..., s] = full[..., s]
        half = view.shape[0] // 2
        view[half:, :, PARTIAL] = full[half:, :, PARTIAL]
        write_volume(ph.image, out / "imagesTr" / f"{cid}_0000.nii.gz")
        write_volume(ph.label.like(sparse), out / "labelsTr" / f"{cid}.nii.gz")
        write_volume(ph.label, out / "full" / f"{cid}.nii.gz")
    (out / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": {"background": 0, "part1": 1, "part2": 2, "ignore": IGNORE},
        "numTraining": cases, "file_ending": ".nii.gz"}))
    return out
