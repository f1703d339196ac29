"""Finding cases on disk: MSD / nnU-Net v2 raw layouts, folders of pairs, CSV lists.

A :class:`Case` names one subject: its image channels and, when it has one, its label.
Unlabelled pools are normal before annotation, so labels are optional unless a caller asks
for them with ``require_labels=True``.

What decides which files form a case, first rule that applies:

1. ``dataset.json`` lists the training pairs (MSD: ``"training": [{"image", "label"}]``):
   the list is the truth. Case ids are the label names (``amos_0001`` is a case, never
   channel 1 of ``amos``); an entry's ``image`` may be a list of channel files, and an image
   named ``<case>_0000`` (or listed as ``<case>`` while only ``<case>_0000``... exist, as in
   nnU-Net v1) brings its sibling channel files ``<case>_0001``...
2. ``dataset.json`` declares ``channel_names`` (nnU-Net v2 raw): every image file ends in a
   four-digit channel suffix and each case has exactly the declared channels.
3. Otherwise (no listing, e.g. an ``imagesTs`` folder) files are channels of one case only
   when every file has a four-digit suffix and every case has the same channels
   ``_0000`` ... ``_000k`` (``amos_0001``, ``amos_0002`` are two cases).
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparseslice.errors import UserError, unknown_choice
from sparseslice.io import (
    Volume,
    check_same_space,
    default_slice_axis,
    read_header,
    read_label,
    read_volume,
    strip_suffix,
    volume_suffix,
)

#: What :func:`load_image` does with NaN or infinite voxels: refuse the case, or read them as 0.
NONFINITE = ("error", "zero")
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
_LABEL_TAGS = ("_label", "_labels", "_seg", "_mask", "_gt", ".seg")
_IMAGE_DIRS = ("imagesTr", "images", "imgs", "image")
_LABEL_DIRS = ("labelsTr", "labels", "masks", "segs", "label")


@dataclass(frozen=True)
class Case:
    """One subject: image channels (nnU-Net ``_0000`` order) and an optional label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass(frozen=True)
class Dataset:
    """Cases found under ``root`` plus what ``dataset.json`` says about them (if present)."""

    root: Path
    cases: tuple[Case, ...]
    layout: str
    label_names: dict[int, str] = field(default_factory=dict)
    modality: str = "unknown"
    ignore_value: int | None = None
    """nnU-Net v2's ignore label (``dataset.json`` ``"labels": {"ignore": K}``): voxels equal to
    ``K`` are unknown, never a class. None when ``dataset.json`` declares none."""

    @property
    def case_ids(self) -> list[str]:
        return [c.case_id for c in self.cases]

    def case(self, case_id: str) -> Case:
        for c in self.cases:
            if c.case_id == case_id:
                return c
        known = ", ".join(self.case_ids[:5]) + (" ..." if len(self.cases) > 5 else "")
        raise UserError(f"case {case_id!r} is not in the dataset {str(self.root)!r}; "
                        f"known cases: {known}")

    @property
    def labelled(self) -> list[Case]:
        return [c for c in self.cases if c.label is not None]


