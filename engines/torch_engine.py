"""PyTorch backend: runs a checkpoint's model directly (CPU, or CUDA with FP16 autocast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.checkpoint import load_checkpoint
from fgh_deploy.errors import BackendUnavailableError

from .base import Engine


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; an explicit CUDA request must be satisfiable."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailableError(f"device {device!r} requested but CUDA is not available here")
    return resolved


class TorchEngine(Engine):
    """A checkpoint (``.pt``) run by PyTorch.

    On CUDA the model runs under FP16 autocast in channels-last layout; SEMICON's mask statistics
    stay FP32 inside the model regardless.
    """

    kind = "pytorch"

    def __init__(self, path: Path, device: str = "auto") -> None:
        ckpt = load_checkpoint(path)
        super().__init__(path, ckpt.preprocess, ckpt.fingerprint, ckpt.config.to_dict())
        self.device = resolve_device(device)
        self.network = ckpt.build_model(self.device)
        self._autocast = self.device.type == "cuda"
        if self._autocast:
            self.network = self.network.to(memory_format=torch.channels_last)

    @property
    def precision(self) -> str:
        return "fp16-autocast" if self._autocast else "fp32"

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = torch.as_tensor(images).to(self.device, non_blocking=True)
        if self._autocast:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=torch.float16, enabled=self._autocast):
            codes = self.network(batch)
        return codes.float().cpu().numpy()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "device": str(self.device), "precision": self.precision}
