"""Apply a plan to a fully labelled dataset: the sparse labels a real annotator would produce.

The output is a *sparse dataset* that :func:`~sparseslice.datasets.discover_dataset` reads::

    out/imagesTr/<case>.nii.gz         one 4D file when the case has channels (MSD's convention, as
                                       BraTS); nnU-Net: <case>_0000.nii.gz, one file per channel
    out/labelsTr/<case>.nii.gz         ignore-encoded label (planned slices true, the rest ignored)
    out/labelsTr/<case>.sparse.json    sidecar: axis, annotated/border/drawn slices, extent
    out/dataset.json                   written last: its presence means the folder is complete
    out/plan.json, out/plan.csv        the plan that produced it

Images are absolute symbolic links to the originals by default (no copy of large CT data;
the dataset stays valid while the originals stay where they are); ``copy_images=True``
copies them instead. Images not stored as ``.nii.gz`` are converted. Simulating again into
the same folder replaces the earlier simulation (the files its marker lists,
:mod:`sparseslice.outputs`); any other folder that is not empty, and a folder that is, holds or
lies inside the source dataset, is refused.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from sparseslice.atomic import atomic_path, write_json
from sparseslice.datasets import Case, Dataset, load_image
from sparseslice.errors import UserError
from sparseslice.io import Header, Volume, check_same_space, read_header, read_label, volume_suffix, write_volume
from sparseslice.outputs import OutputFolder, claim_output, dataset_inputs
from sparseslice.progress import track
from sparseslice.select.plan import Plan, PlanEntry
from sparseslice.select.worklist import write_plan
from sparseslice.sparse import DEFAULT_IGNORE_VALUE, SIDECAR_SUFFIX, SparseLabel, extent_of, write_sparse

FORMATS = ("msd", "nnunet")
UNKNOWN_MODALITY = "unknown"  # channel name when neither --modality nor the source's dataset.json gives one


def check_plan(plan: Plan, dataset: Dataset) -> None:
    """Refuse a plan naming a case the dataset lacks or a slice outside its volume."""
    known = set(dataset.case_ids)
    for e in plan.entries:
        if e.case_id not in known:
            raise UserError(f"plan names case {e.case_id!r}, which is not in the dataset {str(dataset.root)!r}; "
                            "pass the dataset the plan was made for")
        shape = read_header(dataset.case(e.case_id).images[0]).shape[:3]
        n = shape[e.axis]
        if n != e.n_slices or (e.slices and max(e.slices) >= n):
            raise UserError(f"plan slices for case {e.case_id!r} lie outside the volume, got n_slices "
                            f"{e.n_slices} and slices up to {max(e.slices, default=-1)} for {n} slices along axis "
                            f"{e.axis}; make the plan for this dataset")


def label_values(dataset: Dataset, cases: Sequence[str]) -> list[int]:
    """Label values of a dataset: from ``dataset.json`` when it names them, else read from the labels."""
    if dataset.label_names:
        return sorted(dataset.label_names)
    values: set[int] = {0}
    for cid in cases:
        values.update(int(v) for v in np.unique(read_label(dataset.case(cid).label).array))
    return sorted(values)


def nnunet_ignore_value(values: Sequence[int]) -> int:
    """nnU-Net v2's ignore label for labels ``values``: the next integer after the highest.

    nnU-Net requires the ignore label to be the highest label value and all values,
    ignore included, to be consecutive (``verify_dataset_integrity`` checks
    ``0, 1, 2, ...``), so for labels 0, 1, 2 it is 3.

    Examples
    --------
    >>> nnunet_ignore_value([0, 1, 2])
    3
    """
    vals = sorted(set(int(v) for v in values) | {0})
    if vals != list(range(len(vals))):
        raise UserError(f"labels must be consecutive (0, 1, 2, ...) for an nnU-Net export, got {vals}; "
                        "relabel the dataset first or use format='msd'")
    return len(vals)


def simulate(dataset: Dataset, plan: Plan, out: Path, *, format: str = "msd", border_slices: bool = False,
             ignore_value: int = DEFAULT_IGNORE_VALUE, copy_images: bool = False,
             modality: Sequence[str] | None = None, progress: bool = False) -> Path:
    """Write the sparse dataset produced by annotating ``plan`` on ``dataset``'s full labels.

    Parameters
    ----------
    dataset : Dataset
        Fully labelled source.
    plan : Plan
        From :func:`~sparseslice.select.make_plan` or :func:`~sparseslice.select.read_plan`.
    out : Path
        Output folder; only planned cases are written.
    format : {"msd", "nnunet"}
        ``msd``: MSD layout, ``dataset.json`` with ``"labels": {"0": "background", ...}`` and
        the ignore value under ``"sparse"``; a case with several channel files gets one 4D
        image (channels last, as MSD's BraTS and Prostate; ``"tensorImageSize": "4D"``), which
        MONAI's ``load_decathlon_datalist`` + ``LoadImaged`` read as one multi-channel image.
        ``nnunet``: nnU-Net v2 raw dataset (images
        ``<case>_0000.nii.gz``, ``channel_names``, ``labels`` name -> value with ``"ignore"``).
    border_slices : bool
        Also mark the slices outside the structure's extent as annotated background (free of
        drawing cost, Specktor-Fadida et al.). The extent is the true label's (the
        annotator's two clicks). Without border slices the sidecar's ``extent`` is the
        plan's, when the plan has one.
    ignore_value : int
        Value of unknown voxels (default 255, nnU-Net's convention for sparse labels). For
        ``nnunet`` nnU-Net requires the value after the highest label (3 for labels 0, 1, 2);
        the default is replaced by it and any other value is refused.
    copy_images : bool
        Copy images instead of linking them (absolute symbolic links by default).
    modality : sequence of str, optional
        Channel names, one for all channels or one per channel (MSD ``modality``, nnU-Net
        ``channel_names``: nnU-Net normalises ``CT`` by intensity percentiles and any other
        name by z-score). Default: the source ``dataset.json``'s, else ``"unknown"`` (with a
        warning for ``nnunet``; z-score, as nnU-Net does for MRI).
    progress : bool
        Show a progress bar.

    Returns
    -------
    Path
        ``out``.
    """
    if format not in FORMATS:
        raise UserError(f"format is unknown, got {format!r}; use one of {', '.join(FORMATS)}")
    out = Path(out)
    values, channels, ignore_value = _check_inputs(dataset, plan, format=format, ignore_value=ignore_value,
                                                   modality=modality)
    folder = claim_output(out, command="simulate", inputs=dataset_inputs(dataset), argument="out", exclusive=True)
    folder.clear()  # dataset.json (written last) goes first: the folder no longer looks complete
    cases = [_simulate_case(dataset.case(entry.case_id), entry, plan, folder, values=values, format=format,
                            border_slices=border_slices, ignore_value=ignore_value, copy_images=copy_images)
             for entry in track(plan.entries, "simulating", progress=progress)]
    _warn(cases, channels, format=format)
    folder.path("plan.csv")
    write_plan(plan, folder.path("plan.json"))
    training = [c.training for c in cases]
    write_json(folder.path("dataset.json"), sparse_dataset_json(dataset, plan, values, training, channels,
                                                                format=format, ignore_value=ignore_value,
                                                                border_slices=border_slices))
    return out


def _check_inputs(dataset: Dataset, plan: Plan, *, format: str, ignore_value: int,
                  modality: Sequence[str] | None) -> tuple[list[int], dict[str, str], int]:
    """Check the plan, labels and ignore value before writing; the label values, channels and ignore value."""
    check_plan(plan, dataset)
    cases = plan.case_ids
    for cid in cases:
        if dataset.case(cid).label is None:
            raise UserError(f"case {cid!r} has no label; simulate needs fully labelled cases")
    values = label_values(dataset, cases)
    channels = channel_names(dataset, cases, modality=modality)
    if format == "nnunet":
        needed = nnunet_ignore_value(values)
        if ignore_value not in (DEFAULT_IGNORE_VALUE, needed):
            raise UserError(f"ignore_value must be the value after the highest label for nnU-Net, got "
                            f"{ignore_value}; use {needed} (or leave the default)")
        ignore_value = needed
    elif ignore_value <= max(values):
        raise UserError(f"ignore_value must exceed every label value, got {ignore_value} with labels up to "
                        f"{max(values)}; use 255")
    return values, channels, ignore_value


@dataclass(frozen=True)
class _Simulated:
    """One case written: its ``dataset.json`` training entry and what the warnings report."""

    case_id: str
    training: dict[str, Any]
    wasted: str | None = None  # "<case> [slices]" drawn outside the extent, when border slices were free
    finer: bool = False  # annotated along an axis finer than another (nnU-Net 2d would slice that one)


def _simulate_case(case: Case, entry: PlanEntry, plan: Plan, folder: OutputFolder, *, values: list[int],
                   format: str, border_slices: bool, ignore_value: int, copy_images: bool) -> _Simulated:
    """Write one case's images, sparse label and sidecar."""
    label = read_label(case.label)
    head = read_header(case.images[0])
    check_same_space(head, label, name=case.case_id)
    extra_values = sorted(set(np.unique(label.array).tolist()) - set(values))
    if extra_values:
        raise UserError(f"case {case.case_id!r} holds label values {extra_values} that dataset.json does "
                        f"not declare ({values}); fix the label or dataset.json")
    sparse = SparseLabel.from_slices(label.array, entry.slices, axis=entry.axis)
    if entry.extent is not None:  # the plan's clicks are known to whoever trains on this
        sparse = replace(sparse, extent=entry.extent)
    wasted = None
    if border_slices:
        ext = extent_of(label.array, axis=entry.axis)
        if ext is not None:
            sparse = sparse.with_border_slices(ext)
            outside = [i for i in entry.slices if not ext[0] <= i <= ext[1]]
            if outside:
                wasted = f"{case.case_id} {outside}"
    label = on_image_header(label, head)
    order = nnunet_axis_order(entry.axis) if format == "nnunet" else (0, 1, 2)
    finer = False
    if order != (0, 1, 2):  # nnU-Net 2D slices along the last NIfTI axis: put the annotated one there
        sparse, label = _transposed(sparse, order), label.transposed(order)
        finer = _finer_than_another(head.spacing, entry.axis)
    images = write_case_images(case, folder, nnunet=format == "nnunet", copy=copy_images, order=order)
    label_path = folder.path(f"labelsTr/{case.case_id}.nii.gz")
    folder.path(f"labelsTr/{case.case_id}{SIDECAR_SUFFIX}")
    write_sparse(sparse, label_path, like=label, ignore_value=ignore_value,
                 extra={"case": case.case_id, "strategy": plan.strategy, "seed": plan.seed,
                        "plan_extent": list(entry.extent) if entry.extent else None,
                        "source_label": str(Path(case.label).resolve()),
                        **({"source_axis": entry.axis, "axis_order": list(order)}
                           if order != (0, 1, 2) else {})})
    training = {"image": f"./imagesTr/{images[0].name}" if format == "msd" or len(images) == 1
                else [f"./imagesTr/{p.name}" for p in images],
                "label": f"./labelsTr/{label_path.name}"}
    return _Simulated(case.case_id, training, wasted, finer)