def discover_dataset(path: str | os.PathLike[str], *, require_labels: bool = False) -> Dataset:
    """Find the cases of a dataset.

    ``path`` may be (a) an MSD / nnU-Net v2 raw folder (``imagesTr/``, optional
    ``labelsTr/`` and ``dataset.json``; channel suffixes ``_0000`` are grouped into one
    case), (b) a folder of image/label pairs, either in ``images/`` and ``labels/``
    sub-folders with matching names or side by side with a ``_label``/``_seg``/``_mask``
    tag, or (c) a CSV file with ``image`` and ``label`` columns (optional ``case``; paths
    relative to the CSV).

    Examples
    --------
    >>> ds = discover_dataset("../shared/data/msd-hippocampus")  # doctest: +SKIP
    >>> len(ds.cases), ds.layout  # doctest: +SKIP
    (260, 'msd')
    """
    root = Path(path)
    if not root.exists():
        raise UserError(f"data path {str(root)!r} does not exist; pass a dataset folder or CSV")
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise UserError(f"data path {str(root)!r} is a file but not a CSV; pass a dataset "
                            "folder or a CSV with image,label columns")
        ds = _from_csv(root)
    elif _read_meta(root).get("training"):
        ds = _from_listing(root, _read_meta(root))
    else:
        image_dir = next((root / d for d in _IMAGE_DIRS if (root / d).is_dir()), None)
        if image_dir is not None:
            label_dir = next((root / d for d in _LABEL_DIRS if (root / d).is_dir()), None)
            layout = "msd" if image_dir.name == "imagesTr" else "pairs"
            ds = _from_folders(root, image_dir, label_dir, layout)
        else:
            ds = _from_flat(root)
    if not ds.cases:
        raise UserError(f"data path {str(root)!r} holds no image files; pass a folder with "
                        f"imagesTr/ or images/, or volumes ending in .nii.gz/.nrrd/.mha")
    if require_labels:
        missing = [c.case_id for c in ds.cases if c.label is None]
        if missing:
            raise UserError(
                f"case {missing[0]!r} has an image but no label ({len(missing)} such cases); "
                "labels are required here: add them or remove those images"
            )
    return ds


def _volume_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and volume_suffix(p))


def _group_channels(files: list[Path], *, channels: int | None = None,
                    label_ids: Iterable[str] = ()) -> dict[str, list[Path]]:
    """Group files into cases by their ``_0000`` channel suffix, when the suffixes are channels.

    ``channels`` (nnU-Net's ``channel_names`` count) makes the suffix rule mandatory: each case
    must have exactly ``_0000`` ... ``_{channels-1:04d}``. Without it, files are grouped only
    when every case has the same channels ``_0000`` ... ``_000k`` and no label is named like
    an image file (``labelsTr/x_0000`` makes ``x_0000`` a case); otherwise each file is a case.
    """
    stems = [strip_suffix(f) for f in files]
    matches = [_CHANNEL.match(s) for s in stems]
    groups: dict[str, list[Path]] = {}
    if files and all(matches):
        for f, m in sorted(zip(files, matches, strict=True), key=lambda t: t[0].name):
            groups.setdefault(m.group("case"), []).append(f)
    if channels is not None:
        expected = [f"{c:04d}" for c in range(channels)]
        for f, m in zip(files, matches, strict=True):
            if m is None:
                raise UserError(f"image {f.name!r} has no channel suffix; dataset.json declares channel_names "
                                f"(nnU-Net layout), so name it <case>_0000{volume_suffix(f)}")
        for cid, fs in groups.items():
            found = [_CHANNEL.match(strip_suffix(f)).group("channel") for f in fs]
            if found != expected:
                raise UserError(f"case {cid!r} has channel files {found}, but dataset.json channel_names "
                                f"declares {channels} channel(s) {expected}; add or rename the channel files")
        return groups
    suffixes = {tuple(_CHANNEL.match(strip_suffix(f)).group("channel") for f in fs) for fs in groups.values()}
    if len(suffixes) == 1 and not set(stems) & set(label_ids):
        (found,) = suffixes
        if found == tuple(f"{c:04d}" for c in range(len(found))):
            return groups
    return {s: [f] for f, s in zip(files, stems, strict=True)}


def _read_meta(root: Path) -> dict:
    """``root/dataset.json`` as a dict ({} when absent)."""
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"file {str(meta_path)!r} is not valid JSON ({exc}); fix or remove it") from exc
    return meta if isinstance(meta, dict) else {}


def _read_dataset_json(root: Path) -> tuple[dict[int, str], str, int | None]:
    """Label names, modality and nnU-Net ignore value that ``root/dataset.json`` declares."""
    meta = _read_meta(root)
    names: dict[int, str] = {}
    labels = meta.get("labels", {})
    for k, v in labels.items():
        if str(k) == "ignore":  # nnU-Net v2's ignore label marks unknown voxels, it is not a class
            continue
        if isinstance(v, int | float) and not str(k).lstrip("-").isdigit():  # nnU-Net v2: name -> value
            names[int(v)] = str(k)
        elif str(k).lstrip("-").isdigit():  # MSD: "value" -> name
            names[int(k)] = str(v)
    modalities = meta.get("modality") or meta.get("channel_names") or {}
    modality = str(next(iter(modalities.values()), "unknown")) if modalities else "unknown"
    return names, modality, _ignore_value(labels, names, root / "dataset.json")


