"""PyTorch backend: runs a checkpoint's model directly (CPU, or CUDA with FP16 autocast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.checkpoint import load_checkpoint
from fgh_deploy.models import model_from_checkpoint
from fgh_deploy.utils import resolve_device

from .base import Engine




class TorchEngine(Engine):
    """A checkpoint (``.pt``) run by PyTorch.

    On CUDA the model runs under FP16 autocast in channels-last layout; SEMICON's mask statistics
    stay FP32 inside the model regardless.
    """

    kind = "pytorch"

    def __init__(self, path: Path, device: str = "auto") -> None:
        self.device = resolve_device(device)
        # load_checkpoint verifies the weights against the fingerprint before it is reported.
        ckpt = load_checkpoint(path)
        super().__init__(path, ckpt.preprocess, ckpt.fingerprint, ckpt.config.to_dict())
        self.network = model_from_checkpoint(ckpt, self.device)
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
