"""Training configuration, the presets (``paper`` schedules from models.md, and ``fast``), and
the configuration of a run to resume (:func:`resume_config`)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from fgh_deploy.backbones import list_backbones
from fgh_deploy.config import MAX_BITS, MAX_INPUT_SIZE, parse_json_object
from fgh_deploy.errors import FghError
from fgh_deploy.models import list_models, model_entry
from fgh_deploy.models._registry import resolve_options
from fgh_deploy.models.semicon import code_split
from fgh_deploy.utils import display_path, terminal_safe

#: The run's configuration file in its directory.
CONFIG_FILE = "config.json"
#: The backbones downsample 32×: below this the last feature map is empty.
MIN_INPUT_SIZE = 32
#: fgh writes config.json files of about 1 kB; anything far larger was not written by it.
MAX_CONFIG_BYTES = 1 << 20
#: More decoding processes than any machine has cores: a typo or a damaged config must not fork thousands.
MAX_WORKERS = 256


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
    """

    data: str
    model: str
    bits: int
    out: str
    #: The database/query split of a plain class-folder tree (``data/<class>/*.jpg``): a file in the
    #: splits.tsv format, relative to the run directory unless absolute. A new run on such a tree
    #: draws the split (``query_fraction`` of each class, seeded by ``seed``) and writes it there.
    splits: str | None = None
    query_fraction: float = 0.2
    backbone: str = "resnet50"
    pretrained: bool | str = True
    input_size: int = 224
    model_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "paper"
    iterations: int = 40
    epochs: int = 30
    num_samples: int = 2000
    batch_size: int = 16
    lr: float = 2.5e-4
    lr_new: float | None = None
    scale_hash_rate: bool = True
    #: "sgd" (the papers', with ``momentum``/``nesterov``) or "adamw" (``momentum`` is its β1).
    optimizer: str = "sgd"
    momentum: float = 0.91
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_steps: list[int] = field(default_factory=lambda: [40])
    lr_decay: float = 0.1
    gamma: float = 200.0
    #: A²-Net adds reconstruction + decorrelation from this fraction of the iterations on.
    aux_start: float = 0.5
    #: AGMH's attention-dispersion loss weight.
    adl_weight: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    #: Keep the shared trunk (and its BatchNorm statistics) at the pretrained weights and train only
    #: the per-branch stages and heads: about 2× faster, for short CPU schedules.
    freeze_trunk: bool = False
    #: With a frozen trunk: compute its output once for this many augmented views of every
    #: training image and train on those (0: run the trunk on every pass).
    trunk_cache_views: int = 0
    #: Host memory the trunk cache may take; fewer views are cached when they would not fit.
    trunk_cache_gb: float = 4.0
    #: Fraction of the database held out to choose best.pt (never the query split).
    val_fraction: float = 0.1
    #: "val" (honest) or "query" (the papers' practice: best over iterations on the test set).
    select_on: str = "val"
    eval_every: int = 1
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    #: "auto" (bf16 where supported on CUDA, else fp16; off on CPU), "bf16", "fp16" or "off".
    amp: str = "auto"

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
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _matches(value, hints[f.name]):
                yield f"{f.name} must be {_describe(hints[f.name])}, got {_shown(value)}"
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
        if isinstance(values.get("crop_scale"), list):  # JSON has no tuples
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)


# models.md §2–§5: the public code's schedules (CUB / Aircraft rows). lr_steps at 40 with 40
# iterations means the rate never decays, exactly as in the papers' runs.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "semicon": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=2.5e-4, momentum=0.91,
                    nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "adsh": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=2.5e-4, momentum=0.91,
                 nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "agmh": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=32, lr=1e-3, momentum=0.9,
                 nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "a2net": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=1e-4, momentum=0.9,
                  nesterov=False, weight_decay=1e-4, lr_steps=[35], scale_hash_rate=False),
}

# A short schedule for a first result on a CPU (see the README's cub100 table): the trunk frozen
# and computed once per image and view; AdamW, whose per-parameter step sizes do not depend on how
# many bits or branches feed a layer's gradient (SGD at one rate collapsed A²-Net's codes, whose
# hash layer starts reading five copies of one feature, and left SEMICON's two stage copies at
# half ADSH's pace); the pretrained stages at 3e-4, the new layers at 1e-3 (at 1e-2 the hash layer
# collapses every model's codes).
FAST_PRESET: dict[str, Any] = dict(iterations=30, epochs=1, num_samples=500, batch_size=32, optimizer="adamw",
                                   lr=3e-4, lr_new=1e-3, momentum=0.9, weight_decay=1e-4, lr_steps=[24],
                                   crop_scale=(0.35, 1.0), eval_every=5, freeze_trunk=True, trunk_cache_views=4,
                                   # AGMH's SIEA branch is training-only and doubles its CPU cost per image;
                                   # the short schedule spends that time on hash-layer iterations instead.
                                   adl_weight=0.0)

PRESETS = ("paper", "fast")


def make_config(preset: str, *, data: str, model: str, bits: int, out: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with explicit overrides (``None`` values are ignored)."""
    if preset == "paper":
        base = PAPER_PRESETS.get(model)
        if base is None:
            raise FghError(f"train config: unknown model {_quoted(model)}; choose from {', '.join(list_models())}")
    elif preset == "fast":
        base = dict(FAST_PRESET)
    else:
        raise FghError(f"train config: unknown preset {_quoted(preset)}; choose from {', '.join(PRESETS)}")
    values = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainConfig(data=data, model=model, bits=bits, out=out, preset=preset, **values)
    config.validate()
    return config


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
    unknown = sorted(set(given) - {f.name for f in dataclasses.fields(TrainConfig)})
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
                       f"refusing {', '.join(_flag(name) for name in changed)} (they would change it; "
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
    if name == "data" or (name == "pretrained" and isinstance(given, str) and isinstance(recorded, str)):
        return Path(given).resolve() == Path(recorded).resolve()  # one file or folder, however spelt
    if isinstance(given, (list, tuple)) and isinstance(recorded, (list, tuple)):
        return list(given) == list(recorded)
    return given == recorded and isinstance(given, bool) == isinstance(recorded, bool)  # True == 1 otherwise


def _flag(name: str) -> str:
    """The ``fgh train`` option that sets config field ``name``."""
    return {"model_options": "--option", "pretrained": "--weights/--no-pretrained"}.get(
        name, "--" + name.replace("_", "-"))


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