def _warn(cases: list[_Simulated], channels: dict[str, str], *, format: str) -> None:
    """Warn (as :func:`simulate`'s caller) of finer axes, slices border slices gave for free, unknown modality."""
    finer = [c.case_id for c in cases if c.finer]
    wasted = [c.wasted for c in cases if c.wasted is not None]
    if finer:
        warnings.warn(f"{len(finer)} case(s) are annotated along an axis finer than another (e.g. {finer[0]}); "
                      "nnU-Net's 2d configuration slices along the coarsest axis, so train it with 3d_fullres "
                      "or plan along the coarsest axis", UserWarning, stacklevel=3)
    if wasted:
        warnings.warn(f"{len(wasted)} case(s) have drawn slices outside the structure extent, which border "
                      f"slices would have given for free (e.g. {wasted[0]}); plan with --extents so the "
                      "budget goes inside the structure", UserWarning, stacklevel=3)
    if format == "nnunet" and UNKNOWN_MODALITY in channels.values():
        warnings.warn("modality is not known (the source dataset.json names none): nnU-Net z-score normalises "
                      "every channel; pass --modality CT for CT", UserWarning, stacklevel=3)


def nnunet_axis_order(axis: int) -> tuple[int, int, int]:
    """Axis order that moves the annotated ``axis`` last, keeping the other two in cyclic order.

    nnU-Net v2 reads NIfTI through SimpleITK (array ``[k, j, i]``) and its 2d configuration
    slices along that array's first axis (after moving the coarsest axis first; ties keep
    it), i.e. along the last NIfTI axis. A cyclic order keeps the handedness of the grid.

    Examples
    --------
    >>> nnunet_axis_order(0), nnunet_axis_order(1), nnunet_axis_order(2)
    ((1, 2, 0), (2, 0, 1), (0, 1, 2))
    """
    return tuple((axis + 1 + k) % 3 for k in range(3))  # type: ignore[return-value]


