"""Training configuration: one dataclass, loaded from dicts or YAML, with helpful errors.

Unset sizes (``patch_size``, ``batch_size``, ``samples_per_epoch``, ``axis``) are resolved
from the data by the trainer; the resolved configuration is written to ``config.json`` in
the run folder, so a run can be reproduced from its files alone.
"""

from __future__ import annotations

import math
import numbers
import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from sparseslice.errors import UserError, unknown_choice

MODELS = ("2d", "3d")
SCHEDULES = ("one-step", "two-step")
NORMALIZATIONS = ("auto", "zscore", "ct", "none")
# keys that may differ when resuming: where it runs (and caches its data), and budgets (raise them to extend a run)
RESUME_FREE_KEYS = ("device", "num_threads", "epochs", "finetune_epochs", "max_minutes", "cache", "channels_last")

#: Channels of the levels a default network takes (the first 2 to 5): see :func:`default_levels`.
WIDTHS = (16, 32, 64, 128, 256)
#: 2D: the smallest in-plane side the deepest level may have (nnU-Net pools while a side stays >= 4).
MIN_BOTTLENECK = 4


def default_levels(model: str, inplane: tuple[int, ...] | None = None) -> int:
    """Levels of the default network: 4 in 3D; in 2D one more per halving that keeps the smallest
    in-plane side of the largest case (``inplane``) at :data:`MIN_BOTTLENECK` voxels or more, 2 to 5.

    Left atrium (slices up to 160x112 at the default spacing): 5 levels, where 4 plateaued at 0.80
    validation and 0.864 test Dice and 5 reach 0.89 in the same 96k slices (13 min on 2 cores).
    Hippocampus (up to 50x48): 4, as before. 3D keeps 4 (left atrium 0.895 test Dice).

    >>> default_levels("2d", (160, 112)), default_levels("2d", (50, 48)), default_levels("3d", (128, 112))
    (5, 4, 4)
    """
    if model != "2d" or inplane is None:
        return 4
    halvings = 0
    while halvings < len(WIDTHS) - 1 and min(inplane) / 2 ** (halvings + 1) >= MIN_BOTTLENECK:
        halvings += 1
    return 1 + max(1, halvings)


