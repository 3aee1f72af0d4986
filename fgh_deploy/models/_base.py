"""The surface every hashing model shares."""

from __future__ import annotations

import abc
from typing import Any

import torch
from torch import nn

from ..config import HashConfig, PreprocessConfig
from .layers import InputNormalize


class HashModel(nn.Module, abc.ABC):
    """Base class: uint8 images in, (B, bits) tanh codes out.

    ``forward`` is exactly the inference path that gets exported. Training-only computations
    (decoders, auxiliary attention branches) live in :meth:`forward_train`, and the modules
    they use are listed by :meth:`training_only_modules` so tests can prove ``forward`` never
    reaches them.
    """

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig) -> None:
        super().__init__()
        self.config = config
        self.preprocess = preprocess
        self.normalize = InputNormalize(preprocess.mean, preprocess.std)

    @property
    def bits(self) -> int:
        return self.config.bits

    @abc.abstractmethod
    def encode_features(self, x: torch.Tensor) -> Any:
        """Normalised images → whatever :meth:`hash_head` consumes."""

    @abc.abstractmethod
    def hash_head(self, features: Any) -> torch.Tensor:
        """Features → pre-tanh logits (B, bits)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.hash_head(self.encode_features(self.normalize(images))))

    def forward_train(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Codes plus the extra tensors the model's training losses need (``{"codes": u, ...}``)."""
        return {"codes": self(images)}

    def training_only_modules(self) -> dict[str, nn.Module]:
        """Modules used by :meth:`forward_train` but never by :meth:`forward`."""
        return {}
