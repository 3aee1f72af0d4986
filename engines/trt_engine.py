"""TensorRT backend: an fgh ``.engine`` file run through the name-based tensor API (TensorRT 10.x and 11.x).

The engine file's header (see :mod:`.trt_format`) is read and checked against the installed
TensorRT and the current GPU before the plan is deserialised, so a plan built elsewhere is refused
with the command that rebuilds it instead of failing inside TensorRT, and the plan bytes are
checked against the header's digest before TensorRT deserialises them. Device buffers are torch
CUDA tensors. Each engine has its own CUDA stream for copies, inference, CUDA-graph capture and
replay: ``enqueueV3`` on the legacy default stream would add device-wide synchronisations, and one
stream orders everything an engine does without further synchronisation.
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
    its min (the last one, or any on a static DLA profile) runs padded to it. With
    ``cuda_graph_batch`` set, chunks of exactly that size replay a captured CUDA graph (one
    ``execute_async_v3``), which saves the per-call launch overhead that dominates small batches;
    the graph has an execution context and buffers of its own (which cost a second set of
    activation memory), so plain launches at other sizes never change what it replays.

    Args:
        path: the ``.engine`` file from ``fgh export --trt``.
        device: ``auto``/``cuda`` (the current CUDA device) or ``cuda:N``.
        cuda_graph_batch: batch size to capture and replay as a CUDA graph (None: never).
        allow_other_gpu: run a plan built on a GPU with another multiprocessor count or memory
            size (same TensorRT version and compute capability); see
            :func:`.trt_format.check_engine_compatible`.

    Raises:
        FghError: unreadable or foreign file, a plan or header changed after the build (digest
            mismatch), header/plan mismatch, deserialisation failure, a CPU
            device, or a CUDA graph batch outside the profile or on a DLA engine.
        BackendUnavailableError: TensorRT missing (checked after the header) or no usable CUDA GPU.
        IncompatibleEngineError: built with another TensorRT version, for another GPU architecture,
            or on another GPU model or MIG slice (checked before deserialising).
    """

    kind = "tensorrt"

    def __init__(self, path: Path, device: str = "auto", *, cuda_graph_batch: int | None = None,
                 allow_other_gpu: bool = False) -> None:
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
        self.gpu = cuda_device_info(self.device)
        check_engine_compatible(header, path=path, tensorrt_version=trt.__version__, gpu=self.gpu,
                                allow_other_gpu=allow_other_gpu)
        self._deserialize(trt, plan)
        self._bind_io(trt)
        self._stream = torch.cuda.Stream(self.device)
        self._plain_slot: _ExecutionSlot | None = _ExecutionSlot(self, self._context)
        self._graph_slot: _ExecutionSlot | None = None
        if cuda_graph_batch is not None:
            with torch.cuda.stream(self._stream):  # its buffers belong to the stream that uses them
                self._graph_slot = _ExecutionSlot(self, self._new_context(), fixed_batch=cuda_graph_batch)
        self._pinned: torch.Tensor | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        log.debug("TensorRT: loaded %s (%s, profile %s, TensorRT %s on %s)", path.name, self.precision,
                  batch_range, trt.__version__, self.gpu.describe())

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
            self._context = self._new_context()

    def _new_context(self) -> Any:
        """An execution context of the engine, with its own activation memory."""
        with torch.cuda.device(self.device):
            context = self._engine.create_execution_context()
        if context is None:
            raise FghError(f"{self.shown_path}: TensorRT could not create an execution context "
                           f"({self._logger.last_errors() or 'out of GPU memory?'})")
        return context

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

    def _run_chunk(self, chunk: torch.Tensor) -> np.ndarray:
        batch = chunk.shape[0]
        # A chunk shorter than the profile's min (a static DLA profile, the last chunk) runs padded to
        # it; the padding rows hold stale input and their codes are dropped.
        run = max(batch, self.profile[0])
        slot = self._graph_slot if run == self.cuda_graph_batch else self._plain_slot
        slot.reserve(run)
        target = slot.input[:batch]
        if chunk.device.type == "cpu":
            # Through pinned memory so the upload is a real asynchronous DMA; the buffer is reused
            # safely because reading the output below synchronises the stream before the next chunk.
            if self._pinned is None:
                self._pinned = torch.empty((self.profile[2], *chunk.shape[1:]), dtype=torch.uint8, pin_memory=True)
            staging = self._pinned[:batch]
            staging.copy_(chunk)
            target.copy_(staging, non_blocking=True)
        else:
            target.copy_(chunk)
        if slot is self._graph_slot:
            self._replay_graph()
        else:
            slot.launch(run, self._stream)
        return slot.output[:batch].float().cpu().numpy()

    def _replay_graph(self) -> None:
        """Replay the graph of ``cuda_graph_batch``, capturing it on first use.

        The graph has its own execution context, buffers and input shape, set once before the
        capture and never changed (NVIDIA's guidance: one context per captured graph), so plain
        launches at other batch sizes on the other context cannot invalidate it.
        """
        if self._graph is None:
            slot = self._graph_slot
            # The warm-up run applies the input shape and flushes TensorRT's deferred setup work,
            # which must not land inside the capture.
            slot.launch(self.cuda_graph_batch, self._stream)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph()
            try:
                # Thread-local: a CUDA call from another thread (encode's pin-memory thread) during
                # the capture neither joins nor breaks it.
                with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                    launched = slot.context.execute_async_v3(self._stream.cuda_stream)
            except RuntimeError as exc:
                raise FghError(f"{self.shown_path}: CUDA graph capture failed ({' '.join(str(exc).split())[:200]}); "
                               f"encode without cuda_graph_batch") from exc
            if not launched:
                raise FghError(f"{self.shown_path}: TensorRT inference failed during CUDA graph capture "
                               f"({self._logger.last_errors() or 'no error reported'})")
            self._graph = graph
        self._graph.replay()  # on self._stream: _encode_impl made it the current stream

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        if self._plain_slot is None:
            raise FghError(f"{self.shown_path}: the engine is closed")
        batch = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
        total, step = batch.shape[0], self.profile[2]
        codes = np.empty((total, self.bits), np.float32)
        with torch.cuda.device(self.device), torch.no_grad():
            if batch.device.type == "cuda":
                # The caller's images may still be in flight on its own stream.
                self._stream.wait_stream(torch.cuda.current_stream(batch.device))
            with torch.cuda.stream(self._stream):
                for start in range(0, total, step):
                    chunk = batch[start:start + step].contiguous()
                    codes[start:start + chunk.shape[0]] = self._run_chunk(chunk)
        return codes

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "precision": self.precision,
                "tensorrt_version": self.header["tensorrt_version"], "gpu": self.gpu.name,
                "compute_capability": self.gpu.compute_capability, "gpu_multiprocessors": self.gpu.multiprocessors,
                "gpu_memory_bytes": self.gpu.memory_bytes, "dla_core": self.dla_core,
                "profile": {"min": self.profile[0], "opt": self.profile[1], "max": self.profile[2]}}

    def close(self) -> None:
        """Free the CUDA graph and buffers, then the contexts, engine and runtime, in that order."""
        if getattr(self, "_stream", None) is not None:
            self._stream.synchronize()  # nothing of ours may still run on what is freed below
        self._graph = None
        self._pinned = None
        self._plain_slot = self._graph_slot = None
        self._context = None
        self._engine = None
        self._runtime = None


