"""``fgh doctor``: what this machine can run, checked for real rather than read off version strings."""

from __future__ import annotations

import contextlib
import importlib.metadata as md
import io
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino")


def _torch_report() -> dict[str, Any]:
    """torch's version, the CUDA and cuDNN it was built with, and the GPUs it sees."""
    import torch

    from fgh_deploy.engines.trt_format import cuda_device_info

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            gpu = cuda_device_info(i)  # what a TensorRT engine built here is tied to
            gpus.append({"index": i, "name": gpu.name, "compute_capability": gpu.compute_capability,
                         "multiprocessors": gpu.multiprocessors, "memory_gib": round(gpu.memory_bytes / 2**30, 1)})
    return {
        "version": torch.__version__,
        "cuda_build": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpus": gpus,
    }


def _tiny_onnx(path: Path) -> None:
    """Write a one-node ONNX model: a session on it proves that a provider really works."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "probe",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10  # newer onnx writes an IR that older runtimes reject
    onnx.save(model, str(path))


def _ort_report() -> dict[str, Any]:
    """The installed ONNX Runtime distributions, and which of the providers it lists actually run a model.

    A provider whose libraries are missing is listed by ORT all the same, and a session silently
    falls back to the CPU: only opening one tells.
    """
    installed = {}
    for name in ORT_DISTRIBUTIONS:
        try:
            installed[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    report: dict[str, Any] = {"distributions": installed, "warnings": []}
    if len(installed) > 1:
        report["warnings"].append(
            f"several ONNX Runtime distributions are installed ({', '.join(installed)}); they overwrite each "
            f"other's files — uninstall all and reinstall one")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        report["error"] = f"import onnxruntime failed: {exc}"
        return report
    report["version"] = ort.__version__
    report["built_providers"] = ort.get_available_providers()
    ort.set_default_logger_severity(4)
    working = []
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        _tiny_onnx(probe)
        for provider in report["built_providers"]:
            try:
                # ORT prints its fallback notice with print(): keep it off our stdout (--json).
                with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                    session = ort.InferenceSession(str(probe), providers=[provider])
            except Exception:  # a provider whose libraries are missing raises or falls back
                continue
            if session.get_providers()[0] == provider:
                working.append(provider)
    report["working_providers"] = working
    return report


def _trt_report(torch_report: dict[str, Any]) -> dict[str, Any]:
    """Whether TensorRT imports, its API family, and in one sentence what ``fgh export --trt`` would do."""
    from fgh_deploy.engines.trt_format import api_family, import_tensorrt, tensorrt_extra

    extra = tensorrt_extra(torch_report["cuda_build"])
    fits = (f"the TensorRT extra for this torch (CUDA {torch_report['cuda_build']}) is fgh[{extra}]" if extra else
            "this torch has no CUDA 12 or 13 build, which TensorRT's pip wheels need")
    try:
        trt = import_tensorrt()
    except Exception as exc:  # BackendUnavailableError, or a broken install's ImportError/OSError
        message = " ".join(str(exc).split())
        return {"available": False, "reason": message, "extra": extra,
                "export_plan": f"fgh export --trt cannot build engines here: {message}; {fits}"}
    family = api_family(trt)
    if not torch_report["cuda_available"]:
        plan = "fgh export --trt cannot build engines here: no CUDA GPU (engines are built on the GPU that runs them)"
    elif family >= 11:
        plan = (f"fgh export --trt builds a strongly typed engine with TensorRT {trt.__version__}: precision "
                f"comes from the FP16 ONNX graph (FP32 islands kept); DLA (--dla-core) needs TensorRT 10.x (JetPack 6) "
                f"or 11.4.1 on JetPack 7.2.2+ (AGX Orin): NVIDIA's other 11.x releases have no DLA")
    else:
        plan = (f"fgh export --trt builds with TensorRT {trt.__version__} (API 10.x): FP32 ONNX + the FP16 builder "
                f"flag, softmax/reduction layers pinned to FP32; --dla-core needs a static --batch N,N,N")
    return {"available": True, "version": trt.__version__, "api_family": family, "extra": extra,
            "export_plan": f"{plan}; {fits}"}


def diagnose() -> dict[str, Any]:
    """Versions and capabilities of this machine, as a JSON-serialisable dict."""
    from .version import __version__

    torch_report = _torch_report()
    return {
        "schema_version": 1,
        "fgh": __version__,
        "python": sys.version.split()[0],
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch_report,
        "onnxruntime": _ort_report(),
        "tensorrt": _trt_report(torch_report),
        "search": _search_report(),
    }


def _search_report() -> dict[str, Any]:
    """Which CPU Hamming kernel the search uses (the compiled one, or numpy when it was not built)."""
    from .search import FUSED_MAX_BITS, cpu_kernel

    kernel = cpu_kernel()
    note = (f"fused xor + popcount loop for codes up to {FUSED_MAX_BITS} bits" if kernel != "numpy" else
            "fgh_deploy._hamming is not built (no C compiler at install): numpy's passes, slower at 128 bits")
    return {"cpu_kernel": kernel, "note": note}