def option(default: Any, help: str, *, unset: str | None = None, choices: str | None = None,
           flag: str | None = None) -> Any:
    """A :class:`TrainConfig` field with what ``sparseslice train --help`` and README say of it.

    The field is declared once: its default here, and the ``train`` command's option
    (:func:`sparseslice.cli.config_options`) and README's option table are derived from it.

    Parameters
    ----------
    default : object
        The field's default (its only declaration).
    help : str
        One line saying what the field sets.
    unset : str, optional
        What ``None`` means (a size resolved from the data), shown as the default.
    choices : str, optional
        The registry of valid values, ``"module:NAME"`` (imported only when needed, so reading
        the fields does not import torch).
    flag : str, optional
        The command-line flag when it is not ``--`` and the name with dashes.
    """
    return field(default=default, metadata={"help": help, "unset": unset, "choices": choices, "flag": flag})


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run.

    Each field is declared once, with :func:`option`: its default, and the one-line help that
    ``sparseslice train --help`` (one option per field) and README's option table show.

    Parameters
    ----------
    model : str
        ``"2d"`` (slice-wise network trained on annotated slices only) or ``"3d"`` (patches
        that contain at least one annotated slice, with a voxel mask of known voxels).
    arch : str
        ``"unet"`` or ``"dynunet"`` (MONAI).
    channels, strides, num_res_units, dropout
        Network width and depth (see :class:`sparseslice.model.ModelSpec`). Unset, they are
        resolved by :meth:`network` (depth from :func:`default_levels`, 2 per level).
    epochs : int
        Maximum number of epochs of the first (or only) optimisation step.
    samples_per_epoch : int, optional
        Training samples (slices or patches) per epoch; default: the number of known
        training slices (2D) or ``4 x`` the number of training cases (3D), at most 100 batches.
    batch_size : int, optional
        Default 16 (2D) or 2 (3D).
    patch_size : tuple of int, optional
        2D: in-plane size; 3D: block size. Default: the largest case (in-plane for 2D) rounded
        up to a multiple of the network divisor, capped at 256 (2D), or 128 in-plane and 48
        along the slice axis (3D).
    spacing : tuple of float, optional
        In-plane spacing (mm, the two axes across the slice axis in order) that images and
        labels are resampled to (:mod:`sparseslice.resample`; slices stay whole, unknown stays
        unknown); ``predict`` resamples back to each image's grid. Default: the training
        cases' median in-plane spacing (nnU-Net's target), coarsened so that the median case
        is at most ``max_inplane`` voxels along each in-plane axis.
    max_inplane : int
        Without ``spacing``: the largest in-plane size (voxels per axis) of the median case
        that the default spacing allows (128: what 2 CPU cores train in minutes).
    foreground_fraction : float
        3D: share of patches centred on a known foreground voxel (nnU-Net oversamples a third).
    lr : float
        Adam learning rate.
    weight_decay : float
        Adam weight decay.
    schedule : str
        ``"one-step"``: ReduceLROnPlateau on validation Dice. ``"two-step"``: the same, then
        fine-tuning from the best checkpoint with learning-rate restarts every
        ``restart_every`` epochs for ``finetune_epochs`` epochs (Specktor-Fadida et al.).
    plateau_patience, plateau_factor : int, float
        ReduceLROnPlateau settings.
    restart_every, finetune_epochs : int
        Two-step fine-tuning settings.
    patience : int
        Early stopping: stop a step after this many epochs without a better validation Dice.
    mask_channel : bool
        Give the network the annotated-slice mask as an extra last input channel. At inference
        it is all ones; so that the network has seen that input, half of the 3D training
        patches get it too (losses keep the true weights).
    interpolated_weight : float
        Weight of voxels in interpolated slices (sidecar ``"interpolated"``) in both losses;
        0 ignores them.
    dice_weight, ce_weight : float
        Weights of the selective batch Dice and masked cross-entropy terms.
    normalization : str
        ``"auto"`` (``ct`` when the dataset's modality is CT, else ``zscore``), ``"zscore"``,
        ``"ct"`` or ``"none"``.
    ct_window : tuple of float
        HU window for ``ct`` normalisation.
    axis : int, optional
        Slice axis; default: the sidecars' axis, else the dataset's slice axis.
    augment : bool
        Random flips, small in-plane rotations and scaling, intensity scale/shift/noise.
    val_fraction : float
        Fraction of training cases held out for validation when no ``val_dir`` is given.
    val_share : float, optional
        Validation costs at most this share of an epoch's training, estimated from sizes
        (:func:`sparseslice.train.validation.validation_subset`: evenly spaced slices, or the first
        cases for 3D); None validates every annotated slice of every validation case.
    seed : int
        Seed of every random choice (split, sampling, augmentation, weights).
    device : str, optional
        ``cpu``, ``cuda``...; default CUDA when present.
    num_threads : int, optional
        ``torch.set_num_threads`` value.
    max_minutes : float, optional
        Wall-clock budget of the whole run (both steps), checked after each epoch.
    bf16 : bool, optional
        bfloat16 autocast for forward passes. Default: on where the device computes bfloat16
        natively (:func:`sparseslice.model.native_bf16`: CUDA with bf16, CPUs with AVX512-BF16 or
        AMX), off elsewhere, where it is slower. Measured on 2 Sapphire Rapids cores with channels
        last: 1.5-2x the fp32 step, test Dice within 0.005 of fp32 on hippocampus and left atrium.
    channels_last : bool
        Channels-last memory format (1.2-1.5x the training step on CPU, same arithmetic).
    nonfinite : str
        NaN or infinite image voxels: ``"error"`` refuses the case, ``"zero"`` reads them as 0
        (see :func:`sparseslice.datasets.load_image`); ``predict`` reads images the same way.
    cache : str, optional
        Folder of an on-disk cache of the preprocessed cases (:mod:`sparseslice.train.cache`,
        nnU-Net's preprocessed arrays): each case is read, normalised and resampled once, then
        memory-mapped from there, for data that does not fit in RAM. Keyed by the files'
        content and the preprocessing, so it is safe to share between runs and to interrupt;
        it never changes what is trained.
    """

    model: str = option("2d", "Network dimension.", choices=f"{__name__}:MODELS")
    arch: str = option("unet", "Network architecture.", choices="sparseslice.model:ARCHITECTURES")
    channels: tuple[int, ...] | None = option(None, "Channels per level.", unset=(
        f"the first levels of {list(WIDTHS)}: 4 (3d); 2d one per halving that keeps the largest case's "
        f"smaller in-plane side >= {MIN_BOTTLENECK} voxels (2-5 levels)"))
    strides: tuple[int, ...] | None = option(None, "Downsampling stride per level, one fewer than channels.",
                                             unset="2 per level")
    num_res_units: int = option(1, "Residual units per level.")
    dropout: float = option(0.0, "Dropout probability.")
    epochs: int = option(50, "Maximum epochs.")
    samples_per_epoch: int | None = option(None, "Training samples (slices or patches) per epoch.",
                                           unset="known training slices (2d), 4 x training cases (3d), "
                                                 "at most 100 batches")
    batch_size: int | None = option(None, "Batch size.", unset="16 (2d), 2 (3d)")
    patch_size: tuple[int, ...] | None = option(None, "Patch size, e.g. 64,64 (2d) or 64,64,32 (3d).",
                                                unset="the largest case rounded up to the network divisor, "
                                                      "at most 256 (2d), 128 in-plane x 48 slices (3d)")
    spacing: tuple[float, float] | None = option(
        None, "In-plane spacing (mm) to resample to, e.g. 1.25,1.25 (the slice axis is never resampled).",
        unset="the cases' median, coarsened so the median case is at most max_inplane voxels in-plane")
    max_inplane: int = option(128, "Without spacing: the median case's largest in-plane size (voxels) the "
                                   "default spacing allows.")
    foreground_fraction: float = option(0.33, "3d: share of patches centred on a foreground voxel.")
    lr: float = option(1e-3, "Adam learning rate.")
    weight_decay: float = option(1e-5, "Adam weight decay.")
    schedule: str = option("one-step", "Learning-rate schedule.", choices=f"{__name__}:SCHEDULES")
    plateau_patience: int = option(3, "ReduceLROnPlateau patience in epochs.")
    plateau_factor: float = option(0.5, "ReduceLROnPlateau factor.")
    restart_every: int = option(5, "two-step: epochs between learning-rate restarts.")
    finetune_epochs: int = option(15, "two-step: fine-tuning epochs from the best checkpoint.")
    patience: int = option(10, "Early-stopping patience in epochs.")
    mask_channel: bool = option(False, "Give the annotated-slice mask as input.")
    interpolated_weight: float = option(0.5, "Weight of interpolated slices.")
    dice_weight: float = option(1.0, "Weight of the selective batch Dice loss.")
    ce_weight: float = option(1.0, "Weight of the masked cross-entropy loss.")
    normalization: str = option("auto", "Intensity normalization.", choices=f"{__name__}:NORMALIZATIONS")
    ct_window: tuple[float, float] = option((-1000.0, 1000.0), "HU window of ct normalization.")
    axis: int | None = option(None, "Slice axis.", unset="the sidecars', else the dataset's")
    augment: bool = option(True, "Random augmentation.")
    val_fraction: float = option(0.1, "Held-out fraction without --val-dir.")
    val_share: float | None = option(0.2, "Most validation may cost, as a share of an epoch's training.",
                                     unset="validate every annotated slice")
    seed: int = option(0, "Random seed.")
    device: str | None = option(None, "cpu, cuda or cuda:N.", unset="CUDA when present")
    num_threads: int | None = option(None, "torch threads (1 per process is best on a busy CPU).",
                                     unset="torch's choice", flag="--threads")
    max_minutes: float | None = option(None, "Wall-clock budget of the run.", unset="no limit")
    bf16: bool | None = option(None, "bfloat16 autocast for forward passes.",
                               unset="on where the device computes bfloat16 natively")
    channels_last: bool = option(True, "Channels-last memory format.")
    nonfinite: str = option("error", "NaN or infinite image voxels: error refuses the case, zero reads them as 0.",
                            choices="sparseslice.datasets:NONFINITE")
    cache: str | None = option(None, "Folder of an on-disk, memory-mapped cache of the preprocessed cases (data "
                                     "beyond RAM), shared by runs.", unset="cases are read into memory")

    def __post_init__(self) -> None:
        # imported here: reading the fields (the CLI's options) must not import torch
        from sparseslice.datasets import NONFINITE
        from sparseslice.model import ModelSpec

        def choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
            if value not in allowed:
                raise UserError(f"{name} must be one of {', '.join(allowed)}, got {value!r}; "
                                f"e.g. {name}: {allowed[0]}")

        choice("model", self.model, MODELS)
        choice("schedule", self.schedule, SCHEDULES)
        choice("normalization", self.normalization, NORMALIZATIONS)
        choice("nonfinite", self.nonfinite, NONFINITE)
        for name in ("epochs", "restart_every", "patience", "plateau_patience", "max_inplane"):
            if int(getattr(self, name)) < 1:
                raise UserError(f"{name} must be at least 1, got {getattr(self, name)}; e.g. {name}: 10")
        for name in ("batch_size", "samples_per_epoch", "num_threads"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise UserError(f"{name} must be at least 1 (or unset), got {value}; e.g. {name}: 8")
        if self.finetune_epochs < 0:
            raise UserError(f"finetune_epochs must be >= 0, got {self.finetune_epochs}; e.g. 15")
        if not self.lr > 0:
            raise UserError(f"lr must be positive, got {self.lr}; e.g. lr: 0.001")
        if not 0 <= self.interpolated_weight <= 1:
            raise UserError(f"interpolated_weight must lie in [0, 1], got {self.interpolated_weight}; e.g. 0.5")
        if not 0 <= self.foreground_fraction <= 1:
            raise UserError(f"foreground_fraction must lie in [0, 1], got {self.foreground_fraction}; e.g. 0.33")
        if self.spacing is not None:
            from sparseslice.resample import check_target

            object.__setattr__(self, "spacing", check_target(self.spacing))
        if self.val_share is not None and not self.val_share > 0:
            raise UserError(f"val_share must be positive, got {self.val_share}; e.g. 0.2, or none to validate all")
        if not 0 <= self.val_fraction < 1:
            raise UserError(f"val_fraction must lie in [0, 1), got {self.val_fraction}; e.g. 0.1")
        if self.dice_weight < 0 or self.ce_weight < 0 or self.dice_weight + self.ce_weight == 0:
            raise UserError(f"dice_weight and ce_weight must be >= 0 and not both 0, got "
                            f"{self.dice_weight} and {self.ce_weight}; e.g. 1 and 1")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise UserError(f"max_minutes must be positive (or unset), got {self.max_minutes}; e.g. 5")
        if self.axis is not None and self.axis not in (0, 1, 2):
            raise UserError(f"axis must be 0, 1 or 2 (or unset), got {self.axis}; pass the slice axis")
        for name in ("channels", "strides"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        # the network's own checks (arch, strides vs channels) run now, before any data is read
        channels, strides = self.network()
        spec = ModelSpec(dims=2 if self.model == "2d" else 3, in_channels=1, out_channels=2,
                         channels=channels, strides=strides,
                         num_res_units=self.num_res_units, arch=self.arch, dropout=self.dropout)
        object.__setattr__(self, "ct_window", tuple(float(v) for v in self.ct_window))
        if self.patch_size is not None:
            patch = tuple(int(p) for p in self.patch_size)
            want = 2 if self.model == "2d" else 3
            if len(patch) != want or min(patch) < 1:
                raise UserError(f"patch_size must have {want} positive sizes for a {self.model} model, got "
                                f"{tuple(self.patch_size)}; e.g. {(64,) * want}")
            divisor = spec.divisor
            if any(p % divisor for p in patch):
                raise UserError(f"patch_size must be multiples of {divisor} (product of strides), got {patch}; "
                                f"round each size up to a multiple of {divisor}")
            object.__setattr__(self, "patch_size", patch)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build a config from a plain dict, refusing unknown keys and wrong types with a suggestion.

        Each value must have its field's type (:func:`check_config_types`): ``augment: "false"``
        (quoted) or ``epochs: "two"`` are refused, never read as true or as a traceback.

        Examples
        --------
        >>> TrainConfig.from_dict({"model": "3d", "epochs": 2}).epochs
        2
        >>> TrainConfig.from_dict({"epoch": 2})
        Traceback (most recent call last):
        ...
        sparseslice.errors.UserError: config key 'epoch' does not exist, got 'epoch'; did you mean 'epochs'?
        >>> TrainConfig.from_dict({"epochs": "two"})
        Traceback (most recent call last):
        ...
        sparseslice.errors.UserError: train config key 'epochs' must be an integer, got 'two'; write e.g. epochs: 50
        """
        check_config_types(data)
        clean = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        try:
            return cls(**clean)
        except TypeError as exc:
            raise UserError(f"config is invalid ({exc}); check the value types") from exc

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (JSON/YAML ready); tuples become lists."""
        out = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}

    def network(self, inplane: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(channels, strides)``: the fields where set; else the first levels of :data:`WIDTHS` (as many
        as ``strides`` needs, or :func:`default_levels` for a 2D ``patch_size``, which the network must
        divide, or else the largest case's in-plane size ``inplane``) and a stride of 2 per level."""
        channels = self.channels
        if channels is None:
            if self.model == "2d" and self.patch_size is not None and len(self.patch_size) == 2:
                inplane = tuple(int(p) for p in self.patch_size)
            levels = len(self.strides) + 1 if self.strides is not None else default_levels(self.model, inplane)
            channels = WIDTHS[:levels]
        strides = self.strides if self.strides is not None else (2,) * (len(channels) - 1)
        return tuple(channels), tuple(strides)

    def updated(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


def check_config_types(data: Any) -> None:
    """Refuse a config mapping with an unknown key or a value of the wrong type.

    Types come from :class:`TrainConfig`'s field annotations: a ``bool`` takes only true or
    false (not the text ``"false"`` or ``"no"``), an ``int`` only an integer (not a bool, not
    ``"two"``), a ``float`` any finite number, ``X | None`` also null, tuples a list whose
    items have the item type (and the length, when fixed).

    Raises
    ------
    UserError
        Naming the key, the value and a value of the right type.
    """
    if not isinstance(data, dict):
        raise UserError(f"config must be a mapping of keys to values, got {type(data).__name__}; "
                        "write key: value lines")
    declared = {f.name: f for f in fields(TrainConfig)}
    hints = typing.get_type_hints(TrainConfig)
    for key, value in data.items():
        if key not in declared:
            raise unknown_choice(f"config key {key!r}", key, list(declared), cutoff=0.5, problem="does not exist",
                                 otherwise=f"valid keys: {', '.join(declared)}")
        wanted = _type_problem(value, hints[key])
        if wanted is not None:
            default = _EXAMPLES.get(key, declared[key].default)
            raise UserError(f"train config key {key!r} must be {wanted}, got {value!r}; "
                            f"write e.g. {key}: {_example(value, hints[key], default)}")


#: Examples in type errors for keys whose default is None (resolved per model).
_EXAMPLES = {"channels": list(WIDTHS[:4]), "strides": [2, 2, 2]}
_WORDS = {int: "an integer", float: "a number", bool: "true or false (unquoted)", str: "text"}
_PLURALS = {int: "integers", float: "numbers"}


def _type_problem(value: Any, hint: Any) -> str | None:
    """What ``value`` should be to match the type ``hint`` (None when it matches)."""
    args = typing.get_args(hint)
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        problem = _type_problem(value, inner)
        return None if problem is None else f"{problem} or null"
    if typing.get_origin(hint) is tuple:
        item = args[0]
        fixed = None if len(args) == 2 and args[1] is Ellipsis else len(args)
        what = f"a list of {f'{fixed} ' if fixed else ''}{_PLURALS[item]}"
        if not isinstance(value, list | tuple) or (fixed is not None and len(value) != fixed):
            return what
        return what if any(_type_problem(v, item) for v in value) else None
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, hint)
    return None if ok else _WORDS[hint]


def _example(value: Any, hint: Any, default: Any) -> str:
    """A YAML value of the type ``hint``: what a quoted bool or number meant, else the default."""
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    text = value.strip().lower() if isinstance(value, str) else None
    if base is bool and text in ("false", "no", "off", "n", "true", "yes", "on", "y"):
        return "false" if text in ("false", "no", "off", "n") else "true"
    if base in (int, float) and text is not None:
        try:
            number = float(text)  # YAML 1.1 reads 1e-3 as text
        except ValueError:
            number = math.nan
        if math.isfinite(number) and (base is float or number.is_integer()):
            return str(int(number)) if base is int else repr(number)
    if default is None or default is MISSING:
        floats = typing.get_origin(base) is tuple and typing.get_args(base)[0] is float
        default = {int: 8, float: 1.0, str: "cpu"}.get(base, [1.0, 1.0] if floats else [64, 64])
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, tuple | list):
        return "[" + ", ".join(map(str, default)) + "]"
    return str(default)


def load_config(path: str | os.PathLike[str]) -> TrainConfig:
    """Read a YAML (or JSON) training config file."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {str(p)!r} does not exist; pass a YAML file of key: value lines")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(p)!r} is not valid YAML ({str(exc).splitlines()[0]}); fix its syntax") \
            from exc
    return TrainConfig.from_dict(data)


def config_difference(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """First key whose value differs between two resolved configs (ignoring free keys)."""
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    for key in sorted(set(stored) | set(current)):
        if key in RESUME_FREE_KEYS:
            continue
        # a key the stored run predates holds its default there
        a, b = stored.get(key, defaults.get(key)), current.get(key)
        a = list(a) if isinstance(a, tuple) else a
        b = list(b) if isinstance(b, tuple) else b
        if a != b:
            return key
    return None
