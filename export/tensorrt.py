"""ONNX → TensorRT engine, and the ``.engine`` file format fgh reads back.

TensorRT is optional and imported lazily (:func:`import_tensorrt`), never when the CLI starts.
Two API families are supported:

- **10.x** (JetPack 6 ships 10.3): weakly typed networks. FP16 comes from the ``FP16`` builder
  flag applied to the FP32 ONNX, with numerically fragile layers pinned to FP32.
- **11.x**: strongly typed networks only; the weak-typing flags (``FP16``,
  ``OBEY_PRECISION_CONSTRAINTS``) and the ``EXPLICIT_BATCH`` enum are gone. The precision is the
  one written in the ONNX file, so an FP16 engine needs an FP16 ONNX (FP16 network with FP32
  islands and casts).

A plan runs only with the exact TensorRT version that built it, on the same GPU architecture.
Every engine file therefore starts with a JSON header that records how and where it was built;
loaders call :func:`check_engine_compatible` on it before deserialising anything.

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
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig, PreprocessConfig, parse_json_object
from fgh_deploy.errors import BackendUnavailableError, FghError, IncompatibleEngineError
from fgh_deploy.utils import atomic_write, display_path, sha256_file, terminal_safe
from fgh_deploy.version import __version__ as FGH_VERSION

from .onnx import DIGEST_KEY, INPUT_NAME, MAX_BATCH, OUTPUT_NAME

log = logging.getLogger(__name__)

MAGIC = b"FGHTRT1\n"
_LENGTH = struct.Struct("<I")
# A header is a few KB; anything larger is a damaged length field, not a header.
MAX_HEADER_BYTES = 16 * 2**20
PRECISIONS = ("fp16", "fp32")

#: Every engine header carries these fields.
HEADER_KEYS = (
    "fgh_version", "tensorrt_version", "api_family", "gpu_name", "compute_capability", "precision",
    "dla_core", "profile", "input", "output", "input_shape", "onnx_sha256", "bits", "preprocess",
    "model", "fingerprint", "checkpoint", "rebuild", DIGEST_KEY,
)
#: The fields :func:`build_engine` takes from its caller; it measures the others itself.
CALLER_HEADER_KEYS = ("bits", "preprocess", "model", "fingerprint", "checkpoint", "rebuild")

INSTALL_HINT = ("on x86-64 GPU servers run `pip install 'fgh[trt]'`; on Jetson use JetPack's TensorRT "
                "from a venv created with `python3 -m venv --system-site-packages`")


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
    if missing == [DIGEST_KEY]:
        raise FghError(f"{shown}: built by an older fgh, without a plan digest; {rebuild_hint}")
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


def check_engine_compatible(header: dict[str, Any], *, path: str | os.PathLike, tensorrt_version: str,
                            compute_capability: str, gpu_name: str) -> None:
    """Refuse an engine built with another TensorRT version or for another GPU architecture.

    Plans are tied to the exact TensorRT version (the full version string) and to the compute
    capability they were built for; deserialising a mismatched plan fails deep inside TensorRT
    ("Version tag does not match") or, worse, misbehaves. Call this before deserialising.

    Args:
        header: from :func:`read_engine_header`.
        path: the engine file, for the message.
        tensorrt_version: the installed ``tensorrt.__version__``.
        compute_capability: this GPU's, as ``"major.minor"`` (e.g. ``"9.0"``).
        gpu_name: this GPU's name, for the message.

    Raises:
        IncompatibleEngineError: with the exact command that rebuilds the engine here.
    """
    built_version = str(header["tensorrt_version"])
    built_cc = str(header["compute_capability"])
    if built_version == tensorrt_version and built_cc == compute_capability:
        return
    raise IncompatibleEngineError(
        f"{display_path(path)}: built with TensorRT {terminal_safe(built_version)} for "
        f"{terminal_safe(str(header['gpu_name']))} (sm {terminal_safe(built_cc)}); "
        f"this machine has TensorRT {tensorrt_version} and {gpu_name} (sm {compute_capability}) "
        f"— rebuild it with: {terminal_safe(header['rebuild'])}")


def engine_file_name(stem: str, precision: str, compute_capability: str, trt_version: str) -> str:
    """The conventional engine file name, e.g. ``semicon48.fp16.sm87.trt10.3.engine``.

    Args:
        stem: model name (usually the checkpoint's stem).
        precision: ``fp16`` or ``fp32``.
        compute_capability: ``"major.minor"``, e.g. ``"8.7"``.
        trt_version: TensorRT version; only major.minor goes into the name.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    sm = compute_capability.replace(".", "")
    trt = ".".join(trt_version.split(".")[:2])
    return f"{stem}.{precision}.sm{sm}.trt{trt}.engine"


def onnx_float_precision(path: str | os.PathLike) -> str:
    """``"fp16"`` when the ONNX graph computes in half precision anywhere, else ``"fp32"``.

    On TensorRT 11 the ONNX file alone decides the engine's precision, so :func:`build_engine`
    checks it against the requested one. Looks at initializers, declared value types, ``Cast``
    targets and constant tensors, including subgraphs.
    """
    import onnx

    half = onnx.TensorProto.FLOAT16
    proto = onnx.load(str(path), load_external_data=False)

    def has_half(graph: Any) -> bool:
        if any(t.data_type == half for t in graph.initializer):
            return True
        if any(v.type.tensor_type.elem_type == half for v in (*graph.input, *graph.output, *graph.value_info)):
            return True
        for node in graph.node:
            for attr in node.attribute:
                if node.op_type == "Cast" and attr.name == "to" and attr.i == half:
                    return True
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == half:
                    return True
                if attr.type == onnx.AttributeProto.GRAPH and has_half(attr.g):
                    return True
                if attr.type == onnx.AttributeProto.GRAPHS and any(has_half(g) for g in attr.graphs):
                    return True
        return False

    return "fp16" if has_half(proto.graph) else "fp32"


def cuda_device_info(device: Any = None) -> tuple[str, str]:
    """(GPU name, compute capability ``"major.minor"``) of a CUDA device (default: the current one)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return props.name, f"{props.major}.{props.minor}"


def dtype_name(trt: ModuleType, dtype: Any) -> str:
    """A TensorRT DataType as a numpy-style name (``uint8``, ``float32``, ``float16``)."""
    return np.dtype(trt.nptype(dtype)).name


# --------------------------------------------------------------------------------------------
# Building


def _pin_fp32_islands(trt: ModuleType, network: Any) -> int:
    """Keep numerically fragile layers in FP32 in a weakly typed FP16 build (TensorRT 10.x).

    Heuristic: softmax and reductions (sums of many terms, means, variances), square roots and
    powers (L2 norms, signed-sqrt, x²) overflow or lose the small differences that decide a hash
    bit in FP16 (max 65504, 11-bit mantissa). SEMICON's mask statistics and its signed-sqrt
    channel-interaction softmax lower to exactly these (Softmax, Sqrt, Pow, ReduceMean in the ONNX);
    the global average pools of all models are reductions too and cost little in FP32. Everything
    else (convs, GEMMs, activations) runs in FP16. Only layers whose outputs are all float tensors
    are pinned, so shape arithmetic on integers is left alone. Needs ``OBEY_PRECISION_CONSTRAINTS``.

    Returns:
        The number of layers pinned.
    """
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        kind = layer.type
        if kind == trt.LayerType.UNARY:
            layer.__class__ = trt.IUnaryLayer  # documented downcast to reach the layer's op
            fragile = layer.op == trt.UnaryOperation.SQRT
        elif kind == trt.LayerType.ELEMENTWISE:
            layer.__class__ = trt.IElementWiseLayer
            fragile = layer.op == trt.ElementWiseOperation.POW
        else:
            fragile = kind in (trt.LayerType.SOFTMAX, trt.LayerType.REDUCE)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not fragile or not all(t.dtype == trt.float32 for t in outputs):
            continue
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        pinned += 1
    return pinned


def _parse_onnx(trt: ModuleType, builder: Any, logger: Any, onnx_path: Path) -> tuple[Any, Any]:
    """Parse an fgh ONNX export into a new network; returns (network, parser).

    Raises:
        FghError: with every parser error, or when the graph is not fgh's uint8-images → codes.
    """
    shown = display_path(onnx_path)
    # 0 flags on both families. 10.x: networks are always explicit-batch (the EXPLICIT_BATCH enum
    # is a deprecated no-op there and gone in 11.x) and weakly typed; 11.x: always strongly typed.
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    logger.errors.clear()
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FghError(f"{shown}: TensorRT {trt.__version__} cannot parse it: "
                       f"{errors or logger.last_errors() or 'no error reported'}")
    if network.num_inputs != 1 or network.num_outputs != 1:
        raise FghError(f"{shown}: expected one input and one output, found {network.num_inputs} and "
                       f"{network.num_outputs}; export it with fgh export")
    inp, out = network.get_input(0), network.get_output(0)
    in_shape, out_shape = tuple(inp.shape), tuple(out.shape)
    if inp.name != INPUT_NAME or out.name != OUTPUT_NAME or len(in_shape) != 4 or len(out_shape) != 2:
        raise FghError(f"{shown}: expected input {INPUT_NAME!r} (B, 3, S, S) and output {OUTPUT_NAME!r} "
                       f"(B, bits), found {inp.name!r} {in_shape} and {out.name!r} {out_shape}")
    if dtype_name(trt, inp.dtype) != "uint8":
        raise FghError(f"{shown}: input {inp.name!r} is {dtype_name(trt, inp.dtype)}, expected uint8")
    return network, parser


def _attach_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> None:
    """Load ``path`` into the builder config when it exists and matches, else start an empty cache."""
    blob = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(blob)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        # A cache from another GPU / CUDA / TensorRT is useless here; start over rather than fail
        # (the new one replaces it after the build).
        log(f"TensorRT: timing cache {path} does not match this GPU/TensorRT; starting a new one")
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    elif blob:
        log(f"TensorRT: timing cache loaded from {path} ({len(blob) / 1e3:.1f} KB)")
    else:
        log(f"TensorRT: new timing cache, will be saved to {path}")


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *, precision: str,
                 batch: tuple[int, int, int] = (1, 16, 64), workspace_gib: float = 2.0,
                 optimization_level: int = 3, dla_core: int | None = None,
                 timing_cache: Path | None = None, header: dict[str, Any],
                 log: Callable[[str], None] = log.info) -> Path:
    """Build a TensorRT engine from an fgh ONNX export and write it with its header.

    Precision contract by API family:

    - TensorRT 10.x: pass the **FP32** ONNX. ``fp16`` sets the FP16 builder flag and pins
      softmax/reduce/sqrt/pow layers to FP32 (see :func:`_pin_fp32_islands`).
    - TensorRT 11.x: the network is strongly typed, so ``onnx_path`` must already be in the
      requested precision: the **FP16** ONNX (FP16 network with FP32 islands, e.g. from
      :class:`export.onnx.HalfPrecisionModel`) for ``fp16``, the FP32 ONNX for ``fp32``.

    A mismatched ONNX is refused before anything is built.

    Args:
        onnx_path: ONNX from :func:`export.onnx.export_onnx` (input ``images`` uint8
            (B, 3, S, S), output ``codes`` (B, bits)).
        engine_path: output engine file.
        precision: ``fp16`` or ``fp32`` (``fp32`` also disables TF32 so it matches ONNX Runtime).
        batch: (min, opt, max) batch sizes of the single optimization profile.
        workspace_gib: TensorRT workspace memory pool limit.
        optimization_level: builder optimization level 0–5 (0: fastest build, ignores the timing
            cache; 3: TensorRT's default).
        dla_core: build for this DLA core with GPU fallback (Jetson); needs ``fp16``.
        timing_cache: file to load tactic timings from (when it exists) and save them to; valid only
            for the same GPU, CUDA and TensorRT version, so key its name like the engine's.
        header: the caller's fields: ``bits``, ``preprocess``, ``model``, ``fingerprint``,
            ``checkpoint`` and ``rebuild`` (the ``fgh export CKPT --trt ...`` command that rebuilds
            this engine). The TensorRT version, GPU, profile, I/O and ONNX hash are added here.
        log: receives the staged progress lines (``TensorRT: ...``).

    Returns:
        The engine path written.

    Raises:
        BackendUnavailableError: TensorRT missing, or no usable CUDA GPU.
        FghError: unparsable ONNX, precision/ONNX mismatch, build failure (with TensorRT's errors).
        ValueError: invalid arguments, or ``header`` lacking a caller field.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    shown = display_path(onnx_path)
    min_b, opt_b, max_b = batch
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if not 1 <= min_b <= opt_b <= max_b:
        raise ValueError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_b}/{opt_b}/{max_b}")
    if not 0 <= optimization_level <= 5:
        raise ValueError(f"optimization_level must be 0..5, got {optimization_level}")
    if workspace_gib <= 0:
        raise ValueError(f"workspace_gib must be positive, got {workspace_gib}")
    if dla_core is not None and precision != "fp16":
        raise FghError("DLA runs FP16 (or INT8) only: build with precision fp16 to use a DLA core")
    missing = [key for key in CALLER_HEADER_KEYS if key not in header]
    if missing:
        raise ValueError(f"header lacks {', '.join(missing)}")
    if not onnx_path.is_file():
        raise FghError(f"{shown}: no such ONNX file")

    trt = import_tensorrt()
    family = api_family(trt)
    onnx_precision = onnx_float_precision(onnx_path)
    if family == 11 and onnx_precision != precision:
        raise FghError(f"{shown}: is an {onnx_precision.upper()} ONNX but a {precision.upper()} engine was asked "
                       f"for; TensorRT {trt.__version__} builds strongly typed networks, whose precision is the "
                       f"ONNX file's: pass the {precision.upper()} ONNX")
    if family == 10 and onnx_precision != "fp32":
        raise FghError(f"{shown}: is an FP16 ONNX; TensorRT {trt.__version__} lowers precision itself "
                       f"(FP16 builder flag): pass the FP32 ONNX")

    if not torch.cuda.is_available():
        raise BackendUnavailableError("no usable CUDA GPU for TensorRT: torch.cuda.is_available() is False")
    gpu_name, compute_capability = cuda_device_info()
    log(f"TensorRT: starting export with TensorRT {trt.__version__} (API family {family}) "
        f"on {gpu_name} (sm {compute_capability})...")

    logger = get_logger(trt)
    logger.errors.clear()
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # no driver / no device: pybind11 reports a null factory result as TypeError
        raise BackendUnavailableError(f"no usable CUDA GPU for TensorRT: {logger.last_errors() or exc}") from exc
    if builder is None:
        raise BackendUnavailableError(f"no usable CUDA GPU for TensorRT: {logger.last_errors() or 'no builder'}")

    # The parser holds the weights the network points to: keep it alive until the build is done.
    network, parser = _parse_onnx(trt, builder, logger, onnx_path)
    inp, out = network.get_input(0), network.get_output(0)
    in_shape, out_shape = tuple(inp.shape), tuple(out.shape)
    sample = tuple(int(d) for d in in_shape[1:])
    size = int(header["preprocess"]["input_size"])
    if sample != (3, size, size):
        raise FghError(f"{shown}: input shape {sample} does not match the preprocessing (3, {size}, {size})")
    if out_shape[1] != int(header["bits"]):
        raise FghError(f"{shown}: outputs {out_shape[1]} bits, the header says {header['bits']}")
    log(f"TensorRT: input {inp.name!r} {dtype_name(trt, inp.dtype)} {in_shape}, "
        f"output {out.name!r} {dtype_name(trt, out.dtype)} {out_shape}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    config.builder_optimization_level = optimization_level
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 convolutions keep a 10-bit mantissa: enough to flip near-zero hash bits against the
        # FP32 reference. An fp32 engine is the exact one; fp16 is the fast one.
        config.clear_flag(trt.BuilderFlag.TF32)
    if family == 10 and precision == "fp16":
        if not builder.platform_has_fast_fp16:
            log(f"TensorRT: warning: {gpu_name} has no fast FP16; the FP16 engine may not be faster")
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_fp32_islands(trt, network)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"TensorRT: FP16 builder flag, {pinned} softmax/reduce/sqrt/pow layer(s) pinned to FP32")
    elif family == 11:
        log(f"TensorRT: strongly typed network, {precision.upper()} as written in {onnx_path.name}")

    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (min_b, *sample), (opt_b, *sample), (max_b, *sample))
    config.add_optimization_profile(profile)

    if dla_core is not None:
        cores = builder.num_DLA_cores
        if not 0 <= dla_core < cores:
            raise FghError(f"DLA core {dla_core} requested but {gpu_name} has {cores} DLA core(s)")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)  # layers DLA cannot run go to the GPU
        log(f"TensorRT: DLA core {dla_core} with GPU fallback")

    if timing_cache is not None:
        timing_cache = Path(timing_cache)
        _attach_timing_cache(config, timing_cache, log)

    log(f"TensorRT: building {precision.upper()} engine, profile {min_b}/{opt_b}/{max_b}, "
        f"workspace {workspace_gib:g} GiB, optimization level {optimization_level}...")
    start = time.perf_counter()
    logger.errors.clear()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FghError(f"{shown}: TensorRT {trt.__version__} could not build the engine: "
                       f"{logger.last_errors() or 'no error reported'}")
    elapsed = time.perf_counter() - start

    if timing_cache is not None:
        serialized = config.get_timing_cache().serialize()
        atomic_write(timing_cache, lambda f: f.write(serialized))
        log(f"TensorRT: timing cache saved to {timing_cache}")

    full_header = {
        **header,
        "fgh_version": FGH_VERSION,
        "tensorrt_version": trt.__version__,
        "api_family": family,
        "gpu_name": gpu_name,
        "compute_capability": compute_capability,
        "precision": precision,
        "dla_core": dla_core,
        "profile": {"min": min_b, "opt": opt_b, "max": max_b},
        "input": {"name": inp.name, "dtype": dtype_name(trt, inp.dtype)},
        "output": {"name": out.name, "dtype": dtype_name(trt, out.dtype)},
        "input_shape": list(sample),
        "onnx_sha256": sha256_file(onnx_path),
    }
    write_engine(engine_path, full_header, plan)
    log(f"TensorRT: build success {elapsed:.1f}s, saved as '{engine_path}' "
        f"({engine_path.stat().st_size / 1e6:.1f} MB)")
    return engine_path