def _transposed(sparse: SparseLabel, order: tuple[int, int, int]) -> SparseLabel:
    """``sparse`` with its arrays transposed by ``order``; its slice axis becomes ``order.index(axis)``."""
    return replace(sparse, label=np.ascontiguousarray(np.transpose(sparse.label, order)),
                   axis=order.index(sparse.axis))


def _finer_than_another(spacing: Sequence[float], axis: int) -> bool:
    """Whether ``axis`` has a smaller spacing than another axis (nnU-Net 2d would slice that one)."""
    return spacing[axis] < max(spacing) * (1 - 1e-3)


def on_image_header(label: Volume, head: Header) -> Volume:
    """``label`` carrying its image's NIfTI header (both transforms and codes), so it lands on the image.

    The affines already agree (checked); the image's qform may still differ from the
    label's, and ITK readers use it.
    """
    if head.geometry is None:
        return label
    return replace(label, geometry=head.geometry)


def write_case_images(case: Case, output: OutputFolder, *, nnunet: bool, copy: bool,
                  order: tuple[int, int, int] = (0, 1, 2)) -> list[Path]:
    """Link, copy or convert a case's image files; nnU-Net gets one ``_000c`` file per channel.

    Images are rewritten (with their own header) when converted, split or reordered by ``order``;
    each goes to ``imagesTr`` of ``output``, registered there first.
    """
    def folder_path(name: str) -> Path:
        return output.path(f"imagesTr/{name}")

    sources = list(case.images)
    if not nnunet and len(sources) > 1:  # MSD: one 4D image per case, channels last (BraTS, Prostate)
        target = folder_path(f"{case.case_id}.nii.gz")
        write_volume(load_image(case), target)
        return [target]
    if nnunet and len(sources) == 1:
        head = read_header(sources[0])
        if len(head.shape) == 4 and head.shape[3] > 1:  # one 4D file: split channels for nnU-Net
            image = load_image(case).transposed(order)
            targets = []
            for c in range(image.array.shape[3]):
                target = folder_path(f"{case.case_id}_{c:04d}.nii.gz")
                write_volume(image.like(np.ascontiguousarray(image.array[..., c])), target)
                targets.append(target)
            return targets
    several = nnunet or len(sources) > 1
    targets = []
    for c, src in enumerate(sources):
        name = f"{case.case_id}_{c:04d}.nii.gz" if several else f"{case.case_id}.nii.gz"
        target = folder_path(name)
        if volume_suffix(src) != ".nii.gz" or order != (0, 1, 2):
            from sparseslice.io import read_volume

            write_volume(read_volume(src).transposed(order), target)
        else:
            _link_or_copy(Path(src), target, copy=copy)
        targets.append(target)
    return targets