def _ignore_value(labels: dict, names: dict[int, str], path: Path) -> int | None:
    """nnU-Net v2's ``"ignore": K`` from dataset.json's labels, checked; None when absent."""
    if "ignore" not in labels:
        return None
    value = labels["ignore"]
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) or value < 0:
        raise UserError(f"file {str(path)!r}: labels.ignore must be a non-negative integer, got {value!r}; "
                        "give the label value that marks unknown voxels (nnU-Net: the highest value)")
    if int(value) in names:
        raise UserError(f"file {str(path)!r}: labels.ignore must differ from every class, got {int(value)} "
                        f"which is also {names[int(value)]!r}; give the ignore label its own value")
    return int(value)


def _channel_count(root: Path) -> int | None:
    """Number of channels nnU-Net's ``channel_names`` declares (None for other layouts)."""
    channels = _read_meta(root).get("channel_names")
    return len(channels) if isinstance(channels, dict) and channels else None


def _from_folders(root: Path, image_dir: Path, label_dir: Path | None, layout: str) -> Dataset:
    channels = _channel_count(root)
    labels = {}
    if label_dir is not None:
        labels = {strip_suffix(p): p for p in _volume_files(label_dir)}
    groups = _group_channels(_volume_files(image_dir), channels=channels, label_ids=labels)
    cases = tuple(Case(cid, tuple(files), labels.get(cid)) for cid, files in sorted(groups.items()))
    names, modality, ignore = _read_dataset_json(root)
    return Dataset(root, cases, layout, names, modality, ignore)


def _from_listing(root: Path, meta: dict) -> Dataset:
    """Cases exactly as dataset.json's ``training`` list names them (MSD, nnU-Net v1)."""
    where = str(root / "dataset.json")
    cases: list[Case] = []
    seen: set[str] = set()
    for n, entry in enumerate(meta["training"]):
        if not isinstance(entry, dict) or not entry.get("image"):
            raise UserError(f"file {where!r}: training entry {n} must be an object with an 'image', got "
                            f"{entry!r}; list pairs as {{\"image\": ..., \"label\": ...}}")
        listed = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        images = [_resolve(root, str(p)) for p in listed]
        label = _resolve(root, str(entry["label"])) if entry.get("label") else None
        cid = strip_suffix(label) if label is not None else strip_suffix(images[0])
        if len(images) == 1:
            images = _listed_channels(images[0], cid)
        if label is not None and not label.exists():
            label = None  # an image without its label, as in a folder pool: require_labels says so
        for p in images:
            if not p.exists():
                raise UserError(f"file {where!r}: training entry {n} names {str(p)!r}, which does not exist; "
                                "fix dataset.json or the file (paths are relative to dataset.json's folder)")
        if cid in seen:
            raise UserError(f"file {where!r}: case {cid!r} is listed twice in training; list each case once")
        seen.add(cid)
        cases.append(Case(cid, tuple(images), label))
    names, modality, ignore = _read_dataset_json(root)
    return Dataset(root, tuple(sorted(cases, key=lambda c: c.case_id)), "msd", names, modality, ignore)


def _listed_channels(image: Path, case_id: str) -> list[Path]:
    """The channel files of one listed image: itself, unless it is channel ``_0000`` of ``case_id``
    (then every ``<case_id>_dddd`` beside it) or absent while ``<stem>_0000`` exists (nnU-Net v1)."""
    suffix = volume_suffix(image) or ".nii.gz"
    stem = strip_suffix(image)
    if not image.exists():
        case_id, stem = stem, stem + "_0000"
    if stem != f"{case_id}_0000" or not (image.parent / f"{stem}{suffix}").exists():
        return [image]
    files = []
    for c in range(10000):
        p = image.parent / f"{case_id}_{c:04d}{suffix}"
        if not p.exists():
            break
        files.append(p)
    return files


