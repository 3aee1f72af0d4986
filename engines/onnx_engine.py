"""ONNX Runtime backend: TensorRT → CUDA → CPU execution providers, and the truth about which runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError

from .base import Engine

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def read_metadata(path: Path) -> dict[str, Any]:
    """The fgh metadata of an exported ONNX file; refuses files fgh did not export."""
    from export.onnx import read_onnx_metadata

    try:
        meta = read_onnx_metadata(path)
    except Exception as exc:  # onnx raises DecodeError / ValueError / OSError on damaged files
        raise FghError(f"{path}: not a readable ONNX model ({exc.__class__.__name__}: "
                       f"{' '.join(str(exc).split())[:160]})") from exc
    for key in ("model", "preprocess", "fingerprint"):
        if key not in meta:
            raise FghError(f"{path}: no fgh metadata ({key!r} missing); export it with fgh export")
    return meta


class OnnxEngine(Engine):
    """An exported ``.onnx`` model run by ONNX Runtime.

    Providers are tried in the order TensorRT → CUDA → CPU (or as given). ONNX Runtime falls back
    to the CPU silently when a GPU provider cannot initialise; the providers the session really
    uses are read back and a fallback is reported loudly.
    """

    kind = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, device: str = "auto") -> None:
        import onnxruntime as ort

        meta = read_metadata(path)
        super().__init__(path, PreprocessConfig.from_dict(meta["preprocess"]), meta["fingerprint"], meta["model"])
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
            self.session = ort.InferenceSession(str(path), sess_options=options, providers=wanted)
        except Exception as exc:
            raise FghError(f"{path}: ONNX Runtime cannot load it ({' '.join(str(exc).split())[:200]})") from exc
        self.providers = self.session.get_providers()
        gpu_wanted = [p for p in wanted if p != "CPUExecutionProvider"]
        if gpu_wanted and self.providers[0] == "CPUExecutionProvider":
            log.warning("WARNING: ONNX Runtime could not initialise %s and runs %s on the CPU "
                        "(check CUDA/cuDNN versions with `fgh doctor`)", ", ".join(gpu_wanted), path.name)
        if device.startswith("cuda") and self.providers[0] == "CPUExecutionProvider":
            raise FghError(f"{path}: --device {device} requested but ONNX Runtime has no working GPU provider here")
        self._input = self.session.get_inputs()[0].name

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = images.numpy() if isinstance(images, torch.Tensor) else images
        return self.session.run(None, {self._input: np.ascontiguousarray(batch)})[0].astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers,
                "precision": self.metadata.get("precision", "fp32")}
