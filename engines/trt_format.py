"""The fgh TensorRT engine file: its container, integrity digest and compatibility check, and TensorRT itself.

The builder (:mod:`fgh_deploy.export.tensorrt`) writes this format and the runtime
(:mod:`.trt_engine`) reads it, so both use this module. Reading and checking a file is pure
Python; TensorRT is imported lazily (:func:`import_tensorrt`), never when the CLI starts.

A plan runs only with the exact TensorRT version that built it, and is tuned for the GPU model
it was built on: not only its architecture (an AGX Orin and an Orin NX are both sm87) but its
multiprocessor count and memory (a MIG slice has the compute capability of the whole GPU). Every
engine file therefore starts with a JSON header that records how and where it was built; loaders
call :func:`check_engine_compatible` on it before deserialising anything.

File layout::

    b"FGHTRT1\\n"              8-byte magic (format version 1)
    uint32 little-endian       length N of the header
    N bytes                    UTF-8 JSON header (see HEADER_KEYS)
    the rest                   the serialized TensorRT plan

The header's ``integrity_sha256`` is the sha256 of its other fields and the plan bytes
(:func:`engine_digest`), written by :func:`write_engine` and checked by
:func:`read_verified_plan` before the plan reaches TensorRT: a plan or header changed after the
build is refused, so the fingerprint an engine reports belongs to the plan it runs.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig, PreprocessConfig, parse_json_object
from fgh_deploy.errors import BackendUnavailableError, FghError, IncompatibleEngineError
from fgh_deploy.utils import atomic_write, display_path, terminal_safe

from .onnx_format import DIGEST_KEY, MAX_BATCH

log = logging.getLogger(__name__)

MAGIC = b"FGHTRT1\n"
_LENGTH = struct.Struct("<I")
# A header is a few KB; anything larger is a damaged length field, not a header.
MAX_HEADER_BYTES = 16 * 2**20
PRECISIONS = ("fp16", "fp32")

#: Every engine header carries these fields.
HEADER_KEYS = (
    "fgh_version", "tensorrt_version", "api_family", "gpu_name", "compute_capability", "gpu_multiprocessors",
    "gpu_memory_bytes", "precision", "dla_core", "profile", "input", "output", "input_shape", "onnx_sha256", "bits",
    "preprocess", "model", "fingerprint", "checkpoint", "rebuild", DIGEST_KEY,
)
#: Fields that engines written by an earlier fgh lack: such a file is old, not damaged.
_LATER_KEYS = frozenset({"gpu_multiprocessors", "gpu_memory_bytes", DIGEST_KEY})
#: Two boards of one model report total memory a few MB apart (driver and carve-out reservations);
#: other models and MIG slices differ by far more (AGX Orin 32 vs 64 GB, a 1g.10gb slice of 80 GB).
GPU_MEMORY_TOLERANCE = 0.10

def tensorrt_extra(torch_cuda: str | None = torch.version.cuda) -> str | None:
    """The fgh extra whose TensorRT matches torch's CUDA (``trt-cu12``, ``trt-cu13``); None without CUDA."""
    if not torch_cuda:
        return None
    major = torch_cuda.split(".")[0]
    return f"trt-cu{major}" if major in ("12", "13") else None


INSTALL_HINT = (f"on x86-64 GPU servers run `pip install 'fgh[{tensorrt_extra() or 'trt-cu13'}]'` (the extra "
                f"matching torch's CUDA; fgh doctor names it); on Jetson use JetPack's TensorRT from a venv "
                f"created with `python3 -m venv --system-site-packages`")


