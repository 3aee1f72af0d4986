"""``fgh export``: checkpoint → ONNX (+ parity) → FP16 ONNX (+ parity) → TensorRT engine (+ parity).

Every stage logs one line when it starts and one when it ends (tool version, artefact size,
time), like Ultralytics' exporter; the summary ends with ready-to-paste next commands.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fgh_deploy.checkpoint import load_checkpoint
from fgh_deploy.errors import BackendUnavailableError, FghError
from fgh_deploy.utils import display_path, sha256_file, terminal_safe
from fgh_deploy.version import __version__

from .calibration import calibration_images
from .onnx import INPUT_NAME, MAX_BATCH, ONNX_OPSET, OUTPUT_NAME, HalfPrecisionModel, export_onnx
from .parity import DEFAULT_MIN_AGREEMENT, ParityReport, compare_codes

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


def _mb(path: Path) -> str:
    return f"{path.stat().st_size / 1e6:.1f} MB"


def _onnx_metadata(ckpt, checkpoint: Path, precision: str) -> dict[str, Any]:

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

    tick = time.perf_counter()
    log.info("%s: starting export with torch %s, onnx %s, opset %d (dynamic batch) ...", label,
             torch.__version__.split("+")[0], onnx.__version__, ONNX_OPSET)
    export_onnx(model, path, metadata=metadata)
    log.info("%s: export success %.1fs, checker passed, saved as '%s' (%s)", label, time.perf_counter() - tick,
             display_path(path), _mb(path))
    return path


def _ort_parity(path: Path, images: torch.Tensor, reference, name: str, min_agreement: float) -> ParityReport:
    import onnxruntime as ort

    from fgh_deploy.engines.onnx_engine import OnnxEngine

    engine = OnnxEngine(path)
    codes = engine.encode(images)
    runtime = f"onnxruntime {ort.__version__}, {engine.providers[0]}"
    report = compare_codes(reference, codes, name=name, runtime=runtime, min_agreement=min_agreement)
    log.info("Parity: %s", report.summary())
    return report


def export_checkpoint(checkpoint: str | os.PathLike, *, out_dir: str | os.PathLike | None = None,
                      fp16: bool = False, trt: bool = False, trt_precision: str = "fp16",
                      calib: str | os.PathLike | None = None, calib_count: int = 32,
                      batch: tuple[int, int, int] = (1, 16, 64), workspace_gib: float = 2.0,
                      optimization_level: int = 3, dla_core: int | None = None,
                      timing_cache: str | os.PathLike | None = None,
                      min_agreement: float = DEFAULT_MIN_AGREEMENT) -> ExportResult:
    """Export a checkpoint's inference path and check every artefact against PyTorch.

    Args:
        checkpoint: the ``.pt`` file.
        out_dir: where artefacts go (default: next to the checkpoint), named after its stem.
        fp16: also write an FP16 ONNX graph (FP32 islands kept) and check it.
        trt: build a TensorRT engine (needs TensorRT and a GPU).
        trt_precision: ``fp16`` (default) or ``fp32`` engine.
        calib: folder of real images for the parity checks (default: built-in synthetic images).
        calib_count: images used for parity.
        batch: TensorRT optimisation profile (min, opt, max batch).
        workspace_gib: TensorRT workspace limit.
        optimization_level: TensorRT builder optimisation level 0–5.
        dla_core: build for this DLA core with GPU fallback (Jetson).
        timing_cache: TensorRT timing cache file, reused between builds.
        min_agreement: bit agreement below which the export fails.

    Returns:
        An :class:`ExportResult`; check ``passed`` (the CLI exits non-zero when it is False).
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    if trt and batch[2] > MAX_BATCH:
        raise FghError(f"--batch: MAX is at most {MAX_BATCH}, got {batch[2]}")
    ckpt = load_checkpoint(checkpoint)
    model = ckpt.build_model("cpu")
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
    log.info("PyTorch: starting from '%s' (%s %d bits, %s) with input shape (B, 3, %d, %d) uint8 and output "
             "shape (B, %d) float32 (%s)", display_path(checkpoint), ckpt.config.model, bits, ckpt.config.backbone,
             size, size, bits, _mb(checkpoint))
    images, source = calibration_images(calib, ckpt.preprocess, calib_count)
    with torch.no_grad():
        reference = model(images).numpy()

    onnx_path = _onnx_stage(model, out / f"{stem}.onnx", _onnx_metadata(ckpt, checkpoint, "fp32"), "ONNX")
    result.artifacts["onnx"] = onnx_path
    result.parity.append(_ort_parity(onnx_path, images, reference, f"ONNX FP32 vs PyTorch ({source})",
                                     min_agreement))
    engine_onnx = onnx_path
    if fp16 or (trt and trt_precision == "fp16"):
        half_path = _onnx_stage(HalfPrecisionModel(model), out / f"{stem}.fp16.onnx",
                                _onnx_metadata(ckpt, checkpoint, "fp16"), "ONNX FP16")
        result.artifacts["onnx_fp16"] = half_path
        result.parity.append(_ort_parity(half_path, images, reference, f"ONNX FP16 vs PyTorch ({source})",
                                         min_agreement))
        engine_onnx = half_path
    if trt:
        try:
            result.artifacts["engine"], report = _trt_stage(
                ckpt, checkpoint, onnx_path, engine_onnx, out, stem, images, reference, source, trt_precision, batch,
                workspace_gib, optimization_level, dla_core, timing_cache, min_agreement)
            result.parity.append(report)
        except BackendUnavailableError as exc:
            # Everything else is done: say what could not be, and keep the ONNX files for the target.
            result.skipped["tensorrt"] = str(exc)
            log.info("TensorRT: skipped: %s", exc)
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