def _link_or_copy(src: Path, target: Path, *, copy: bool) -> None:
    with atomic_path(target) as tmp:
        if copy:
            shutil.copyfile(src, tmp)
            return
        tmp.unlink()
        try:
            os.symlink(src.resolve(), tmp)
        except OSError:  # file systems without symlinks: fall back to a copy
            shutil.copyfile(src, tmp)


def n_channels(case: Case) -> int:
    """Image channels of a case: its channel files, or the fourth axis of its one file (headers only)."""
    if len(case.images) > 1:
        return len(case.images)
    shape = read_header(case.images[0]).shape
    return int(shape[3]) if len(shape) == 4 else 1


def channel_names(dataset: Dataset, cases: Sequence[str], *, modality: Sequence[str] | None = None
                  ) -> dict[str, str]:
    """Channel index -> modality name for an export (MSD ``modality``, nnU-Net ``channel_names``).

    ``modality`` wins; else the source ``dataset.json``'s ``channel_names`` / ``modality``;
    else :data:`UNKNOWN_MODALITY`. One name stands for every channel; otherwise one per channel.
    """
    counts = sorted({n_channels(dataset.case(cid)) for cid in cases})
    if len(counts) > 1:
        raise UserError(f"cases must have the same number of image channels for one export, got {counts}; "
                        "plan cases of one kind")
    n = counts[0]
    if modality:
        names, origin = [str(m) for m in modality], "--modality"
    else:
        source = _source_json(dataset)
        given = source.get("channel_names") or source.get("modality") or {"0": UNKNOWN_MODALITY}
        names = [str(v) for _, v in sorted(given.items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))]
        origin = "the source dataset.json"
    if len(names) not in (1, n):
        raise UserError(f"modality must name one modality or one per channel ({n}), got {names} from {origin}; "
                        "repeat --modality once per channel, e.g. --modality T2 --modality ADC")
    return {str(c): names[0] if len(names) == 1 else names[c] for c in range(n)}


