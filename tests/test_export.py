"""fgh export: staged ONNX export, FP16 graph, parity checks, metadata, ONNX Runtime engine, doctor."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.encode import encode_folder
from fgh_deploy.engines import load_engine
from fgh_deploy.export import read_onnx_metadata
from fgh_deploy.export.calibration import synthetic_images
from fgh_deploy.export.pipeline import export_checkpoint
from fgh_deploy.index import CodeIndex

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, object]:
    """A SEMICON checkpoint (the model with FP32 islands) exported to FP32 and FP16 ONNX."""
    tmp = tmp_path_factory.mktemp("export")
    torch.manual_seed(0)
    ckpt = fgh.save_checkpoint(fgh.build_model("semicon", 24, backbone="resnet18", input_size=64), tmp / "semi.pt")
    return ckpt, export_checkpoint(ckpt, fp16=True, calib_count=16)


def test_export_writes_both_graphs_and_reports_parity(exported) -> None:
    ckpt, result = exported
    assert set(result.artifacts) == {"onnx", "onnx_fp16"}
    names = [p.name for p in result.parity]
    assert names[0].startswith("ONNX FP32 vs PyTorch") and names[1].startswith("ONNX FP16 vs PyTorch")
    fp32, fp16 = result.parity
    print("\n" + fp32.summary() + "\n" + fp16.summary())
    assert fp32.passed and fp32.bit_agreement >= 0.999 and fp32.max_abs_diff < 1e-4
    assert 0.9 < fp16.bit_agreement <= 1.0 and fp16.images == 16
    assert result.passed == (fp16.bit_agreement >= 0.995)
    assert any("fgh encode" in c for c in result.next_commands)
    json.dumps(result.to_dict())


def test_metadata_round_trip(exported) -> None:
    ckpt, result = exported
    loaded = fgh.load_checkpoint(ckpt)
    for key, precision in (("onnx", "fp32"), ("onnx_fp16", "fp16")):
        meta = read_onnx_metadata(result.artifacts[key])
        assert meta["fingerprint"] == loaded.fingerprint
        assert meta["model"] == loaded.config.to_dict() and meta["bits"] == 24
        assert fgh.PreprocessConfig.from_dict(meta["preprocess"]) == loaded.preprocess
        assert meta["precision"] == precision and meta["opset"] == 20
        assert len(meta["checkpoint_sha256"]) == 64 and meta["fgh_version"] == fgh.__version__


def test_fp16_graph_keeps_fp32_islands(exported) -> None:
    _, result = exported
    graph = onnx.load(str(result.artifacts["onnx_fp16"])).graph
    casts_to_float = [n for n in graph.node if n.op_type == "Cast" and
                      any(a.name == "to" and a.i == onnx.TensorProto.FLOAT for a in n.attribute)]
    softmax_inputs = {n.input[0] for n in graph.node if n.op_type == "Softmax"}
    cast_outputs = {n.output[0] for n in casts_to_float}
    assert casts_to_float, "the FP16 graph must cast its fragile parts back to FP32"
    assert softmax_inputs, "SEMICON has softmaxes"
    # Every softmax reads FP32 data (a Cast-to-float output, possibly through elementwise ops).
    types = {vi.name: vi.type.tensor_type.elem_type for vi in list(graph.value_info) + list(graph.input)}
    for name in softmax_inputs:
        assert name in cast_outputs or types.get(name) == onnx.TensorProto.FLOAT


def test_onnx_engine_matches_the_checkpoint_engine(exported, tmp_path: Path) -> None:
    ckpt, result = exported
    images = synthetic_images(6, 64, seed=3)
    # The FP32 graph against the FP32 model: on CUDA the PyTorch engine would run under FP16 autocast.
    with load_engine(ckpt, device="cpu") as torch_engine, load_engine(result.artifacts["onnx"]) as onnx_engine:
        assert onnx_engine.kind == "onnxruntime" and onnx_engine.providers[-1] == "CPUExecutionProvider"
        assert onnx_engine.fingerprint == torch_engine.fingerprint and onnx_engine.bits == 24
        np.testing.assert_allclose(onnx_engine.encode(images), torch_engine.encode(images), atol=1e-4)


def test_encode_with_onnx_gives_the_pt_index(exported, tmp_path: Path) -> None:
    ckpt, result = exported
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    for i, image in enumerate(synthetic_images(10, 80, seed=5)):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    codes = {}
    for kind, engine_path in (("pt", ckpt), ("onnx", result.artifacts["onnx"])):
        with load_engine(engine_path) as engine:
            encode_folder(folder, engine, tmp_path / kind, workers=0, progress=False)
        with CodeIndex.open(tmp_path / kind) as index:
            codes[kind] = np.unpackbits(np.asarray(index.codes), axis=1)
            assert index.engine["kind"] == {"pt": "pytorch", "onnx": "onnxruntime"}[kind]
            paths = index.all_paths()
    agreement = (codes["pt"] == codes["onnx"]).mean()
    print(f"\n.pt vs .onnx index bit agreement: {agreement:.4%} over {len(paths)} images")
    assert agreement >= result.parity[0].bit_agreement - 0.01


def test_a_foreign_onnx_file_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    model.ir_version = 10
    onnx.save(model, str(tmp_path / "foreign.onnx"))
    with pytest.raises(fgh.FghError, match="foreign.onnx: no fgh metadata"):
        load_engine(tmp_path / "foreign.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00garbage")
    with pytest.raises(fgh.FghError, match="garbage.onnx: not a readable ONNX model"):
        load_engine(tmp_path / "garbage.onnx")


def test_cli_exits_non_zero_when_parity_fails(tmp_path: Path) -> None:
    torch.manual_seed(0)
    ckpt = fgh.save_checkpoint(fgh.build_model("adsh", 16, backbone="resnet18", input_size=64), tmp_path / "a.pt")
    proc = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "export", str(ckpt), "--calib-count", "4",
                           "--min-agreement", "1.01", "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    payload = json.loads(proc.stdout)
    assert payload["passed"] is False and payload["parity"][0]["bit_agreement"] == 1.0
    assert "PyTorch: starting from" in proc.stderr and "ONNX: export success" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("fgh: error: parity check failed")


def test_doctor_reports_what_runs_here() -> None:
    proc = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "doctor", "--json"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert "CPUExecutionProvider" in report["onnxruntime"]["working_providers"]
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()
    assert "export_plan" in report["tensorrt"]
    kernel = report["search"]["cpu_kernel"]
    assert kernel == "numpy" or kernel.startswith("compiled/"), kernel


def test_trt_export_does_what_it_can_and_says_what_it_could_not(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401

        if torch.cuda.is_available():
            pytest.skip("TensorRT and a GPU are here: the real build is covered by tests/test_tensorrt.py")
    except ImportError:
        pass
    torch.manual_seed(0)
    ckpt = fgh.save_checkpoint(fgh.build_model("adsh", 16, backbone="resnet18", input_size=64), tmp_path / "a.pt")
    proc = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "export", str(ckpt), "--trt", "--calib-count", "4",
                           "--json"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 3, proc.stderr
    payload = json.loads(proc.stdout)
    assert set(payload["artifacts"]) == {"onnx", "onnx_fp16"} and payload["passed"] is True
    assert "tensorrt" in payload["skipped"]
    assert "TensorRT: skipped:" in proc.stderr and "fgh encode" in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("fgh: error: tensorrt not built:")
