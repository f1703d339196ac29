"""Training options are declared once, in :class:`TrainConfig`'s fields (issue 12): the ``train``
command's options, the defaults its help shows and README's option table come from them."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from types import SimpleNamespace

import pytest
import typer
from typer.testing import CliRunner

import sparseslice.train
from sparseslice.cli import Choices, app
from sparseslice.errors import UserError
from sparseslice.train.config import TrainConfig

runner = CliRunner()
README = Path(__file__).parents[1] / "README.md"
TABLE_START, TABLE_END = "<!-- train-options: start -->", "<!-- train-options: end -->"

#: For every field: what to type after its flag (None: a bool switch) and the value it must give.
NON_DEFAULT = {
    "model": ("3d", "3d"), "arch": ("dynunet", "dynunet"), "channels": ("8,16,32", (8, 16, 32)),
    "strides": ("2,2", (2, 2)), "num_res_units": ("2", 2), "dropout": ("0.1", 0.1), "epochs": ("3", 3),
    "samples_per_epoch": ("4", 4), "batch_size": ("3", 3), "patch_size": ("32x32x16", (32, 32, 16)),
    "spacing": ("1.25,1.5", (1.25, 1.5)), "max_inplane": ("96", 96), "foreground_fraction": ("0.5", 0.5),
    "lr": ("0.002", 0.002), "weight_decay": ("0.0001", 0.0001), "schedule": ("two-step", "two-step"),
    "plateau_patience": ("2", 2), "plateau_factor": ("0.25", 0.25), "restart_every": ("3", 3),
    "finetune_epochs": ("4", 4), "patience": ("5", 5), "mask_channel": (None, True),
    "interpolated_weight": ("0.25", 0.25), "dice_weight": ("0.5", 0.5), "ce_weight": ("2", 2.0),
    "normalization": ("ct", "ct"), "ct_window": ("-200,300", (-200.0, 300.0)), "axis": ("1", 1),
    "augment": (None, False), "val_fraction": ("0.2", 0.2), "seed": ("7", 7), "device": ("cpu", "cpu"),
    "val_share": ("0.5", 0.5),
    "num_threads": ("1", 1), "max_minutes": ("1.5", 1.5), "bf16": (None, True), "channels_last": (None, False),
    "nonfinite": ("zero", "zero"), "cache": ("cache-folder", "cache-folder"),
}


def train_params() -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands["train"].params}


def help_line(flag: str) -> str:
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output
    lines = [ln for ln in text.splitlines() if re.search(rf"(^|\s){re.escape(flag)}(\s|$)", ln)]
    assert lines, f"{flag} not in help:\n{text}"
    return lines[0]


def shown_default(field, param) -> str:
    """The default as help writes it: the flag of a bool, ``16,32`` for a tuple, what None means."""
    if field.default is None:
        return field.metadata["unset"]
    if isinstance(field.default, bool):
        return (param.opts if field.default else param.secondary_opts)[0].lstrip("-")
    if isinstance(field.default, tuple):
        return ",".join(map(str, field.default))
    return str(field.default)


def yaml_default(field) -> str:
    if field.default is None:
        return f"`null`: {field.metadata['unset']}"
    if isinstance(field.default, bool):
        return f"`{str(field.default).lower()}`"
    if isinstance(field.default, tuple):
        return f"`[{', '.join(map(str, field.default))}]`"
    return f"`{field.default}`"


def options_table() -> str:
    """README's table of training options, generated from the fields and the command's flags."""
    params = train_params()
    rows = ["| key | flag | default | meaning |", "|---|---|---|---|"]
    for field in fields(TrainConfig):
        param = params[field.name]
        flags = " / ".join(f"`{flag}`" for flag in (*param.opts, *param.secondary_opts))
        meaning = field.metadata["help"]
        if field.metadata["choices"]:
            meaning += f" One of: {', '.join(Choices(field.metadata['choices']).values())}."
        rows.append(f"| `{field.name}` | {flags} | {yaml_default(field)} | {meaning} |")
    return "\n".join(rows)


def test_every_field_is_a_train_option_whose_help_shows_the_dataclass_default():
    params = train_params()
    for field in fields(TrainConfig):
        assert field.name in params, f"TrainConfig.{field.name} has no train option"
        param = params[field.name]
        assert param.default is None  # not given: the -c config or the dataclass default applies
        line = help_line(param.opts[0])
        assert f"[default: {shown_default(field, param)}]" in line, line
        assert field.metadata["help"] in line, line


def test_readme_lists_every_training_option_with_its_default():
    text = README.read_text()
    assert TABLE_START in text and TABLE_END in text, "README lacks the training options table"
    table = text.split(TABLE_START)[1].split(TABLE_END)[0].strip()
    assert table == options_table(), f"README's training options are stale; replace them by:\n{options_table()}"
    for field in fields(TrainConfig):  # the README row holds the dataclass default
        assert f"| `{field.name}` |" in table and yaml_default(field) in table


def captured_config(monkeypatch, args: list[str], tmp_path: Path) -> TrainConfig:
    """The TrainConfig ``sparseslice train`` hands to the trainer for ``args`` (nothing is trained)."""
    seen = {}

    def fake_train(data, out, *, config, **kwargs):
        seen["config"] = config
        return SimpleNamespace(best_val_dice=0.0, epochs=0, seconds=0.0, checkpoint=out / "best.pt")

    monkeypatch.setattr(sparseslice.train, "train", fake_train)
    result = runner.invoke(app, ["train", str(tmp_path / "data"), "-o", str(tmp_path / "run"), *args])
    assert result.exit_code == 0, result.output
    return seen["config"]


def test_each_option_sets_its_field(monkeypatch, tmp_path):
    assert set(NON_DEFAULT) == {f.name for f in fields(TrainConfig)}
    params = train_params()
    args, expected = [], {}
    for field in fields(TrainConfig):
        text, value = NON_DEFAULT[field.name]
        assert value != field.default, field.name
        param = params[field.name]
        if text is None:
            args.append((param.opts if value else param.secondary_opts)[0])
        else:
            args += [param.opts[0], text]
        expected[field.name] = value
    assert captured_config(monkeypatch, args, tmp_path) == TrainConfig(**expected)
    assert captured_config(monkeypatch, [], tmp_path) == TrainConfig()


def test_channels_alone_set_two_per_level_unless_strides_are_given(monkeypatch, tmp_path):
    assert captured_config(monkeypatch, ["--channels", "8,16"], tmp_path).strides == (2,)
    assert captured_config(monkeypatch, ["--channels", "8,16", "--strides", "1"], tmp_path).strides == (1,)
    config = tmp_path / "c.yaml"
    config.write_text("channels: [8, 16, 32]\nstrides: [2, 1]\nepochs: 4\n")
    cfg = captured_config(monkeypatch, ["-c", str(config), "--channels", "4,8,16", "--epochs", "2"], tmp_path)
    assert (cfg.channels, cfg.strides, cfg.epochs) == ((4, 8, 16), (2, 1), 2)  # options override the file


@pytest.mark.parametrize(("flag", "text", "message"), [
    ("--patch-size", "64,a", "patch-size must be comma-separated integers, got '64,a'; e.g. 64,64"),
    ("--ct-window", "low,high", "ct-window must be comma-separated numbers, got 'low,high'; e.g. -1000,1000"),
])
def test_a_list_option_that_is_not_numbers_is_one_line(tmp_path, flag, text, message):
    result = runner.invoke(app, ["train", str(tmp_path / "data"), "-o", str(tmp_path / "run"), flag, text])
    assert result.exit_code == 2 and result.output.strip() == f"error: {message}", result.output


def test_unknown_key_without_a_near_one_lists_the_valid_keys():
    names = ", ".join(f.name for f in fields(TrainConfig))
    with pytest.raises(UserError) as err:
        TrainConfig.from_dict({"zzqqx": 1})
    assert str(err.value) == f"config key 'zzqqx' does not exist, got 'zzqqx'; valid keys: {names}"


def test_the_cli_starts_without_importing_torch():
    """The options are read from the fields, not from the trainer: ``--help`` stays fast."""
    code = "import sys, sparseslice.cli; print('torch' in sys.modules)"
    src = str(Path(__file__).parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": src, "PATH": ""})
    assert out.stdout.strip() == "False"