def _source_json(dataset: Dataset) -> dict[str, Any]:
    import json

    meta_path = Path(dataset.root) / "dataset.json"
    return json.loads(meta_path.read_text()) if meta_path.is_file() else {}


def sparse_dataset_json(dataset: Dataset, plan: Plan, values: list[int], training: list[dict],
                        channels: dict[str, str], *, format: str, ignore_value: int,
                        border_slices: bool) -> dict[str, Any]:
    """The ``dataset.json`` of a sparse dataset (MSD or nnU-Net v2 layout) made from ``plan`` on ``dataset``."""
    source = _source_json(dataset)
    names = {v: dataset.label_names.get(v, "background" if v == 0 else f"label{v}") for v in values}
    names[0] = "background"
    sparse = {"ignore_value": ignore_value, "axis": plan.axis, "strategy": plan.strategy, "seed": plan.seed,
              "budget": plan.budget, "volumes": plan.volumes, "rho": plan.rho, "border_slices": border_slices,
              "source": str(Path(dataset.root).resolve())}
    if format == "nnunet":  # every case was reordered so its annotated axis is the last (nnunet_axis_order)
        sparse.update(axis=2, source_axis=plan.axis)
    name = f"{source.get('name', Path(dataset.root).name)} sparse ({plan.strategy}, {plan.budget} slices)"
    if format == "nnunet":
        labels: dict[str, int] = {}
        for v in values:
            key = names[v] if names[v] not in labels else f"{names[v]}_{v}"
            labels[key] = v
        labels["ignore"] = ignore_value
        return {"channel_names": channels, "labels": labels, "numTraining": len(training),
                "file_ending": ".nii.gz", "name": name,
                "description": "sparse slice labels written by sparseslice simulate; 'ignore' marks unknown voxels",
                "sparse": sparse}
    return {"name": name, "description": "sparse slice labels written by sparseslice simulate; unknown voxels "
            f"hold {ignore_value}", "tensorImageSize": "3D" if len(channels) == 1 else "4D", "modality": channels,
            "labels": {str(v): names[v] for v in values}, "numTraining": len(training), "numTest": 0,
            "training": training, "test": [], "sparse": sparse}
