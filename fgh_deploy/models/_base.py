"""The surface every hashing model shares."""

from __future__ import annotations

import abc
from typing import Any, Collection

import torch
from torch import nn

from ..config import HashConfig, PreprocessConfig
from .layers import InputNormalize

#: Training-only outputs a model may give next to its codes: A²-Net's "features" and tied
#: "reconstruction", AGMH's SIEA "attention".
TRAINING_OUTPUTS = frozenset({"reconstruction", "attention"})

#: Names of the parameter groups (:meth:`HashModel.parameter_groups`).
PRETRAINED, NEW, HASH = "pretrained", "new", "hash"


class HashModel(nn.Module, abc.ABC):
    """Base class: uint8 images in, (B, bits) tanh codes out.

    Every model reads the backbone's stride-16 *trunk* map and computes from it; the methods
    below take that map (``fmap``), so a trainer can compute a frozen trunk once and reuse it.

    ``forward`` is exactly the inference path that gets exported. Training-only computations
    (decoders, auxiliary attention branches) live in :meth:`train_outputs`, and the modules
    they use are listed by :meth:`training_only_modules` so tests can prove ``forward`` never
    reaches them.
    """

    trunk: nn.Module
    #: The hash layer of models with one (SEMICON has one per part and overrides the hash methods).
    hash: nn.Linear

    def __init__(self, config: HashConfig, preprocess: PreprocessConfig, feature_width: int) -> None:
        super().__init__()
        self.config = config
        #: Width of the backbone's pooled features: what ADSH's hash layer reads.
        self.feature_width = feature_width
        self.preprocess = preprocess
        self.normalize = InputNormalize(preprocess.mean, preprocess.std)

    @property
    def bits(self) -> int:
        """Code length."""
        return self.config.bits

    @abc.abstractmethod
    def features(self, fmap: torch.Tensor) -> Any:
        """Trunk map (B, C, H, W) → whatever :meth:`hash_head` consumes."""

    def hash_head(self, features: Any) -> torch.Tensor:
        """Features → pre-tanh logits (B, bits); by default one linear layer, ``self.hash``."""
        return self.hash(features)

    @abc.abstractmethod
    def global_features(self, fmap: torch.Tensor) -> torch.Tensor:
        """(B, C) pooled features of the branch that sees the whole image (no part attention)."""

    @abc.abstractmethod
    def pretrained_modules(self) -> list[nn.Module]:
        """The modules that start from the backbone's (pretrained) weights; the rest is new."""

    def hash_layers(self) -> list[nn.Linear]:
        """The linear layers that produce the code logits (by default ``self.hash``)."""
        return [self.hash]

    def encode_features(self, x: torch.Tensor) -> Any:
        """Normalised images → whatever :meth:`hash_head` consumes."""
        return self.features(self.trunk(x))

    def codes(self, features: Any) -> torch.Tensor:
        """Features → (B, bits) tanh codes."""
        return torch.tanh(self.hash_head(features))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) images → (B, bits) tanh codes: the graph that export traces."""
        return self.codes(self.encode_features(self.normalize(images)))

    def forward_train(self, images: torch.Tensor, want: Collection[str] = TRAINING_OUTPUTS) -> dict[str, torch.Tensor]:
        """Codes plus the extra tensors the model's training losses need (``{"codes": u, ...}``)."""
        return self.train_outputs(self.trunk(self.normalize(images)), want)

    def train_outputs(self, fmap: torch.Tensor, want: Collection[str] = TRAINING_OUTPUTS) -> dict[str, torch.Tensor]:
        """:meth:`forward_train` from the trunk map.

        Args:
            fmap: the trunk map.
            want: which of the model's training-only outputs to compute (of
                :data:`TRAINING_OUTPUTS`); the losses that are off need none, and AGMH's
                attention branch costs as much as the rest of its training step.
        """
        return {"codes": self.codes(self.features(fmap))}

    def training_only_modules(self) -> dict[str, nn.Module]:
        """Modules used by :meth:`train_outputs` but never by :meth:`forward`."""
        return {}

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``{"pretrained": [...], "new": [...], "hash": [...]}``: every parameter in exactly one group.

        Pretrained layers need a gentle rate (they are already good); new layers (attention,
        interaction blocks) start from random and need a larger one; the hash layers are new too,
        at the rate :meth:`hash_rate_scale` adjusts for their width.
        """
        pretrained = {id(p) for module in self.pretrained_modules() for p in module.parameters()}
        hash_params = {id(p) for layer in self.hash_layers() for p in layer.parameters()}
        groups: dict[str, list[nn.Parameter]] = {PRETRAINED: [], NEW: [], HASH: []}
        for p in self.parameters():
            groups[PRETRAINED if id(p) in pretrained else HASH if id(p) in hash_params else NEW].append(p)
        return groups

    def hash_rate_scale(self) -> float:
        """The hash layers' rate relative to the other new layers: feature width / fan-in, at most 1.

        An adaptive optimizer moves every weight by about its rate per step, so a linear layer's
        output moves in proportion to its fan-in (the μP rule for Adam: rate ∝ 1/fan-in). ADSH's
        hash layer reads the pooled features (scale 1); A²-Net's reads M + 1 vectors that all
        equal them at initialisation, AGMH's six descriptor branches. Scaled, every model's
        codes move per step as ADSH's do at the same ``lr_new``.
        """
        widest = max(layer.in_features for layer in self.hash_layers())
        return min(1.0, self.feature_width / widest)
