"""SEMICON: suppression-enhancing masks and channel interaction.

Shen et al., "SEMICON: A Learning-to-hash Solution for Large-scale Fine-grained Image
Retrieval", ECCV 2022 (models.md §2). Three attention maps are found one after the other, each
suppressing what the previous ones attended to; the attended parts go through a shared copy of
the last stage with channel-interaction (ICON) blocks, the whole map through another copy.

Deviations from the public code, on purpose:

* The mask statistics (mean and std of the softmaxed attention) are computed **per sample** and in
  FP32; the public code uses the whole batch, so a code depended on the rest of the batch.
* The copied stages keep **every** pretrained weight (the public code leaves the third block
  random); ``reproduce_official_init=True`` re-creates that bug for comparisons.
* The code split ``k_g = k − 3⌊k/6⌋`` works for any k ≥ 6 (the public code only for 12/24/32/48).
* The three parts go through the shared stage as one batch (identical in eval mode; in training
  BatchNorm pools its statistics over the three parts).
* The channel interaction (ICON, :class:`~.layers.ChannelInteraction`) returns its output in the
  input's channel order (the public code returns it shuffled, which a pretrained layer behind it
  cannot read), scales attention by the head dimension as the paper does, and adds its two
  branches through zero-initialised gates, so at initialisation the global branch is exactly the
  pretrained backbone and training moves it away only as far as the hash loss asks.
* The attention heads start as all-ones maps (see :class:`~.layers.AttentionHead`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..backbones import Backbone
from ..config import HashConfig, PreprocessConfig
from ..errors import ConfigError
from ._base import HashModel
from ._registry import register_model
from .layers import AttentionHead, RefineStage, SlimAttentionStack, global_pool

NUM_PARTS = 3


def code_split(bits: int) -> tuple[int, int]:
    """(global bits, bits per local part): k_l = ⌊k/6⌋, k_g = k − 3·k_l.

    Raises:
        ConfigError: fewer than 6 bits (each of the three parts needs at least one).
    """
    if bits < 2 * NUM_PARTS:
        raise ConfigError(f"semicon needs at least {2 * NUM_PARTS} bits (one per part), got {bits}")
    per_part = bits // (2 * NUM_PARTS)
    return bits - NUM_PARTS * per_part, per_part


def suppression_mask(att: torch.Tensor, alpha: float, eps: float = 1e-6) -> torch.Tensor:
    """SEM's mask m = clamp((p − μ)/σ^α + 1, 0, 2) from one attention map per sample.

    p is the softmax of ``att`` (B, 1, H, W) over the H·W positions; μ and σ (unbiased) are taken
    per sample. Computed without gradient and in FP32: deviations are ~1e-3 and their squares are
    subnormal in FP16.
    """
    with torch.no_grad():
        p = att.float().flatten(1).softmax(dim=1)
        mu = p.mean(dim=1, keepdim=True)
        sigma = p.std(dim=1, keepdim=True)
        mask = ((p - mu) / (sigma + eps).pow(alpha) + 1.0).clamp(0.0, 2.0)
        return mask.reshape(att.shape).to(att.dtype)


@dataclass(frozen=True)
class SEMICONOptions:
    """Args:
        alpha: mask exponent; the public code uses 0.15, the paper 0.3.
        reproduce_official_init: leave the third block of each copied stage randomly initialised,
            as the public code does by accident.
    """

    alpha: float = 0.15
    reproduce_official_init: bool = False


@register_model("semicon", options=SEMICONOptions, summary="3 suppressed attention parts + ICON channel interaction",
                paper="Shen et al., SEMICON: Learning-to-hash for Fine-grained Retrieval, ECCV 2022")
class SEMICON(HashModel):
    """A global branch and three suppression-masked parts, each hashed to its share of the code.

    The code is the global bits followed by the three parts' bits (:func:`code_split`).
    """

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig, backbone: Backbone,
                 options: SEMICONOptions) -> None:
        super().__init__(config, preprocess, backbone.info.out_channels)
        info = backbone.info
        self.options = options
        self.global_bits, self.part_bits = code_split(config.bits)
        # ICON after the last two blocks of the stage (after bottlenecks 2 and 3 of ResNet-50's layer4).
        ct_after = (-2, -1)
        self.trunk = backbone.trunk
        self.refine_global = RefineStage(backbone.copy_last_stage(), info.stage_channels, ct_after)
        self.refine_local = RefineStage(backbone.copy_last_stage(), info.stage_channels, ct_after)
        if options.reproduce_official_init:
            for stage in (self.refine_global, self.refine_local):
                _reinitialise(stage.blocks[min(2, len(stage.blocks) - 1)])
        self.attention = SlimAttentionStack(info.trunk_channels)
        self.heads = nn.ModuleList(AttentionHead(self.attention.out_channels) for _ in range(NUM_PARTS))
        c = info.out_channels
        self.hash_global = nn.Linear(c, self.global_bits, bias=False)
        self.hash_parts = nn.ModuleList(nn.Linear(c, self.part_bits, bias=False) for _ in range(NUM_PARTS))

    def attention_maps(self, fmap: torch.Tensor) -> list[torch.Tensor]:
        """The three (B, 1, H, W) maps; each later map sees the earlier peaks suppressed."""
        feats = self.attention(fmap)
        maps = []
        for i, head in enumerate(self.heads):
            att = head(feats)
            maps.append(att)
            if i + 1 < NUM_PARTS:  # suppression is cumulative
                feats = feats * (2.0 - suppression_mask(att, self.options.alpha))
        return maps

    def features(self, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = fmap.shape[0]
        parts = torch.cat([att * fmap for att in self.attention_maps(fmap)], dim=0)
        local = global_pool(self.refine_local(parts)).reshape(NUM_PARTS, b, -1)
        return self.global_features(fmap), local

    def global_features(self, fmap: torch.Tensor) -> torch.Tensor:
        return global_pool(self.refine_global(fmap))

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.trunk, self.refine_global.blocks, self.refine_local.blocks]

    def hash_layers(self) -> list[nn.Linear]:
        return [self.hash_global, *self.hash_parts]

    def hash_head(self, features: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        glob, local = features
        logits = [self.hash_global(glob)] + [head(local[i]) for i, head in enumerate(self.hash_parts)]
        return torch.cat(logits, dim=1)


def _reinitialise(block: nn.Module) -> None:
    """Give ``block`` fresh random weights (``reproduce_official_init``).

    torchvision's ResNet init, which is what the block the public code forgets to copy keeps.
    """
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
