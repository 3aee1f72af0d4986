"""ONNX Runtime backend: TensorRT → CUDA → CPU providers, their options, and the truth about which runs."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgh_deploy.config import HashConfig
from fgh_deploy.errors import FghError
from fgh_deploy.utils import check_device, display_path, terminal_safe

from .base import Engine
from .onnx_format import DIGEST_KEY, read_verified_model

log = logging.getLogger(__name__)

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"
PREFERRED_PROVIDERS = (TRT, CUDA, CPU)
# ONNX Runtime's C++ errors start with the source line and the function signature; the message follows.
_SOURCE_PREFIX = re.compile(r"^/\S+:\d+ [^(]*\([^)]*\) ")


def cuda_device_id(device: str) -> int:
    """The CUDA ordinal ONNX Runtime's GPU providers get for a ``--device`` value.

    ``cuda:N`` → N; ``auto`` and ``cuda`` → torch's current device (0 unless the caller chose another);
    ``cpu``, or no CUDA here → 0.
    """
    if device.startswith("cuda:"):
        return int(device.removeprefix("cuda:"))
    if device == "cpu" or not torch.cuda.is_available():
        return 0
    return torch.cuda.current_device()


def trt_cache_folders(model_path: Path, digest: str) -> tuple[Path, Path]:
    """Where the TensorRT provider keeps its engines and its timing cache for a model: beside it.

    ``best.onnx`` → ``best.ort-trt/<first 16 hex digits of digest>/`` and ``best.ort-trt/``. ONNX Runtime
    names cached engines after the graph's structure, not its weights, so the model's ``integrity_sha256``
    (``digest``) keeps two exports of one architecture from sharing an engine; layer timings depend only on
    the layers and the GPU, so every model beside it shares them.
    """
    timing = model_path.with_suffix(".ort-trt")
    return timing / digest[:16], timing


def provider_options(providers: Sequence[str], *, device_id: int, model_path: Path,
                     digest: str | None) -> list[tuple[str, dict[str, Any]]]:
    """The ``(provider, options)`` list ONNX Runtime takes, in the order of ``providers``.

    The GPU providers run on CUDA device ``device_id`` (ONNX Runtime's default is 0 whatever the caller
    wanted). TensorRT builds FP16 engines; given the model's ``digest`` it caches them and its layer timings
    in :func:`trt_cache_folders`, so a new session loads its engine instead of rebuilding it. cuDNN picks
    conv algorithms by heuristic, as an exhaustive search reruns for every new batch size. Other providers
    (CPU) get no options.
    """
    listed: list[tuple[str, dict[str, Any]]] = []
    for name in providers:
        options: dict[str, Any] = {}
        if name == TRT:
            options = {"device_id": device_id, "trt_fp16_enable": True}
            if digest is not None:
                engines, timing = trt_cache_folders(model_path, digest)
                options.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(engines),
                               trt_timing_cache_enable=True, trt_timing_cache_path=str(timing))
        elif name == CUDA:
            options = {"device_id": device_id, "cudnn_conv_algo_search": "HEURISTIC"}
        listed.append((name, options))
    return listed


def _reason(exc: BaseException) -> str:
    """ONNX Runtime's error message as one printable line of at most 200 characters."""
    return terminal_safe(_SOURCE_PREFIX.sub("", " ".join(str(exc).split())))[:200]


