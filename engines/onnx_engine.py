"""ONNX Runtime backend: TensorRT → CUDA → CPU execution providers, and the truth about which runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig, PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.utils import check_device, display_path, terminal_safe

from .base import Engine

log = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def read_verified_model(path: Path) -> tuple[bytes, dict[str, Any], PreprocessConfig]:
    """The bytes of an exported ONNX file, its fgh metadata and preprocessing, once all are checked.

    Checks, in order: a readable ONNX model; fgh metadata with the fields an engine needs; the
    metadata's ``integrity_sha256`` against the graph's weights and the metadata themselves
    (:func:`export.onnx.graph_digest`); the fields' types and bounds; the graph's one uint8
    (B, 3, S, S) input and (B, bits) output against the metadata. The bytes returned are the ones
    checked, so the session runs exactly what was verified.

    Raises:
        FghError: one line naming the file and what is wrong.
    """
    import onnx
    from google.protobuf.message import DecodeError

    from fgh_deploy.export.onnx import DIGEST_KEY, graph_digest, metadata_of

    shown = display_path(path)
    try:
        data = path.read_bytes()
        proto = onnx.load_model_from_string(data)
    except OSError as exc:
        raise FghError(f"{shown}: cannot read it ({terminal_safe(exc.strerror or str(exc))})") from None
    except (DecodeError, ValueError, RuntimeError) as exc:  # protobuf's parse errors, by implementation
        reason = terminal_safe(" ".join(str(exc).split()))[:160]
        raise FghError(f"{shown}: not a readable ONNX model ({exc.__class__.__name__}: {reason})") from None
    try:
        meta = metadata_of(proto)
        if meta is None:
            raise FghError("no fgh metadata; export it with fgh export")
        missing = [key for key in ("model", "preprocess", "fingerprint") if key not in meta]
        if missing:
            raise FghError(f"no fgh metadata ({', '.join(map(repr, missing))} missing); export it with fgh export")
        if DIGEST_KEY not in meta:
            raise FghError("exported by an older fgh without a weights digest; re-export it with fgh export")
        if meta[DIGEST_KEY] != graph_digest(proto, meta):
            raise FghError("the graph's weights or its fgh metadata do not match the recorded digest "
                           "(modified after export?); re-export it with fgh export")
        config = HashConfig.from_dict(meta["model"], "model")
        preprocess = PreprocessConfig.from_dict(meta["preprocess"])
        if not isinstance(meta["fingerprint"], str) or not meta["fingerprint"]:
            raise FghError("bad fingerprint: expected a non-empty string")
        if meta.get("bits", config.bits) != config.bits:
            raise FghError(f"bad bits: {terminal_safe(repr(meta['bits']))[:40]}, but model.bits is {config.bits}")
        if meta.get("precision", "fp32") not in ("fp32", "fp16"):
            raise FghError("bad precision: expected fp32 or fp16")
        _check_graph_io(proto.graph, preprocess.input_size, config.bits)
    except FghError as exc:
        raise FghError(f"{shown}: {exc}") from None
    return data, meta, preprocess


def _check_graph_io(graph: Any, size: int, bits: int) -> None:
    """The graph takes uint8 (B, 3, size, size) and gives (B, bits), as its metadata says."""
    import onnx

    initializers = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(graph.output) != 1:
        raise FghError(f"the graph has {len(inputs)} inputs and {len(graph.output)} outputs; fgh exports have one "
                       f"of each")

    def dims(value: Any) -> tuple[int | str, ...]:
        shape = value.type.tensor_type.shape.dim
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in shape)

    in_dims, out_dims = dims(inputs[0]), dims(graph.output[0])
    if inputs[0].type.tensor_type.elem_type != onnx.TensorProto.UINT8:
        raise FghError("the graph's input is not uint8 images; re-export it with fgh export")
    if len(in_dims) != 4 or in_dims[1:] != (3, size, size):
        raise FghError(f"the graph takes images of shape {in_dims} but its metadata says input_size {size}; "
                       f"re-export it with fgh export")
    if len(out_dims) != 2 or out_dims[1] != bits:
        raise FghError(f"the graph gives codes of shape {out_dims} but its metadata says {bits} bits; "
                       f"re-export it with fgh export")


class OnnxEngine(Engine):
    """An exported ``.onnx`` model run by ONNX Runtime.

    Providers are tried in the order TensorRT → CUDA → CPU (or as given). ONNX Runtime falls back
    to the CPU silently when a GPU provider cannot initialise; the providers the session really
    uses are read back and a fallback is reported loudly. The file is verified before it runs
    (see :func:`read_verified_model`), so ``fingerprint`` is the one recorded at export.
    """

    kind = "onnxruntime"

    def __init__(self, path: Path, providers: list[str] | None = None, device: str = "auto") -> None:
        import onnxruntime as ort

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
