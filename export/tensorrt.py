"""ONNX → TensorRT engine: the build in small steps, from one :class:`TrtBuildOptions`.

The steps follow Polygraphy's loaders: parse the ONNX into a network, create the builder config,
add the optimization profile, place it on a DLA core, build the serialized plan, then write it
with fgh's header (:func:`fgh_deploy.engines.trt_format.write_engine`). The file format, the
TensorRT import and logger live with the runtime in :mod:`fgh_deploy.engines.trt_format`: the
builder depends on the runtime, never the reverse.

Two API families are supported:

- **10.x** (JetPack 6 ships 10.3): weakly typed networks. FP16 comes from the ``FP16`` builder
  flag applied to the FP32 ONNX, with numerically fragile layers pinned to FP32.
- **11.x**: strongly typed networks only; the weak-typing flags (``FP16``,
  ``OBEY_PRECISION_CONSTRAINTS``) and the ``EXPLICIT_BATCH`` enum are gone. The precision is the
  one written in the ONNX file, so an FP16 engine needs an FP16 ONNX (FP16 network with FP32
  islands and casts).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from fgh_deploy.engines.onnx_format import INPUT_NAME, MAX_BATCH, OUTPUT_NAME
from fgh_deploy.engines.trt_format import (PRECISIONS, GpuInfo, api_family, cuda_device_info, dtype_name,
                                           get_logger, import_tensorrt, write_engine)
from fgh_deploy.errors import BackendUnavailableError, ConfigError, FghError
from fgh_deploy.utils import atomic_write, display_path, sha256_file
from fgh_deploy.version import __version__ as FGH_VERSION

log = logging.getLogger(__name__)

#: The header fields :func:`build_engine` takes from its caller; it measures the others itself.
CALLER_HEADER_KEYS = ("bits", "preprocess", "model", "fingerprint", "checkpoint", "rebuild")


@dataclass(frozen=True)
class TrtBuildOptions:
    """How to build a TensorRT engine: the ``fgh export --trt`` options, checked once when made.

    Attributes:
        precision: ``fp16`` or ``fp32`` (``fp32`` also disables TF32 so it matches ONNX Runtime).
        batch: (min, opt, max) batch sizes of the single optimization profile.
        workspace_gib: TensorRT workspace memory pool limit.
        optimization_level: builder optimization level 0–5 (0: fastest build, ignores the timing
            cache; 3: TensorRT's default).
        dla_core: build for this DLA core with GPU fallback (Jetson: TensorRT 10.x on JetPack 6, or
            11.4.1 on JetPack 7.2.2+; NVIDIA's other 11.x releases have no DLA); needs ``fp16`` and
            a static batch (DLA has no dynamic shapes).
        timing_cache: file to load tactic timings from (when it exists) and save them to; valid only
            for the same GPU, CUDA and TensorRT version, so key its name like the engine's. None: no
            cache (``fgh export`` then keeps one next to the engine).

    Raises:
        ConfigError: the first option out of range, named in the message (also a ValueError).
    """

    precision: str = "fp16"
    batch: tuple[int, int, int] = (1, 16, 64)
    workspace_gib: float = 2.0
    optimization_level: int = 3
    dla_core: int | None = None
    timing_cache: Path | None = None

    def command_line(self) -> str:
        """The ``fgh export --trt`` flags that build with these options (the timing cache is local)."""
        flags = [f"--precision {self.precision}", f"--batch {','.join(map(str, self.batch))}",
                 f"--workspace {self.workspace_gib:g}", f"--opt-level {self.optimization_level}"]
        if self.dla_core is not None:
            flags.append(f"--dla-core {self.dla_core}")
        return " ".join(flags)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        batch = tuple(self.batch)
        if (len(batch) != 3 or not all(_is_int(b) for b in batch)
                or not 1 <= batch[0] <= batch[1] <= batch[2] <= MAX_BATCH):
            raise ConfigError(f"batch profile must satisfy 1 <= min <= opt <= max <= {MAX_BATCH}, "
                              f"got {'/'.join(map(str, batch))}")
        if not _is_int(self.optimization_level) or not 0 <= self.optimization_level <= 5:
            raise ConfigError(f"optimization_level must be 0..5, got {self.optimization_level!r}")
        workspace = self.workspace_gib
        if isinstance(workspace, bool) or not isinstance(workspace, (int, float)) or not 0 < workspace < math.inf:
            raise ConfigError(f"workspace_gib must be a positive number of GiB, got {workspace!r}")
        if self.dla_core is not None:
            # The bound read_engine_header accepts; the device's real count is checked at build time.
            if not _is_int(self.dla_core) or not 0 <= self.dla_core < 16:
                raise ConfigError(f"dla_core must be a DLA core number 0..15, got {self.dla_core!r}")
            if self.precision != "fp16":
                raise ConfigError("DLA runs FP16 (or INT8) only: build with precision fp16 to use a DLA core")
            if len(set(batch)) != 1:
                # DLA has no dynamic dimensions: a 1/16/64 profile fails the build or runs on the GPU.
                raise ConfigError(f"DLA needs a static batch (min = opt = max), got {'/'.join(map(str, batch))}; "
                                  f"pass e.g. --batch {batch[1]},{batch[1]},{batch[1]} (shorter batches are padded)")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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


# --------------------------------------------------------------------------------------------
# Build steps, in the order build_engine runs them


def _check_onnx_precision(trt: ModuleType, family: int, onnx_path: Path, precision: str) -> None:
    """Refuse an ONNX whose float precision does not fit the requested engine on this API family."""
    shown = display_path(onnx_path)
    onnx_precision = onnx_float_precision(onnx_path)
    if family == 11 and onnx_precision != precision:
        raise FghError(f"{shown}: is an {onnx_precision.upper()} ONNX but a {precision.upper()} engine was asked "
                       f"for; TensorRT {trt.__version__} builds strongly typed networks, whose precision is the "
                       f"ONNX file's: pass the {precision.upper()} ONNX")
    if family == 10 and onnx_precision != "fp32":
        raise FghError(f"{shown}: is an FP16 ONNX; TensorRT {trt.__version__} lowers precision itself "
                       f"(FP16 builder flag): pass the FP32 ONNX")


def _create_builder(trt: ModuleType, logger: Any) -> Any:
    """A TensorRT builder on the current CUDA device.

    Raises:
        BackendUnavailableError: no usable CUDA GPU (no driver, no device).
    """
    if not torch.cuda.is_available():
        raise BackendUnavailableError("no usable CUDA GPU for TensorRT: torch.cuda.is_available() is False")
    logger.errors.clear()
    try:
        builder = trt.Builder(logger)
    except Exception as exc:  # no driver / no device: pybind11 reports a null factory result as TypeError
        raise BackendUnavailableError(f"no usable CUDA GPU for TensorRT: {logger.last_errors() or exc}") from exc
    if builder is None:
        raise BackendUnavailableError(f"no usable CUDA GPU for TensorRT: {logger.last_errors() or 'no builder'}")
    return builder


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


def _check_network_io(trt: ModuleType, network: Any, header: dict[str, Any], onnx_path: Path,
                      log: Callable[[str], None]) -> tuple[int, int, int]:
    """The network's per-image input shape (3, S, S), once it and the code length match ``header``."""
    shown = display_path(onnx_path)
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
    return sample


def _create_config(trt: ModuleType, family: int, builder: Any, network: Any, options: TrtBuildOptions,
                   gpu_name: str, onnx_path: Path, log: Callable[[str], None]) -> Any:
    """The builder config: workspace, optimization level and the precision rules of the API family."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(options.workspace_gib * 2**30))
    config.builder_optimization_level = options.optimization_level
    if options.precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        # TF32 convolutions keep a 10-bit mantissa: enough to flip near-zero hash bits against the
        # FP32 reference. An fp32 engine is the exact one; fp16 is the fast one.
        config.clear_flag(trt.BuilderFlag.TF32)
    if family == 10 and options.precision == "fp16":
        if not builder.platform_has_fast_fp16:
            log(f"TensorRT: warning: {gpu_name} has no fast FP16; the FP16 engine may not be faster")
        config.set_flag(trt.BuilderFlag.FP16)
        pinned = _pin_fp32_islands(trt, network)
        if pinned:
            config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        log(f"TensorRT: FP16 builder flag, {pinned} softmax/reduce/sqrt/pow layer(s) pinned to FP32")
    elif family == 11:
        log(f"TensorRT: strongly typed network, {options.precision.upper()} as written in {onnx_path.name}")
    return config


def _add_profile(builder: Any, config: Any, input_name: str, sample: tuple[int, int, int],
                 batch: tuple[int, int, int]) -> None:
    """The single optimization profile: the batch axis from min to max, tuned for opt."""
    min_b, opt_b, max_b = batch
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, (min_b, *sample), (opt_b, *sample), (max_b, *sample))
    config.add_optimization_profile(profile)


def _use_dla(trt: ModuleType, builder: Any, config: Any, dla_core: int, gpu_name: str,
             log: Callable[[str], None]) -> None:
    """Place the network on a DLA core; layers the DLA cannot run fall back to the GPU."""
    cores = builder.num_DLA_cores
    if not 0 <= dla_core < cores:
        raise FghError(f"DLA core {dla_core} requested but {gpu_name} has {cores} DLA core(s)")
    config.default_device_type = trt.DeviceType.DLA
    config.DLA_core = dla_core
    config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    log(f"TensorRT: DLA core {dla_core} with GPU fallback")


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


def _save_timing_cache(config: Any, path: Path, log: Callable[[str], None]) -> None:
    """Write the timings measured by this build (and the ones loaded) for the next build."""
    serialized = config.get_timing_cache().serialize()
    atomic_write(path, lambda f: f.write(serialized))
    log(f"TensorRT: timing cache saved to {path}")


def _build_plan(trt: ModuleType, builder: Any, network: Any, config: Any, logger: Any, options: TrtBuildOptions,
                onnx_path: Path, log: Callable[[str], None]) -> Any:
    """The serialized plan (TensorRT's IHostMemory), or FghError with TensorRT's errors."""
    min_b, opt_b, max_b = options.batch
    log(f"TensorRT: building {options.precision.upper()} engine, profile {min_b}/{opt_b}/{max_b}, "
        f"workspace {options.workspace_gib:g} GiB, optimization level {options.optimization_level}...")
    logger.errors.clear()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise FghError(f"{display_path(onnx_path)}: TensorRT {trt.__version__} could not build the engine: "
                       f"{logger.last_errors() or 'no error reported'}")
    return plan


def _engine_header(trt: ModuleType, family: int, gpu: GpuInfo, network: Any, caller_fields: dict[str, Any],
                   options: TrtBuildOptions, onnx_path: Path) -> dict[str, Any]:
    """The caller's header fields plus what this build measured: TensorRT, GPU, profile, I/O, ONNX hash."""
    inp, out = network.get_input(0), network.get_output(0)
    min_b, opt_b, max_b = options.batch
    return {
        **caller_fields,
        "fgh_version": FGH_VERSION,
        "tensorrt_version": trt.__version__,
        "api_family": family,
        "gpu_name": gpu.name,
        "compute_capability": gpu.compute_capability,
        "gpu_multiprocessors": gpu.multiprocessors,
        "gpu_memory_bytes": gpu.memory_bytes,
        "precision": options.precision,
        "dla_core": options.dla_core,
        "profile": {"min": min_b, "opt": opt_b, "max": max_b},
        "input": {"name": inp.name, "dtype": dtype_name(trt, inp.dtype)},
        "output": {"name": out.name, "dtype": dtype_name(trt, out.dtype)},
        "input_shape": [int(d) for d in tuple(inp.shape)[1:]],
        "onnx_sha256": sha256_file(onnx_path),
    }


# --------------------------------------------------------------------------------------------
# The build


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike,
                 options: TrtBuildOptions | None = None, *, header: dict[str, Any],
                 log: Callable[[str], None] = log.info, **option_fields: Any) -> Path:
    """Build a TensorRT engine from an fgh ONNX export and write it with its header.

    Precision contract by API family:

    - TensorRT 10.x: pass the **FP32** ONNX. ``fp16`` sets the FP16 builder flag and pins
      softmax/reduce/sqrt/pow layers to FP32 (see :func:`_pin_fp32_islands`).
    - TensorRT 11.x: the network is strongly typed, so ``onnx_path`` must already be in the
      requested precision: the **FP16** ONNX (FP16 network with FP32 islands, e.g. from
      :class:`fgh_deploy.export.onnx.HalfPrecisionModel`) for ``fp16``, the FP32 ONNX for ``fp32``.

    A mismatched ONNX is refused before anything is built.

    Args:
        onnx_path: ONNX from :func:`fgh_deploy.export.onnx.export_onnx` (input ``images`` uint8
            (B, 3, S, S), output ``codes`` (B, bits)).
        engine_path: output engine file.
        options: how to build; or give its fields as keywords instead
            (``build_engine(onnx, engine, precision="fp32", batch=(1, 8, 32), header=...)``).
        header: the caller's fields: ``bits``, ``preprocess``, ``model``, ``fingerprint``,
            ``checkpoint`` and ``rebuild`` (the ``fgh export CKPT --trt ...`` command that rebuilds
            this engine). The TensorRT version, GPU, profile, I/O and ONNX hash are added here.
        log: receives the progress lines of the build steps (``TensorRT: ...``).

    Returns:
        The engine path written.

    Raises:
        BackendUnavailableError: TensorRT missing, or no usable CUDA GPU.
        ConfigError: an option out of range (also a ValueError).
        FghError: unparsable ONNX, precision/ONNX mismatch, build failure (with TensorRT's errors).
        ValueError: ``header`` lacking a caller field.
        TypeError: both ``options`` and option keywords.
    """
    if options is None:
        options = TrtBuildOptions(**option_fields)
    elif option_fields:
        raise TypeError(f"pass options or its fields, not both (got {', '.join(option_fields)})")
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    missing = [key for key in CALLER_HEADER_KEYS if key not in header]
    if missing:
        raise ValueError(f"header lacks {', '.join(missing)}")
    if not onnx_path.is_file():
        raise FghError(f"{display_path(onnx_path)}: no such ONNX file")

    trt = import_tensorrt()
    family = api_family(trt)
    _check_onnx_precision(trt, family, onnx_path, options.precision)
    logger = get_logger(trt)
    builder = _create_builder(trt, logger)
    gpu = cuda_device_info()
    # The parser holds the weights the network points to: keep it alive until the build is done.
    network, parser = _parse_onnx(trt, builder, logger, onnx_path)
    sample = _check_network_io(trt, network, header, onnx_path, log)
    config = _create_config(trt, family, builder, network, options, gpu.name, onnx_path, log)
    _add_profile(builder, config, network.get_input(0).name, sample, options.batch)
    if options.dla_core is not None:
        _use_dla(trt, builder, config, options.dla_core, gpu.name, log)
    timing_cache = Path(options.timing_cache) if options.timing_cache is not None else None
    if timing_cache is not None:
        _attach_timing_cache(config, timing_cache, log)
    plan = _build_plan(trt, builder, network, config, logger, options, onnx_path, log)
    if timing_cache is not None:
        _save_timing_cache(config, timing_cache, log)
    return write_engine(engine_path, _engine_header(trt, family, gpu, network, header, options, onnx_path), plan)
