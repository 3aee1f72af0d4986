"""``fgh export``: checkpoint → ONNX (+ parity) → FP16 ONNX (+ parity) → TensorRT engine (+ parity).

Every stage logs one line when it starts and one when it ends (tool version, artefact size,
time) through :func:`.stages.stage`; the summary ends with ready-to-paste next commands.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.checkpoint import Checkpoint, load_checkpoint
from fgh_deploy.engines.onnx_format import INPUT_NAME, OUTPUT_NAME
from fgh_deploy.errors import BackendUnavailableError, FghError
from fgh_deploy.models import model_from_checkpoint
from fgh_deploy.utils import display_path, sha256_file, terminal_safe
from fgh_deploy.version import __version__

from .calibration import calibration_images
from .onnx import ONNX_OPSET, HalfPrecisionModel, export_onnx
from .parity import DEFAULT_MIN_AGREEMENT, ParityReport, compare_codes
from .stages import file_size, note, stage
from .tensorrt import TrtBuildOptions

log = logging.getLogger(__name__)


@dataclass
class ExportResult:
    """What ``fgh export`` produced (``--json`` dumps :meth:`to_dict`)."""

    checkpoint: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    parity: list[ParityReport] = field(default_factory=list)
    seconds: float = 0.0
    next_commands: list[str] = field(default_factory=list)
    #: Stages that could not run here, with the reason (e.g. no TensorRT on this machine).
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "checkpoint": str(self.checkpoint),
                "artifacts": {k: str(v) for k, v in self.artifacts.items()},
                "parity": [p.to_dict() for p in self.parity], "passed": self.passed, "skipped": self.skipped,
                "seconds": round(self.seconds, 2), "next_commands": self.next_commands}


def _onnx_metadata(ckpt: Checkpoint, checkpoint: Path, precision: str) -> dict[str, Any]:
    """The ``fgh`` metadata of an exported graph (and the caller's fields of an engine header)."""
    size = ckpt.preprocess.input_size
    return {
        "fgh_version": __version__,
        "model": ckpt.config.to_dict(),
        "bits": ckpt.config.bits,
        "preprocess": ckpt.preprocess.to_dict(),
        "fingerprint": ckpt.fingerprint,
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "precision": precision,
        "opset": ONNX_OPSET,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "shape": ["batch", 3, size, size]},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", ckpt.config.bits]},
    }


def _onnx_stage(model: torch.nn.Module, path: Path, metadata: dict[str, Any], label: str) -> Path:
    import onnx

    with stage(label, f"starting export with torch {torch.__version__.split('+')[0]}, onnx {onnx.__version__}, "
                      f"opset {ONNX_OPSET} (dynamic batch) ...") as current:
        current.saved = export_onnx(model, path, metadata=metadata, check=True)
        current.checked = "checker passed"
    return path


@dataclass(frozen=True)
class _Reference:
    """PyTorch's codes for the calibration images: what every exported artefact is compared with."""

    images: torch.Tensor
    codes: np.ndarray
    source: str
    min_agreement: float

    def compare(self, codes: np.ndarray, label: str, runtime: str) -> ParityReport:
        """The parity report of ``codes``, logged as one ``Parity:`` line."""
        report = compare_codes(self.codes, codes, name=f"{label} vs PyTorch ({self.source})", runtime=runtime,
                               min_agreement=self.min_agreement)
        note("Parity", report.summary())
        return report


def _ort_parity(path: Path, label: str, reference: _Reference) -> ParityReport:
    import onnxruntime as ort

    from fgh_deploy.engines.onnx_engine import OnnxEngine

    # The graph as written: ONNX Runtime's TensorRT provider would run an FP32 graph in FP16.
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if torch.cuda.is_available() else None
    engine = OnnxEngine(path, providers=providers)
    codes = engine.encode(reference.images)
    return reference.compare(codes, label, f"onnxruntime {ort.__version__}, {engine.providers[0]}")


