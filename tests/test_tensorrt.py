"""TensorRT export and runtime.

The engine file format, the compatibility check and the refusal order are pure Python and run
everywhere. Building and running engines needs TensorRT and a CUDA GPU; those tests skip with the
reason elsewhere (TensorRT cannot be installed from PyPI on CPU-only CI).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

import fgh_deploy as fgh
from fgh_deploy.engines.trt_engine import TensorRTEngine
from fgh_deploy.export.onnx import export_onnx
from fgh_deploy.engines.trt_format import (HEADER_KEYS, INSTALL_HINT, MAGIC, GpuInfo, api_family_for,
                                           check_engine_compatible, engine_digest, read_engine_header,
                                           read_verified_plan, write_engine)
from fgh_deploy.export.tensorrt import build_engine, engine_file_name, onnx_float_precision
from fgh_deploy.errors import BackendUnavailableError, FghError, IncompatibleEngineError

REBUILD = "fgh export semicon48.pt --trt --precision fp16 --batch 1,16,64"
GIB = 2**30
#: The board _header() says the engine was built on (a Jetson AGX Orin 64GB: 16 SMs, ~61 GiB visible).
AGX_ORIN = GpuInfo("NVIDIA Jetson AGX Orin", "8.7", 16, int(61.4 * GIB))


def _header(**overrides: Any) -> dict[str, Any]:
    """A complete engine header as a Jetson build would write it."""
    header = {
        "fgh_version": "0.1.0",
        "tensorrt_version": "10.3.0",
        "api_family": 10,
        "gpu_name": "NVIDIA Orin",
        "compute_capability": "8.7",
        "gpu_multiprocessors": 16,
        "gpu_memory_bytes": int(61.4 * GIB),
        "precision": "fp16",
        "dla_core": None,
        "profile": {"min": 1, "opt": 16, "max": 64},
        "input": {"name": "images", "dtype": "uint8"},
        "output": {"name": "codes", "dtype": "float32"},
        "input_shape": [3, 64, 64],
        "onnx_sha256": "0" * 64,
        "bits": 48,
        "preprocess": fgh.PreprocessConfig(input_size=64, resize_size=73).to_dict(),
        "model": {"model": "semicon", "bits": 48, "backbone": "resnet18", "options": {}},
        "fingerprint": "f" * 64,
        "checkpoint": "semicon48.pt",
        "rebuild": REBUILD,
    }
    header.update(overrides)
    return json.loads(json.dumps(header))  # as stored: tuples become lists


# --------------------------------------------------------------------------------------------
# Pure tests: no TensorRT, no GPU


def test_header_round_trip(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _header(), b"PLAN-BYTES")
    header, offset = read_engine_header(path)
    assert header == {**_header(), "integrity_sha256": engine_digest(_header(), b"PLAN-BYTES")}
    assert set(HEADER_KEYS) <= set(header)
    assert read_verified_plan(path, header, offset) == b"PLAN-BYTES"
    data = path.read_bytes()
    assert data.startswith(MAGIC)
    assert data[offset:] == b"PLAN-BYTES"
    assert int.from_bytes(data[8:12], "little") == offset - 12
    assert [p.name for p in tmp_path.iterdir()] == ["m.engine"], "no temporary file may be left behind"


def test_raw_plan_without_fgh_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "trtexec.plan"
    path.write_bytes(b"ftrt" + bytes(range(200)))
    with pytest.raises(FghError, match="lacks fgh's header") as info:
        read_engine_header(path)
    message = str(info.value)
    assert str(path) in message and "trtexec" in message and "fgh export" in message
    assert "\n" not in message


@pytest.mark.parametrize(("content", "reason"), [
    (b"", "empty file"),
    (MAGIC + b"\x10\x00", "header length cut off"),
    (MAGIC + (1000).to_bytes(4, "little") + b'{"fgh_version": "0.1', "header has 20 of 1000 bytes"),
    (MAGIC + (0xFFFFFFFF).to_bytes(4, "little"), "implausible"),
    (MAGIC + (9).to_bytes(4, "little") + b"{not json" + b"PLAN", "it is not valid JSON"),
    (MAGIC + (2).to_bytes(4, "little") + b"\xff}" + b"PLAN", "it is not UTF-8"),
    (MAGIC + (2).to_bytes(4, "little") + b"[]" + b"PLAN", "a JSON list, not an object"),
    (MAGIC + (2).to_bytes(4, "little") + b"{}" + b"PLAN", "missing fgh_version"),
])
def test_damaged_header_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "damaged.engine"
    path.write_bytes(content)
    with pytest.raises(FghError, match=reason) as info:
        read_engine_header(path)
    assert str(info.value).startswith(f"{path}: ")


def test_header_without_plan_is_truncated(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _header(), b"PLAN")
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(FghError, match="no TensorRT plan after the header") as info:
        read_engine_header(path)
    assert REBUILD in str(info.value)


def test_missing_engine_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(FghError, match="cannot read engine file") as info:
        read_engine_header(tmp_path / "nope.engine")
    assert "nope.engine" in str(info.value)


def test_other_tensorrt_version_is_refused_with_rebuild_command() -> None:
    with pytest.raises(IncompatibleEngineError) as info:
        check_engine_compatible(_header(), path="m.engine", tensorrt_version="11.1.0",
                                gpu=GpuInfo("NVIDIA H100", "9.0", 132, 80 * GIB))
    assert str(info.value) == (
        "m.engine: built with TensorRT 10.3.0 for NVIDIA Orin (sm 8.7); this machine has TensorRT 11.1.0 and "
        f"NVIDIA H100 (sm 9.0) — rebuild it with: {REBUILD}")
    assert info.value.exit_code == 4


def test_tensorrt_version_is_compared_exactly() -> None:
    # Plans are tied to the exact build: a patch or build-number difference is still refused.
    with pytest.raises(IncompatibleEngineError, match="this machine has TensorRT 10.3.0.30"):
        check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0.30", gpu=AGX_ORIN)


def test_other_compute_capability_is_refused_even_when_other_gpus_are_allowed() -> None:
    with pytest.raises(IncompatibleEngineError) as info:
        check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0", allow_other_gpu=True,
                                gpu=GpuInfo("NVIDIA GeForce RTX 3090", "8.6", 82, 24 * GIB))
    assert "(sm 8.7)" in str(info.value) and "(sm 8.6)" in str(info.value)
    assert str(info.value).endswith(f"rebuild it with: {REBUILD}")


def test_the_same_gpu_model_is_accepted() -> None:
    check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0", gpu=AGX_ORIN)
    # Another board of the model may report a little less memory (driver and carve-out reservations).
    board = GpuInfo("NVIDIA Jetson AGX Orin", "8.7", 16, int(60.9 * GIB))
    check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0", gpu=board)


@pytest.mark.parametrize(("gpu", "shown"), [
    # Same architecture (sm87), another module: fewer SMs, less memory.
    (GpuInfo("NVIDIA Orin NX", "8.7", 8, int(15.3 * GIB)), "NVIDIA Orin NX (8 SMs, 15.3 GiB)"),
    # The 32 GB AGX Orin: the same 14/16-SM family but half the memory.
    (GpuInfo("NVIDIA Jetson AGX Orin", "8.7", 16, int(30.6 * GIB)), "(16 SMs, 30.6 GiB)"),
])
def test_another_gpu_model_of_the_same_architecture_is_refused_unless_allowed(gpu: GpuInfo, shown: str) -> None:
    with pytest.raises(IncompatibleEngineError) as info:
        check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0", gpu=gpu)
    message = str(info.value)
    assert message.startswith("m.engine: built on NVIDIA Orin (16 SMs, 61.4 GiB); this is ")
    assert shown in message and f"rebuild it with: {REBUILD}" in message and "--allow-other-gpu" in message
    check_engine_compatible(_header(), path="m.engine", tensorrt_version="10.3.0", gpu=gpu, allow_other_gpu=True)


def test_a_mig_slice_is_another_gpu() -> None:
    h100 = {"tensorrt_version": "11.4.0", "api_family": 11, "gpu_name": "NVIDIA H100 80GB HBM3",
            "compute_capability": "9.0", "gpu_multiprocessors": 132, "gpu_memory_bytes": int(79.1 * GIB)}
    mig_1g = GpuInfo("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "9.0", 16, int(9.5 * GIB))
    with pytest.raises(IncompatibleEngineError, match="another GPU model or a MIG slice"):
        check_engine_compatible(_header(**h100), path="m.engine", tensorrt_version="11.4.0", gpu=mig_1g)


def test_an_engine_from_before_the_gpu_fields_is_old_not_damaged(tmp_path: Path) -> None:
    old = {key: value for key, value in _header().items() if key not in ("gpu_multiprocessors", "gpu_memory_bytes")}
    path = write_engine(tmp_path / "old.engine", old, b"PLAN")
    with pytest.raises(FghError, match="built by an older fgh .its header lacks gpu_multiprocessors, "
                                       "gpu_memory_bytes.; rebuild it with `fgh export CHECKPOINT --trt`"):
        read_engine_header(path)
    path = write_engine(tmp_path / "bad.engine", _header(gpu_multiprocessors=0), b"PLAN")
    with pytest.raises(FghError, match="bad gpu_multiprocessors: expected a positive integer"):
        read_engine_header(path)


def test_engine_file_name() -> None:
    assert engine_file_name("semicon48", "fp16", "8.7", "10.3.0") == "semicon48.fp16.sm87.trt10.3.engine"
    assert engine_file_name("adsh32", "fp32", "9.0", "11.1.0.4") == "adsh32.fp32.sm90.trt11.1.engine"
    with pytest.raises(ValueError, match="precision"):
        engine_file_name("adsh32", "int8", "9.0", "11.1.0")


def test_api_family() -> None:
    assert api_family_for("10.3.0", weak_typing=True) == 10
    assert api_family_for("10.16.1.11", weak_typing=True) == 10
    assert api_family_for("11.1.0", weak_typing=False) == 11
    # The feature decides: no FP16 builder flag means the strongly typed path.
    assert api_family_for("10.99.0", weak_typing=False) == 11
    with pytest.raises(BackendUnavailableError, match="too old"):
        api_family_for("8.6.1", weak_typing=True)


def _tiny_onnx(path: Path, half: bool) -> Path:
    """uint8 → Cast → Relu → float32, with an FP16 Cast island when ``half``."""
    nodes = [helper.make_node("Cast", ["images"], ["x"], to=TensorProto.FLOAT)]
    if half:
        nodes += [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                  helper.make_node("Relu", ["h"], ["r"]),
                  helper.make_node("Cast", ["r"], ["codes"], to=TensorProto.FLOAT)]
    else:
        nodes.append(helper.make_node("Relu", ["x"], ["codes"]))
    graph = helper.make_graph(nodes, "tiny",
                              [helper.make_tensor_value_info("images", TensorProto.UINT8, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("codes", TensorProto.FLOAT, ["batch", 3, 8, 8])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=10), path)
    return path


def test_onnx_float_precision(tmp_path: Path) -> None:
    assert onnx_float_precision(_tiny_onnx(tmp_path / "fp32.onnx", half=False)) == "fp32"
    assert onnx_float_precision(_tiny_onnx(tmp_path / "fp16.onnx", half=True)) == "fp16"


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"precision": "int8"}, ValueError, "precision must be one of fp16, fp32"),
    ({"precision": "fp16", "batch": (8, 4, 16)}, ValueError, "1 <= min <= opt <= max"),
    ({"precision": "fp16", "optimization_level": 6}, ValueError, "optimization_level"),
    ({"precision": "fp32", "dla_core": 0}, FghError, "DLA runs FP16"),
    ({"precision": "fp16", "dla_core": 0}, FghError, "DLA needs a static batch .min = opt = max., got 1/16/64"),
    ({"precision": "fp16", "header": {"bits": 48}}, ValueError, "header lacks preprocess"),
])
def test_build_engine_refuses_bad_arguments(tmp_path: Path, kwargs: dict[str, Any], error: type, match: str) -> None:
    # Checked before TensorRT is imported, so these hold on any machine.
    kwargs = {"header": _header(), **kwargs}
    with pytest.raises(error, match=match):
        build_engine(tmp_path / "m.onnx", tmp_path / "m.engine", **kwargs)


def test_engine_with_bad_magic_gives_the_header_error_not_the_install_hint(tmp_path: Path) -> None:
    path = tmp_path / "raw.engine"
    path.write_bytes(b"\x00" * 256)
    with pytest.raises(FghError) as info:
        TensorRTEngine(path)
    assert not isinstance(info.value, BackendUnavailableError)
    assert "lacks fgh's header" in str(info.value)


def test_engine_refuses_cpu_device(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _header(), b"PLAN")
    with pytest.raises(FghError, match="run on a CUDA GPU, not 'cpu'"):
        TensorRTEngine(path, device="cpu")


def _tensorrt_import_error() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return None


def test_foreign_engine_is_refused_before_deserialising(tmp_path: Path) -> None:
    # The plan bytes are garbage: reaching deserialisation would fail differently.
    path = write_engine(tmp_path / "orin.engine", _header(tensorrt_version="10.3.0-other"), b"NOT A PLAN")
    with pytest.raises(FghError) as info:
        TensorRTEngine(path)
    message = str(info.value)
    assert "\n" not in message
    if _tensorrt_import_error() is not None:
        # No TensorRT here: the header was read and accepted, then the clear install hint.
        assert type(info.value) is BackendUnavailableError and info.value.exit_code == 3
        assert INSTALL_HINT in message
        assert "pip install 'fgh[trt-cu1" in message and "--system-site-packages" in message
    elif not torch.cuda.is_available():
        assert type(info.value) is BackendUnavailableError
        assert message.startswith("no usable CUDA GPU for TensorRT")
    else:
        assert type(info.value) is IncompatibleEngineError
        assert "built with TensorRT 10.3.0-other for NVIDIA Orin (sm 8.7)" in message
        assert message.endswith(f"rebuild it with: {REBUILD}")


def test_tensorrt_is_not_imported_at_cli_import_time() -> None:
    code = ("import sys, fgh_deploy.cli, fgh_deploy.engines.trt_engine, fgh_deploy.export.tensorrt; "
            "print('tensorrt' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Real TensorRT: build, run, compare with ONNX Runtime


def _real_tensorrt_skip_reason() -> str | None:
    error = _tensorrt_import_error()
    if error is not None:
        return f"TensorRT is not importable here ({' '.join(error.split())[:120]}); install fgh[trt-cu12] or fgh[trt-cu13] on a GPU machine"
    if not torch.cuda.is_available():
        return "TensorRT is installed but there is no CUDA GPU (torch.cuda.is_available() is False)"
    return None


_SKIP_REASON = _real_tensorrt_skip_reason()
requires_tensorrt = pytest.mark.skipif(_SKIP_REASON is not None, reason=_SKIP_REASON or "")

PROFILE = (2, 4, 8)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """An ADSH-32 model, its ONNX files, and an FP32 and an FP16 engine sharing one timing cache."""
    import tensorrt as trt

    from fgh_deploy.engines.trt_format import api_family

    root = tmp_path_factory.mktemp("trt")
    torch.manual_seed(0)
    model = fgh.build_model("adsh", 32, backbone="resnet18", input_size=64).eval()
    meta = {"model": model.config.to_dict(), "preprocess": model.preprocess.to_dict(), "fingerprint": "test"}
    onnx32 = export_onnx(model, root / "adsh32.onnx", metadata=meta)
    family = api_family(trt)
    if family == 11:
        # Strongly typed: the FP16 engine is built from the FP16 graph.
        from fgh_deploy.export.onnx import HalfPrecisionModel

        onnx16 = export_onnx(HalfPrecisionModel(model).to("cuda"), root / "adsh32.fp16.onnx", metadata=meta)
    else:
        onnx16 = onnx32
    header = {"bits": 32, "preprocess": model.preprocess.to_dict(), "model": model.config.to_dict(),
              "fingerprint": "test", "checkpoint": str(root / "adsh32.pt"),
              "rebuild": f"fgh export {root / 'adsh32.pt'} --trt"}
    cache = root / "timing.cache"
    engines, logs = {}, {}
    for precision, onnx_path in (("fp32", onnx32), ("fp16", onnx16)):
        logs[precision] = []
        engines[precision] = build_engine(onnx_path, root / f"adsh32.{precision}.engine", precision=precision,
                                          batch=PROFILE, workspace_gib=1.0, optimization_level=2,
                                          timing_cache=cache, header=header, log=logs[precision].append)
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (20, 3, 64, 64), dtype=torch.uint8, generator=gen)
    return SimpleNamespace(trt=trt, model=model, onnx32=onnx32, engines=engines, logs=logs, cache=cache,
                           images=images)


def _onnxruntime_codes(onnx_path: Path, images: torch.Tensor) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return session.run(None, {"images": images.numpy()})[0]


@requires_tensorrt
def test_fp32_engine_matches_onnxruntime(built: SimpleNamespace) -> None:
    want = _onnxruntime_codes(built.onnx32, built.images)
    with TensorRTEngine(built.engines["fp32"]) as engine:
        got = engine.encode(built.images)  # 20 images through a max-8 profile: three chunks
        assert engine.bits == 32 and engine.fingerprint == "test"
        assert engine.describe()["kind"] == "tensorrt"
        assert engine.describe()["tensorrt_version"] == built.trt.__version__
    assert got.dtype == np.float32 and got.shape == (20, 32)
    max_diff = float(np.abs(got - want).max())
    print(f"\nTensorRT FP32 vs ONNX Runtime: max |Δ| {max_diff:.2e}")
    assert max_diff < 1e-3


@requires_tensorrt
def test_fp16_engine_bit_agreement(built: SimpleNamespace) -> None:
    want = _onnxruntime_codes(built.onnx32, built.images)
    with TensorRTEngine(built.engines["fp16"]) as engine:
        got = engine.encode(built.images)
    agreement = float(((got >= 0) == (want >= 0)).mean())
    print(f"\nTensorRT FP16 vs ONNX Runtime FP32: bit agreement {agreement:.2%}")
    assert agreement >= 0.99


@requires_tensorrt
def test_engine_header_records_the_build(built: SimpleNamespace) -> None:
    from fgh_deploy.engines.trt_format import cuda_device_info

    header, _ = read_engine_header(built.engines["fp16"])
    gpu = cuda_device_info()
    assert header["tensorrt_version"] == built.trt.__version__
    assert (header["gpu_name"], header["compute_capability"]) == (gpu.name, gpu.compute_capability)
    assert (header["gpu_multiprocessors"], header["gpu_memory_bytes"]) == (gpu.multiprocessors, gpu.memory_bytes)
    assert header["precision"] == "fp16" and header["dla_core"] is None
    assert header["profile"] == dict(zip(("min", "opt", "max"), PROFILE))
    assert header["input"] == {"name": "images", "dtype": "uint8"}
    assert header["input_shape"] == [3, 64, 64] and header["bits"] == 32
    fp32_header, _ = read_engine_header(built.engines["fp32"])
    assert fp32_header["onnx_sha256"] == hashlib.sha256(built.onnx32.read_bytes()).hexdigest()


@requires_tensorrt
def test_inputs_as_numpy_cpu_and_cuda_tensors_agree(built: SimpleNamespace) -> None:
    with TensorRTEngine(built.engines["fp32"]) as engine:
        from_cpu = engine.encode(built.images)
        np.testing.assert_array_equal(engine.encode(built.images.numpy()), from_cpu)
        np.testing.assert_array_equal(engine.encode(built.images.cuda()), from_cpu)


@requires_tensorrt
def test_images_still_being_written_on_the_callers_stream_are_waited_for(built: SimpleNamespace) -> None:
    """The engine works on its own stream; a GPU batch the caller is still producing on another is waited for."""
    with TensorRTEngine(built.engines["fp32"]) as engine:
        want = engine.encode(built.images[:8])
        producer = torch.cuda.Stream()
        with torch.cuda.stream(producer):
            on_gpu = torch.zeros((8, 3, 64, 64), dtype=torch.uint8, device="cuda")
            torch.cuda._sleep(50_000_000)  # keep the producer busy, so the copy below lands late
            on_gpu.copy_(built.images[:8].cuda(non_blocking=True))
            got = engine.encode(on_gpu)
    np.testing.assert_array_equal(got, want)


@requires_tensorrt
def test_batch_outside_profile_is_refused(built: SimpleNamespace) -> None:
    with TensorRTEngine(built.engines["fp32"]) as engine:
        with pytest.raises(FghError, match=r"outside the engine's optimization profile \(min 2, opt 4, max 8\)"):
            engine.encode(built.images[:1])


@requires_tensorrt
def test_cuda_graph_replay_equals_plain_launch(built: SimpleNamespace) -> None:
    images = built.images
    gen = torch.Generator().manual_seed(2)
    with TensorRTEngine(built.engines["fp32"]) as plain, \
            TensorRTEngine(built.engines["fp32"], cuda_graph_batch=4) as graphed:
        for batch in (images[:4], images[4:8], images[:3], images[8:12]):  # capture, replay, plain, replay
            np.testing.assert_allclose(graphed.encode(batch), plain.encode(batch), rtol=0, atol=1e-6)
        # Plain launches at other sizes between replays change the plain context's shape, never the graph's.
        for size in (3, 4, 5, 4, 8, 4, 2, 4):
            fresh = torch.randint(0, 256, (size, 3, 64, 64), dtype=torch.uint8, generator=gen)
            np.testing.assert_allclose(graphed.encode(fresh), plain.encode(fresh), rtol=0, atol=1e-6)
    with pytest.raises(FghError, match="cuda_graph_batch 9 is outside"):
        TensorRTEngine(built.engines["fp32"], cuda_graph_batch=9)


@requires_tensorrt
def test_timing_cache_is_written_and_reused(built: SimpleNamespace) -> None:
    assert built.cache.is_file() and built.cache.stat().st_size > 0
    assert any(line.startswith("TensorRT: new timing cache") for line in built.logs["fp32"])
    assert any(line.startswith("TensorRT: timing cache loaded from") for line in built.logs["fp16"])
    assert any("building FP16 engine, profile 2/4/8" in line for line in built.logs["fp16"])


@requires_tensorrt
def test_foreign_engine_refused_on_a_real_gpu(built: SimpleNamespace, tmp_path: Path) -> None:
    header, offset = read_engine_header(built.engines["fp32"])
    plan = built.engines["fp32"].read_bytes()[offset:]
    for field, value in (("tensorrt_version", "0.0.0"), ("compute_capability", "1.0"),
                         ("gpu_multiprocessors", header["gpu_multiprocessors"] + 2)):
        foreign = write_engine(tmp_path / f"{field}.engine", {**header, field: value}, plan)
        with pytest.raises(IncompatibleEngineError, match="rebuild it with: fgh export"):
            TensorRTEngine(foreign)
    # The override accepts a plan from another GPU of this architecture, and it runs.
    other_sms = tmp_path / "gpu_multiprocessors.engine"
    with TensorRTEngine(other_sms, allow_other_gpu=True) as engine:
        assert engine.encode(built.images[:4]).shape == (4, 32)


def test_the_rebuild_command_carries_every_build_option() -> None:
    from fgh_deploy.export.tensorrt import TrtBuildOptions

    fp32 = TrtBuildOptions(precision="fp32", batch=(2, 8, 32), workspace_gib=1.5, optimization_level=5)
    assert fp32.command_line() == "--precision fp32 --batch 2,8,32 --workspace 1.5 --opt-level 5"
    dla = TrtBuildOptions(batch=(8, 8, 8), dla_core=1)
    assert dla.command_line() == "--precision fp16 --batch 8,8,8 --workspace 2 --opt-level 3 --dla-core 1"
    assert TrtBuildOptions().command_line() == "--precision fp16 --batch 1,16,64 --workspace 2 --opt-level 3"


def test_dla_with_a_dynamic_batch_is_one_line_before_tensorrt_is_needed(tmp_path: Path) -> None:
    import subprocess
    import sys

    import fgh_deploy as fgh

    checkpoint = fgh.save_checkpoint(fgh.build_model("adsh", 8, backbone="resnet18", input_size=32), tmp_path / "m.pt")
    result = subprocess.run([sys.executable, "-c", "from fgh_deploy.cli import main; main()", "export", str(checkpoint),
                             "--trt", "--dla-core", "0"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fgh: error: DLA needs a static batch (min = opt = max), got 1/16/64; pass e.g. --batch 16,16,16 "
        "(shorter batches are padded)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]  # nothing exported


def test_the_tensorrt_extra_follows_torchs_cuda() -> None:
    from fgh_deploy.engines.trt_format import tensorrt_extra

    assert tensorrt_extra("12.8") == "trt-cu12" and tensorrt_extra("13.0") == "trt-cu13"
    assert tensorrt_extra(None) is None and tensorrt_extra("11.8") is None
