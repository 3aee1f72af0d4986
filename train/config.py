"""Training configuration: :class:`TrainConfig` (each field with its ``fgh train`` option), the presets
as a table of field values (:data:`PRESETS`), command-line values converted by each field's type
(:func:`command_line_values`), and the configuration of a run to resume (:func:`resume_config`)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fgh_deploy.backbones import list_backbones
from fgh_deploy.config import MAX_BITS, MAX_INPUT_SIZE, parse_json_object
from fgh_deploy.errors import FghError
from fgh_deploy.models import list_models, model_entry
from fgh_deploy.models._registry import resolve_options
from fgh_deploy.models.semicon import code_split
from fgh_deploy.utils import display_path, parse_int_list, terminal_safe

#: The run's configuration file in its directory.
CONFIG_FILE = "config.json"
#: The backbones downsample 32×: below this the last feature map is empty.
MIN_INPUT_SIZE = 32
#: fgh writes config.json files of about 1 kB; anything far larger was not written by it.
MAX_CONFIG_BYTES = 1 << 20
#: More decoding processes than any machine has cores: a typo or a damaged config must not fork thousands.
MAX_WORKERS = 256


@dataclass(frozen=True)
class TrainOption:
    """How ``fgh train`` sets one :class:`TrainConfig` field, declared next to the field.

    The CLI builds its options from these (:data:`TRAIN_OPTIONS`) and :func:`command_line_values`
    converts what they receive by the field's type, so a field is declared once. A bool field is a
    switch (``--flag/--no-flag``); a dict field is a repeated ``key=value`` option; any other field
    takes one value.
    """

    help: str
    #: The option's names; empty: ``--field-name``.
    flags: tuple[str, ...] = ()
    #: The switch that sets the field to false: a bool's negative form (default ``--no-field-name``),
    #: or next to a value option, a switch of its own (``--no-pretrained`` next to ``--weights PATH``).
    off: str | None = None
    off_help: str | None = None
    metavar: str | None = None
    #: A file or folder: spelt as :class:`pathlib.Path` spells it (``runs/a/`` → ``runs/a``).
    path: bool = False
    #: False: no option of its own; ``--set field=value`` sets it.
    own_option: bool = True
    #: What the option holds when not given (``--out``: a run directory is always named).
    cli_default: str | None = None
    #: Filled in by :data:`TRAIN_OPTIONS`: the field, and ``"switch"``, ``"pairs"`` or ``"value"``.
    name: str = ""
    kind: str = "value"

    @property
    def off_name(self) -> str | None:
        """The parameter name of a switch of its own that sets a non-bool field to false."""
        return self.off[2:].replace("-", "_") if self.off and self.kind != "switch" else None

    @property
    def shown(self) -> str:
        """How messages name the option (``--lr``, ``--weights/--no-pretrained``, ``--set lr_decay``)."""
        if not self.own_option:
            return f"--set {self.name}"
        return f"{self.flags[0]}/{self.off}" if self.off_name else self.flags[0]


def _option(text: str, default: Any = dataclasses.MISSING, **spelling: Any) -> Any:
    """A :class:`TrainConfig` field with its ``fgh train`` help ``text`` and spelling (:class:`TrainOption`)."""
    factory = spelling.pop("default_factory", dataclasses.MISSING)
    return field(default=default, default_factory=factory, metadata={"option": TrainOption(text, **spelling)})


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``config.json`` and into checkpoints).

    The schedule follows ADSH: ``iterations`` outer iterations, each sampling ``num_samples``
    database images and training ``epochs`` epochs on them against fixed database codes, then
    updating the codes by DCC. The learning rates step ×``lr_decay`` at the iterations in
    ``lr_steps`` (the scheduler steps once per outer iteration, as in the papers).

    Two parameter groups (each model declares which layer is which): ``lr`` for the layers
    that start from the backbone's pretrained weights, ``lr_new`` for the layers that start
    from random (attention, interaction blocks, hash layers); ``None`` means ``lr`` (the
    papers train everything at one rate). With ``scale_hash_rate`` the hash layers train at
    ``lr_new`` × the model's :meth:`~fgh_deploy.models.HashModel.hash_rate_scale` (feature width
    / fan-in), so a wide hash layer's codes move per step as ADSH's do.

    Each field's metadata holds its ``fgh train`` option (:class:`TrainOption`).
    """

    data: str = _option("Dataset root (splits.tsv, CUB-200-2011, train/ + test/, or one folder per class).",
                        flags=("--data", "-d"), path=True)
    model: str = _option("adsh, a2net, semicon or agmh.", flags=("--model", "-m"))
    bits: int = _option("Code length in bits.", flags=("--bits", "-b"))
    out: str = _option("Run directory (with --resume: the run to continue, wherever it was first written).",
                       flags=("--out", "-o"), path=True, cli_default="runs/fgh")
    #: A new run on a plain class-folder tree draws the split and writes it there.
    splits: str | None = _option(
        "The database/query split of a plain class-folder tree (data/<class>/*.jpg): a splits.tsv file, relative "
        "to the run directory unless absolute (drawn with query_fraction and seed on a new run).",
        None, path=True, own_option=False)
    query_fraction: float = _option(
        "On a plain class-folder tree: the share of each class drawn as queries (default 0.2).", 0.2)
    backbone: str = _option("resnet50 (default), resnet18 or efficientnet_lite0.", "resnet50")
    pretrained: bool | str = _option("Local backbone weights instead of the ImageNet download.", True,
                                     flags=("--weights",), off="--no-pretrained", off_help="Random backbone weights.",
                                     metavar="PATH", path=True)
    input_size: int = _option("Square input size (default 224).", 224)
    model_options: dict[str, Any] = _option("Model option key=value (e.g. num_parts=4).", flags=("--option",),
                                            default_factory=dict)
    preset: str = _option("paper (the papers' schedules, default) or fast.", "paper")
    iterations: int = _option("Outer iterations (DCC code updates); with --resume: extend the run to this many.", 40)
    epochs: int = _option("Epochs per outer iteration on its sampled images.", 30)
    num_samples: int = _option("Database images sampled per outer iteration.", 2000)
    batch_size: int = _option("Images per step.", 16)
    lr: float = _option("Rate of the layers that start from pretrained weights.", 2.5e-4)
    lr_new: float | None = _option("Rate of the new layers (attention, interaction, hash).", None)
    scale_hash_rate: bool = _option(
        "Hash layers at lr-new × feature width / fan-in (default; off in the paper presets).", True)
    optimizer: str = _option("sgd (the papers') or adamw.", "sgd")
    momentum: float = _option("SGD momentum, or AdamW's β1.", 0.91)
    nesterov: bool = _option("Nesterov momentum (SGD).", True)
    weight_decay: float = _option("Weight decay.", 1e-4)
    lr_steps: list[int] = _option("Comma-separated iterations, e.g. 30,35.", default_factory=lambda: [40])
    lr_decay: float = _option("Factor of the rates at each of lr_steps.", 0.1, own_option=False)
    gamma: float = _option("Quantization weight.", 200.0)
    aux_start: float = _option("A²-Net: fraction of the iterations after which its reconstruction and decorrelation "
                               "losses start (1: never).", 0.5)
    adl_weight: float = _option("AGMH: weight of the attention-dispersion loss (0: its attention branch does not run).",
                                0.5)
    crop_scale: tuple[float, float] = _option("RandomResizedCrop scale range, e.g. 0.08,1.", (0.08, 1.0),
                                              metavar="MIN,MAX")
    #: Training only the per-branch stages and heads is about 2× faster, for short CPU schedules.
    freeze_trunk: bool = _option("Keep the shared trunk (and its BatchNorm statistics) at its pretrained weights.",
                                 False, flags=("--freeze-trunk",), off="--train-trunk")
    trunk_cache_views: int = _option("With a frozen trunk: its output for this many augmented views per image, "
                                     "computed once (0: every pass).", 0)
    #: Fewer views are cached when they would not fit.
    trunk_cache_gb: float = _option("Host memory (GB) the trunk cache may take.", 4.0, own_option=False)
    val_fraction: float = _option("Fraction of the database held out to choose best.pt (never the query split).", 0.1)
    select_on: str = _option("val, or query (the papers' test-set selection).", "val")
    eval_every: int = _option("Evaluate every this many iterations.", 1)
    workers: int = _option("Decoding processes.", 4)
    seed: int = _option("Seed of the split, the sampling and the initialisation.", 0)
    device: str = _option("auto (default), cpu or cuda[:N].", "auto")
    amp: str = _option("auto (bf16 where supported on CUDA, else fp16; off on CPU), bf16, fp16 or off.", "auto")

    def validate(self, where: str = "train config") -> None:
        """Check every value (types, bounds, names, the run directory) before anything is built.

        Args:
            where: what the message names as the source of the values (e.g. a config.json).

        Raises:
            FghError: ``"<where>: <field> ..."`` for the first bad value; the device's own error
                (:func:`engines.torch_engine.resolve_device`) for a device that is unknown or absent.
        """
        problem = next(self._problems(), None)
        if problem is not None:
            raise FghError(f"{where}: {problem}")
        from fgh_deploy.utils import resolve_device

        resolve_device(self.device)

    def _problems(self) -> Iterator[str]:
        """What is wrong, first problem first (later checks assume the earlier ones passed)."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, _HINTS[f.name]):
                yield f"{f.name} must be {_describe(_HINTS[f.name])}, got {_shown(value)}"
                return
        if not self.data:
            yield "data must name the dataset folder"
        if self.model not in list_models():
            yield f"unknown model {_quoted(self.model)}; choose from {', '.join(list_models())}"
        if self.backbone not in list_backbones():
            yield f"unknown backbone {_quoted(self.backbone)}; choose from {', '.join(list_backbones())}"
        if not 1 <= self.bits <= MAX_BITS:
            yield f"bits must be from 1 to {MAX_BITS}, got {self.bits}"
        option_types = typing.get_type_hints(model_entry(self.model).options)
        for key, value in self.model_options.items():
            if key in option_types and not _matches(value, option_types[key]):
                yield f"model_options (--option): {self.model}'s {key} must be {_describe(option_types[key])}, " \
                      f"got {_shown(value)}"
        try:
            resolve_options(self.model, self.model_options)
        except ValueError as exc:
            yield f"model_options (--option): {terminal_safe(str(exc))}"
        if self.model == "semicon":
            try:
                code_split(self.bits)
            except ValueError as exc:
                yield f"bits: {exc}"
        if not MIN_INPUT_SIZE <= self.input_size <= MAX_INPUT_SIZE:
            yield f"input_size must be from {MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} pixels, got {self.input_size}"
        if self.preset not in PRESETS:
            yield f"unknown preset {_quoted(self.preset)}; choose from {', '.join(PRESETS)}"
        if isinstance(self.pretrained, str) and not os.path.isfile(self.pretrained):
            yield f"pretrained (--weights) {display_path(self.pretrained)}: no such weights file"
        checks = [
            (self.iterations >= 1 and self.epochs >= 1, "iterations and epochs must be ≥ 1"),
            (self.num_samples >= 1 and self.batch_size >= 1, "num_samples and batch_size must be ≥ 1"),
            (self.lr > 0 and (self.lr_new is None or self.lr_new > 0), "lr and lr_new must be positive"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be 'sgd' or 'adamw'"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be ≥ 0, got {self.weight_decay}"),
            (all(step >= 1 for step in self.lr_steps), f"lr_steps must be iterations ≥ 1, got {self.lr_steps}"),
            (self.lr_decay > 0 and self.gamma >= 0, "lr_decay must be positive and gamma ≥ 0"),
            (0.0 <= self.aux_start <= 1.0 and self.adl_weight >= 0, "aux_start must be in [0, 1], adl_weight ≥ 0"),
            (0 < self.crop_scale[0] <= self.crop_scale[1] <= 1,
             f"crop_scale must be two numbers 0 < min ≤ max ≤ 1, got {list(self.crop_scale)}"),
            (self.trunk_cache_views >= 0 and self.trunk_cache_gb > 0,
             "trunk_cache_views must be ≥ 0 and trunk_cache_gb positive"),
            (self.trunk_cache_views == 0 or self.freeze_trunk,
             "trunk_cache_views needs a frozen trunk (freeze_trunk); a trained trunk changes its output"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (0.0 < self.query_fraction < 1.0, "query_fraction must be in (0, 1)"),
            (self.select_on in ("val", "query"), "select_on must be 'val' or 'query'"),
            (self.eval_every >= 1, "eval_every must be ≥ 1"),
            (0 <= self.workers <= MAX_WORKERS, f"workers must be from 0 to {MAX_WORKERS}, got {self.workers}"),
            (0 <= self.seed < 2**63, "seed must be in [0, 2⁶³)"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "amp must be auto, bf16, fp16 or off"),
            (self.splits is None or bool(self.splits), "splits must name a file"),
        ]
        for ok, message in checks:
            if not ok:
                yield message
        if (problem := _not_a_run_directory(Path(self.out))) is not None:
            yield f"out {problem}"

    @property
    def new_lr(self) -> float:
        """The rate of the new (randomly initialised) layers."""
        return self.lr if self.lr_new is None else self.lr_new

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: Any) -> "TrainConfig":
        """The config a :meth:`to_dict` wrote (unknown keys ignored); not yet validated.

        Raises:
            FghError: ``data`` is not a dict or lacks a required field.
        """
        if not isinstance(data, dict):
            raise FghError(f"train config must be a JSON object, got {type(data).__name__}")
        fields = dataclasses.fields(cls)
        required = [f.name for f in fields
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing := [name for name in required if name not in data]:
            raise FghError(f"train config lacks {', '.join(missing)}")
        values = {f.name: data[f.name] for f in fields if f.name in data}
        for name, value in values.items():
            if typing.get_origin(_HINTS[name]) is tuple and isinstance(value, list):  # JSON has no tuples
                values[name] = tuple(value)
        return cls(**values)


def _metavar(hint: Any) -> str:
    """What a value option shows in ``--help`` for a field of type ``hint``."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    origin = typing.get_origin(hint)
    if origin is dict:
        return "KEY=VALUE"
    if origin in (list, tuple):
        return "N,N,..."
    return {int: "INTEGER", float: "FLOAT"}.get(hint, "TEXT")


