"""Hostile and careless engine files: tampered weights, edited metadata, unbounded or malformed fields.

Real ONNX exports and real ONNX Runtime; TensorRT engine files are checked up to the point where
TensorRT would receive the plan, which is pure Python and runs everywhere.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fgh_deploy as fgh
from fgh_deploy.config import MAX_JSON_DEPTH, HashConfig, PreprocessConfig, parse_json_object
from fgh_deploy.engines import load_engine
from fgh_deploy.engines.onnx_engine import OnnxEngine
from fgh_deploy.engines.onnx_format import DIGEST_KEY, METADATA_KEY, graph_digest
from fgh_deploy.engines.trt_engine import TensorRTEngine
from fgh_deploy.engines.trt_format import MAGIC, read_engine_header, read_verified_plan, write_engine
from fgh_deploy.errors import BackendUnavailableError, FghError
from fgh_deploy.export.calibration import synthetic_images
from fgh_deploy.export.onnx import export_onnx
from fgh_deploy.export.pipeline import export_checkpoint
from fgh_deploy.utils import check_device, resolve_device

ROOT = Path(__file__).resolve().parents[1]
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A small ADSH checkpoint and its ONNX export, written by fgh export."""
    root = tmp_path_factory.mktemp("hostile")
    torch.manual_seed(0)
    ckpt = fgh.save_checkpoint(fgh.build_model("adsh", 16, backbone="resnet18", input_size=32), root / "adsh.pt")
    result = export_checkpoint(ckpt, calib_count=4)
    return ckpt, result.artifacts["onnx"]


def _edited(source: Path, target: Path, edit) -> Path:
    """``source`` with ``edit(proto)`` applied, saved as ``target``."""
    proto = onnx.load(str(source))
    edit(proto)
    onnx.save_model(proto, str(target))
    return target


def _metadata(proto: onnx.ModelProto) -> onnx.StringStringEntryProto:
    return next(entry for entry in proto.metadata_props if entry.key == METADATA_KEY)


def _set_metadata(proto: onnx.ModelProto, meta: dict[str, Any]) -> None:
    _metadata(proto).value = json.dumps(meta)


def _negate_largest_initializer(proto: onnx.ModelProto) -> None:
    tensor = max(proto.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    tensor.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(tensor), tensor.name))


def _refusal(path: Path) -> str:
    with pytest.raises(FghError) as info:
        load_engine(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}: ")
    return message


# --------------------------------------------------------------------------------------------
# An ONNX engine is tied to its weights and its metadata


def test_an_untampered_export_loads_with_the_checkpoint_fingerprint(exported) -> None:
    ckpt, onnx_path = exported
    meta = json.loads(_metadata(onnx.load(str(onnx_path))).value)
    assert len(meta[DIGEST_KEY]) == 64
    with load_engine(onnx_path) as engine:
        assert engine.fingerprint == fgh.load_checkpoint(ckpt).fingerprint
        assert engine.encode(synthetic_images(2, 32, seed=1)).shape == (2, 16)


