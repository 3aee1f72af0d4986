"""Runtime backends behind one interface, chosen by file type.

``load_engine("m.pt")`` (PyTorch checkpoint), ``load_engine("m.onnx")`` (ONNX Runtime),
``load_engine("m.engine")`` (TensorRT, with fgh's header). Every engine takes uint8 images and returns float
tanh codes; see :class:`~engines.base.Engine`.
"""

from __future__ import annotations

import os
from pathlib import Path

from fgh_deploy.errors import FghError

from .base import Engine

ENGINE_SUFFIXES = {".pt": "pytorch", ".pth": "pytorch", ".onnx": "onnxruntime", ".engine": "tensorrt",
                   ".plan": "tensorrt"}


def load_engine(path: str | os.PathLike, *, device: str = "auto", allow_other_gpu: bool = False) -> Engine:
    """Open an engine by its file type.

    Args:
        path: a ``.pt`` checkpoint, or an ``.onnx`` / ``.engine`` file from ``fgh export``.
        device: ``auto``, ``cpu`` or ``cuda[:N]``.
        allow_other_gpu: run a TensorRT engine built on another GPU model of the same
            architecture (see :class:`~engines.trt_engine.TensorRTEngine`); other files ignore it.

    Raises:
        FghError: missing file or unknown file type.
    """
    path = Path(path)
    if not path.is_file():
        raise FghError(f"{path}: no such engine or checkpoint file")
    kind = ENGINE_SUFFIXES.get(path.suffix.lower())
    if kind == "pytorch":
        from .torch_engine import TorchEngine

        return TorchEngine(path, device=device)
    if kind == "onnxruntime":
        from .onnx_engine import OnnxEngine

        return OnnxEngine(path, device=device)
    if kind == "tensorrt":
        from .trt_engine import TensorRTEngine

        return TensorRTEngine(path, device=device, allow_other_gpu=allow_other_gpu)
    raise FghError(f"{path}: unknown engine type {path.suffix!r}; expected one of {', '.join(ENGINE_SUFFIXES)}")


__all__ = ["ENGINE_SUFFIXES", "Engine", "load_engine"]