def _make_cache_folder(folder: Path) -> list[Path] | None:
    """Create the TensorRT cache ``folder`` and its parent; the folders it created, innermost first.

    None, after one warning, when it cannot: TensorRT then runs without a cache.
    """
    made = [p for p in (folder, folder.parent) if not p.is_dir()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("WARNING: cannot create the TensorRT cache %s (%s); TensorRT builds its engines anew for every "
                    "session", display_path(folder), terminal_safe(exc.strerror or str(exc)))
        return None
    return made


def _open_session(ort: Any, data: bytes, path: Path,
                  providers: list[tuple[str, dict[str, Any]]]) -> tuple[Any, dict[str, str]]:
    """An ONNX Runtime session on the first of ``providers`` that can create one, and why those before it could not.

    A provider failing here is dropped and the session created again on the rest, options kept.

    Raises:
        FghError: not even the last provider can run the model.
    """
    failed: dict[str, str] = {}
    while True:
        try:
            # ONNX Runtime's own fallback would retry without the options (so on GPU 0) and print on stdout, where
            # `--json` output goes: it is turned off, and stdout redirected should this version ignore that.
            with contextlib.redirect_stdout(sys.stderr):
                session = ort.InferenceSession(data, sess_options=ort.SessionOptions(), providers=providers,
                                               enable_fallback=0)
        except Exception as exc:
            if len(providers) <= 1:
                raise FghError(f"{display_path(path)}: ONNX Runtime cannot load it ({_reason(exc)})") from exc
            failed[providers[0][0]] = _reason(exc)
            providers = providers[1:]
            continue
        # A provider failing in run() would otherwise rerun the batch on the CPU, announced on stdout.
        session.disable_fallback()
        return session, failed


class OnnxEngine(Engine):
    """An exported ``.onnx`` model run by ONNX Runtime.

    Providers are tried in the order TensorRT → CUDA → CPU (or as given), with the options of
    :func:`provider_options`: the GPU of ``device``, TensorRT's FP16 and its caches in
    :func:`trt_cache_folders` (created only when TensorRT is asked for, removed again if it did not run).
    A provider that fails to create the session is dropped and the rest tried with their options, and
    one that ONNX Runtime skips silently is noticed: the providers the session really uses are read
    back, and any requested one missing is reported in one warning. ONNX Runtime's own fallbacks (which
    would lose the options, print on stdout, or rerun a failed batch on the CPU) are off. The file is
    verified before it runs (see :func:`.onnx_format.read_verified_model`), so ``fingerprint`` is the
    one recorded at export.
    """

    kind = "onnxruntime"

    def __init__(self, path: str | os.PathLike[str], providers: list[str] | None = None, device: str = "auto") -> None:
        import onnxruntime as ort

        path = Path(path)
        check_device(device)
        data, meta, preprocess = read_verified_model(path)
        super().__init__(path, preprocess, meta["fingerprint"], HashConfig.from_dict(meta["model"]).to_dict())
        self.metadata = meta
        available = ort.get_available_providers()
        if providers is not None:
            wanted = list(providers)
        elif device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
            # No GPU here: asking for the GPU providers would only print load errors, then fall back.
            wanted = [CPU]
        else:
            wanted = [p for p in PREFERRED_PROVIDERS if p in available]
        digest: str | None = None
        made: list[Path] = []
        if TRT in wanted and TRT in available:
            created = _make_cache_folder(trt_cache_folders(path, meta[DIGEST_KEY])[0])
            if created is not None:
                digest, made = meta[DIGEST_KEY], created
        # Provider-load failures are reported below, once, on one line; ONNX Runtime's own (coloured,
        # multi-line) error log only with `fgh -v`.
        ort.set_default_logger_severity(3 if log.isEnabledFor(logging.DEBUG) else 4)
        session = None
        try:
            session, failed = _open_session(ort, data, path, provider_options(
                wanted, device_id=cuda_device_id(device), model_path=path, digest=digest))
        finally:
            if session is None or TRT not in session.get_providers():
                for folder in made:  # no litter beside the model; rmdir leaves a folder that has files
                    with contextlib.suppress(OSError):
                        folder.rmdir()
        self.session = session
        self.providers = session.get_providers()
        missing = [p for p in wanted if p not in self.providers]
        if missing:
            log.warning("WARNING: ONNX Runtime could not initialise %s; %s runs on %s "
                        "(check CUDA/cuDNN/TensorRT versions with `fgh doctor`)",
                        ", ".join(f"{p} ({failed[p]})" if p in failed else p for p in missing),
                        display_path(path.name), ", ".join(self.providers))
        if device.startswith("cuda") and self.providers[0] == CPU:
            raise FghError(f"{display_path(path)}: --device {device} requested but ONNX Runtime has no working GPU "
                           f"provider here")
        self._input = self.session.get_inputs()[0].name

    def _encode_impl(self, images: torch.Tensor | np.ndarray) -> np.ndarray:
        batch = images.numpy() if isinstance(images, torch.Tensor) else images
        try:
            codes = self.session.run(None, {self._input: np.ascontiguousarray(batch)})[0]
        except Exception as exc:  # ONNX Runtime's error classes share no base below Exception
            raise FghError(f"{display_path(self.path)}: ONNX Runtime failed running it on {', '.join(self.providers)} "
                           f"({_reason(exc)})") from exc
        return codes.astype(np.float32, copy=False)

    def describe(self) -> dict[str, Any]:
        options = self.session.get_provider_options()
        return {**super().describe(), "providers": self.providers,
                "provider_options": {p: options[p] for p in self.providers if p != CPU and p in options},
                "precision": self.metadata.get("precision", "fp32")}