def test_a_negated_initializer_is_refused(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    tampered = _edited(onnx_path, tmp_path / "tampered.onnx", _negate_largest_initializer)
    # The tampered graph still runs and computes other codes: only the digest tells.
    assert onnx.load(str(tampered)).metadata_props == onnx.load(str(onnx_path)).metadata_props
    message = _refusal(tampered)
    assert message.endswith("the graph's weights or its fgh metadata do not match the recorded digest "
                            "(modified after export?); re-export it with fgh export")


def test_a_changed_node_is_refused(exported, tmp_path: Path) -> None:
    _, onnx_path = exported

    def rename_first_output(proto: onnx.ModelProto) -> None:
        proto.graph.node[0].name = "edited"

    assert "do not match the recorded digest" in _refusal(_edited(onnx_path, tmp_path / "node.onnx",
                                                                  rename_first_output))


def test_a_swapped_fingerprint_is_refused(exported, tmp_path: Path) -> None:
    _, onnx_path = exported

    def swap(proto: onnx.ModelProto) -> None:
        _set_metadata(proto, {**json.loads(_metadata(proto).value), "fingerprint": "0" * 64})

    assert "do not match the recorded digest" in _refusal(_edited(onnx_path, tmp_path / "swapped.onnx", swap))


def test_an_export_without_a_digest_is_refused(exported, tmp_path: Path) -> None:
    _, onnx_path = exported

    def drop_digest(proto: onnx.ModelProto) -> None:
        meta = json.loads(_metadata(proto).value)
        del meta[DIGEST_KEY]
        _set_metadata(proto, meta)

    message = _refusal(_edited(onnx_path, tmp_path / "old.onnx", drop_digest))
    assert message.endswith("exported by an older fgh without a weights digest; re-export it with fgh export")


def test_the_digest_does_not_depend_on_how_a_tensor_is_stored(exported, tmp_path: Path) -> None:
    _, onnx_path = exported

    def as_typed_fields(proto: onnx.ModelProto) -> None:
        for tensor in proto.graph.initializer:
            if tensor.data_type == onnx.TensorProto.FLOAT and tensor.raw_data:
                values = numpy_helper.to_array(tensor)
                tensor.ClearField("raw_data")
                tensor.float_data.extend(values.ravel().tolist())

    with load_engine(_edited(onnx_path, tmp_path / "typed.onnx", as_typed_fields)) as engine:
        assert engine.bits == 16


def test_a_graph_whose_input_size_disagrees_with_its_metadata_is_refused(exported, tmp_path: Path) -> None:
    ckpt, onnx_path = exported
    meta = json.loads(_metadata(onnx.load(str(onnx_path))).value)
    meta["preprocess"] = {**meta["preprocess"], "input_size": 224, "resize_size": 256}
    # Sealed by export_onnx itself: the digest is valid, the metadata are wrong.
    mislabelled = export_onnx(fgh.load_model(ckpt), tmp_path / "mislabelled.onnx", metadata=meta, check=False)
    message = _refusal(mislabelled)
    assert "the graph takes images of shape ('batch', 3, 32, 32) but its metadata says input_size 224" in message


@pytest.mark.parametrize(("value", "reason"), [
    (DEEP, f"fgh metadata is nested 100000 levels deep (at most {MAX_JSON_DEPTH})"),
    ("[1, 2]", "fgh metadata is a JSON list, not an object"),
    ("{\"model\": ", "fgh metadata is not valid JSON"),
    ("{}", "no fgh metadata ('model', 'preprocess', 'fingerprint' missing)"),
])
def test_malformed_metadata_is_refused_in_one_line(exported, tmp_path: Path, value: str, reason: str) -> None:
    _, onnx_path = exported

    def replace(proto: onnx.ModelProto) -> None:
        _metadata(proto).value = value

    assert reason in _refusal(_edited(onnx_path, tmp_path / "bad.onnx", replace))


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda m: m["preprocess"].update(input_size=20000), "bad preprocess.input_size: expected an integer in 32..1024"),
    (lambda m: m["preprocess"].update(std=[0.2, 0, 0.2]), "bad preprocess.std: expected 3 positive finite numbers"),
    (lambda m: m["model"].update(bits="16"), "bad model.bits: expected an integer in 1..4096, got '16'"),
    (lambda m: m.update(fingerprint=["x"]), "bad fingerprint: expected a non-empty string"),
])
def test_bad_fields_are_refused_even_with_a_valid_digest(exported, tmp_path: Path, edit, reason: str) -> None:
    _, onnx_path = exported

    def reseal(proto: onnx.ModelProto) -> None:
        meta = json.loads(_metadata(proto).value)
        edit(meta)
        meta[DIGEST_KEY] = graph_digest(proto, meta)  # what a hostile tool would do
        _set_metadata(proto, meta)

    assert reason in _refusal(_edited(onnx_path, tmp_path / "fields.onnx", reseal))