# --------------------------------------------------------------------------------------------
# Importing TensorRT and telling the API families apart


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, imported on first use.

    Raises:
        BackendUnavailableError: TensorRT is missing, cannot load its libraries, or is older than
            10.0.
    """
    try:
        import tensorrt as trt
    except (ImportError, OSError) as exc:
        # The PyPI bindings-only wheel imports as far as the missing libnvinfer / libnvonnxparser
        # and fails there with an ImportError or OSError naming the library.
        reason = " ".join(str(exc).split())[:160]
        raise BackendUnavailableError(f"TensorRT is not installed or cannot be loaded ({exc.__class__.__name__}: "
                                      f"{reason}): {INSTALL_HINT}") from exc
    api_family(trt)
    return trt


def api_family_for(version: str, *, weak_typing: bool) -> int:
    """The API family (10 or 11) of a TensorRT version.

    Args:
        version: ``tensorrt.__version__``, e.g. ``"10.3.0"`` or ``"11.1.0.4"``.
        weak_typing: whether ``BuilderFlag.FP16`` exists (it was removed with weak typing in 11.0).

    Raises:
        BackendUnavailableError: TensorRT older than 10 (no name-based tensor API, implicit batch).
    """
    try:
        major = int(version.split(".")[0])
    except ValueError as exc:
        raise BackendUnavailableError(f"unrecognised TensorRT version {version!r}") from exc
    if major < 10:
        raise BackendUnavailableError(f"TensorRT {version} is too old: fgh needs TensorRT 10.3 or newer "
                                      f"({INSTALL_HINT})")
    # The feature decides over the number: the weak-typing path needs the FP16 flag to exist.
    return 10 if major == 10 and weak_typing else 11


def api_family(trt: ModuleType) -> int:
    """The API family of the imported TensorRT: 10 (weak typing available) or 11 (strongly typed only)."""
    return api_family_for(trt.__version__, weak_typing=hasattr(trt.BuilderFlag, "FP16"))


@functools.cache
def get_logger(trt: ModuleType) -> Any:
    """The process-wide TensorRT logger: forwards warnings to :mod:`logging`, keeps the last errors.

    One instance per process because TensorRT keeps the first logger it is given as its global
    logger (and warns when a later builder or runtime brings another); it must also outlive every
    builder, runtime and engine, which a cached instance does.
    """
    severity = trt.ILogger.Severity
    errors = (severity.INTERNAL_ERROR, severity.ERROR)

    class FghTensorRTLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # pybind11 trampolines need the explicit base __init__
            self.errors: collections.deque[str] = collections.deque(maxlen=8)

        def log(self, level: Any, msg: str) -> None:
            if level in errors:
                # Reported through FghError when the operation fails; not every TensorRT error
                # is fatal, so they are not printed here.
                self.errors.append(" ".join(msg.split()))
                log.debug("TensorRT error: %s", msg)
            elif level == severity.WARNING:
                log.warning("TensorRT: %s", msg)
            elif level == severity.INFO:
                log.debug("TensorRT: %s", msg)

        def last_errors(self) -> str:
            """The recent error messages, joined on one line ('' when there were none)."""
            return " | ".join(self.errors)

    return FghTensorRTLogger()


# --------------------------------------------------------------------------------------------
# Engine file format and compatibility (pure Python: no TensorRT needed)


def write_engine(path: str | os.PathLike, header: dict[str, Any], plan: bytes | memoryview) -> Path:
    """Write ``header`` and ``plan`` as one fgh engine file, atomically.

    Args:
        path: destination (conventionally named by :func:`engine_file_name`).
        header: JSON-serialisable dict (see ``HEADER_KEYS``); its ``integrity_sha256`` is
            computed here (:func:`engine_digest`).
        plan: the serialized TensorRT plan (bytes, or any buffer such as TensorRT's IHostMemory).

    Returns:
        The path written.
    """
    path = Path(path)
    sealed = {**header, DIGEST_KEY: engine_digest(header, plan)}
    blob = json.dumps(sealed, sort_keys=True).encode("utf-8")

    def write(f: Any) -> None:
        f.write(MAGIC)
        f.write(_LENGTH.pack(len(blob)))
        f.write(blob)
        f.write(plan)

    atomic_write(path, write)
    return path


def engine_digest(header: dict[str, Any], plan: bytes | memoryview) -> str:
    """sha256 over the header's fields (all but ``integrity_sha256``, as sorted JSON) and the plan bytes."""
    digest = hashlib.sha256()
    fields = {key: value for key, value in header.items() if key != DIGEST_KEY}
    digest.update(json.dumps(fields, sort_keys=True).encode("utf-8"))
    digest.update(plan)
    return digest.hexdigest()


def read_engine_header(path: str | os.PathLike) -> tuple[dict[str, Any], int]:
    """The header of an fgh engine file and the byte offset where its plan starts.

    Reads only the header, never the plan; every field is checked (types and bounds, see
    :func:`_check_header`), so callers may use them as they are.

    Raises:
        FghError: missing file, no fgh magic (e.g. a raw trtexec plan), truncated, non-JSON or
            implausibly nested header, missing or bad fields, or no plan after the header; the
            message names the file.
    """
    path = Path(path)
    shown = display_path(path)
    rebuild_hint = "rebuild it with `fgh export CHECKPOINT --trt`"
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            magic = f.read(len(MAGIC))
            if not magic:
                raise FghError(f"{shown}: empty file, not a TensorRT engine; {rebuild_hint}")
            if magic != MAGIC:
                raise FghError(f"{shown}: not an fgh TensorRT engine: it lacks fgh's header (a raw plan, e.g. "
                               f"from trtexec, carries no model metadata); {rebuild_hint}")
            length_bytes = f.read(_LENGTH.size)
            if len(length_bytes) < _LENGTH.size:
                raise FghError(f"{shown}: truncated engine file (header length cut off); {rebuild_hint}")
            (length,) = _LENGTH.unpack(length_bytes)
            if length > MAX_HEADER_BYTES:
                raise FghError(f"{shown}: damaged engine header (length {length} bytes is implausible); "
                               f"{rebuild_hint}")
            blob = f.read(length)
    except OSError as exc:
        raise FghError(f"{shown}: cannot read engine file ({terminal_safe(exc.strerror or str(exc))})") from exc
    if len(blob) < length:
        raise FghError(f"{shown}: truncated engine file (header has {len(blob)} of {length} bytes); {rebuild_hint}")
    try:
        header = parse_json_object(blob, "it")
    except FghError as exc:
        raise FghError(f"{shown}: damaged engine header ({exc}); {rebuild_hint}") from None
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing and set(missing) <= _LATER_KEYS:
        raise FghError(f"{shown}: built by an older fgh (its header lacks {', '.join(missing)}); {rebuild_hint}")
    if missing:
        raise FghError(f"{shown}: damaged engine header (missing {', '.join(missing)}); {rebuild_hint}")
    try:
        _check_header(header)
    except FghError as exc:
        raise FghError(f"{shown}: damaged engine header ({exc}); {rebuild_hint}") from None
    offset = len(MAGIC) + _LENGTH.size + length
    if size <= offset:
        raise FghError(f"{shown}: truncated engine file (no TensorRT plan after the header); "
                       f"rebuild it with: {terminal_safe(header['rebuild'])}")
    return header, offset


def _check_header(header: dict[str, Any]) -> None:
    """Every header field has the type and range fgh writes; raises FghError naming the first that has not."""
    for key in ("fgh_version", "tensorrt_version", "gpu_name", "compute_capability", "fingerprint", "checkpoint",
                "rebuild", "onnx_sha256", DIGEST_KEY):
        if not isinstance(header[key], str) or not header[key]:
            raise FghError(f"bad {key}: expected a non-empty string")
    for key in ("gpu_multiprocessors", "gpu_memory_bytes"):
        if type(header[key]) is not int or header[key] < 1:
            raise FghError(f"bad {key}: expected a positive integer")
    if header["precision"] not in PRECISIONS:
        raise FghError(f"bad precision: expected one of {', '.join(PRECISIONS)}")
    if header["api_family"] not in (10, 11):
        raise FghError("bad api_family: expected 10 or 11")
    dla_core = header["dla_core"]
    if dla_core is not None and (type(dla_core) is not int or not 0 <= dla_core < 16):
        raise FghError("bad dla_core: expected null or a core number")
    profile = header["profile"]
    batches = [profile.get(key) for key in ("min", "opt", "max")] if isinstance(profile, dict) else []
    if (len(batches) != 3 or not all(type(b) is int for b in batches)
            or not 1 <= batches[0] <= batches[1] <= batches[2] <= MAX_BATCH):
        raise FghError(f"bad profile: expected min, opt and max batch with 1 <= min <= opt <= max <= {MAX_BATCH}")
    for key in ("input", "output"):
        if not isinstance(header[key], dict) or not isinstance(header[key].get("name"), str):
            raise FghError(f"bad {key}: expected an object with a tensor name")
    model = HashConfig.from_dict(header["model"], "model")
    preprocess = PreprocessConfig.from_dict(header["preprocess"])
    size = preprocess.input_size
    if header["bits"] != model.bits or header["input_shape"] != [3, size, size]:
        raise FghError("bits / input_shape disagree with the model and preprocessing")


def read_verified_plan(path: str | os.PathLike, header: dict[str, Any], offset: int) -> bytes:
    """The plan bytes of an engine file, once they and the header match the header's ``integrity_sha256``.

    Call before the plan reaches TensorRT: a plan is executable code, and a changed one (or a
    header edited to claim another model's fingerprint) must not run under the recorded identity.

    Raises:
        FghError: unreadable file, or a digest mismatch (with the rebuild command).
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            plan = f.read()
    except OSError as exc:
        raise FghError(f"{display_path(path)}: cannot read engine file "
                       f"({terminal_safe(exc.strerror or str(exc))})") from exc
    if engine_digest(header, plan) != header[DIGEST_KEY]:
        raise FghError(f"{display_path(path)}: the plan or its header does not match the recorded digest "
                       f"(modified after the build?); rebuild it with: {terminal_safe(header['rebuild'])}")
    return plan


@dataclass(frozen=True)
class GpuInfo:
    """What an engine is tuned for: the GPU's name, architecture, multiprocessors and memory."""

    name: str
    compute_capability: str  # "major.minor", e.g. "8.7"
    multiprocessors: int
    memory_bytes: int

    def describe(self) -> str:
        return (f"{self.name} (sm {self.compute_capability}, {self.multiprocessors} SMs, "
                f"{self.memory_bytes / 2**30:.1f} GiB)")


def cuda_device_info(device: Any = None) -> GpuInfo:
    """The :class:`GpuInfo` of a CUDA device (default: the current one)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return GpuInfo(props.name, f"{props.major}.{props.minor}", int(props.multi_processor_count),
                   int(props.total_memory))


def check_engine_compatible(header: dict[str, Any], *, path: str | os.PathLike, tensorrt_version: str,
                            gpu: GpuInfo, allow_other_gpu: bool = False) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU.

    Plans are tied to the exact TensorRT version (the full version string) and to the compute
    capability they were built for; deserialising a mismatched plan fails deep inside TensorRT
    ("Version tag does not match") or, worse, misbehaves. Within one compute capability a plan is
    still tuned for its GPU model: its tactics were timed on that many multiprocessors and sized
    for that much memory, and NVIDIA does not promise it runs elsewhere (an AGX Orin engine can fail
    on an Orin NX; a MIG slice has the whole GPU's compute capability and a fraction of its SMs and
    memory). Call this before deserialising.

    Args:
        header: from :func:`read_engine_header`.
        path: the engine file, for the message.
        tensorrt_version: the installed ``tensorrt.__version__``.
        gpu: this GPU (:func:`cuda_device_info`).
        allow_other_gpu: accept another multiprocessor count or memory size (same TensorRT and
            compute capability) — for users who know the plan fits, e.g. boards of one model that
            report memory differently.

    Raises:
        IncompatibleEngineError: with the exact command that rebuilds the engine here.
    """
    built_version = str(header["tensorrt_version"])
    built_cc = str(header["compute_capability"])
    built_on = terminal_safe(str(header["gpu_name"]))
    rebuild = f"rebuild it with: {terminal_safe(header['rebuild'])}"
    if built_version != tensorrt_version or built_cc != gpu.compute_capability:
        raise IncompatibleEngineError(
            f"{display_path(path)}: built with TensorRT {terminal_safe(built_version)} for {built_on} "
            f"(sm {terminal_safe(built_cc)}); this machine has TensorRT {tensorrt_version} and {gpu.name} "
            f"(sm {gpu.compute_capability}) — {rebuild}")
    built_sms, built_memory = header["gpu_multiprocessors"], header["gpu_memory_bytes"]
    same_memory = abs(gpu.memory_bytes - built_memory) <= GPU_MEMORY_TOLERANCE * built_memory
    if allow_other_gpu or (gpu.multiprocessors == built_sms and same_memory):
        return
    raise IncompatibleEngineError(
        f"{display_path(path)}: built on {built_on} ({built_sms} SMs, {built_memory / 2**30:.1f} GiB); this is "
        f"{gpu.name} ({gpu.multiprocessors} SMs, {gpu.memory_bytes / 2**30:.1f} GiB), another GPU model or a MIG "
        f"slice — {rebuild} (or pass --allow-other-gpu to run it anyway)")


def dtype_name(trt: ModuleType, dtype: Any) -> str:
    """A TensorRT DataType as a numpy-style name (``uint8``, ``float32``, ``float16``)."""
    return np.dtype(trt.nptype(dtype)).name
