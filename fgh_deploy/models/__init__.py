"""Fine-grained hashing models, created by name: ``build_model("semicon", 48, backbone="resnet50")``."""

from ._base import HashModel
from ._registry import (
    ModelEntry,
    build_model,
    build_model_from_config,
    default_preprocess,
    list_models,
    load_model,
    model_entry,
    model_from_checkpoint,
    register_model,
)

# Importing the model modules registers them (in this order: the baseline first).
from . import adsh, a2net, semicon, agmh  # noqa: E402,F401  isort:skip

__all__ = [
    "HashModel",
    "ModelEntry",
    "build_model",
    "build_model_from_config",
    "default_preprocess",
    "list_models",
    "load_model",
    "model_entry",
    "model_from_checkpoint",
    "register_model",
]