def test_encode_with_a_tampered_onnx_fails_in_one_line(exported, tmp_path: Path) -> None:
    _, onnx_path = exported
    tampered = _edited(onnx_path, tmp_path / "tampered.onnx", _negate_largest_initializer)
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.fromarray(synthetic_images(1, 40, seed=2)[0].permute(1, 2, 0).numpy()).save(images / "a.png")
    proc = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "encode", str(images), "--engine", str(tampered),
                           "--out", str(tmp_path / "index")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "do not match the recorded digest" in lines[0], proc.stderr
    assert not (tmp_path / "index").exists()


# --------------------------------------------------------------------------------------------
# A TensorRT engine file is tied to its plan (checked before TensorRT is imported)


def _trt_header(**overrides: Any) -> dict[str, Any]:
    preprocess = PreprocessConfig(input_size=64, resize_size=73)
    header = {
        "fgh_version": "0.1.0", "tensorrt_version": "10.3.0", "api_family": 10, "gpu_name": "NVIDIA Orin",
        "compute_capability": "8.7", "gpu_multiprocessors": 16, "gpu_memory_bytes": 61 * 2**30,
        "precision": "fp16", "dla_core": None,
        "profile": {"min": 1, "opt": 16, "max": 64}, "input": {"name": "images", "dtype": "uint8"},
        "output": {"name": "codes", "dtype": "float32"}, "input_shape": [3, 64, 64], "onnx_sha256": "0" * 64,
        "bits": 48, "preprocess": preprocess.to_dict(), "fingerprint": "f" * 64, "checkpoint": "m.pt",
        "model": {"model": "semicon", "bits": 48, "backbone": "resnet18", "options": {}},
        "rebuild": "fgh export m.pt --trt",
    }
    header.update(overrides)
    return json.loads(json.dumps(header))


def _rewrite_header(path: Path, header: dict[str, Any]) -> None:
    """Replace an engine file's header, keeping its plan and whatever digest ``header`` carries."""
    _, offset = read_engine_header(path)
    plan = path.read_bytes()[offset:]
    blob = json.dumps(header).encode()
    path.write_bytes(MAGIC + len(blob).to_bytes(4, "little") + blob + plan)


def _engine_refusal(path: Path) -> FghError:
    with pytest.raises(FghError) as info:
        TensorRTEngine(path)
    assert not isinstance(info.value, BackendUnavailableError), "must be refused before TensorRT is needed"
    assert "\n" not in str(info.value) and str(info.value).startswith(f"{path}: ")
    return info.value


def test_a_changed_plan_byte_is_refused_before_deserialising(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _trt_header(), b"PLAN-BYTES")
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    message = str(_engine_refusal(path))
    assert "the plan or its header does not match the recorded digest (modified after the build?)" in message
    assert message.endswith("rebuild it with: fgh export m.pt --trt")


def test_a_rebuild_command_with_control_characters_is_sealed_as_written_and_shown_escaped(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _trt_header(rebuild="fgh export 'a\x1b[2Jb.pt' --trt"), b"PLAN")
    header, offset = read_engine_header(path)
    assert read_verified_plan(path, header, offset) == b"PLAN"
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    message = str(_engine_refusal(path))
    assert "\x1b" not in message and message.endswith("rebuild it with: fgh export 'a\\x1b[2Jb.pt' --trt")


def test_a_swapped_header_fingerprint_is_refused(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _trt_header(), b"PLAN-BYTES")
    header, _ = read_engine_header(path)
    _rewrite_header(path, {**header, "fingerprint": "0" * 64})
    assert "does not match the recorded digest" in str(_engine_refusal(path))


def test_an_engine_without_a_digest_is_refused(tmp_path: Path) -> None:
    path = write_engine(tmp_path / "m.engine", _trt_header(), b"PLAN-BYTES")
    header, _ = read_engine_header(path)
    del header[DIGEST_KEY]
    _rewrite_header(path, header)
    assert str(_engine_refusal(path)).endswith("built by an older fgh (its header lacks integrity_sha256); "
                                               "rebuild it with `fgh export CHECKPOINT --trt`")


