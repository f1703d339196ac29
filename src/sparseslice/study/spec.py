"""A study spec: the YAML file that names a dataset and a grid of runs.

A spec is validated when it is read (unknown keys are refused, naming the nearest valid
key) and expands to a list of :class:`RunSpec` with stable run ids, so a study folder can
be resumed run by run.

Example spec::

    name: my-study
    dataset:
      path: ../data/Task04_Hippocampus     # relative to the spec file
      split: {seed: 0, val: 0.1, test: 0.2}
    grid:                                  # one or more blocks; each is a cartesian product
      - budget: [120]
        rho: [0.1, 0.25, 0.5]              # or volumes: [30, 12, 6]
        strategy: [random, interval, ual]
        interpolation: [none, sdf]
        model: [2d, 3d]
    seeds: [0, 1]
    baseline: true                         # full-label runs, one per model and schedule
    training: {preset: quick, epochs: 20}
    metrics: [dice, hd95, assd2d]
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

import sparseslice.metrics as metric_registry
from sparseslice.errors import UserError, unknown_choice
from sparseslice.interpolate import methods as interpolation_registry
from sparseslice.select import strategies as strategy_registry
from sparseslice.train import config as train_registry

BASELINE = "full"
#: The packaged study specs, ``sparseslice/presets/<name>.yaml`` (order: as help texts list them).
PRESETS = ("slice-selection", "partial-annotation", "quick", "demo")

#: Named training presets; a spec's ``training`` mapping is laid over the one it names.
#: In a study, ``epochs`` counts every epoch of a run, fine-tuning included (a two-step run
#: takes ``epochs - finetune_epochs``, then ``finetune_epochs``), and ``samples_per_epoch`` is
#: fixed (never the arm's annotated-slice count), so every run of one model takes the same
#: number of gradient steps, whatever the arm or the machine's load. Presets set no wall-clock
#: cap (``max_minutes``): a run it cuts short is marked ``cut_short`` and left out of comparisons.
TRAINING_PRESETS: dict[str, dict[str, Any]] = {
    # short CPU runs for demos and quick looks
    "demo": {"epochs": 15, "samples_per_epoch": 64},
    "quick": {"epochs": 16, "samples_per_epoch": 512, "lr": 0.002},
    # the papers' budgets; meant for a GPU
    "paper": {"epochs": 50, "samples_per_epoch": 400},
}

_TOP_KEYS = ("name", "description", "dataset", "grid", "seeds", "baseline", "training",
             "evaluation", "metrics", "resources", "analysis")
#: ``analysis.label``: the label the report ranks and recommends by (default: the mean over labels).
_ANALYSIS_KEYS = ("label",)
_DATASET_KEYS = ("path", "split", "max_cases", "axis")
_SPLIT_KEYS = ("seed", "val", "test", "test_cases")
_FACTORS = ("budget", "rho", "volumes", "strategy", "block_fraction", "interpolation",
            "border_slices", "model", "schedule", "mask_channel")
_EVALUATION_KEYS = ("tta", "fill_holes", "largest_component")
_RESOURCE_KEYS = ("cpus", "gpus")
_BLOCK_DEFAULTS: dict[str, list[Any]] = {
    "rho": [None], "volumes": [None], "block_fraction": [None], "interpolation": ["none"],
    "border_slices": [False], "model": ["2d"], "schedule": ["one-step"], "mask_channel": [False],
}


def allowed_names(family: str) -> tuple[str, ...]:
    """The valid names of a spec ``family``, read from the registry next to their implementations.

    ``strategy`` (:data:`sparseslice.select.strategies.STRATEGIES`), ``interpolation``
    (:data:`sparseslice.interpolate.methods.METHODS`), ``model`` and ``schedule``
    (:mod:`sparseslice.train.config`) and ``metrics`` (:data:`sparseslice.metrics.METRICS`).
    They are read when a spec is checked, never copied here.
    """
    return {"strategy": strategy_registry.STRATEGIES, "interpolation": interpolation_registry.METHODS,
            "model": train_registry.MODELS, "schedule": train_registry.SCHEDULES,
            "metrics": metric_registry.METRICS}[family]


def check_keys(mapping: Any, allowed: tuple[str, ...], *, where: str) -> dict[str, Any]:
    """Refuse a non-mapping or unknown keys, naming the nearest valid key."""
    if mapping is None:
        return {}
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping, got {mapping!r}; write key: value pairs")
    for key in mapping:
        if key not in allowed:
            raise unknown_choice(where, key, allowed, cutoff=0.0, problem="has an unknown key",
                                 more=f"valid keys: {', '.join(allowed)}")
    return dict(mapping)


@dataclass(frozen=True)
class DatasetSpec:
    """Where the data is and how it is split into train / validation / test cases."""

    path: Path | None = None
    split_seed: int = 0
    val: float = 0.1
    test: float = 0.2
    max_cases: int | None = None
    axis: int | None = None
    #: Fixed test cases (``split.test_cases``); ``test`` is then unused.
    test_cases: tuple[str, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        split: dict[str, Any] = {"seed": self.split_seed, "val": self.val, "test": self.test}
        if self.test_cases is not None:  # only when set, so specs without it keep their fingerprint
            del split["test"]  # exclusive with test_cases: the written spec reads back
            split["test_cases"] = list(self.test_cases)
        return {"path": str(self.path) if self.path else None, "split": split,
                "max_cases": self.max_cases, "axis": self.axis}


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: one point of the grid and one seed.

    ``strategy == "full"`` marks a baseline run trained on the full labels of every
    training case.
    """

    budget: int | None
    rho: float | None
    volumes: int | None
    strategy: str
    block_fraction: float | None
    interpolation: str
    border_slices: bool
    model: str
    schedule: str
    mask_channel: bool
    seed: int

    @property
    def baseline(self) -> bool:
        return self.strategy == BASELINE

    @property
    def run_id(self) -> str:
        """Stable, readable id built from the values (never from the grid position)."""
        parts = [self.model]
        if self.baseline:
            parts.append("full")
        else:
            parts.append(f"b{self.budget}")
            if self.rho is not None:
                parts.append(f"rho{_num(self.rho)}")
            if self.volumes is not None:
                parts.append(f"s{self.volumes}")
            parts.append(self.strategy if self.block_fraction is None
                         else f"{self.strategy}{_num(self.block_fraction)}")
            parts.append(f"interp-{self.interpolation}")
            if self.border_slices:
                parts.append("border")
            if self.mask_channel:
                parts.append("mask")
        if self.schedule != "one-step":
            parts.append(self.schedule)
        parts.append(f"seed{self.seed}")
        return "_".join(parts)

    def regime(self) -> dict[str, Any]:
        """Every factor except the seed (runs of one regime differ by seed only)."""
        d = self.to_dict()
        d.pop("seed")
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _num(x: float) -> str:
    return f"{x:g}"


