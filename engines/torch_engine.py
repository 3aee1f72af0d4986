"""PyTorch backend: runs a checkpoint's model directly (CPU, or CUDA with FP16 autocast)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.checkpoint import load_checkpoint
from fgh_deploy.display import terminal_safe
from fgh_deploy.errors import BackendUnavailableError, FghError

from .base import Engine


_DEVICE = re.compile(r"auto|cpu|cuda(:[0-9]{1,4})?")


def check_device(device: str) -> str:
    """``device`` when it is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, the forms every command accepts.

    Raises:
        FghError: anything else, in one line naming ``--device``.
    """
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise FghError(f"--device: expected auto, cpu or cuda[:N], got {terminal_safe(repr(device))[:80]}")
    return device


def resolve_device(device: str) -> torch.device:
    """The torch device for a ``--device`` value: ``auto`` → CUDA when available, else CPU.

    The one place device strings are checked; an explicit CUDA request must be satisfiable here.

    Raises:
        FghError: not one of :func:`check_device`'s forms, or a CUDA index this machine lacks.
        BackendUnavailableError: CUDA requested but not available.
    """
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailableError(f"--device {device}: CUDA is not available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise FghError(f"--device {device}: no such CUDA device ({torch.cuda.device_count()} visible)")
    return resolved


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