def export_checkpoint(checkpoint: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                      fp16: bool = False, trt_options: TrtBuildOptions | None = None,
                      calib: str | os.PathLike | None = None, calib_count: int = 32,
                      min_agreement: float = DEFAULT_MIN_AGREEMENT) -> ExportResult:
    """Export a checkpoint's inference path and check every artefact against PyTorch.

    Args:
        checkpoint: the ``.pt`` file.
        out_dir: where artefacts go (default: next to the checkpoint), named after its stem.
        fp16: also write an FP16 ONNX graph (FP32 islands kept) and check it.
        trt_options: build a TensorRT engine with these options (needs TensorRT and a GPU); None:
            no engine. Without a ``timing_cache`` the build keeps one next to the engine.
        calib: folder of real images for the parity checks (default: built-in synthetic images).
        calib_count: images used for parity.
        min_agreement: bit agreement below which the export fails.

    Returns:
        An :class:`ExportResult`; check ``passed`` (the CLI exits non-zero when it is False).
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    model = model_from_checkpoint(ckpt, "cpu")
    out = Path(out_dir) if out_dir else checkpoint.parent
    if out.exists() and not out.is_dir():
        raise FghError(f"{display_path(out)}: --out-dir names a file, not a directory; nothing was written")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FghError(f"{display_path(out)}: cannot create --out-dir ({terminal_safe(exc.strerror or str(exc))})") \
            from None
    stem = checkpoint.stem
    size, bits = ckpt.preprocess.input_size, ckpt.config.bits
    result = ExportResult(checkpoint)
    with stage("PyTorch", f"starting from '{display_path(checkpoint)}' ({ckpt.config.model} {bits} bits, "
                          f"{ckpt.config.backbone}) with input shape (B, 3, {size}, {size}) uint8 and output shape "
                          f"(B, {bits}) float32 ({file_size(checkpoint)})"):
        images, source = calibration_images(calib, ckpt.preprocess, calib_count)
        with torch.no_grad():
            reference = _Reference(images, model(images).numpy(), source, min_agreement)

    onnx_path = _onnx_stage(model, out / f"{stem}.onnx", _onnx_metadata(ckpt, checkpoint, "fp32"), "ONNX")
    result.artifacts["onnx"] = onnx_path
    result.parity.append(_ort_parity(onnx_path, "ONNX FP32", reference))
    engine_onnx = onnx_path
    if fp16 or (trt_options is not None and trt_options.precision == "fp16"):
        half_path = _onnx_stage(HalfPrecisionModel(model), out / f"{stem}.fp16.onnx",
                                _onnx_metadata(ckpt, checkpoint, "fp16"), "ONNX FP16")
        result.artifacts["onnx_fp16"] = half_path
        result.parity.append(_ort_parity(half_path, "ONNX FP16", reference))
        engine_onnx = half_path
    if trt_options is not None:
        if trt_options.timing_cache is None:
            trt_options = replace(trt_options, timing_cache=out / f"{stem}.timing.cache")
        try:
            result.artifacts["engine"], report = _trt_stage(ckpt, checkpoint, onnx_path, engine_onnx, out / stem,
                                                            reference, trt_options)
            result.parity.append(report)
        except BackendUnavailableError as exc:
            # Everything else is done: say what could not be, and keep the ONNX files for the target.
            result.skipped["tensorrt"] = str(exc)
            note("TensorRT", f"skipped: {exc}")
    result.seconds = time.perf_counter() - started
    deploy = result.artifacts.get("engine") or result.artifacts["onnx"]
    result.next_commands = [
        f"fgh encode IMAGES/ --engine {shlex.quote(str(deploy))} --out {shlex.quote(str(out / (stem + '.index')))}",
        f"fgh query IMAGE.jpg --index {shlex.quote(str(out / (stem + '.index')))}",
        f"fgh eval {shlex.quote(str(checkpoint))}",
    ]
    verdict = "FAILED parity" if not result.passed else ("incomplete" if result.skipped else "complete")
    log.info("Export %s (%.1fs), results saved to %s", verdict, result.seconds, display_path(out))
    for command in result.next_commands:
        log.info("  %s", terminal_safe(command))
    return result


def _trt_stage(ckpt: Checkpoint, checkpoint: Path, onnx_fp32: Path, onnx_for_engine: Path, out_stem: Path,
               reference: _Reference, options: TrtBuildOptions) -> tuple[Path, ParityReport]:
    """Build the engine next to the ONNX files and check its codes against PyTorch's.

    ``onnx_for_engine`` is the FP16 graph when one was written: a strongly typed FP16 build needs it.
    """
    from fgh_deploy.engines.trt_engine import TensorRTEngine
    from fgh_deploy.engines.trt_format import api_family, cuda_device_info, import_tensorrt

    from .tensorrt import build_engine, engine_file_name

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines are built on the GPU they will run on, and CUDA is not "
                                      "available here; copy the checkpoint to the target and run fgh export there")
    family = api_family(trt)
    gpu = cuda_device_info()
    engine_path = out_stem.with_name(engine_file_name(out_stem.name, options.precision, gpu.compute_capability,
                                                      trt.__version__))
    # 11.x is strongly typed: precision comes from the graph. 10.x takes the FP32 graph + FP16 flag.
    source_onnx = onnx_for_engine if (family >= 11 and options.precision == "fp16") else onnx_fp32
    # Every build option, so that the rebuilt engine is the same kind (an fp32 engine stays fp32).
    rebuild = f"fgh export {shlex.quote(str(checkpoint))} --trt {options.command_line()}"
    header = {**_onnx_metadata(ckpt, checkpoint, options.precision), "onnx_sha256": sha256_file(source_onnx),
              "rebuild": rebuild}
    with stage("TensorRT", f"starting export with TensorRT {trt.__version__} (API family {family}) on "
                           f"{gpu.describe()}...") as current:
        current.saved = build_engine(source_onnx, engine_path, options, header=header,
                                     log=lambda line: log.info("%s", line))
    with TensorRTEngine(engine_path) as engine:
        codes = engine.encode(reference.images)
    return engine_path, reference.compare(codes, f"TensorRT {options.precision.upper()}", f"TensorRT {trt.__version__}")