def _train_default(name: str) -> Any:
    """A :class:`~sparseslice.train.TrainConfig` default (declared there once)."""
    return train_registry.TrainConfig.__dataclass_fields__[name].default


@dataclass(frozen=True)
class StudySpec:
    """A validated study: dataset, grid blocks, seeds, training preset, metrics."""

    name: str
    dataset: DatasetSpec
    grid: tuple[dict[str, tuple[Any, ...]], ...]
    seeds: tuple[int, ...] = (0,)
    baseline: bool = True
    training: dict[str, Any] = field(default_factory=lambda: {"preset": "quick"})
    evaluation: dict[str, bool] = field(default_factory=lambda: {"tta": False, "fill_holes": True,
                                                                 "largest_component": True})
    metrics: tuple[str, ...] = ("dice", "hd95", "assd2d")
    resources: dict[str, float] = field(default_factory=lambda: {"cpus": 1, "gpus": 0})
    description: str = ""
    analysis: dict[str, Any] = field(default_factory=dict)

    def runs(self) -> list[RunSpec]:
        """Every run of the grid (baselines first), each id once, in a stable order."""
        out: dict[str, RunSpec] = {}
        grid_runs: list[RunSpec] = []
        for block in self.grid:
            keys = list(_FACTORS)
            for values in itertools.product(*(block[k] for k in keys), self.seeds):
                grid_runs.append(RunSpec(**dict(zip([*keys, "seed"], values, strict=True))))
        if self.baseline:
            for model, schedule in dict.fromkeys((r.model, r.schedule) for r in grid_runs):
                base = RunSpec(budget=None, rho=None, volumes=None, strategy=BASELINE, block_fraction=None,
                               interpolation="none", border_slices=False, model=model, schedule=schedule,
                               mask_channel=False, seed=self.seeds[0])
                out.setdefault(base.run_id, base)
        for r in grid_runs:
            out.setdefault(r.run_id, r)
        return list(out.values())

    def training_config(self, run: RunSpec) -> dict[str, Any]:
        """Training options of a run: the named preset, the spec's overrides, the run's factors.

        The study's ``epochs`` is the run's total: a two-step run's first step gets
        ``epochs - finetune_epochs``. ``patience`` defaults to ``epochs``, so early stopping
        never ends one arm sooner than another (the best-validation checkpoint is kept).
        """
        options = dict(self.training)
        preset = options.pop("preset", "quick")
        options = {**TRAINING_PRESETS[preset], **options}
        per_model = {m: options.pop(m, None) or {} for m in train_registry.MODELS}
        options.update(per_model[run.model])  # e.g. 3d: {patch_size: [80, 64, 32]}
        total = options.get("epochs")
        if total is None:
            total = options["epochs"] = _train_default("epochs")
        options.setdefault("patience", total)
        if run.schedule == "two-step":
            finetune = options.get("finetune_epochs")
            if finetune is None:
                finetune = options["finetune_epochs"] = _train_default("finetune_epochs")
            if not isinstance(total, int) or not isinstance(finetune, int) or total - finetune < 1:
                raise UserError(f"training.epochs must exceed finetune_epochs for two-step runs (epochs counts "
                                f"both steps), got epochs {total!r} and finetune_epochs {finetune!r}; raise epochs "
                                "or lower finetune_epochs")
            options["epochs"] = total - finetune
        return {**options, "model": run.model, "schedule": run.schedule, "mask_channel": run.mask_channel,
                "seed": run.seed}

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "dataset": self.dataset.to_dict(),
                "grid": [{k: list(v) for k, v in b.items()} for b in self.grid], "seeds": list(self.seeds),
                "baseline": self.baseline, "training": dict(self.training), "evaluation": dict(self.evaluation),
                "metrics": list(self.metrics), "resources": dict(self.resources),
                **({"analysis": dict(self.analysis)} if self.analysis else {})}

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not the name, description, resources or analysis)."""
        d = self.to_dict()
        for k in ("name", "description", "resources", "analysis"):
            d.pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def with_dataset(self, path: str | os.PathLike[str] | None = None, *,
                     test_cases: Sequence[str] | None = None) -> StudySpec:
        """The same study on another dataset folder, or with fixed test cases (``split.test_cases``)."""
        dataset = self.dataset if path is None else replace(self.dataset, path=Path(path).resolve())
        if test_cases is not None:
            dataset = replace(dataset, test=0.0, test_cases=_test_cases({"test_cases": list(test_cases)}))
        return replace(self, dataset=dataset)


def parse_spec(data: Any, *, base: Path | None = None) -> StudySpec:
    """Validate a spec mapping (as read from YAML); relative dataset paths start at ``base``."""
    top = check_keys(data, _TOP_KEYS, where="spec")  # each step checks its part, in the file's order
    name = str(top.get("name") or "study")
    dataset = _parse_dataset(top.get("dataset"), base)
    grid = _parse_grid(top.get("grid"))
    seeds = _parse_seeds(top.get("seeds", [0]))
    baseline = top.get("baseline", True)
    if not isinstance(baseline, bool):
        raise UserError(f"baseline must be true or false, got {baseline!r}; true adds full-label runs")
    training = _parse_training(top.get("training", {}))
    evaluation = _parse_evaluation(top.get("evaluation"))
    metrics = _parse_metrics(top.get("metrics", ["dice", "hd95", "assd2d"]))
    resources = _parse_resources(top.get("resources"))
    analysis = check_keys(top.get("analysis"), _ANALYSIS_KEYS, where="analysis")
    if "label" in analysis and analysis["label"] is not None:
        analysis["label"] = _integer(analysis["label"], "analysis.label", minimum=1)
    spec = StudySpec(name=name, dataset=dataset, grid=grid, seeds=seeds, baseline=baseline, training=training,
                     evaluation=evaluation, metrics=metrics, resources=resources,
                     description=str(top.get("description") or ""),
                     analysis={k: v for k, v in analysis.items() if v is not None})
    if any("two-step" in block["schedule"] for block in grid):  # epochs must leave a first step
        spec.training_config(next(r for r in spec.runs() if r.schedule == "two-step"))
    return spec


def _parse_dataset(raw: Any, base: Path | None) -> DatasetSpec:
    ds = check_keys(raw, _DATASET_KEYS, where="dataset")
    split = check_keys(ds.get("split"), _SPLIT_KEYS, where="dataset.split")
    path = ds.get("path")
    if path is not None:
        p = Path(str(path)).expanduser()
        path = (p if p.is_absolute() or base is None else base / p).resolve()
    val, test = _fraction(split.get("val", 0.1), "dataset.split.val"), _fraction(split.get("test", 0.2),
                                                                               "dataset.split.test")
    test_cases = _test_cases(split)
    if test_cases is not None:
        test = 0.0
    elif test <= 0:
        raise UserError(f"dataset.split.test must leave test cases, got {test}; e.g. 0.2")
    if val + test >= 1:
        raise UserError(f"dataset.split val + test must be below 1, got {val} + {test}; lower them")
    max_cases = ds.get("max_cases")
    if max_cases is not None:
        max_cases = _integer(max_cases, "dataset.max_cases", minimum=3)
    axis = ds.get("axis")
    if axis is not None and axis not in (0, 1, 2):
        raise UserError(f"dataset.axis must be 0, 1 or 2, got {axis!r}; or leave it out for the default axis")
    return DatasetSpec(path, _integer(split.get("seed", 0), "dataset.split.seed"), val, test, max_cases, axis,
                       test_cases)


def _test_cases(split: dict[str, Any]) -> tuple[str, ...] | None:
    """``dataset.split.test_cases``: a non-empty list of case ids, exclusive with ``test``."""
    raw = split.get("test_cases")
    if raw is None:
        return None
    if "test" in split:
        raise UserError("dataset.split has both test and test_cases, got both; give the test fraction or the "
                        "test cases")
    if not isinstance(raw, list) or not raw or not all(isinstance(c, str) for c in raw):
        raise UserError(f"dataset.split.test_cases must be a list of case ids, got {raw!r}; "
                        "e.g. test_cases: [la_045, la_046]")
    return tuple(raw)


def _parse_grid(blocks: Any) -> tuple[dict[str, tuple[Any, ...]], ...]:
    if isinstance(blocks, dict):
        blocks = [blocks]
    if not blocks or not isinstance(blocks, list):
        raise UserError(f"grid must be a list of blocks, got {blocks!r}; e.g. grid: [{{budget: [100], "
                        "rho: [0.1, 0.5], strategy: [random]}]")
    return tuple(_parse_block(b, f"grid[{n}]") for n, b in enumerate(blocks))


def _parse_seeds(raw: Any) -> tuple[int, ...]:
    seeds = tuple(_integer(s, "seeds") for s in _as_list(raw))
    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"seeds must be distinct integers, got {list(seeds)}; e.g. seeds: [0, 1]")
    return seeds


def _parse_training(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict | type(None)):
        raise UserError(f"training must be a mapping, got {raw!r}; e.g. training: {{preset: quick}}")
    training = dict(raw or {"preset": "quick"})
    preset = training.setdefault("preset", "quick")
    if preset not in TRAINING_PRESETS:
        raise unknown_choice("training.preset", preset, tuple(TRAINING_PRESETS))
    for factor in ("model", "schedule", "mask_channel", "seed"):
        if factor in training:
            raise UserError(f"training.{factor} is set by the grid, got {training[factor]!r}; "
                            f"put {factor} in a grid block (seed: in seeds)")
    models = train_registry.MODELS
    train_registry.check_config_types({k: v for k, v in training.items() if k != "preset" and k not in models})
    for where, options in [("training", training), *((f"training.{m}", training.get(m) or {}) for m in models)]:
        if not isinstance(options, dict):
            raise UserError(f"{where} must be a mapping of training options, got {options!r}; "
                            f"e.g. {where}: {{samples_per_epoch: 512}}")
        if where != "training":
            for key in ("preset", "model", "schedule", "mask_channel", "seed", *models):
                if key in options:
                    raise UserError(f"{where}.{key} cannot be set per model, got {options[key]!r}; "
                                    "remove it (per-model options are training options)")
            train_registry.check_config_types(options)
        if "samples_per_epoch" in options and options["samples_per_epoch"] is None:
            raise UserError(f"{where}.samples_per_epoch must be a number in a study, got null; every arm then "
                            "takes the same number of gradient steps (e.g. samples_per_epoch: 512)")
    return training


def _parse_evaluation(raw: Any) -> dict[str, bool]:
    evaluation = {"tta": False, "fill_holes": True, "largest_component": True,
                  **check_keys(raw, _EVALUATION_KEYS, where="evaluation")}
    for k, v in evaluation.items():
        if not isinstance(v, bool):
            raise UserError(f"evaluation.{k} must be true or false, got {v!r}")
    return evaluation


def _parse_metrics(raw: Any) -> tuple[str, ...]:
    metrics = tuple(_as_list(raw))
    for m in metrics:
        _choice(m, allowed_names("metrics"), "metrics")
    if "dice" not in metrics:
        raise UserError(f"metrics must include 'dice' (the report's main measure), got {list(metrics)}; add dice")
    return metrics


def _parse_resources(raw: Any) -> dict[str, float]:
    res = {"cpus": 1, "gpus": 0, **check_keys(raw, _RESOURCE_KEYS, where="resources")}
    for k, v in res.items():
        if not isinstance(v, int | float) or v < 0 or (k == "cpus" and v < 1):
            raise UserError(f"resources.{k} must be a number >= {1 if k == 'cpus' else 0}, got {v!r}")
    return res


def _parse_block(block: Any, where: str) -> dict[str, tuple[Any, ...]]:
    raw = check_keys(block, _FACTORS, where=where)
    out: dict[str, tuple[Any, ...]] = {}
    for key in _FACTORS:
        values = _as_list(raw[key]) if key in raw else _BLOCK_DEFAULTS.get(key)
        if values is None:
            raise UserError(f"{where}.{key} is missing, got no value; give it, e.g. {key}: "
                            f"{'[100]' if key == 'budget' else '[random]'}")
        if not values:
            raise UserError(f"{where}.{key} is an empty list, got []; give at least one value")
        out[key] = tuple(_check_factor(key, v, where) for v in values)
    strategies = set(out["strategy"])
    has_rho, has_vols = out["rho"] != (None,), out["volumes"] != (None,)
    has_block = out["block_fraction"] != (None,)
    if has_rho and has_vols:
        raise UserError(f"{where} sets both rho and volumes, got rho {list(out['rho'])} and volumes "
                        f"{list(out['volumes'])}; at a fixed budget one decides the other: give one")
    if "block" in strategies and (strategies - {"block"}):
        raise UserError(f"{where}.strategy mixes block with slice strategies, got {list(out['strategy'])}; "
                        "put block in its own grid block")
    if strategies == {"block"}:
        if not has_block:
            raise UserError(f"{where}.block_fraction is missing for strategy block, got none; "
                            "e.g. block_fraction: [0.2, 0.4]")
    else:
        if has_block:
            raise UserError(f"{where}.block_fraction only applies to strategy block, got "
                            f"{list(out['block_fraction'])}; remove it or use strategy: [block]")
        if not (has_rho or has_vols):
            raise UserError(f"{where} needs rho (density) or volumes (count), got neither; e.g. rho: [0.1, 0.5]")
    return out


def _check_factor(key: str, value: Any, where: str) -> Any:
    name = f"{where}.{key}"
    if key == "budget":
        return _integer(value, name, minimum=1)
    if key == "volumes":
        return None if value is None else _integer(value, name, minimum=1)
    if key in ("rho", "block_fraction"):
        if value is None:
            return None
        v = _fraction(value, name)
        if not 0 < v <= 1:
            raise UserError(f"{name} must be in (0, 1], got {value!r}; e.g. 0.25")
        return v
    if key in ("strategy", "interpolation", "schedule"):
        return _choice(value, allowed_names(key), name)
    if key == "model":
        return _choice(str(value).lower(), allowed_names(key), name)
    if not isinstance(value, bool):
        raise UserError(f"{name} must be true or false, got {value!r}")
    return value


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _choice(value: Any, allowed: tuple[str, ...], name: str) -> str:
    if value not in allowed:
        raise unknown_choice(name, value, allowed, cutoff=0.0)
    return str(value)


def _integer(value: Any, name: str, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise UserError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise UserError(f"{name} must be a number in [0, 1], got {value!r}; e.g. 0.2")
    return float(value)


def load_spec(spec: str | os.PathLike[str], *, data: str | os.PathLike[str] | None = None,
              test_cases: Sequence[str] | None = None) -> StudySpec:
    """Read a spec from a YAML file or a packaged preset name.

    Parameters
    ----------
    spec : str or path
        A YAML file, or one of :data:`PRESETS` (``slice-selection``, ``partial-annotation``,
        ``quick``, ``demo``).
    data : path, optional
        Dataset folder; replaces ``dataset.path`` of the spec (presets have none).
    test_cases : sequence of str, optional
        Case ids held out for testing; replace the spec's ``dataset.split`` test fraction
        or cases (validation is still drawn from the others by the split seed).

    Examples
    --------
    >>> s = load_spec("quick", data=".")
    >>> len(s.runs())
    19
    """
    text, base = _spec_text(spec)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"spec {str(spec)!r} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from exc
    parsed = parse_spec(raw, base=base)
    if data is not None or test_cases is not None:
        parsed = parsed.with_dataset(data, test_cases=test_cases)
    if parsed.dataset.path is None:
        raise UserError(f"dataset.path is not set, got spec {str(spec)!r} without one; pass --data DATASET")
    return parsed


def _spec_text(spec: str | os.PathLike[str]) -> tuple[str, Path | None]:
    path = Path(spec)
    if path.is_file():
        return path.read_text(), path.resolve().parent
    name = str(spec)
    if name in PRESETS:
        return resources.files("sparseslice").joinpath("presets", f"{name}.yaml").read_text(), None
    raise unknown_choice("spec", name, PRESETS, cutoff=0.0, problem="is neither a file nor a preset",
                         more=f"pass a YAML file or a preset ({', '.join(PRESETS)})")


def run_config(spec: StudySpec, run: RunSpec, *, threads: int, executor: str) -> dict[str, Any]:
    """The resolved configuration of one run, as written to its ``config.json``."""
    return {
        "study": spec.name,
        "run_id": run.run_id,
        "run": run.to_dict(),
        "dataset": spec.dataset.to_dict(),
        "training": spec.training_config(run),
        "evaluation": dict(spec.evaluation),
        "metrics": list(spec.metrics),
        "execution": {"executor": executor, "threads": threads},
    }
