"""Create hashing models by name (a strict registry, as in torchvision).

A user's mistake (an unknown model or backbone, an unknown or mistyped option, too few bits)
raises :class:`~fgh_deploy.errors.ConfigError` naming the valid choices, so the CLI shows it as
one line; registering a name twice is a programming error and stays a plain ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..backbones import PretrainedArg, backbone_normalization, build_backbone, check_backbone
from ..checkpoint import Checkpoint, load_checkpoint
from ..config import HashConfig, PreprocessConfig
from ..errors import ConfigError, FghError
from ..utils import display_path, terminal_safe
from ._base import HashModel


@dataclass(frozen=True)
class ModelEntry:
    """A registered model: its class, its options dataclass, a one-line description and paper."""

    name: str
    cls: type[HashModel]
    options: type
    summary: str
    paper: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, *, options: type, summary: str, paper: str) -> Callable[[type], type]:
    """Class decorator adding a :class:`HashModel` subclass to the registry under ``name``."""

    def wrap(cls: type) -> type:
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelEntry(name, cls, options, summary, paper)
        return cls

    return wrap


def list_models() -> list[str]:
    """The registered model names, in registration order (the baseline first)."""
    return list(_MODELS)


def model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name is a :class:`ConfigError` listing the valid ones."""
    if name not in _MODELS:
        raise ConfigError(f"unknown model {name!r}; choose from {', '.join(_MODELS)}")
    return _MODELS[name]


def default_preprocess(backbone: str, input_size: int = 224) -> PreprocessConfig:
    """Resize short side to 256/224 of the crop, then center-crop, with the backbone's mean/std."""
    mean, std = backbone_normalization(backbone)
    return PreprocessConfig(input_size=input_size, resize_size=round(input_size * 256 / 224), mean=mean, std=std)


def resolve_options(name: str, options: dict[str, Any]) -> Any:
    """``options`` as the model's options dataclass; unknown keys and wrong types raise :class:`ConfigError`."""
    entry = model_entry(name)
    known = {f.name for f in dataclasses.fields(entry.options)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{name}: unknown option(s) {', '.join(unknown)}; "
                          f"valid: {', '.join(sorted(known)) or 'none'}")
    defaults = entry.options()
    for key, value in options.items():
        _check_option_type(name, key, value, getattr(defaults, key))
    return entry.options(**options)


def _check_option_type(model: str, key: str, value: Any, default: Any) -> None:
    """Options come from the command line and from files: each must have its field's type."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{model}: option {key} must be {type(default).__name__} "
                         f"(like {default!r}), got {terminal_safe(repr(value))[:60]}")


def build_model_from_config(config: HashConfig, preprocess: PreprocessConfig | None = None,
                            pretrained: PretrainedArg = False) -> HashModel:
    """Rebuild a model from a :class:`HashConfig` (as stored in checkpoints).

    Raises:
        ConfigError: an unknown model or backbone, bits < 1, or options the model refuses.
    """
    entry = model_entry(config.model)
    check_backbone(config.backbone)
    if config.bits < 1:
        raise ConfigError(f"bits must be positive, got {config.bits}")
    opts = resolve_options(config.model, config.options)
    # Store every option value, defaults included, so a checkpoint says exactly what it is.
    config = HashConfig(config.model, config.bits, config.backbone, dataclasses.asdict(opts))
    preprocess = preprocess or default_preprocess(config.backbone)
    backbone = build_backbone(config.backbone, pretrained)
    model = entry.cls(config, preprocess, backbone, opts)
    model.backbone_weights = backbone.weights_source  # recorded in checkpoint provenance
    return model


def model_from_checkpoint(ckpt: Checkpoint, device: str | torch.device = "cpu") -> HashModel:
    """The model a loaded checkpoint describes, with its weights, in eval mode on ``device``.

    Raises:
        FghError: the checkpoint's config names a model the registry refuses, or its weights do
            not fit that model; one line naming the file.
    """
    where = display_path(ckpt.path)
    try:
        model = build_model_from_config(ckpt.config, ckpt.preprocess)
    except ConfigError as exc:
        raise FghError(f"{where}: {exc}") from None
    try:
        model.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise FghError(f"{where}: weights do not match its model config ({terminal_safe(reason)})") from exc
    return model.to(device).eval()


def load_model(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> HashModel:
    """Load a checkpoint (verified, see :func:`~fgh_deploy.checkpoint.load_checkpoint`) and return its model."""
    return model_from_checkpoint(load_checkpoint(path), device)


def build_model(name: str, bits: int, *, backbone: str = "resnet50", pretrained: PretrainedArg = False,
                input_size: int = 224, **options: Any) -> HashModel:
    """Create a hashing model by name.

    Args:
        name: one of :func:`list_models` (``adsh``, ``a2net``, ``semicon``, ``agmh``).
        bits: code length.
        backbone: one of ``resnet50`` (the papers'), ``resnet18``, ``efficientnet_lite0`` (edge).
        pretrained: ``False`` (random), ``True`` (ImageNet weights) or a local weights file.
        input_size: square crop size the model is built and exported for.
        **options: model-specific options (see each model's options dataclass).

    Returns:
        The model in training mode; ``model.eval()(uint8 images)`` gives (B, bits) tanh codes.

    Raises:
        ConfigError: an unknown model or backbone, bits < 1, or options the model refuses.
        FghError: ``pretrained`` weights that cannot be found or loaded.
    """
    config = HashConfig(name, int(bits), backbone, dict(options))
    return build_model_from_config(config, default_preprocess(backbone, input_size), pretrained)
