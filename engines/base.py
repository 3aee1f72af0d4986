"""The runtime interface every backend implements (PyTorch, ONNX Runtime, TensorRT)."""

from __future__ import annotations

import abc
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.utils import display_path


class Engine(abc.ABC):
    """uint8 images (B, 3, S, S) in, float tanh codes (B, bits) out.

    Attributes:
        kind: backend name (``pytorch``, ``onnxruntime``, ``tensorrt``).
        path: the file it was loaded from.
        bits: code length.
        preprocess: how images must be prepared (input size, resize, mean/std for reference:
            normalisation happens inside the engine).
        fingerprint: the source checkpoint's fingerprint; indexes use it to refuse codes from
            another model, so a ``.pt``, its ``.onnx`` and its ``.engine`` share one index. It is
            reported only after the file's weights were verified on load: against the checkpoint's
            own fingerprint (``.pt``), against the ``integrity_sha256`` recorded at export over the
            graph's weights and its metadata (``.onnx``), or over the plan bytes and the header
            (``.engine``). An engine whose weights were changed after export does not load.
        model: the model config dict (name, bits, backbone, options).
    """

    kind: str = ""

    def __init__(self, path: Path, preprocess: PreprocessConfig, fingerprint: str, model: dict[str, Any]) -> None:
        self.path = Path(path)
        self.preprocess = preprocess
        self.fingerprint = fingerprint
        self.model = model
        self.bits = int(model["bits"])

    @property
    def shown_path(self) -> str:
        """The file's path as it may be printed (see :func:`fgh_deploy.display.display_path`)."""
        return display_path(self.path)

    @property
    def input_size(self) -> int:
        return self.preprocess.input_size

    def encode(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Codes for a batch of uint8 images.

        Args:
            images: uint8 (B, 3, S, S) with S = ``input_size``, as torch tensor or numpy array.

        Returns:
            float32 numpy array (B, bits) of tanh codes; sign them with
            :func:`fgh_deploy.bits.pack_codes`.
        """
        shape = tuple(images.shape)
        size = self.input_size
        if len(shape) != 4 or shape[1:] != (3, size, size):
            raise FghError(f"{display_path(self.path.name)}: expected images of shape (B, 3, {size}, {size}), "
                           f"got {shape}")
        if images.dtype not in (torch.uint8, np.uint8):
            raise FghError(f"{display_path(self.path.name)}: expected uint8 images, got {images.dtype}")
        if shape[0] == 0:
            return np.zeros((0, self.bits), np.float32)
        return self._encode_impl(images)

    @abc.abstractmethod
    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        """Backend-specific encode of a validated, non-empty batch."""

    def describe(self) -> dict[str, Any]:
        """What an index records about the engine that produced its codes."""
        return {"kind": self.kind, "path": str(self.path.resolve()), "fingerprint": self.fingerprint}

    def close(self) -> None:
        """Release backend resources."""

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
