"""One run of a study, end to end: plan, simulate, interpolate, train, predict, evaluate.

Each stage is the library function behind its CLI command; the run folder keeps what each
stage wrote::

    runs/<run_id>/plan.json, plan.csv      which slices of which training volumes
    runs/<run_id>/sparse/                  the simulated sparse dataset (images linked)
    runs/<run_id>/interpolated/            after interpolation (when the run interpolates)
    runs/<run_id>/model/                   config.json, history.csv, best.pt, last.pt
    runs/<run_id>/pred/                    test-set predictions
    runs/<run_id>/metrics.csv              test-set metrics (tidy)

Baseline runs (strategy ``full``) train on the full labels of every training case. The
split (train / validation / test) is the study's, the same for every run; validation uses
the full labels of the validation cases, test metrics the full labels of the test cases.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sparseslice.datasets import Dataset, Split, discover_dataset, split_cases
from sparseslice.errors import UserError
from sparseslice.study.spec import RunSpec, StudySpec, run_config
from sparseslice.study.store import METRIC_COLUMNS, RunOutput


def study_cases(dataset: Dataset, *, max_cases: int | None, seed: int) -> list[str]:
    """The labelled cases a study uses: all, or a seeded subset of ``max_cases``."""
    ids = sorted(c.case_id for c in dataset.labelled)
    if max_cases is not None and max_cases < len(ids):
        keep = np.random.default_rng(seed).permutation(len(ids))[:max_cases]
        ids = sorted(ids[i] for i in keep)
    return ids


def study_split(config: dict[str, Any]) -> tuple[Dataset, Split]:
    """The dataset and the train / validation / test split a run configuration names."""
    ds_conf = config["dataset"]
    if ds_conf["path"] is None:
        raise UserError("dataset.path is not set, got none; pass --data DATASET")
    dataset = discover_dataset(ds_conf["path"], require_labels=False)
    split = ds_conf["split"]
    ids = study_cases(dataset, max_cases=ds_conf.get("max_cases"), seed=split["seed"])
    if len(ids) < 3:
        raise UserError(f"dataset {ds_conf['path']!r} has too few labelled cases, got {len(ids)}; a study needs "
                        "at least 3 (train, validation, test)")
    return dataset, split_cases(ids, seed=split["seed"], val=split["val"], test=split.get("test", 0.0),
                                test_cases=split.get("test_cases"))


def preflight(spec: StudySpec) -> None:
    """Check a spec against its dataset before any run starts.

    Refuses volume counts above the training split, budgets that a density cannot spend
    on the training split, and training options :class:`~sparseslice.train.TrainConfig`
    does not know. Plans are made once per distinct (budget, density or volumes) with
    the cheap ``random`` (or ``block``) strategy.
    """
    from sparseslice.select import make_plan
    from sparseslice.train import TrainConfig

    runs = spec.runs()
    dataset, split = study_split(run_config(spec, runs[0], threads=1, executor="local"))
    n_train = len(split.train)
    checked: set[tuple[Any, ...]] = set()
    for run in runs:
        TrainConfig.from_dict(_train_options(spec.training_config(run), threads=1))
        if run.baseline:
            continue
        if run.volumes is not None and run.volumes > n_train:
            raise UserError(f"volumes asks for more volumes than the training split has, got {run.volumes} "
                            f"(training split: {n_train} of {len(split.train) + len(split.val) + len(split.test)} "
                            "cases); lower volumes, or lower dataset.split val/test")
        key = (run.budget, run.rho, run.volumes, run.block_fraction)
        if key in checked:
            continue
        checked.add(key)
        try:
            plan = make_plan(dataset, budget=run.budget, rho=run.rho, volumes=run.volumes,
                             strategy="block" if run.strategy == "block" else "random", seed=0,
                             axis=spec.dataset.axis, cases=list(split.train), block_fraction=run.block_fraction)
        except UserError as exc:
            raise UserError(f"run {run.run_id} cannot be planned on the {n_train} training cases: {exc}") from None
        if plan.volumes > n_train:
            raise UserError(f"budget needs more volumes than the training split has, got {plan.volumes} "
                            f"for budget {run.budget} (training split: {n_train}); lower the budget or raise rho")


def _train_options(options: dict[str, Any], *, threads: int) -> dict[str, Any]:
    return {**{k: v for k, v in options.items() if k != "preset"}, "num_threads": threads}


def link_cases(dataset: Dataset, cases: list[str] | tuple[str, ...], out: Path) -> Path:
    """A dataset folder (MSD layout) of symbolic links to some cases' images and labels."""
    for sub in ("imagesTr", "labelsTr"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    training = []
    for cid in cases:
        case = dataset.case(cid)
        images = []
        for n, image in enumerate(case.images):
            # nnU-Net channel names: grouped back to the case id whatever the source names were
            images.append(f"./imagesTr/{cid}_{n:04d}{_suffix(image)}")
            os.symlink(Path(image).resolve(), out / images[-1])
        entry = {"image": images if len(images) > 1 else images[0]}
        if case.label is not None:
            entry["label"] = f"./labelsTr/{cid}{_suffix(case.label)}"
            os.symlink(Path(case.label).resolve(), out / entry["label"])
        training.append(entry)
    meta = Path(dataset.root) / "dataset.json"
    if meta.is_file():  # the source's, listing the linked cases only (a listing is the truth for discovery)
        import json

        from sparseslice.atomic import write_json

        record = json.loads(meta.read_text())
        if "training" in record:
            record.update(training=training, numTraining=len(training))
        write_json(out / "dataset.json", record)
    return out


def _suffix(path: Path) -> str:
    from sparseslice.io import volume_suffix

    return volume_suffix(path) or ".nii.gz"


def run_pipeline(run: RunSpec, config: dict[str, Any], run_dir: Path) -> RunOutput:
    """Plan, simulate, interpolate, train, predict and evaluate one run in ``run_dir``.

    This is the default run function of :func:`~sparseslice.study.orchestrate.run_study`.
    """
    import torch

    from sparseslice.evaluate import evaluate_folder
    from sparseslice.predict import predict_folder
    from sparseslice.train import TrainConfig, train

    threads = int(config["execution"]["threads"])
    torch.set_num_threads(threads)
    dataset, split = study_split(config)
    axis = config["dataset"].get("axis")
    val_dir = link_cases(dataset, split.val, run_dir / "val") if split.val else None
    info: dict[str, Any] = {"n_train_cases": len(split.train), "n_val_cases": len(split.val),
                            "n_test_cases": len(split.test)}
    if run.baseline:
        train_dir = link_cases(dataset, split.train, run_dir / "full")
        info.update(n_volumes=len(split.train))
    else:
        train_dir, plan_info = _sparse_training_data(dataset, split, run, run_dir, axis=axis)
        info.update(plan_info)
    cfg = TrainConfig.from_dict(_train_options(config["training"], threads=threads))
    if axis is not None and cfg.axis is None:
        cfg = TrainConfig.from_dict({**cfg.to_dict(), "axis": axis})
    result = train(train_dir, run_dir / "model", config=cfg, val_dir=val_dir, progress=False)
    info.update(best_val_dice=round(float(result.best_val_dice), 4), epochs=int(result.epochs),
                train_seconds=round(float(result.seconds), 1), **training_facts(result))
    evaluation = config["evaluation"]
    predict_folder(run_dir / "model", dataset.root, run_dir / "pred", cases=list(split.test),
                   tta=evaluation["tta"], fill_holes=evaluation["fill_holes"],
                   largest_component=evaluation["largest_component"], device=cfg.device, progress=False)
    table = evaluate_folder(run_dir / "pred", dataset.root, cases=list(split.test), axis=axis, progress=False)
    table = table[table["metric"].isin(config["metrics"])]
    return RunOutput(table[METRIC_COLUMNS].reset_index(drop=True), info)


def training_facts(result: Any) -> dict[str, Any]:
    """What a run's training took against what it planned (:data:`~sparseslice.study.store.TRAINING_FACTS`)."""
    return {"gradient_steps": int(result.gradient_steps), "samples_seen": int(result.samples_seen),
            "planned_steps": int(result.planned_steps), "cut_short": bool(result.cut_short),
            "cut_short_reason": str(result.cut_short_reason)}


def _sparse_training_data(dataset: Dataset, split: Split, run: RunSpec, run_dir: Path, *,
                          axis: int | None) -> tuple[Path, dict[str, Any]]:
    from sparseslice.select import make_plan, write_plan
    from sparseslice.simulate import simulate

    extents = None
    if run.border_slices and run.strategy != "block":  # the annotator clicked the extent: plan inside it
        from sparseslice.select.plan import extents_from_labels, plan_axis

        train_ids = list(split.train)
        extents = extents_from_labels(dataset, axis=plan_axis(dataset, axis=axis, cases=train_ids), cases=train_ids)
    plan = make_plan(dataset, budget=run.budget, rho=run.rho, volumes=run.volumes, strategy=run.strategy,
                     seed=run.seed, axis=axis, cases=list(split.train), block_fraction=run.block_fraction,
                     extents=extents)
    write_plan(plan, run_dir / "plan.json")
    sparse_dir = simulate(dataset, plan, run_dir / "sparse", border_slices=run.border_slices)
    per_volume = [len(e.slices) for e in plan.entries]
    info = {"n_volumes": plan.volumes, "slices": int(sum(per_volume)),
            "slices_per_volume": round(float(np.mean(per_volume)), 2),
            "rho_effective": plan.rho_effective, "axis": plan.axis, "full_volumes": plan.full_volumes,
            "unspent": plan.unspent}
    if run.interpolation == "none":
        return sparse_dir, info
    from sparseslice.interpolate import interpolate_dataset

    return interpolate_dataset(sparse_dir, run_dir / "interpolated", method=run.interpolation), info