@pytest.mark.parametrize(("overrides", "reason"), [
    ({"preprocess": {**PreprocessConfig(input_size=64, resize_size=73).to_dict(), "input_size": 20000}},
     "bad preprocess.input_size: expected an integer in 32..1024, got 20000"),
    ({"profile": {"min": 1, "opt": 16, "max": 10**9}}, "bad profile"),
    ({"bits": 4096}, "bits / input_shape disagree"),
    ({"model": [[["semicon"]]]}, "bad model: expected an object, got list"),
    ({"rebuild": 7}, "bad rebuild: expected a non-empty string"),
    ({"precision": "int4"}, "bad precision"),
])
def test_bad_header_fields_are_refused(tmp_path: Path, overrides: dict[str, Any], reason: str) -> None:
    path = write_engine(tmp_path / "m.engine", _trt_header(**overrides), b"PLAN-BYTES")
    message = str(_engine_refusal(path))
    assert f"damaged engine header ({reason}" in message


def test_a_deeply_nested_header_is_refused_in_one_line(tmp_path: Path) -> None:
    blob = DEEP.encode()
    path = tmp_path / "deep.engine"
    path.write_bytes(MAGIC + len(blob).to_bytes(4, "little") + blob + b"PLAN")
    assert "damaged engine header (it is nested 100000 levels deep" in str(_engine_refusal(path))


# --------------------------------------------------------------------------------------------
# Fields read from files are bounded


def test_parse_json_object_ignores_brackets_inside_strings() -> None:
    text = json.dumps({"name": "[" * 1000, "nested": {"a": [1, {"b": "}}}"}]}})
    assert parse_json_object(text, "x")["name"] == "[" * 1000
    with pytest.raises(FghError, match=r"^x is nested 33 levels deep \(at most 32\)"):
        parse_json_object("[" * 33 + "]" * 33, "x")


@pytest.mark.parametrize(("field", "value", "reason"), [
    ("input_size", 0, "bad preprocess.input_size: expected an integer in 32..1024, got 0"),
    ("input_size", 20000, "bad preprocess.input_size: expected an integer in 32..1024, got 20000"),
    ("input_size", 64.0, "bad preprocess.input_size: expected an integer in 32..1024, got 64.0"),
    ("input_size", True, "bad preprocess.input_size: expected an integer in 32..1024, got True"),
    ("resize_size", 63, "bad preprocess.resize_size: expected an integer in 64..2048, got 63"),
    ("resize_size", 5000, "bad preprocess.resize_size: expected an integer in 64..2048, got 5000"),
    ("mean", [0.5, float("nan"), 0.5], "bad preprocess.mean: expected 3 finite numbers"),
    ("mean", [0.5, 0.5], "bad preprocess.mean: expected 3 finite numbers"),
    ("std", [0.2, -0.2, 0.2], "bad preprocess.std: expected 3 positive finite numbers"),
    ("interpolation", "lanczos\x1b[2J", "bad preprocess.interpolation: expected one of nearest, nearest-exact, "
                                        "bilinear, bicubic, got 'lanczos\\x1b[2J'"),
])
def test_preprocess_fields_are_bounded(field: str, value: Any, reason: str) -> None:
    data = {**PreprocessConfig(input_size=64, resize_size=73).to_dict(), field: value}
    with pytest.raises(FghError) as info:
        PreprocessConfig.from_dict(data)
    assert str(info.value).startswith(reason)