class _ExecutionSlot:
    """One execution context, the device buffers bound to it, and the batch its input shape is set to.

    Buffers are bound once and move only when a larger batch needs larger ones; a slot with a
    ``fixed_batch`` (the CUDA graph's) is sized once and never moves, as a captured graph requires.
    """

    def __init__(self, engine: TensorRTEngine, context: Any, *, fixed_batch: int | None = None) -> None:
        self._engine = engine
        self.context = context
        self.fixed_batch = fixed_batch
        self.capacity = 0
        self.batch: int | None = None
        self.input = self.output = torch.empty(0)
        if fixed_batch is not None:
            self.reserve(fixed_batch)

    def reserve(self, batch: int) -> None:
        """Device buffers for ``batch`` images, bound to the context."""
        if batch <= self.capacity:
            return
        if self.fixed_batch is not None and self.capacity:
            raise AssertionError(f"a fixed-batch slot of {self.fixed_batch} cannot grow to {batch}")
        engine = self._engine
        size = engine.input_size
        self.input = torch.empty((batch, 3, size, size), dtype=torch.uint8, device=engine.device)
        self.output = torch.empty((batch, engine.bits), dtype=engine._output_dtype, device=engine.device)
        self.context.set_tensor_address(engine._input_name, self.input.data_ptr())
        self.context.set_tensor_address(engine._output_name, self.output.data_ptr())
        self.capacity = batch

    def set_batch(self, batch: int) -> None:
        """Set the context's input shape to ``batch`` images (a no-op when it already is)."""
        if batch == self.batch:
            return
        engine = self._engine
        size = engine.input_size
        if not self.context.set_input_shape(engine._input_name, (batch, 3, size, size)):
            low, opt, high = engine.profile
            raise FghError(f"{engine.shown_path}: a batch of {batch} is outside the engine's optimization profile "
                           f"(min {low}, opt {opt}, max {high}); rebuild it with: {engine.rebuild}")
        out_shape = tuple(self.context.get_tensor_shape(engine._output_name))
        if out_shape != (batch, engine.bits):
            raise FghError(f"{engine.shown_path}: the engine reports output shape {out_shape} for a batch of "
                           f"{batch}, expected {(batch, engine.bits)}")
        self.batch = batch

    def launch(self, batch: int, stream: torch.cuda.Stream) -> None:
        """Enqueue inference of the first ``batch`` images of :attr:`input` on ``stream``."""
        self.set_batch(batch)
        if not self.context.execute_async_v3(stream.cuda_stream):
            engine = self._engine
            raise FghError(f"{engine.shown_path}: TensorRT inference failed "
                           f"({engine._logger.last_errors() or 'no error reported'})")