def _trt_stage(ckpt, checkpoint: Path, onnx_fp32: Path, onnx_for_engine: Path, out: Path, stem: str,
               images: torch.Tensor, reference, source: str, precision: str, batch: tuple[int, int, int],
               workspace_gib: float, optimization_level: int, dla_core: int | None,
               timing_cache: str | os.PathLike | None, min_agreement: float) -> tuple[Path, ParityReport]:
    from fgh_deploy.engines.trt_engine import TensorRTEngine

    from .tensorrt import api_family, build_engine, engine_file_name, import_tensorrt

    trt = import_tensorrt()
    if not torch.cuda.is_available():
        raise BackendUnavailableError("TensorRT engines are built on the GPU they will run on, and CUDA is not "
                                      "available here; copy the checkpoint to the target and run fgh export there")
    family = api_family(trt)
    major, minor = torch.cuda.get_device_capability()
    engine_path = out / engine_file_name(stem, precision, f"{major}.{minor}", trt.__version__)
    # 11.x is strongly typed: precision comes from the graph. 10.x takes the FP32 graph + FP16 flag.
    source_onnx = onnx_for_engine if (family >= 11 and precision == "fp16") else onnx_fp32
    rebuild = (f"fgh export {shlex.quote(str(checkpoint))} --trt --batch {','.join(map(str, batch))}"
               + (f" --dla-core {dla_core}" if dla_core is not None else ""))
    header = {**_onnx_metadata(ckpt, checkpoint, precision), "onnx_sha256": sha256_file(source_onnx),
              "rebuild": rebuild}
    tick = time.perf_counter()
    build_engine(source_onnx, engine_path, precision=precision, batch=batch, workspace_gib=workspace_gib,
                 optimization_level=optimization_level, dla_core=dla_core,
                 timing_cache=Path(timing_cache) if timing_cache else out / f"{stem}.timing.cache",
                 header=header, log=lambda line: log.info("%s", line))
    log.info("TensorRT: export success %.1fs, saved as '%s' (%s)", time.perf_counter() - tick,
             display_path(engine_path), _mb(engine_path))
    with TensorRTEngine(engine_path) as engine:
        codes = engine.encode(images)
    report = compare_codes(reference, codes, name=f"TensorRT {precision.upper()} vs PyTorch ({source})",
                           runtime=f"TensorRT {trt.__version__}", min_agreement=min_agreement)
    log.info("Parity: %s", report.summary())
    return engine_path, report