@pytest.mark.parametrize(("data", "reason"), [
    ({"model": "adsh", "bits": 0, "backbone": "resnet18"}, "bad config.bits: expected an integer in 1..4096, got 0"),
    ({"model": "adsh", "bits": 4097, "backbone": "resnet18"}, "bad config.bits: expected an integer in 1..4096"),
    ({"model": "ad\nsh", "bits": 16, "backbone": "resnet18"}, "bad config.model: expected a name"),
    ({"model": "adsh", "bits": 16}, "bad config: backbone is missing"),
    ({"model": "adsh", "bits": 16, "backbone": "resnet18", "options": [1]}, "bad config.options: expected an object"),
    ("adsh", "bad config: expected an object, got str"),
])
def test_model_config_fields_are_checked(data: Any, reason: str) -> None:
    with pytest.raises(FghError) as info:
        HashConfig.from_dict(data)
    assert str(info.value).startswith(reason) and "\n" not in str(info.value)


def test_valid_configs_round_trip() -> None:
    preprocess = PreprocessConfig(input_size=32, resize_size=37, interpolation="bicubic")
    assert PreprocessConfig.from_dict(json.loads(json.dumps(preprocess.to_dict()))) == preprocess
    config = HashConfig("a2net", 48, "efficientnet_lite0", {"num_parts": 4})
    assert HashConfig.from_dict(config.to_dict()) == config


# --------------------------------------------------------------------------------------------
# --device, --out-dir and bad checkpoints


@pytest.mark.parametrize("device", ["bogus", "mps", "cuda:x", "cuda:", "CPU", " cpu", "cuda:0 "])
def test_a_bogus_device_is_refused_in_one_line(device: str) -> None:
    with pytest.raises(FghError) as info:
        resolve_device(device)
    assert str(info.value) == f"--device: expected auto, cpu or cuda[:N], got {device!r}"


def test_valid_device_forms() -> None:
    assert [check_device(d) for d in ("auto", "cpu", "cuda", "cuda:1")] == ["auto", "cpu", "cuda", "cuda:1"]
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_refused_in_one_line() -> None:
    with pytest.raises(BackendUnavailableError, match=r"^--device cuda:0: CUDA is not available here$"):
        resolve_device("cuda:0")


def test_every_engine_refuses_a_bogus_device(exported, tmp_path: Path) -> None:
    ckpt, onnx_path = exported
    engine_path = write_engine(tmp_path / "m.engine", _trt_header(), b"PLAN-BYTES")
    for path in (ckpt, onnx_path, engine_path):
        with pytest.raises(FghError, match=r"^--device: expected auto, cpu or cuda\[:N\], got 'bogus'$"):
            load_engine(path, device="bogus")
    with pytest.raises(FghError, match="^--device: expected"):
        OnnxEngine(onnx_path, device="bogus")


def test_cli_encode_with_a_bogus_device(exported, tmp_path: Path) -> None:
    ckpt, _ = exported
    (tmp_path / "images").mkdir()
    proc = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "encode", str(tmp_path / "images"), "--engine",
                           str(ckpt), "--out", str(tmp_path / "index"), "--device", "bogus"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == ["fgh: error: --device: expected auto, cpu or cuda[:N], got 'bogus'"]


def test_export_to_an_out_dir_that_is_a_file_writes_nothing(exported, tmp_path: Path) -> None:
    ckpt, _ = exported
    target = tmp_path / "out"
    target.write_text("not a directory")
    with pytest.raises(FghError) as info:
        export_checkpoint(ckpt, out_dir=target, calib_count=4)
    assert str(info.value) == f"{target}: --out-dir names a file, not a directory; nothing was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and target.read_text() == "not a directory"
    with pytest.raises(FghError, match="cannot create --out-dir"):
        export_checkpoint(ckpt, out_dir=target / "below", calib_count=4)


def test_export_of_a_bad_checkpoint_is_one_line(exported, tmp_path: Path) -> None:
    ckpt, _ = exported
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[:1000])
    for path, reason in ((tmp_path, "is a directory, not a checkpoint file"),
                         (tmp_path / "missing.pt", "no such checkpoint file"),
                         (truncated, "not a readable checkpoint (truncated or corrupt")):
        with pytest.raises(FghError) as info:
            export_checkpoint(path, out_dir=tmp_path / "out", calib_count=4)
        assert str(info.value).startswith(f"{path}: {reason}") and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()
