"""Each family of allowed names is declared once, as a registry beside its implementations (issue 12).

For every family the study spec accepts exactly the registry's names and refuses any other
with a "did you mean", ``--help`` lists the same choices, and README lists the same names. A new
method is one function plus one registry entry.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import sparseslice.metrics as metrics_module
import sparseslice.select.strategies as strategies_module
from sparseslice.cli import app
from sparseslice.errors import UserError
from sparseslice.interpolate.methods import FILLS, METHODS
from sparseslice.metrics import METRIC_FUNCTIONS, METRICS, MaskPair, mask_metrics
from sparseslice.select.strategies import SELECTORS, STRATEGIES, select_slices
from sparseslice.study.spec import PRESETS, TRAINING_PRESETS, allowed_names, load_spec, parse_spec
from sparseslice.train.config import MODELS, SCHEDULES

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()
runner = CliRunner()

BASE = {"name": "t", "dataset": {"path": "/nonexistent"}, "seeds": [0],
        "training": {"preset": "demo", "finetune_epochs": 5}}
BLOCK = {"budget": [12], "rho": [0.5], "strategy": ["random"]}


def spec_with(family: str, value: str):
    """A spec whose one grid block (or metrics list) uses ``value`` of ``family``."""
    if family == "metrics":
        return parse_spec({**BASE, "grid": [BLOCK], "metrics": ["dice", value]})
    block = dict(BLOCK)
    if family == "strategy" and value == "block":  # block is sized by block_fraction, not rho
        block = {"budget": [12], "block_fraction": [0.5]}
    return parse_spec({**BASE, "grid": [{**block, family: [value]}]})


def spec_values(spec, family: str) -> set[str]:
    if family == "metrics":
        return set(spec.metrics)
    return {getattr(r, family) for r in spec.runs() if not r.baseline}


#: (spec family, registry, the registry's name -> implementation mapping)
FAMILIES = [
    ("strategy", STRATEGIES, SELECTORS),
    ("interpolation", METHODS, FILLS),
    ("model", MODELS, None),
    ("schedule", SCHEDULES, None),
    ("metrics", METRICS, METRIC_FUNCTIONS),
]
IDS = [f[0] for f in FAMILIES]


@pytest.mark.parametrize(("family", "registry", "implementations"), FAMILIES, ids=IDS)
def test_the_names_are_the_registry_of_implementations(family, registry, implementations):
    assert allowed_names(family) is registry  # the spec reads the registry, it keeps no copy
    if implementations is not None:
        assert registry == tuple(implementations)
        assert all(callable(f) for f in implementations.values())
    assert len(set(registry)) == len(registry) >= 2


@pytest.mark.parametrize(("family", "registry", "implementations"), FAMILIES, ids=IDS)
def test_the_spec_accepts_exactly_the_registry(family, registry, implementations):
    for name in registry:
        assert name in spec_values(spec_with(family, name), family)
    typo = registry[-1] + "x"
    with pytest.raises(UserError) as err:
        spec_with(family, typo)
    assert f"must be one of {', '.join(registry)}, got {typo!r}; did you mean {registry[-1]!r}?" in str(err.value)


CLI = [  # (family, command, option)
    ("strategy", ["plan"], "--strategy"),
    ("interpolation", ["interpolate"], "--method"),
    ("model", ["train"], "--model"),
    ("schedule", ["train"], "--schedule"),
]


def help_text(path: list[str]) -> str:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.output


def help_line(path: list[str], flag: str) -> str:
    text = help_text(path)
    lines = [ln for ln in text.splitlines() if re.search(rf"(^|\s){re.escape(flag)}(\s|$)", ln)]
    assert lines, text
    return lines[0]


@pytest.mark.parametrize(("family", "path", "flag"), CLI, ids=[c[0] for c in CLI])
def test_help_lists_the_registry(family, path, flag):
    assert f"One of: {', '.join(allowed_names(family))}." in help_line(path, flag)


def test_study_presets_are_the_packaged_specs_and_help_lists_them(tmp_path):
    packaged = {p.name.removesuffix(".yaml") for p in resources.files("sparseslice").joinpath("presets").iterdir()
                if p.name.endswith(".yaml")}
    assert set(PRESETS) == packaged and len(PRESETS) == len(packaged)
    assert f"Presets: {', '.join(PRESETS)}." in help_text(["study", "run"])
    for name in PRESETS:
        assert load_spec(name, data=tmp_path).runs()
    with pytest.raises(UserError, match=r"neither a file nor a preset, got 'quik'; did you mean 'quick'\?"):
        load_spec("quik")


def test_training_presets_are_accepted_and_a_typo_is_named():
    for name in TRAINING_PRESETS:
        assert parse_spec({**BASE, "grid": [BLOCK], "training": {"preset": name}}).training["preset"] == name
    with pytest.raises(UserError, match=r"training.preset must be one of demo, quick, paper, got 'quik'; "
                                        r"did you mean 'quick'\?"):
        parse_spec({**BASE, "grid": [BLOCK], "training": {"preset": "quik"}})


# --- README ---------------------------------------------------------------------------------------


def example_spec() -> str:
    start = README.index("```yaml\nname: my-study")
    return README[start:README.index("```\n", start + 3)]


def listed_in_comment(key: str) -> tuple[str, ...]:
    """The names ``a | b | c`` in the comment of the example spec's ``key:`` line."""
    line = next(ln for ln in example_spec().splitlines() if re.match(rf"\s*(# )?(- )?{key}:", ln))
    comment = line.split("#")[-1]
    run = re.search(r"[\w-]+(?:\s*\|\s*[\w-]+)+", comment)
    assert run, line
    return tuple(name.strip() for name in run.group(0).split("|"))


