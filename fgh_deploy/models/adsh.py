"""ADSH baseline: backbone → global average pool → linear → tanh.

Jiang & Li, "Asymmetric Deep Supervised Hashing", AAAI 2018; the fine-grained repos use it with a
ResNet-50 whose classifier is replaced by ``Linear(2048 → k, bias)`` (models.md §5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import Backbone
from ..config import HashConfig, PreprocessConfig
from ._base import HashModel
from ._registry import register_model
from .layers import global_pool


@dataclass(frozen=True)
class ADSHOptions:
    """ADSH has no options."""


@register_model("adsh", options=ADSHOptions, summary="global features, linear hash layer (baseline)",
                paper="Jiang & Li, Asymmetric Deep Supervised Hashing, AAAI 2018")
class ADSH(HashModel):
    """The baseline: one linear hash layer on the backbone's pooled features (no parts, no attention)."""

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig, backbone: Backbone,
                 options: ADSHOptions) -> None:
        super().__init__(config, preprocess, backbone.info.out_channels)
        self.trunk = backbone.trunk
        self.last_stage = backbone.last_stage
        self.hash = nn.Linear(backbone.info.out_channels, config.bits)

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        return global_pool(self.last_stage(fmap))

    def global_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return self.features(fmap)

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.trunk, self.last_stage]
