"""Fast fake run functions for the study engine tests (importable by worker processes)."""

from __future__ import annotations

import os
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd

from sparseslice.study.store import RunOutput

CASES = ("case_a", "case_b", "case_c", "case_d")
#: A 2 x 2 grid, two seeds and the demo preset: the engine's and the lock's tests' study (their runs are fakes).
ENGINE_SPEC = {
    "name": "t",
    "dataset": {"path": "/nonexistent/data", "split": {"seed": 0}},
    "grid": [{"budget": [12], "rho": [0.25, 0.5], "strategy": ["random", "interval"], "model": ["2d"]}],
    "seeds": [0, 1],
    "training": {"preset": "demo"},
}


def reported_study(spec: dict, out: Path, run_fn) -> Path:
    """Run the study ``spec`` with the fake ``run_fn`` into ``out`` and write its report; returns ``out``."""
    from sparseslice.study.orchestrate import run_study
    from sparseslice.study.report import write_report
    from sparseslice.study.spec import parse_spec

    run_study(parse_spec(spec), out, run_fn=run_fn, progress=False)
    write_report(out)
    return out


def fake_run(run, config, run_dir: Path) -> RunOutput:
    """Deterministic metrics from the run's factors: lower density and more volumes score higher."""
    rng = np.random.default_rng(zlib.crc32(run.run_id.encode()))
    if run.baseline:
        level = 0.9
    else:
        density = run.rho if run.rho is not None else (1 / run.volumes if run.volumes else 0.5)
        level = 0.85 - 0.3 * density - (0.03 if run.strategy == "ual" else 0.0)
        level += 0.02 if run.interpolation != "none" else 0.0
    rows = []
    for n, case in enumerate(CASES):
        for label in ("1", "2", "fg"):
            dice = float(np.clip(level + 0.02 * n + rng.normal(0, 0.01), 0, 1))
            rows += [(case, label, "dice", dice), (case, label, "hd95", 10 * (1 - dice)),
                     (case, label, "assd2d", 3 * (1 - dice))]
    (run_dir / "touched.txt").write_text(run.run_id)
    volumes = 10 if run.baseline else run.volumes or int(round(1 / (run.rho or 0.5)))
    info = {"n_volumes": volumes, "slices_per_volume": 12 if run.baseline else 12 / volumes}
    return RunOutput(pd.DataFrame(rows, columns=["case", "label", "metric", "value"]), info)


#: Test cases of :func:`per_label_run`: enough for a paired test over cases.
MANY_CASES = tuple(f"case_{n:02d}" for n in range(10))


def per_label_run(run, config, run_dir: Path) -> RunOutput:
    """Ten test cases in the integer-label schema (``label``, ``region``): label 1 scores like
    fake_run, lower density and more volumes better; label 2 stays near 0.3 in every sparse run
    (0.85 with full labels), a failing label that the foreground union (label 1 + 0.05) hides."""
    rng = np.random.default_rng(zlib.crc32(run.run_id.encode()))
    density = run.rho if run.rho is not None else (1 / run.volumes if run.volumes else 0.5)
    level = 0.9 if run.baseline else 0.85 - 0.3 * density - (0.03 if run.strategy == "ual" else 0.0) + (
        0.02 if run.interpolation != "none" else 0.0)
    rows = []
    for n, case in enumerate(MANY_CASES):
        one = float(np.clip(level + 0.01 * n + rng.normal(0, 0.005), 0, 1))
        two = float(np.clip((0.85 if run.baseline else 0.3) + 0.01 * n + rng.normal(0, 0.005), 0, 1))
        for label, region, dice in ((1, "label", one), (2, "label", two), (0, "foreground", min(one + 0.05, 1.0))):
            rows += [(case, label, region, "dice", dice), (case, label, region, "hd95", 10 * (1 - dice)),
                     (case, label, region, "assd2d", 3 * (1 - dice))]
    volumes = 10 if run.baseline else run.volumes or int(round(1 / (run.rho or 0.5)))
    info = {"n_volumes": volumes, "slices_per_volume": 12 if run.baseline else 12 / volumes}
    return RunOutput(pd.DataFrame(rows, columns=["case", "label", "region", "metric", "value"]), info)


def cut_short_run(run, config, run_dir: Path) -> RunOutput:
    """Like per_label_run, with the training facts real runs record; the interval runs with seed 1
    are cut short (fewer gradient steps than planned) and, for the test, score far better."""
    output = per_label_run(run, config, run_dir)
    short = run.strategy == "interval" and run.seed == 1
    steps = 60 if short else 100
    info = {**output.info, "gradient_steps": steps, "samples_seen": 4 * steps, "planned_steps": 100,
            "cut_short": short, "cut_short_reason": "max_minutes 0.5 reached" if short else ""}
    metrics = output.metrics.assign(value=output.metrics["value"] + (0.05 if short else 0.0))
    return RunOutput(metrics, info)


def crashing_run(run, config, run_dir: Path) -> RunOutput:
    """Like fake_run but the interval runs with seed 1 crash."""
    if run.strategy == "interval" and run.seed == 1:
        raise RuntimeError("simulated crash in training")
    return fake_run(run, config, run_dir)


#: Full labels of the fake baseline: foreground on slices FULL_SLICES along axis 2 of each volume.
FULL_VOLUMES, FULL_SLICES = 2, (1, 2, 3, 4)


def fake_history(level: float, epochs: int = 5) -> pd.DataFrame:
    """A run's ``history.csv``: loss falling, validation Dice rising towards ``level``."""
    epoch = np.arange(1, epochs + 1)
    return pd.DataFrame({"epoch": epoch, "phase": 1, "loss": 1.5 / epoch, "val_dice": level * (1 - 0.5 ** epoch)})


def fake_run_with_files(run, config, run_dir: Path) -> RunOutput:
    """Like fake_run, and writes what real runs leave for the report's figures: ``model/history.csv``,
    ``plan.json`` (sparse runs, with the time model's minutes) or ``full/labelsTr`` (baseline)."""
    import nibabel as nib

    from sparseslice.select import CostModel, Plan, PlanEntry, write_plan

    output = fake_run(run, config, run_dir)
    (run_dir / "model").mkdir()
    level = float(output.metrics.loc[output.metrics["metric"] == "dice", "value"].mean())
    fake_history(level).to_csv(run_dir / "model" / "history.csv", index=False)
    if run.baseline:
        (run_dir / "full" / "labelsTr").mkdir(parents=True)
        for n in range(FULL_VOLUMES):
            label = np.zeros((6, 6, 8), np.uint8)
            label[2:4, 2:4, list(FULL_SLICES)] = 1
            nib.save(nib.Nifti1Image(label, np.eye(4)), run_dir / "full" / "labelsTr" / f"train_{n}.nii.gz")
        return output
    groups = np.array_split(np.arange(run.budget), output.info["n_volumes"])
    entries = [PlanEntry(f"train_{n}", 2, tuple(range(len(g))), 12) for n, g in enumerate(groups)]
    minutes = CostModel().plan_cost([(e.slices, False) for e in entries])
    write_plan(Plan(entries, run.strategy, run.seed, run.budget, run.rho, len(entries), axis=2, minutes=minutes),
               run_dir / "plan.json")
    return output


def sleeping_run(run, config, run_dir: Path) -> RunOutput:
    """Writes its process id to ``STUDY/pids/<run_id>`` and sleeps for a minute (a run still training)."""
    pids = run_dir.parents[1] / "pids"
    pids.mkdir(exist_ok=True)
    (pids / run.run_id).write_text(str(os.getpid()))
    time.sleep(60)
    return fake_run(run, config, run_dir)