def _train_options() -> dict[str, TrainOption]:
    """Each field's declared :class:`TrainOption` with its field name, kind and default spelling filled in."""
    options = {}
    for f in dataclasses.fields(TrainConfig):
        declared: TrainOption = f.metadata["option"]
        hint = _HINTS[f.name]
        kind = "switch" if hint is bool else "pairs" if typing.get_origin(hint) is dict else "value"
        flags = declared.flags or ("--" + f.name.replace("_", "-"),)
        off = declared.off or (f"--no-{flags[0][2:]}" if kind == "switch" else None)
        metavar = None if kind == "switch" else declared.metavar or ("PATH" if declared.path else _metavar(hint))
        options[f.name] = dataclasses.replace(declared, name=f.name, kind=kind, flags=flags, off=off, metavar=metavar)
    return options


_HINTS: dict[str, Any] = typing.get_type_hints(TrainConfig)
#: Each :class:`TrainConfig` field's ``fgh train`` option, by field name (the CLI builds its options from these).
TRAIN_OPTIONS: dict[str, TrainOption] = _train_options()


# --- presets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    """A named starting point: :class:`TrainConfig` field → value for every model, then per model.

    A preset with ``per_model`` rows covers only those models (a paper's schedule exists for its own).
    """

    values: Mapping[str, Any]
    per_model: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def values_for(self, model: str) -> dict[str, Any]:
        """The values for ``model``, copied (a config must not share the table's lists)."""
        return copy.deepcopy({**self.values, **self.per_model.get(model, {})})


# The presets are a table of plain values here, not a TOML or JSON file beside the package: Python 3.10
# (supported) has no TOML reader, JSON cannot carry the comments that say why each value was chosen, and
# make_config checks every value with the same type and bound checks as a config.json.
PRESETS: dict[str, Preset] = {
    # models.md §2–§5: the public code's schedules (CUB / Aircraft rows). lr_steps at 40 with 40
    # iterations means the rate never decays, exactly as in the papers' runs.
    "paper": Preset(
        values=dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=2.5e-4,
                    momentum=0.91, nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
        per_model={
            "adsh": {},
            "semicon": {},
            "agmh": dict(batch_size=32, lr=1e-3, momentum=0.9),
            "a2net": dict(lr=1e-4, momentum=0.9, nesterov=False, lr_steps=[35]),
        }),
    # A short schedule for a first result on a CPU (see the README's cub100 table): the trunk frozen
    # and computed once per image and view; AdamW, whose per-parameter step sizes do not depend on how
    # many bits or branches feed a layer's gradient (SGD at one rate collapsed A²-Net's codes, whose
    # hash layer starts reading five copies of one feature, and left SEMICON's two stage copies at
    # half ADSH's pace); the pretrained stages at 3e-4, the new layers at 1e-3 (at 1e-2 the hash layer
    # collapses every model's codes).
    "fast": Preset(
        values=dict(iterations=30, epochs=1, num_samples=500, batch_size=32, optimizer="adamw", lr=3e-4, lr_new=1e-3,
                    momentum=0.9, weight_decay=1e-4, lr_steps=[24], crop_scale=(0.35, 1.0), eval_every=5,
                    freeze_trunk=True, trunk_cache_views=4,
                    # AGMH's SIEA branch is training-only and doubles its CPU cost per image;
                    # the short schedule spends that time on hash-layer iterations instead.
                    adl_weight=0.0)),
}


def make_config(preset: str, *, data: str, model: str, bits: int, out: str, **overrides: Any) -> TrainConfig:
    """A validated :class:`TrainConfig` from a preset, with explicit overrides (``None`` values are ignored).

    Raises:
        FghError: an unknown preset or model, a model the preset has no values for, or a bad value.
    """
    chosen = PRESETS.get(preset)
    if chosen is None:
        raise FghError(f"train config: unknown preset {_quoted(preset)}; choose from {', '.join(PRESETS)}")
    if model not in list_models():
        raise FghError(f"train config: unknown model {_quoted(model)}; choose from {', '.join(list_models())}")
    if chosen.per_model and model not in chosen.per_model:
        raise FghError(f"train config: the {preset} preset has no values for {model}; "
                       f"it covers {', '.join(chosen.per_model)}")
    values = {**chosen.values_for(model), **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainConfig(data=data, model=model, bits=bits, out=out, preset=preset, **values)
    config.validate()
    return config


# --- the command line ---------------------------------------------------------------------------

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def command_line_values(options: Mapping[str, Any], assignments: Sequence[str] = ()) -> dict[str, Any]:
    """The :class:`TrainConfig` values of an ``fgh train`` command line, each converted by its field's type.

    Args:
        options: what each field's own option received, by field name (a string, a switch's bool, the
            list of a repeated option; ``None``: not given), and each extra off switch's bool by its
            :attr:`TrainOption.off_name`.
        assignments: the ``--set field=value`` texts, for the fields without an option of their own.

    Returns:
        Field → value for every option given (not yet validated: :meth:`TrainConfig.validate`).

    Raises:
        FghError: one line naming the option, for a value its field's type cannot hold or an unknown
            ``--set`` field.
    """
    values: dict[str, Any] = {}
    for option in TRAIN_OPTIONS.values():
        raw = options.get(option.name)
        if raw is not None:
            values[option.name] = _converted(option, raw, option.flags[0])
        elif option.off_name is not None and options.get(option.off_name):
            # A value wins over its off switch (--weights PATH over --no-pretrained): a script's shared
            # options may switch the weights off while one of its runs names a file.
            values[option.name] = False
    for text in assignments:
        option, value = _assignment(text)
        values[option.name] = _converted(option, value, option.shown)
    return values


def _assignment(text: str) -> tuple[TrainOption, str]:
    """``field=value`` of ``--set``: the field's option and the value's text."""
    name, sep, value = text.partition("=")
    settable = [option.name for option in TRAIN_OPTIONS.values() if not option.own_option]
    if not sep or not name:
        raise FghError(f"--set expects field=value, got '{terminal_safe(text)}'")
    option = TRAIN_OPTIONS.get(name)
    if option is None:
        raise FghError(f"--set: no train config field {_quoted(name)}; --set takes {', '.join(settable)}")
    if option.own_option:
        raise FghError(f"--set {name}: {name} has an option of its own, {option.shown}")
    return option, value


def _converted(option: TrainOption, raw: Any, flag: str) -> Any:
    """The field value of what ``flag`` received: a switch's bool, a repeated option's pairs, or one text."""
    if isinstance(raw, bool):
        return raw
    if option.kind == "pairs":
        return _key_values(raw, flag)
    try:
        value = _from_text(raw, _HINTS[option.name], flag)
    except ValueError:
        raise FghError(f"{flag} expects {_spelt(_HINTS[option.name])}, got '{terminal_safe(raw)}'") from None
    return str(Path(value)) if option.path and isinstance(value, str) else value


def _from_text(text: str, hint: Any, flag: str) -> Any:
    """``text`` as a value of type ``hint`` (the first member of a union that reads it)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for member in args:
            try:
                return _from_text(text, member, flag)
            except ValueError:
                continue
        raise ValueError(text)
    word = text.strip().lower()
    if hint is type(None):
        if word in ("none", "null"):
            return None
        raise ValueError(text)
    if hint is bool:
        if word in _TRUE + _FALSE:
            return word in _TRUE
        raise ValueError(text)
    if hint in (int, float, str):
        return hint(text)
    if origin is list and args == (int,):
        return list(parse_int_list(text, flag))
    if origin is tuple:
        # The count is left to validate(), which names the field and what it got.
        return tuple(float(part) for part in text.split(","))
    raise TypeError(f"no command-line form for {hint!r}")


def _spelt(hint: Any) -> str:
    """What a command-line value of type ``hint`` must look like."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_spelt(arg) for arg in args)
    if origin is tuple:
        count = {2: "two", 3: "three"}.get(len(args), str(len(args)))
        return f"{count} numbers separated by a comma"
    return {bool: "true or false", int: "an integer", float: "a number", type(None): "none"}.get(hint, str(hint))


def _key_values(pairs: Sequence[str], flag: str) -> dict[str, Any]:
    """``key=value`` pairs → dict, values read as JSON where they are JSON (4, 0.3, true), else text."""
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise FghError(f"{flag} expects key=value, got '{terminal_safe(pair)}'")
        try:
            values[key] = json.loads(value)
        except (json.JSONDecodeError, RecursionError):
            values[key] = value
    return values


# --- resume -------------------------------------------------------------------------------------

#: What ``--resume`` may change: how long the schedule runs (the trainer extends it) and where
#: and with how many decoding processes it runs. Any other change would make it another run.
RESUME_MAY_CHANGE = ("iterations", "device", "workers")


def resume_config(run: str | os.PathLike[str], given: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration to continue the run in directory ``run``, read from its config.json.

    The run is where ``run`` is, whatever its config.json records: ``out`` becomes ``run``, so a
    copied or moved run continues in its new place and never writes to the old one.

    Args:
        run: the run directory.
        given: the options the user gave (config field → value). A value equal to the recorded
            one is accepted; those in :data:`RESUME_MAY_CHANGE` may differ; any other difference
            is refused.

    Raises:
        FghError: no run there; config.json unreadable, not a JSON object, or with a bad value
            (naming the file); options that would change the run (naming them).
    """
    run_dir = Path(run)
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise FghError(f"{display_path(run_dir)}: nothing to resume (no {CONFIG_FILE}); start without --resume")
    recorded = _read_json_object(path)
    given = dict(given or {})
    unknown = sorted(set(given) - set(TRAIN_OPTIONS))
    if unknown or "out" in given:
        raise ValueError(f"not train config fields to resume with: {unknown or ['out']}")
    try:
        config = TrainConfig.from_dict({**recorded, "out": str(run_dir)})
    except FghError as exc:
        raise FghError(f"{display_path(path)}: {exc}") from None
    changed = [name for name, value in given.items()
               if name not in RESUME_MAY_CHANGE and not _same_value(name, value, getattr(config, name))]
    if changed:
        raise FghError(f"{display_path(run_dir)}: --resume continues the run as its {CONFIG_FILE} records it; "
                       f"refusing {', '.join(TRAIN_OPTIONS[name].shown for name in changed)} (they would change it; "
                       f"start a new run with another --out instead)")
    config = dataclasses.replace(config, **{name: given[name] for name in RESUME_MAY_CHANGE if name in given})
    config.validate(where=display_path(path))
    return config


def _read_json_object(path: Path) -> dict[str, Any]:
    where = display_path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise FghError(f"{where}: cannot read ({exc.strerror or exc})") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise FghError(f"{where}: larger than {MAX_CONFIG_BYTES} bytes; not a config written by fgh train")
    if not raw.strip():
        raise FghError(f"{where}: empty; the run's configuration is lost (start a new run)")
    try:
        return parse_json_object(raw, "it")
    except FghError as exc:
        raise FghError(f"{where}: {exc}; not a config written by fgh train") from None


def _same_value(name: str, given: Any, recorded: Any) -> bool:
    if TRAIN_OPTIONS[name].path and isinstance(given, (str, os.PathLike)) and isinstance(recorded, str):
        return Path(given).resolve() == Path(recorded).resolve()  # one file or folder, however spelt
    if isinstance(given, (list, tuple)) and isinstance(recorded, (list, tuple)):
        return list(given) == list(recorded)
    return given == recorded and isinstance(given, bool) == isinstance(recorded, bool)  # True == 1 otherwise


def _not_a_run_directory(out: Path) -> str | None:
    """Why ``out`` cannot be (or be created as) a run directory, or ``None``."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                which = "is" if path == out else f"is under {display_path(path)}, which is"
                return f"{display_path(out)} {which} a file, not a run directory"
            return None
    return None


def _matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` (as JSON gives it) is of the annotated type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_matches(item, args[0]) for item in value)
    if origin is tuple:
        return isinstance(value, tuple) and len(value) == len(args) and all(map(_matches, value, args))
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(key, str) for key in value)
    raise TypeError(f"no check for annotation {hint!r}")


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in args)
    if origin is list:
        return f"a list of {_describe(args[0]).split(' ', 1)[1]}s"
    if origin is tuple:
        return f"{len(args)} numbers"
    return {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
            type(None): "null", dict: "an object"}.get(origin or hint, str(hint))


def _shown(value: Any) -> str:
    """A value from a file or the command line, short and printable."""
    text = terminal_safe(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _quoted(text: str) -> str:
    return f"'{terminal_safe(text)}'"
