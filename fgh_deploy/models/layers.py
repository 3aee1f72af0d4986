"""Building blocks shared by the hashing models."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck


class InputNormalize(nn.Module):
    """uint8 (or 0–255 float) pixels → normalised float, inside the graph.

    Keeping normalisation in the model lets every engine (PyTorch, ONNX, TensorRT) take raw uint8
    images: a quarter of the host→device bytes and one preprocessing path for all of them.
    """

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        super().__init__()
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        # (x/255 - mean)/std folded into one multiply-add.
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.scale.dtype) * self.scale + self.shift


def global_pool(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, C) average."""
    return x.mean(dim=(2, 3))


def _channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(sign(A)·sqrt(|A|+1e-5)) @ v with A = scale · q kᵀ, over the last two axes.

    The rows of q, k, v are channels, so A is a channel-to-channel affinity; ``scale`` is the
    inverse square root of the number of channels mixed (SEMICON §3.3), not of the positions.
    """
    # Scale q before the matmul, not A after it: keeps FP16 affinities in range (models.md §8.2).
    q = q * scale
    # The signed square root and the softmax run in FP32 (an island in FP16 graphs): 1e-5 is
    # subnormal-adjacent in FP16 and the softmax is a reduction.
    affinity = (q @ k.transpose(-1, -2)).float()
    affinity = torch.sign(affinity) * torch.sqrt(affinity.abs() + 1e-5)
    return affinity.softmax(dim=-1).to(v.dtype) @ v


class ChannelInteraction(nn.Module):
    """SEMICON's two-step channel interaction block ("ICON" / CT), SEMICON §3.3.

    Step 1 mixes channels within each of ``h`` groups of ``d`` channels (a d×d affinity per
    group, scaled by d^-½); step 2 mixes across the groups (an h×h affinity per within-group
    index, scaled by h^-½) on the batch-normalised, rectified result. Affinities are
    channel-to-channel, so the block is independent of the spatial size.

    Deviations from the public code, both so that the pretrained layers after the block keep the
    input they were trained on:

    * the output is in the **input's channel order** (the public code returns its residual in
      the shuffled order of step 2, which only works there because the block after it is
      randomly initialised by accident);
    * each step is a residual branch with a per-channel gate that starts at 0 (as LayerScale /
      ReZero do), and the BatchNorm sits on the branch, not on the residual path: at
      initialisation the block is the identity in training and in eval mode, and what it adds
      is learnt.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.heads = max(channels // 64, 16)
        if channels % self.heads:
            raise ValueError(f"ChannelInteraction: {channels} channels do not split into {self.heads} groups")
        self.head_dim = channels // self.heads
        self.qkv_within = nn.Conv2d(channels, 3 * channels, 1, groups=self.heads)
        self.norm = nn.BatchNorm2d(channels)
        self.qkv_across = nn.Conv2d(channels, 3 * channels, 1, groups=self.head_dim)
        self.gate_within = nn.Parameter(torch.zeros(channels))
        self.gate_across = nn.Parameter(torch.zeros(channels))
        for conv in (self.qkv_within, self.qkv_across):  # the public code's init (torchvision ResNet's)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n, heads, dim = h * w, self.heads, self.head_dim
        # The q/k/v split cuts across the conv groups exactly like the official reshape.
        q, k, v = self.qkv_within(x).reshape(b, 3, heads, dim, n).unbind(1)
        within = _channel_attention(q, k, v, dim ** -0.5).reshape(b, c, h, w)
        x = x + self.gate_within.view(1, c, 1, 1) * within
        # Step 2 groups the channels with the same within-group index: shuffle them together for
        # its grouped conv, and un-shuffle its output back to the input's order.
        z = F.relu(self.norm(x)).reshape(b, heads, dim, n).transpose(1, 2).reshape(b, c, h, w)
        q, k, v = self.qkv_across(z).reshape(b, 3, dim, heads, n).unbind(1)
        across = _channel_attention(q, k, v, heads ** -0.5)  # (b, dim, heads, n)
        return x + self.gate_across.view(1, c, 1, 1) * across.transpose(1, 2).reshape(b, c, h, w)


class RefineStage(nn.Module):
    """A copy of the backbone's last stage, optionally with a ChannelInteraction after some blocks.

    The blocks keep their own ``nn.Sequential`` (and so their pretrained weights and names); the
    interaction blocks live in a separate ``ModuleDict``. The official SEMICON code inserts them
    into the Sequential, which shifts indices and silently leaves the third pretrained block
    random (models.md §2, "Init quirk").
    """

    def __init__(self, blocks: nn.Sequential, stage_channels: tuple[int, ...],
                 interaction_after: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.blocks = blocks
        n = len(blocks)
        positions = sorted({i % n for i in interaction_after})
        self.interactions = nn.ModuleDict({str(i): ChannelInteraction(stage_channels[i]) for i in positions})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.blocks):
            x = block(x)
            if str(i) in self.interactions:
                x = self.interactions[str(i)](x)
        return x


class SlimAttentionStack(nn.Module):
    """SEMICON's attention trunk (a slimmed stride-1 "layer4"), reused by A²-Net.

    ``in → Bottleneck(in) → 1×1 proj to 4·c → Bottleneck(4·c) → 1×1 proj to c → Bottleneck(c)``
    with ``c = channels`` (64 in the papers, where ``in`` = 1024 for ResNet-50). Randomly
    initialised; no ImageNet weights exist for it.
    """

    def __init__(self, in_channels: int, channels: int = 64) -> None:
        super().__init__()
        mid = 4 * channels
        self.layers = nn.Sequential(OrderedDict(
            block1=Bottleneck(in_channels, in_channels // 4),
            proj1=_conv_bn(in_channels, mid),
            block2=Bottleneck(mid, mid // 4),
            proj2=_conv_bn(mid, channels),
            block3=Bottleneck(channels, channels // 4),
        ))
        self.out_channels = channels
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


class AttentionHead(nn.Module):
    """1×1 conv (no bias) → BN → ReLU: ``maps`` non-negative attention maps.

    The conv starts as in the public code (kaiming-normal, fan-out). The BatchNorm starts with
    weight 0 and bias 1, so every map starts at 1 everywhere: each part sees the whole feature
    map (its features equal the global branch's) and the maps learn where to look from there,
    instead of starting as random masks that hide most of what the pretrained stage needs.
    """

    def __init__(self, in_channels: int, maps: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, maps, 1, bias=False)
        self.bn = nn.BatchNorm2d(maps)
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.bn.weight)
        nn.init.ones_(self.bn.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))
