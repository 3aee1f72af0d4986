"""ONNX Runtime backend: TensorRT → CUDA → CPU execution providers, and the truth about which runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig
from fgh_deploy.errors import FghError
from fgh_deploy.utils import check_device, display_path, terminal_safe

from .base import Engine
from .onnx_format import read_verified_model

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class OnnxEngine(Engine):
    """An exported ``.onnx`` model run by ONNX Runtime.

    Providers are tried in the order TensorRT → CUDA → CPU (or as given). ONNX Runtime falls back
    to the CPU silently when a GPU provider cannot initialise; the providers the session really
    uses are read back and a fallback is reported loudly. The file is verified before it runs
    (see :func:`.onnx_format.read_verified_model`), so ``fingerprint`` is the one recorded at export.
    """

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None, device: str = "auto") -> None:
        import onnxruntime as ort

        path = Path(path)
        check_device(device)
        data, meta, preprocess = read_verified_model(path)
        super().__init__(path, preprocess, meta["fingerprint"], HashConfig.from_dict(meta["model"]).to_dict())
        self.metadata = meta
        if providers is not None:
            wanted = providers
        elif device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            # No GPU here: asking for the GPU providers would only print load errors, then fall back.
            wanted = ["CPUExecutionProvider"]
        else:
            wanted = [p for p in PREFERRED_PROVIDERS if p in ort.get_available_providers()]
        ort.set_default_logger_severity(3)  # provider-load failures are reported below, once, clearly
        options = ort.SessionOptions()
        try:
            self.session = ort.InferenceSession(data, sess_options=options, providers=wanted)
        except Exception as exc:
            reason = terminal_safe(" ".join(str(exc).split()))[:200]
            raise FghError(f"{display_path(path)}: ONNX Runtime cannot load it ({reason})") from exc
        self.providers = self.session.get_providers()
        gpu_wanted = [p for p in wanted if p != "CPUExecutionProvider"]
        if gpu_wanted and self.providers[0] == "CPUExecutionProvider":
            log.warning("WARNING: ONNX Runtime could not initialise %s and runs %s on the CPU "
                        "(check CUDA/cuDNN versions with `fgh doctor`)", ", ".join(gpu_wanted), display_path(path.name))
        if device.startswith("cuda") and self.providers[0] == "CPUExecutionProvider":
            raise FghError(f"{display_path(path)}: --device {device} requested but ONNX Runtime has no working GPU "
                           f"provider here")
        self._input = self.session.get_inputs()[0].name

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run(None, {self._input: np.ascontiguousarray(batch)})[0].astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers,
                "precision": self.metadata.get("precision", "fp32")}
