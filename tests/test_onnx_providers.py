"""ONNX Runtime provider options (GPU, TensorRT FP16 and caches, cuDNN search) and provider fallbacks, reported once.

Real exports and real ONNX Runtime. The fallback tests need a host where the GPU providers cannot
initialise (onnxruntime-gpu without a GPU, as on CI); with CUDA present they would run on it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.engines.onnx_engine import (CPU, CUDA, TRT, OnnxEngine, cuda_device_id, provider_options,
                                            trt_cache_folders)
from fgh_deploy.engines.onnx_format import DIGEST_KEY
from fgh_deploy.export import read_onnx_metadata
from fgh_deploy.export.pipeline import export_checkpoint

LOGGER = "fgh_deploy.engines.onnx_engine"
no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU providers would initialise on this host")


def _export(folder: Path, seed: int) -> Path:
    """A small ADSH model with seed-dependent random weights, exported by fgh export as ``folder/best.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = fgh.build_model("adsh", 16, backbone="resnet18", input_size=32)
    return export_checkpoint(fgh.save_checkpoint(model, folder / "best.pt"), calib_count=4).artifacts["onnx"]


@pytest.fixture(scope="module")
def onnx_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _export(tmp_path_factory.mktemp("providers"), seed=0)


@pytest.fixture
def images() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=gen)


def test_options_pick_the_gpu_fp16_caches_beside_the_model_and_heuristic_conv_search(tmp_path: Path) -> None:
    model = tmp_path / "run" / "best.onnx"
    digest = "0123456789abcdef" + "f" * 48
    options = dict(provider_options([TRT, CUDA, CPU], device_id=1, model_path=model, digest=digest))
    assert list(options) == [TRT, CUDA, CPU]
    assert options[TRT] == {"device_id": 1, "trt_fp16_enable": True,
                            "trt_engine_cache_enable": True,
                            "trt_engine_cache_path": str(tmp_path / "run" / "best.ort-trt" / "0123456789abcdef"),
                            "trt_timing_cache_enable": True,
                            "trt_timing_cache_path": str(tmp_path / "run" / "best.ort-trt")}
    assert options[CUDA] == {"device_id": 1, "cudnn_conv_algo_search": "HEURISTIC"}
    assert options[CPU] == {}
    # No digest (the cache folder cannot be created): FP16 on the right GPU, no caches.
    assert dict(provider_options([TRT], device_id=0, model_path=model, digest=None))[TRT] == {
        "device_id": 0, "trt_fp16_enable": True}
    assert not (tmp_path / "run").exists(), "building options creates nothing"


def test_device_id_follows_the_device() -> None:
    assert cuda_device_id("cuda:1") == 1 and cuda_device_id("cuda:0") == 0 and cuda_device_id("cpu") == 0
    current = torch.cuda.current_device() if torch.cuda.is_available() else 0
    assert cuda_device_id("auto") == current and cuda_device_id("cuda") == current


def test_models_differing_only_in_weights_never_share_an_engine(tmp_path: Path) -> None:
    first = _export(tmp_path / "run", seed=0)
    first_digest = read_onnx_metadata(first)[DIGEST_KEY]
    second = _export(tmp_path / "run", seed=1)  # retrained, re-exported over the same file
    assert second == first
    second_digest = read_onnx_metadata(second)[DIGEST_KEY]
    engines = [dict(provider_options([TRT], device_id=0, model_path=first, digest=d))[TRT] for d in
               (first_digest, second_digest)]
    assert engines[0]["trt_engine_cache_path"] != engines[1]["trt_engine_cache_path"]
    assert engines[0]["trt_timing_cache_path"] == engines[1]["trt_timing_cache_path"]  # per-GPU timings, shared
    assert trt_cache_folders(first, first_digest)[0].parent == tmp_path / "run" / "best.ort-trt"


@no_gpu
def test_cuda_fallback_is_one_warning_nothing_on_stdout_and_the_same_codes(
        onnx_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    cpu = OnnxEngine(onnx_path, device="cpu")
    assert cpu.providers == [CPU] and cpu.describe()["provider_options"] == {}
    capfd.readouterr()
    with caplog.at_level("WARNING", logger=LOGGER):
        engine = OnnxEngine(onnx_path, providers=[CUDA, CPU])
        codes = engine.encode(images)
    assert capfd.readouterr().out == ""
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "could not initialise CUDAExecutionProvider;" in warnings[0]
    assert f"{onnx_path.name} runs on CPUExecutionProvider" in warnings[0]
    assert engine.providers == [CPU]
    np.testing.assert_array_equal(codes, cpu.encode(images))
    assert not onnx_path.with_suffix(".ort-trt").exists(), "the CPU path creates no cache folder"


@no_gpu
def test_tensorrt_failing_at_session_creation_falls_back_with_its_reason_and_leaves_no_folder(
        onnx_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    if TRT not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no TensorRT provider")
    capfd.readouterr()
    with caplog.at_level("WARNING", logger=LOGGER):
        engine = OnnxEngine(onnx_path, providers=[TRT, CUDA, CPU])
        codes = engine.encode(images)
    assert capfd.readouterr().out == "", "ONNX Runtime's fallback banner must not reach stdout"
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 1 and "could not initialise TensorrtExecutionProvider (" in warnings[0]
    assert "CUDAExecutionProvider" in warnings[0] and "\n" not in warnings[0]
    np.testing.assert_array_equal(codes, OnnxEngine(onnx_path, device="cpu").encode(images))
    # The cache folder was made for TensorRT, which did not run: nothing is left beside the model.
    assert not onnx_path.with_suffix(".ort-trt").exists()


@no_gpu
def test_an_uncreatable_cache_folder_is_one_warning_and_no_cache(
        tmp_path: Path, onnx_path: Path, images: torch.Tensor, caplog: pytest.LogCaptureFixture) -> None:
    import onnxruntime as ort

    if TRT not in ort.get_available_providers():
        pytest.skip("this ONNX Runtime has no TensorRT provider")
    model = tmp_path / "best.onnx"
    model.write_bytes(onnx_path.read_bytes())
    model.with_suffix(".ort-trt").write_text("a file where the cache folder would go")  # works as root, too
    with caplog.at_level("WARNING", logger=LOGGER):
        engine = OnnxEngine(model, providers=[TRT, CPU])
    warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(warnings) == 2, warnings
    assert warnings[0].startswith("WARNING: cannot create the TensorRT cache ") and "anew" in warnings[0]
    assert "could not initialise TensorrtExecutionProvider" in warnings[1]
    assert engine.providers == [CPU] and model.with_suffix(".ort-trt").is_file()
