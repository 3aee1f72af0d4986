"""fgh: fine-grained image hashing from research code to devices.

>>> import fgh_deploy
>>> model = fgh_deploy.build_model("semicon", 48, backbone="resnet18").eval()
>>> codes = model(uint8_images)            # (B, 48) tanh codes
>>> fgh_deploy.save_checkpoint(model, "semicon48.pt")
"""

from pathlib import Path as _Path

# Imported from a source checkout rather than from the install (``python -m fgh_deploy.cli`` or
# ``torchrun -m`` run in the repository root puts the checkout first on sys.path): the subpackages
# train, export and engines are the checkout's top-level folders, as pyproject.toml maps them.
_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "train" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))

from .backbones import build_backbone, list_backbones  # noqa: E402
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
