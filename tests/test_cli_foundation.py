"""The CLI's foundation commands through Typer's runner: info, synth, --version, errors."""

from __future__ import annotations

import shutil
import time

import numpy as np
import typer
from typer.testing import CliRunner

from sparseslice import __version__
from sparseslice.cli import app
from sparseslice.io import Volume, write_volume

runner = CliRunner()


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and __version__ in result.output


def test_synth_then_info(tmp_path):
    result = runner.invoke(app, ["synth", str(tmp_path / "d"), "--cases", "3", "--seed", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["info", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "3 cases (3 labelled)" in result.output
    assert "labels {0, 1, 2}" in result.output and "slice axis 2" in result.output


def test_info_on_hippocampus(hippocampus):
    start = time.perf_counter()
    result = runner.invoke(app, ["info", str(hippocampus), "--rows", "3"], terminal_width=200)
    elapsed = time.perf_counter() - start
    assert result.exit_code == 0, result.output
    assert "260 cases (260 labelled)" in result.output
    assert "shapes 31x40x24 to 43x59x47" in result.output
    assert "labels {0, 1, 2}" in result.output
    assert elapsed < 30, f"info took {elapsed:.1f} s (goal: under 10 s on an idle machine)"


def one_line_error(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    return lines[0]


def test_info_errors_are_one_line(tmp_path, phantom_dataset):
    assert "does not exist" in one_line_error(runner.invoke(app, ["info", str(tmp_path / "nope")]))
    (tmp_path / "empty").mkdir()
    assert "holds no image files" in one_line_error(runner.invoke(app, ["info", str(tmp_path / "empty")]))
    ds = tmp_path / "ds"
    shutil.copytree(phantom_dataset, ds)
    (ds / "labelsTr" / "phantom_003.nii.gz").unlink()
    line = one_line_error(runner.invoke(app, ["info", str(ds), "--require-labels"]))
    assert "case 'phantom_003' has an image but no label" in line
    write_volume(Volume(np.zeros((4, 4, 4), np.uint8)), ds / "labelsTr" / "phantom_003.nii.gz")
    line = one_line_error(runner.invoke(app, ["info", str(ds)]))
    assert "case 'phantom_003': label shape must match the image" in line
    write_volume(Volume(np.full((4, 4, 4), 0.5, np.float32)), ds / "labelsTr" / "phantom_003.nii.gz")
    assert "must hold integer values" in one_line_error(runner.invoke(app, ["info", str(ds)]))
    (ds / "labelsTr" / "phantom_003.nii.gz").write_bytes(b"\x1f\x8b garbage")
    line = one_line_error(runner.invoke(app, ["info", str(ds)]))
    assert "phantom_003.nii.gz" in line and "truncated or corrupt" in line


def test_messages_with_brackets_survive_and_warnings_are_one_line(tmp_path):
    """Rich markup must not eat '[...]' in messages; warnings print as 'warning: ...'."""
    import warnings

    from sparseslice.cli import command
    from sparseslice.errors import UserError

    demo = typer.Typer()

    @command(demo, name="boom")
    def boom(warn: bool = False) -> None:
        if warn:
            warnings.warn("slices [3, 4] were skipped", UserWarning, stacklevel=1)
            return
        raise UserError("slices [bold]x[/bold] must be ints, got ['a']; pass [0, 1]")

    @command(demo, name="other")
    def other() -> None:
        pass

    result = runner.invoke(demo, ["boom"])
    assert "slices [bold]x[/bold] must be ints, got ['a']; pass [0, 1]" in one_line_error(result)
    result = runner.invoke(demo, ["boom", "--warn"])
    assert result.exit_code == 0
    assert result.output.strip() == "warning: slices [3, 4] were skipped"
