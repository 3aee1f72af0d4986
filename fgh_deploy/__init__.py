"""fgh: fine-grained image hashing from research code to devices.

>>> import fgh_deploy
>>> model = fgh_deploy.build_model("semicon", 48, backbone="resnet18").eval()
>>> codes = model(uint8_images)            # (B, 48) tanh codes
>>> fgh_deploy.save_checkpoint(model, "semicon48.pt")
"""

from .backbones import build_backbone, list_backbones
from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .config import HashConfig, PreprocessConfig
from .errors import ConfigError, FghError
from .models import HashModel, build_model, build_model_from_config, list_models, load_model, model_from_checkpoint
from .version import __version__

__all__ = [
    "Checkpoint",
    "ConfigError",
    "FghError",
    "HashConfig",
    "HashModel",
    "PreprocessConfig",
    "__version__",
    "build_backbone",
    "build_model",
    "build_model_from_config",
    "list_backbones",
    "list_models",
    "load_checkpoint",
    "load_model",
    "model_from_checkpoint",
    "save_checkpoint",
]
