"""TensorRT backend: an fgh ``.engine`` file run through the name-based tensor API (TensorRT 10.x and 11.x).

The engine file's header (see :mod:`.trt_format`) is read and checked against the installed
TensorRT and the current GPU before the plan is deserialised, so a plan built elsewhere is refused
with the command that rebuilds it instead of failing inside TensorRT, and the plan bytes are
checked against the header's digest before TensorRT deserialises them. Device buffers are torch
CUDA tensors and work is enqueued on torch's current stream, so copies and inference are ordered
without extra synchronisation.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig, PreprocessConfig
from fgh_deploy.errors import BackendUnavailableError, FghError, IncompatibleEngineError
from fgh_deploy.utils import check_device, display_path, resolve_device, terminal_safe

from .base import Engine
from .trt_format import (check_engine_compatible, cuda_device_info, dtype_name, get_logger, import_tensorrt,
                         read_engine_header, read_verified_plan)

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}


class TensorRTEngine(Engine):
    """An fgh TensorRT engine (``.engine``) on a CUDA GPU (or a Jetson's GPU/DLA).

    Batches larger than the optimization profile's max are split into chunks; a chunk smaller than
    its min (the last one, or any on a static DLA profile) runs padded to it. With ``cuda_graph_batch`` set, batches of exactly that size replay a
    captured CUDA graph (one ``execute_async_v3``), which saves the per-call launch overhead that
    dominates small batches; other sizes use the plain launch.

    Args:
        path: the ``.engine`` file from ``fgh export --trt``.
        device: ``auto``/``cuda`` (the current CUDA device) or ``cuda:N``.
        cuda_graph_batch: batch size to capture and replay as a CUDA graph (None: never).

    Raises:
        FghError: unreadable or foreign file, a plan or header changed after the build (digest
            mismatch), header/plan mismatch, deserialisation failure, a CPU
            device, or a CUDA graph batch outside the profile or on a DLA engine.
        BackendUnavailableError: TensorRT missing (checked after the header) or no usable CUDA GPU.
        IncompatibleEngineError: built with another TensorRT version or for another GPU
            architecture (checked before deserialising).
    """

    kind = "tensorrt"

    def __init__(self, path: Path, device: str = "auto", *, cuda_graph_batch: int | None = None) -> None:
        path = Path(path)
        shown = display_path(path)
        check_device(device)
        if device == "cpu":
            raise FghError(f"{shown}: TensorRT engines run on a CUDA GPU, not 'cpu'; use the .onnx or .pt file on "
                           f"the CPU")
        header, plan_offset = read_engine_header(path)  # every field checked
        # Before TensorRT sees the plan: the fingerprint below is only this plan's once the digest matched.
        plan = read_verified_plan(path, header, plan_offset)
        super().__init__(path, PreprocessConfig.from_dict(header["preprocess"]), header["fingerprint"],
                         HashConfig.from_dict(header["model"], "model").to_dict())
        profile = header["profile"]
        batch_range = (profile["min"], profile["opt"], profile["max"])
        self.header = header
        #: The command that rebuilds this engine, as it may be printed.
        self.rebuild = terminal_safe(header["rebuild"])
        self.precision: str = header["precision"]
        self.dla_core: int | None = header["dla_core"]
        self.profile = batch_range
        if cuda_graph_batch is not None:
            if self.dla_core is not None:
                raise FghError(f"{shown}: CUDA graphs cannot capture DLA work; leave cuda_graph_batch unset "
                               f"for this DLA engine")
            if not batch_range[0] <= cuda_graph_batch <= batch_range[2]:
                raise FghError(f"{shown}: cuda_graph_batch {cuda_graph_batch} is outside the engine's profile "
                               f"{batch_range[0]}..{batch_range[2]}")
        self.cuda_graph_batch = cuda_graph_batch

        trt = import_tensorrt()
        if not torch.cuda.is_available():
            raise BackendUnavailableError("no usable CUDA GPU for TensorRT: torch.cuda.is_available() is False")
        self.device = torch.device("cuda", torch.cuda.current_device()) if device in ("auto", "cuda") \
            else resolve_device(device)
        self.gpu_name, self.compute_capability = cuda_device_info(self.device)
        check_engine_compatible(header, path=path, tensorrt_version=trt.__version__,
                                compute_capability=self.compute_capability, gpu_name=self.gpu_name)
        self._deserialize(trt, plan)
        self._bind_io(trt)
        self._capacity = 0
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None
        self._pinned: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._shape_batch: int | None = None
        log.debug("TensorRT: loaded %s (%s, profile %s, TensorRT %s on %s)", path.name, self.precision,
                  batch_range, trt.__version__, self.gpu_name)

    def _deserialize(self, trt: Any, plan: bytes) -> None:
        """Runtime → engine → execution context on this engine's device, from the verified plan."""
        logger = self._logger = get_logger(trt)
        logger.errors.clear()
        with torch.cuda.device(self.device):
            try:
                self._runtime = trt.Runtime(logger)
            except Exception as exc:  # no driver / device: pybind11 reports a null factory result as TypeError
                raise BackendUnavailableError(f"no usable CUDA GPU for TensorRT: "
                                              f"{logger.last_errors() or exc}") from exc
            if self.dla_core is not None:
                cores = int(self._runtime.num_DLA_cores)
                if not 0 <= self.dla_core < cores:
                    raise IncompatibleEngineError(
                        f"{self.shown_path}: built for DLA core {self.dla_core}, but this device has {cores} DLA "
                        f"core(s); rebuild it with: {self.rebuild}")
                self._runtime.DLA_core = int(self.dla_core)
            self._engine = self._runtime.deserialize_cuda_engine(plan)
            if self._engine is None:
                raise FghError(f"{self.shown_path}: TensorRT {trt.__version__} could not deserialise the plan "
                               f"({logger.last_errors() or 'no error reported'}); rebuild it with: "
                               f"{self.rebuild}")
            self._context = self._engine.create_execution_context()
            if self._context is None:
                raise FghError(f"{self.shown_path}: TensorRT could not create an execution context "
                               f"({logger.last_errors() or 'out of GPU memory?'})")

    def _bind_io(self, trt: Any) -> None:
        """Find the I/O tensors by name and check them against the header."""
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        want_in, want_out = self.header["input"]["name"], self.header["output"]["name"]
        if inputs != [want_in] or outputs != [want_out]:
            raise FghError(f"{self.shown_path}: the plan's tensors (inputs {inputs}, outputs {outputs}) do not match "
                           f"its header ({want_in!r} → {want_out!r}); rebuild it with: {self.rebuild}")
        in_dtype = dtype_name(trt, engine.get_tensor_dtype(want_in))
        out_dtype = dtype_name(trt, engine.get_tensor_dtype(want_out))
        out_shape = tuple(engine.get_tensor_shape(want_out))
        if in_dtype != "uint8" or out_dtype not in _TORCH_DTYPES or out_shape[-1] != self.bits:
            raise FghError(f"{self.shown_path}: the plan takes {in_dtype} and gives {out_dtype} {out_shape}; fgh "
                           f"needs uint8 images in and (B, {self.bits}) float codes out")
        self._input_name, self._output_name = want_in, want_out
        self._output_dtype = _TORCH_DTYPES[out_dtype]
        mins, opts, maxs = engine.get_tensor_profile_shape(want_in, 0)
        plan_profile = (int(mins[0]), int(opts[0]), int(maxs[0]))
        if plan_profile != self.profile:
            raise FghError(f"{self.shown_path}: the plan's batch profile {plan_profile} does not match its header "
                           f"{self.profile}; rebuild it with: {self.rebuild}")

    def _ensure_capacity(self, batch: int) -> None:
        """Device buffers for ``batch`` images, bound to the context once (their addresses never move)."""
        if batch <= self._capacity:
            return
        size = self.input_size
        self._input = torch.empty((batch, 3, size, size), dtype=torch.uint8, device=self.device)
        self._output = torch.empty((batch, self.bits), dtype=self._output_dtype, device=self.device)
        self._pinned = None
        self._context.set_tensor_address(self._input_name, self._input.data_ptr())
        self._context.set_tensor_address(self._output_name, self._output.data_ptr())
        self._graph = None  # captured with the old addresses
        self._capacity = batch

    def _set_batch(self, batch: int) -> None:
        if batch == self._shape_batch:
            return
        size = self.input_size
        if not self._context.set_input_shape(self._input_name, (batch, 3, size, size)):
            low, opt, high = self.profile
            raise FghError(f"{self.shown_path}: a batch of {batch} is outside the engine's optimization profile "
                           f"(min {low}, opt {opt}, max {high}); rebuild it with: {self.rebuild}")
        out_shape = tuple(self._context.get_tensor_shape(self._output_name))
        if out_shape != (batch, self.bits):
            raise FghError(f"{self.shown_path}: the engine reports output shape {out_shape} for a batch of {batch}, "
                           f"expected {(batch, self.bits)}")
        self._shape_batch = batch

    def _launch(self, batch: int) -> None:
        self._set_batch(batch)
        stream = torch.cuda.current_stream(self.device).cuda_stream
        if not self._context.execute_async_v3(stream):
            raise FghError(f"{self.shown_path}: TensorRT inference failed "
                           f"({self._logger.last_errors() or 'no error reported'})")

    def _replay(self, batch: int) -> None:
        if self._graph is None:
            # The warm-up run applies the input shape and flushes TensorRT's deferred setup work,
            # which must not land inside the capture.
            self._launch(batch)
            torch.cuda.current_stream(self.device).synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    launched = self._context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            except RuntimeError as exc:
                raise FghError(f"{self.shown_path}: CUDA graph capture failed ({' '.join(str(exc).split())[:200]}); "
                               f"encode without cuda_graph_batch") from exc
            if not launched:
                raise FghError(f"{self.shown_path}: TensorRT inference failed during CUDA graph capture "
                               f"({self._logger.last_errors() or 'no error reported'})")
            self._graph = graph
        # The graph replays kernels recorded for this batch size; keep the context's shape in step
        # for the plain launches that may follow.
        self._set_batch(batch)
        self._graph.replay()

    def _run_chunk(self, chunk: torch.Tensor) -> np.ndarray:
        batch = chunk.shape[0]
        # A chunk shorter than the profile's min (a static DLA profile, the last chunk) runs padded to
        # it; the padding rows hold stale input and their codes are dropped.
        run = max(batch, self.profile[0])
        self._ensure_capacity(max(run, self.cuda_graph_batch or 0))
        target = self._input[:batch]
        if chunk.device.type == "cpu":
            # Through pinned memory so the upload is a real asynchronous DMA; the buffer is reused
            # safely because reading the output below synchronises before the next chunk.
            if self._pinned is None:
                self._pinned = torch.empty(self._input.shape, dtype=torch.uint8, pin_memory=True)
            staging = self._pinned[:batch]
            staging.copy_(chunk)
            target.copy_(staging, non_blocking=True)
        else:
            target.copy_(chunk)
        if run == self.cuda_graph_batch:
            self._replay(run)
        else:
            self._launch(run)
        return self._output[:batch].float().cpu().numpy()

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        if self._context is None:
            raise FghError(f"{self.shown_path}: the engine is closed")
        batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        total, step = batch.shape[0], self.profile[2]
        codes = np.empty((total, self.bits), np.float32)
        with torch.cuda.device(self.device), torch.no_grad():
            for start in range(0, total, step):
                chunk = batch[start:start + step].contiguous()
                codes[start:start + chunk.shape[0]] = self._run_chunk(chunk)
        return codes

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision,
                "tensorrt_version": self.header["tensorrt_version"], "gpu": self.gpu_name,
                "compute_capability": self.compute_capability, "dla_core": self.dla_core,
                "profile": {"min": self.profile[0], "opt": self.profile[1], "max": self.profile[2]}}

    def close(self) -> None:
        """Free the CUDA graph and buffers, then the context, engine and runtime, in that order."""
        self._graph = None
        self._input = self._output = self._pinned = None
        self._capacity = 0
        self._context = None
        self._engine = None
        self._runtime = None