def _from_flat(root: Path) -> Dataset:
    files = _volume_files(root)
    labels: dict[str, Path] = {}
    images: list[Path] = []
    for f in files:
        stem = strip_suffix(f)
        if f.name.lower().endswith(".seg.nrrd"):
            labels[stem] = f
            continue
        tag = next((t for t in _LABEL_TAGS if stem.lower().endswith(t)), None)
        if tag:
            labels[stem[: -len(tag)]] = f
        else:
            images.append(f)
    groups = _group_channels(images, channels=_channel_count(root), label_ids=labels)
    cases = tuple(Case(cid, tuple(fs), labels.get(cid)) for cid, fs in sorted(groups.items()))
    names, modality, ignore = _read_dataset_json(root)
    return Dataset(root, cases, "pairs", names, modality, ignore)


def _from_csv(path: Path) -> Dataset:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "image" not in rows[0]:
        raise UserError(f"CSV {str(path)!r} must have an 'image' column (and optional 'label', "
                        "'case'); add a header line image,label")
    cases = []
    seen: set[str] = set()
    for n, row in enumerate(rows, start=2):
        image_field = (row.get("image") or "").strip()
        if not image_field:
            raise UserError(f"CSV {str(path)!r} line {n}: image is empty; give an image path")
        images = tuple(_resolve(path.parent, p) for p in image_field.split(";"))
        label_field = (row.get("label") or "").strip()
        label = _resolve(path.parent, label_field) if label_field else None
        for p in (*images, *([label] if label else [])):
            if not p.exists():
                raise UserError(f"CSV {str(path)!r} line {n}: file {str(p)!r} does not exist; "
                                "fix the path (relative paths start at the CSV's folder)")
        cid = (row.get("case") or "").strip() or strip_suffix(images[0])
        if cid in seen:
            raise UserError(f"CSV {str(path)!r} line {n}: case {cid!r} appears twice; "
                            "give each row a unique case")
        seen.add(cid)
        cases.append(Case(cid, images, label))
    return Dataset(path, tuple(cases), "csv")


def _resolve(base: Path, value: str) -> Path:
    p = Path(value.strip())
    return p if p.is_absolute() else base / p


def load_image(case: Case, *, nonfinite: str = "error") -> Volume:
    """Read a case's image as a volume; several channels are stacked on a last axis.

    NaN or infinite voxels make every loss NaN and every prediction empty, so they are
    refused (``nonfinite="error"``, naming the case and the count) or read as 0
    (``nonfinite="zero"``).
    """
    if nonfinite not in NONFINITE:
        raise UserError(f"nonfinite must be one of {', '.join(NONFINITE)}, got {nonfinite!r}; e.g. nonfinite: error")
    vols = [_finite(read_volume(p), case.case_id, p, nonfinite=nonfinite) for p in case.images]
    first = vols[0]
    for p, v in zip(case.images[1:], vols[1:], strict=True):
        check_same_space(first, v, name=f"{case.case_id} channel {p.name}")
    if len(vols) == 1:
        return first
    return first.like(np.stack([v.array for v in vols], axis=-1))


def _finite(vol: Volume, case_id: str, path: Path, *, nonfinite: str) -> Volume:
    """``vol`` with its non-finite voxels refused or set to 0 (integer images pass as they are)."""
    if not np.issubdtype(vol.array.dtype, np.floating):
        return vol
    bad = ~np.isfinite(vol.array)
    count = int(np.count_nonzero(bad))
    if not count:
        return vol
    if nonfinite == "error":
        raise UserError(f"case {case_id!r} image {path.name!r} has {count} non-finite voxel(s) (NaN or inf); "
                        "fix the image, or read them as 0 with the train config key nonfinite: zero")
    return vol.like(np.where(bad, 0, vol.array).astype(vol.array.dtype, copy=False))