@pytest.mark.parametrize(("family", "registry", "implementations"), FAMILIES, ids=IDS)
def test_readme_example_spec_lists_the_registry(family, registry, implementations):
    assert listed_in_comment(family) == registry


def test_readme_lists_training_presets_strategies_methods_and_study_presets():
    assert listed_in_comment("training") == tuple(TRAINING_PRESETS)
    bullet = README[README.index("- `random`:"):README.index("`--volume-selection diverse`")]
    assert tuple(re.findall(r"`([\w-]+)`: ", bullet)) == STRATEGIES
    table = README[README.index("| method | what it does |"):]
    table = table[:table.index("\n\n")]
    assert tuple(re.findall(r"^\| `([\w-]+)` \|", table, flags=re.M)) == METHODS
    presets = README[README.index("`SPEC` is a YAML file or a packaged preset"):]
    presets = presets[:presets.index("\n\n")]
    named = [n for n in re.findall(r"`([\w-]+)`", presets) if n not in ("SPEC", *STRATEGIES)]
    assert tuple(named) == PRESETS


# --- a new method is one function plus one entry ----------------------------------------------------


def _first_slices(k: int, lo: int, hi: int, *, rng: np.random.Generator, features: np.ndarray | None):
    return tuple(range(lo, lo + k))


def test_a_new_strategy_is_one_function_and_one_entry(monkeypatch):
    monkeypatch.setitem(SELECTORS, "first", _first_slices)
    monkeypatch.setattr(strategies_module, "STRATEGIES", tuple(SELECTORS))  # as the module derives it
    assert select_slices("first", 3, 2, 9, rng=np.random.default_rng(0)) == (2, 3, 4)
    assert spec_values(spec_with("strategy", "first"), "strategy") == {"first"}
    assert f"One of: {', '.join(STRATEGIES)}, first." in help_line(["plan"], "--strategy")


def _volume(pair: MaskPair) -> tuple[float, str]:
    return float(np.count_nonzero(pair.pred)), pair.note


def test_a_new_metric_is_one_function_and_one_entry(monkeypatch):
    monkeypatch.setitem(METRIC_FUNCTIONS, "volume", _volume)
    monkeypatch.setattr(metrics_module, "METRICS", tuple(METRIC_FUNCTIONS))
    a = np.zeros((4, 4, 3), bool)
    a[1:3, 1:3, 1] = True
    values = mask_metrics(a, a, spacing=(1, 1, 1), axis=2)
    assert list(values) == [*METRICS, "volume"] and values["volume"] == (4.0, "") and values["dice"] == (1.0, "")
    assert spec_values(spec_with("metrics", "volume"), "metrics") == {"dice", "volume"}


def test_one_did_you_mean_helper():
    """difflib is used by errors.unknown_choice only: every "did you mean" goes through it."""
    users = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src").rglob("*.py") if "difflib" in p.read_text()]
    assert users == ["src/sparseslice/errors.py"]
