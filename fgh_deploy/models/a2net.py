"""A²-Net: attentional local parts + global feature, with a tied-weight reconstruction decoder.

Wei et al., "A²-Net: Learning Attribute-Aware Hash Codes for Large-Scale Fine-Grained Image
Retrieval", NeurIPS 2021. Built from the group's A²-Net++ code minus its image generators
(models.md §4): M attention maps on the trunk output pick M local parts, which go through one
shared copy of the last stage as a single (B·M) batch; the global branch is a second copy.
The decoder v̂ = u·W (W the hash matrix, tied) only exists for training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import Backbone
from ..config import HashConfig, PreprocessConfig
from ..errors import ConfigError
from ._base import TRAINING_OUTPUTS, HashModel
from ._registry import register_model
from .layers import AttentionHead, RefineStage, SlimAttentionStack, global_pool


#: Most attention maps: M = bits (the A²-Net++ code's choice) up to 256-bit codes.
MAX_PARTS = 256


@dataclass(frozen=True)
class A2NetOptions:
    """Args:
        num_parts: attention maps M (the paper's value is unverified; the MindSpore port uses 4,
            the PyTorch A²-Net++ code M = bits, which is very heavy).
        normalize_parts: L2-normalise each part and the global vector before concatenation
            (the MindSpore port does, the PyTorch code does not).
    """

    num_parts: int = 4
    normalize_parts: bool = False

    def __post_init__(self) -> None:
        # Bounded because options also come from files: a hostile num_parts must not exhaust memory.
        if not 1 <= self.num_parts <= MAX_PARTS:
            raise ConfigError(f"a2net: num_parts must be in 1..{MAX_PARTS}, got {self.num_parts}")


@register_model("a2net", options=A2NetOptions, summary="M attention parts + global, tied decoder (training)",
                paper="Wei et al., A²-Net: Attribute-Aware Hash Codes for Fine-Grained Retrieval, NeurIPS 2021")
class A2Net(HashModel):
    """M attended parts and the global feature through two copies of the last stage, one hash layer on all.

    The hash layer has no bias, so its transpose is the tied decoder the reconstruction loss
    trains (see the module docstring).
    """

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig, backbone: Backbone,
                 options: A2NetOptions) -> None:
        super().__init__(config, preprocess, backbone.info.out_channels)
        info = backbone.info
        self.options = options
        self.trunk = backbone.trunk
        self.refine_global = RefineStage(backbone.copy_last_stage(), info.stage_channels)
        self.refine_local = RefineStage(backbone.copy_last_stage(), info.stage_channels)
        self.attention = nn.Sequential(
            SlimAttentionStack(info.trunk_channels),
            AttentionHead(64, options.num_parts),
        )
        # Bias-free so that Wᵀ is a pure linear decoder; nn.Linear's default init is the paper's
        # kaiming_uniform(a=√5).
        self.hash = nn.Linear((options.num_parts + 1) * info.out_channels, config.bits, bias=False)

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        b, c, h, w = fmap.shape
        parts_att = self.attention(fmap)  # (B, M, H, W)
        # Broadcast instead of repeating the maps to C channels; fold the M parts into the batch.
        parts = (fmap.unsqueeze(1) * parts_att.unsqueeze(2)).reshape(-1, c, h, w)
        local = global_pool(self.refine_local(parts)).reshape(b, self.options.num_parts, -1)
        glob = self.global_features(fmap)
        if self.options.normalize_parts:  # in FP32: squares overflow FP16
            dtype = local.dtype
            local, glob = F.normalize(local.float(), dim=-1).to(dtype), F.normalize(glob.float(), dim=-1).to(dtype)
        # Local parts first, then the global vector (the official order).
        return torch.cat([local.flatten(1), glob], dim=1)

    def global_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return global_pool(self.refine_global(fmap))

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.trunk, self.refine_global.blocks, self.refine_local.blocks]

    def train_outputs(self, fmap: torch.Tensor, want: Collection[str] = TRAINING_OUTPUTS) -> dict[str, torch.Tensor]:
        """Codes u, and (if wanted) features v and the tied-weight reconstruction v̂ = u·W (for L_rec)."""
        features = self.features(fmap)
        codes = self.codes(features)
        if "reconstruction" not in want:
            return {"codes": codes}
        return {"codes": codes, "features": features, "reconstruction": codes @ self.hash.weight}