def load_label(case: Case, *, image: Volume | None = None) -> Volume:
    """Read a case's label, checked against its image's grid when ``image`` is given."""
    if case.label is None:
        raise UserError(f"case {case.case_id!r} has no label; labels are required here")
    label = read_label(case.label)
    if image is not None:
        check_same_space(image, label, name=case.case_id)
    return label


@dataclass(frozen=True)
class Split:
    """Disjoint train / validation / test case lists."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}


def split_cases(case_ids: list[str], *, seed: int, val: float = 0.1, test: float = 0.2,
                test_cases: Sequence[str] | None = None) -> Split:
    """Deterministic random split of case ids by ``seed``.

    The result depends only on the set of ids and the seed (ids are sorted first), so
    re-listing a folder in another order gives the same split. ``test_cases`` fixes the
    test cases (``test`` is then unused); validation cases (``val`` of all cases) are drawn
    from the others.

    Examples
    --------
    >>> s = split_cases([f"c{i}" for i in range(10)], seed=0)
    >>> len(s.train), len(s.val), len(s.test)
    (7, 1, 2)
    >>> split_cases([f"c{i}" for i in range(10)], seed=0, test_cases=["c8", "c9"]).test
    ('c8', 'c9')
    """
    if test_cases is not None:
        return _split_with_test_cases(case_ids, seed=seed, val=val, test_cases=test_cases)
    for name, frac in (("val", val), ("test", test)):
        if not 0 <= frac < 1:
            raise UserError(f"{name} must be a fraction in [0, 1), got {frac}; e.g. 0.1")
    if val + test >= 1:
        raise UserError(f"val + test must leave cases for training, got {val} + {test}; "
                        "lower them")
    ids = sorted(set(case_ids))
    order = np.random.default_rng(seed).permutation(len(ids))
    shuffled = [ids[i] for i in order]
    n_test = int(round(test * len(ids)))
    n_val = int(round(val * len(ids)))
    return Split(
        train=tuple(sorted(shuffled[n_test + n_val:])),
        val=tuple(sorted(shuffled[n_test:n_test + n_val])),
        test=tuple(sorted(shuffled[:n_test])),
    )


def _split_with_test_cases(case_ids: list[str], *, seed: int, val: float, test_cases: Sequence[str]) -> Split:
    ids = sorted(set(case_ids))
    test = sorted(set(test_cases))
    missing = [c for c in test if c not in ids]
    if missing:
        raise unknown_choice("test_cases", missing[0], ids, problem="must name cases of the dataset",
                             otherwise=f"e.g. test_cases: [{ids[-1]}]")
    rest = [c for c in ids if c not in set(test)]
    n_val = int(round(val * len(ids)))
    if len(rest) - n_val < 1:
        raise UserError(f"test_cases must leave cases for training, got {len(test)} of {len(ids)} cases "
                        f"(and {n_val} for validation); name fewer test cases")
    order = np.random.default_rng(seed).permutation(len(rest))
    shuffled = [rest[i] for i in order]
    return Split(train=tuple(sorted(shuffled[n_val:])), val=tuple(sorted(shuffled[:n_val])), test=tuple(test))


def slice_axis_of(paths: Iterable[str | os.PathLike[str]]) -> int:
    """The dataset slice axis of these volume files, from their headers only (no voxels read)."""
    headers = [read_header(p) for p in paths]
    if not headers:
        raise UserError("paths is empty, got no volume files; pass at least one image or label")
    return dataset_slice_axis([h.shape[:3] for h in headers], [h.spacing for h in headers])


def dataset_slice_axis(shapes: list[tuple[int, ...]], spacings: list[tuple[float, ...]]) -> int:
    """One slice axis for a whole dataset: the most common per-case default axis.

    A 2D model needs slices of one orientation, so a dataset gets a single axis; ties go to
    the lowest axis index.
    """
    votes = Counter(default_slice_axis(sp, sh) for sh, sp in zip(shapes, spacings, strict=True))
    top = max(votes.values())
    return min(a for a, n in votes.items() if n == top)
