"""Configuration dataclasses that travel inside every checkpoint, ONNX file, engine and index."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

#: Longest code fgh trains, stores or searches (the papers use 12 to 128 bits).
MAX_BITS = 4096
#: Largest square input an engine takes; bounds memory per image (3 × 1024² bytes = 3 MB uint8).
MAX_INPUT_SIZE = 1024


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes the uint8 tensor an engine takes.

    Decode → RGB → resize the short side to ``resize_size`` → center-crop ``input_size``.
    ``mean``/``std`` (on the 0–1 scale) are applied *inside* the model, so every engine
    (PyTorch, ONNX, TensorRT) takes raw uint8 pixels.
    """

    input_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    interpolation: str = "bilinear"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PreprocessConfig":
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
            interpolation=str(data.get("interpolation", "bilinear")),
        )


@dataclass(frozen=True)
class HashConfig:
    """Everything needed to rebuild a hashing model's architecture.

    Args:
        model: registered model name (``adsh``, ``a2net``, ``semicon``, ``agmh``).
        bits: code length k.
        backbone: backbone name (``resnet50``, ``resnet18``, ``efficientnet_lite0``).
        options: model-specific options (e.g. ``num_parts`` for A²-Net), JSON-serialisable.
    """

    model: str
    bits: int
    backbone: str = "resnet50"
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "bits": self.bits, "backbone": self.backbone, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "HashConfig":
        return cls(
            model=str(data["model"]),
            bits=int(data["bits"]),
            backbone=str(data["backbone"]),
            options=dict(data.get("options", {})),
        )
