"""AGMH: attention-guided multi-branch hashing with stepwise interactive external attention.

Lu et al., "Attributes Grouping and Mining Hashing for Fine-Grained Image Retrieval", ACM MM
2023 (models.md §3). The last stage runs at stride 1; six 1×1 descriptor branches (conv + BN +
ReLU, 512 channels each) are pooled and concatenated into one 3072-d vector, hashed by one
matrix. The SIEA attention modules only feed the attention-dispersion loss (ADL), so they exist
for training only.

The six descriptor convolutions are stored **fused** as one conv with 6·512 outputs followed by
one BatchNorm: BatchNorm is per channel, so this equals six separate branches exactly, in
training and in eval; :meth:`AGMH.descriptor_branches` gives the six-branch view. The fused
conv is initialised as six branches would be (kaiming-normal over one branch's fan-out, as the
public code does per branch), not over the fused 3072 outputs.

Deviation from the public code, on purpose: the stride-1 last stage is **dilated** (see
:meth:`~fgh_deploy.backbones.Backbone.copy_last_stage`), so its pretrained weights see the
spatial scale they were trained on; ``dilate_last_stage=False`` gives the public code's
undilated stage.
"""

from __future__ import annotations

import math
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
from .layers import global_pool


class SIEA(nn.Module):
    """Stepwise interactive external attention on one descriptor map (training only).

    ``A = ReLU(D + BN(conv(reshape(Conv1d(double_norm(mix(Q_1..Q_n)))))))`` where the Q_n are
    projections of conv(D) to ``memory`` channels and ``mix`` folds them in one at a time.
    """

    def __init__(self, channels: int = 512, memory: int = 128, steps: int = 4) -> None:
        super().__init__()
        # Only the input projection has a bias, as in the public code.
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.queries = nn.ModuleList(nn.Conv1d(channels, memory, 1, bias=False) for _ in range(steps))
        self.mixers = nn.ModuleList(nn.Conv1d(2 * memory, memory, 1, bias=False) for _ in range(steps - 1))
        self.expand = nn.Conv1d(memory, channels, 1, bias=False)
        self.proj_out = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        for m in self.modules():  # the public code's init: N(0, √(2/fan-out))
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                fan = m.kernel_size[0] * (m.kernel_size[1] if len(m.kernel_size) > 1 else 1) * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan))

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        b, c, h, w = d.shape
        x = self.proj_in(d).flatten(2)  # (B, C, N)
        state = self.queries[0](x)
        for query, mixer in zip(self.queries[1:], self.mixers):
            state = mixer(torch.cat([state, query(x)], dim=1))
        # Double normalisation: softmax over positions, then L1 over the memory axis.
        att = state.softmax(dim=-1)
        att = att / (1e-9 + att.sum(dim=1, keepdim=True))
        out = self.expand(att).reshape(b, c, h, w)
        return F.relu(d + self.norm(self.proj_out(out)))


@dataclass(frozen=True)
class AGMHOptions:
    """Args:
        num_branches: descriptor branches (top_k + 1 = 6 in the public code).
        branch_channels: channels per descriptor branch.
        dilate_last_stage: dilate the convs after the removed stride (keeps the pretrained
            weights' spatial scale); ``False`` is the public code's plain stride-1 stage.
    """

    num_branches: int = 6
    branch_channels: int = 512
    dilate_last_stage: bool = True

    def __post_init__(self) -> None:
        # Bounded because options also come from files: hostile sizes must not exhaust memory.
        if not 1 <= self.num_branches <= 64 or not 1 <= self.branch_channels <= 4096:
            raise ConfigError(f"agmh: num_branches must be in 1..64 and branch_channels in 1..4096, "
                             f"got {self.num_branches} and {self.branch_channels}")


@register_model("agmh", options=AGMHOptions, summary="stride-1 stage, 6 descriptor branches, SIEA (training)",
                paper="Lu et al., Attributes Grouping and Mining Hashing for Fine-Grained Retrieval, ACM MM 2023")
class AGMH(HashModel):
    """Fused descriptor branches on a stride-1 last stage, one hash layer on their pooled concatenation.

    The SIEA modules feed only the attention-dispersion loss, so they are training-only.
    """

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig, backbone: Backbone,
                 options: AGMHOptions) -> None:
        super().__init__(config, preprocess, backbone.info.out_channels)
        self.options = options
        width = options.num_branches * options.branch_channels
        self.trunk = backbone.trunk
        self.last_stage = backbone.copy_last_stage(stride=1, dilate=options.dilate_last_stage)
        self.descriptor = nn.Conv2d(backbone.info.out_channels, width, 1)
        # std √(2 / one branch's fan-out): each fused branch gets the statistics a separate one would.
        nn.init.normal_(self.descriptor.weight, 0.0, math.sqrt(2.0 / options.branch_channels))
        self.descriptor_norm = nn.BatchNorm2d(width)
        self.hash = nn.Linear(width, config.bits, bias=False)
        self.siea = nn.ModuleList(SIEA(options.branch_channels) for _ in range(options.num_branches))

    def descriptors(self, fmap: torch.Tensor) -> torch.Tensor:
        """Trunk map → the fused descriptor map (B, branches·channels, H, W)."""
        return F.relu(self.descriptor_norm(self.descriptor(self.last_stage(fmap))))

    def features(self, fmap: torch.Tensor) -> torch.Tensor:
        return global_pool(self.descriptors(fmap))

    def global_features(self, fmap: torch.Tensor) -> torch.Tensor:
        # AGMH has no part branch: every descriptor sees the whole image, and the hash reads them all.
        return self.features(fmap)

    def pretrained_modules(self) -> list[nn.Module]:
        return [self.trunk, self.last_stage]

    def train_outputs(self, fmap: torch.Tensor, want: Collection[str] = TRAINING_OUTPUTS) -> dict[str, torch.Tensor]:
        """Codes plus (if wanted) the SIEA outputs (B, branches, C, H, W) for the attention-dispersion loss."""
        desc = self.descriptors(fmap)
        codes = self.codes(global_pool(desc))
        if "attention" not in want:
            return {"codes": codes}
        branches = desc.split(self.options.branch_channels, dim=1)
        attended = torch.stack([siea(d) for siea, d in zip(self.siea, branches)], dim=1)
        return {"codes": codes, "attention": attended}

    def training_only_modules(self) -> dict[str, nn.Module]:
        return {"siea": self.siea}

    def descriptor_branches(self) -> nn.ModuleList:
        """The fused descriptor as separate branches (conv → BN → ReLU), copies of the weights.

        This is the layout of the published code; ``torch.cat`` of their outputs equals
        :meth:`descriptors`' map before pooling.
        """
        n, c = self.options.num_branches, self.options.branch_channels
        conv, bn = self.descriptor, self.descriptor_norm
        branches = nn.ModuleList()
        for j in range(n):
            part = slice(j * c, (j + 1) * c)
            b_conv = nn.Conv2d(conv.in_channels, c, 1)
            b_bn = nn.BatchNorm2d(c, eps=bn.eps, momentum=bn.momentum)
            with torch.no_grad():
                b_conv.weight.copy_(conv.weight[part])
                b_conv.bias.copy_(conv.bias[part])
                for name in ("weight", "bias", "running_mean", "running_var"):
                    getattr(b_bn, name).copy_(getattr(bn, name)[part])
            branches.append(nn.Sequential(b_conv, b_bn, nn.ReLU()).to(conv.weight.device))
        return branches.train(self.training)
