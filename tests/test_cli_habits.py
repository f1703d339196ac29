"""CLI habits (issue 11): -h, help that keeps its defaults and lists choices, one-line choice
errors, --no-progress on every long command, uncut piped output, ``info --json``."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from sparseslice.cli import app
from sparseslice.interpolate import METHODS
from sparseslice.model import ARCHITECTURES
from sparseslice.select.allocation import VOLUME_SELECTIONS
from sparseslice.select.strategies import STRATEGIES
from sparseslice.simulate import FORMATS
from sparseslice.study.executors import EXECUTORS
from sparseslice.study.results import RESULTS_FORMATS
from sparseslice.train.config import MODELS, NORMALIZATIONS, SCHEDULES, TrainConfig

runner = CliRunner()
WIDE = {"COLUMNS": "250"}  # typer's help console reads it; the help box then never wraps a line


def command_paths() -> list[list[str]]:
    """Every command and group of the app, as argument lists ([] is the app itself)."""
    paths: list[list[str]] = []

    def walk(cmd, path: list[str]) -> None:
        paths.append(path)
        for name, sub in getattr(cmd, "commands", {}).items():
            walk(sub, [*path, name])

    walk(typer.main.get_command(app), [])
    return paths


def help_text(path: list[str]) -> str:
    result = runner.invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def option_line(text: str, flag: str) -> str:
    """The help line of one option (matched as a whole word)."""
    lines = [ln for ln in text.splitlines() if re.search(rf"(^|\s){re.escape(flag)}(\s|$)", ln)]
    assert lines, f"{flag} not in help:\n{text}"
    return lines[0]


def test_dash_h_is_help_everywhere():
    paths = command_paths()
    assert len(paths) >= 12  # app, 11 commands and the study group
    for path in paths:
        short = runner.invoke(app, [*path, "-h"], env=WIDE)
        assert short.exit_code == 0, (path, short.output)
        assert short.output == help_text(path), path


def test_train_help_shows_the_config_defaults():
    """'[default: 50]' was eaten as Rich markup; defaults come from TrainConfig itself."""
    text = help_text(["train"])
    cfg = TrainConfig()
    fields_by_name = {f.name: f for f in dataclasses.fields(TrainConfig)}
    expected = {"--epochs": cfg.epochs, "--lr": cfg.lr, "--model": cfg.model, "--schedule": cfg.schedule,
                "--arch": cfg.arch, "--normalization": cfg.normalization, "--seed": cfg.seed,
                "--patience": cfg.patience, "--val-fraction": cfg.val_fraction,
                "--interpolated-weight": cfg.interpolated_weight,
                "--channels": fields_by_name["channels"].metadata["unset"],
                "--augment": "augment" if cfg.augment else "no-augment",
                "--mask-channel": "mask-channel" if cfg.mask_channel else "no-mask-channel"}
    for flag, value in expected.items():
        assert f"[default: {value}]" in option_line(text, flag), (flag, option_line(text, flag))
    # brackets written in help text survive literally
    assert "[default: 16 (2d), 2 (3d)]" in option_line(text, "--batch-size")


def test_every_option_with_a_default_shows_it():
    root = typer.main.get_command(app)
    for path in command_paths():
        cmd = root
        for name in path:
            cmd = cmd.commands[name]
        if hasattr(cmd, "commands"):
            continue
        text = help_text(path)
        for param in cmd.params:
            if param.param_type_name != "option" or param.name == "help" or (
                    param.is_flag and not param.secondary_opts):  # plain switches such as --json: off
                continue
            line = option_line(text, param.opts[0])
            if param.default is not None and not param.required:
                assert "[default: " in line, (path, line)
            else:  # None means "not given": the help says what happens then
                assert "default" in line.lower() or "[required]" in line or param.name in (
                    "budget", "budget_hours", "rho", "volumes", "extents", "block_fraction", "config",
                    "patch_size", "max_minutes", "threads", "tta_axes", "out", "address", "data",
                ), (path, line)


CHOICES = [  # (command, option, registry, arguments the command needs)
    (["plan"], "--strategy", STRATEGIES, ["DATA"]),
    (["plan"], "--volume-selection", VOLUME_SELECTIONS, ["DATA"]),
    (["simulate"], "--format", FORMATS, ["DATA", "PLAN", "-o", "OUT"]),
    (["interpolate"], "--method", METHODS, ["SPARSE", "-o", "OUT"]),
    (["train"], "--model", MODELS, ["DATA", "-o", "OUT"]),
    (["train"], "--schedule", SCHEDULES, ["DATA", "-o", "OUT"]),
    (["train"], "--arch", ARCHITECTURES, ["DATA", "-o", "OUT"]),
    (["train"], "--normalization", NORMALIZATIONS, ["DATA", "-o", "OUT"]),
    (["study", "run"], "--executor", EXECUTORS, ["quick", "-o", "OUT"]),
    (["study", "run"], "--format", RESULTS_FORMATS, ["quick", "-o", "OUT"]),
]


@pytest.mark.parametrize(("path", "flag", "registry", "args"), CHOICES, ids=[f"{c[0][-1]}{c[1]}" for c in CHOICES])
def test_choice_options_list_their_registry_and_reject_typos_in_one_line(tmp_path, path, flag, registry, args):
    assert f"One of: {', '.join(registry)}." in option_line(help_text(path), flag)
    typo = registry[-1][:-1] + "x" if len(registry[-1]) > 2 else registry[-1] + "x"
    args = [str(tmp_path / a) if a.isupper() else a for a in args]
    result = runner.invoke(app, [*path, *args, flag, typo])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0] == (f"error: {flag} must be one of {', '.join(registry)}, got {typo!r}; "
                        f"did you mean {registry[-1]!r}?")
    assert not (tmp_path / "OUT").exists()


def test_choices_are_read_from_the_registry(monkeypatch):
    """One source of truth: a strategy added to the registry shows in help and is accepted."""
    import sparseslice.select.strategies as strategies

    monkeypatch.setattr(strategies, "STRATEGIES", (*STRATEGIES, "brand-new"))
    assert "brand-new." in option_line(help_text(["plan"]), "--strategy")


LONG = ["info", "plan", "simulate", "interpolate", "train", "predict", "evaluate", "study run", "demo"]


def test_no_progress_on_every_long_command():
    for name in LONG:
        line = option_line(help_text(name.split()), "--progress")
        assert "--no-progress" in line and "[default: progress]" in line, (name, line)
    source = (Path(__file__).parents[1] / "src" / "sparseslice" / "cli.py").read_text()
    assert source.count('"--progress/--no-progress"') == 1  # declared once


def test_piped_output_is_not_cut_at_80_columns(tmp_path):
    deep = tmp_path / ("a_rather_long_folder_name_" * 5) / "phantoms"
    assert runner.invoke(app, ["synth", str(deep), "--cases", "2"]).exit_code == 0
    result = runner.invoke(app, ["info", str(deep), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"{deep} (msd layout)" in result.output.splitlines()
    plan = deep.parent / "plan.json"
    result = runner.invoke(app, ["plan", str(deep), "--budget", "4", "-o", str(plan), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"wrote {plan} and {plan.with_suffix('.csv')}" in result.output.splitlines()


def _nib_facts(image: Path, label: Path, axis: int) -> dict:
    img, lab = nib.load(image), np.asarray(nib.load(label).dataobj)
    other = tuple(a for a in range(3) if a != axis)
    return {"shape": list(img.shape[:3]), "spacing": [round(float(z), 4) for z in img.header.get_zooms()[:3]],
            "labels": np.unique(lab).tolist(), "structure_slices": int(np.any(lab > 0, axis=other).sum()),
            "dtype": str(img.get_data_dtype())}


def test_info_json_agrees_with_nibabel(phantom_dataset):
    result = runner.invoke(app, ["info", str(phantom_dataset), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    meta = json.loads((phantom_dataset / "dataset.json").read_text())
    images = sorted((phantom_dataset / "imagesTr").glob("*.nii.gz"))
    assert record["layout"] == "msd" and record["n_cases"] == len(images) == record["n_labelled"]
    assert record["slice_axis"] == 2  # phantoms are 1 x 1 x 2.5 mm
    assert record["labels"] == {k: v for k, v in meta["labels"].items()}
    for case, image in zip(record["cases"], images, strict=True):
        assert case["case"] == image.name.removesuffix(".nii.gz")
        facts = _nib_facts(image, phantom_dataset / "labelsTr" / image.name, record["slice_axis"])
        assert {k: case[k] for k in facts} == facts
        assert case["channels"] == 1 and case["annotated_slices"] is None
    shapes = np.array([c["shape"] for c in record["cases"]])
    assert record["shape_min"] == shapes.min(0).tolist() and record["shape_max"] == shapes.max(0).tolist()
    sl = [c["structure_slices"] for c in record["cases"]]
    assert record["structure_slices"] == {"min": min(sl), "max": max(sl), "median": float(np.median(sl)),
                                          "total": sum(sl)}


def test_info_json_counts_annotated_slices_of_a_simulation(tmp_path, phantom_dataset):
    plan = tmp_path / "plan.json"
    assert runner.invoke(app, ["plan", str(phantom_dataset), "--budget", "6", "--volumes", "2",
                               "-o", str(plan), "--no-progress"]).exit_code == 0
    result = runner.invoke(app, ["simulate", str(phantom_dataset), str(plan), "-o", str(tmp_path / "sp"),
                                 "--no-progress"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(tmp_path / "sp"), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["n_sparse"] == 2 and record["annotated_slices"]["total"] == 6
    for case in record["cases"]:
        lab = np.asarray(nib.load(tmp_path / "sp" / "labelsTr" / f"{case['case']}.nii.gz").dataobj)
        free_of_unknown = int((lab != 255).all(axis=(0, 1)).sum())
        assert case["annotated_slices"] == free_of_unknown


def test_study_presets_are_listed_from_the_registry():
    from sparseslice.study.spec import PRESETS

    assert f"Presets: {', '.join(PRESETS)}." in help_text(["study", "run"])


def test_info_json_reads_a_declared_ignore_label(tmp_path):
    from nnunet_fakes import ANNOTATED, IGNORE, PARTIAL, write_ignore_dataset

    data = write_ignore_dataset(tmp_path / "nn")
    result = runner.invoke(app, ["info", str(data), "--json", "--no-progress"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["ignore_value"] == IGNORE and record["labels"].keys() == {"0", "1", "2"}
    for case in record["cases"]:
        lab = np.asarray(nib.load(data / "labelsTr" / f"{case['case']}.nii.gz").dataobj)
        free = np.flatnonzero(~(lab == IGNORE).any(axis=(0, 1))).tolist()
        assert case["annotated"] == free == list(ANNOTATED) and case["partial"] == [PARTIAL]
        assert case["annotated_slices"] == len(free)
