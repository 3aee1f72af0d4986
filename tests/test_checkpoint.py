"""Checkpoints: round trip, provenance, and refusal of truncated, foreign or damaged files."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fgh_deploy as fgh
from fgh_deploy.checkpoint import FORMAT


@pytest.fixture
def model() -> fgh.HashModel:
    torch.manual_seed(0)
    return fgh.build_model("semicon", 24, backbone="resnet18", input_size=64).eval()


@pytest.fixture
def saved(model: fgh.HashModel, tmp_path: Path) -> Path:
    return fgh.save_checkpoint(model, tmp_path / "m.pt", extra={"db_codes": torch.ones(3, 24), "classes": ["a", "b"]})


def test_round_trip_gives_identical_codes(model: fgh.HashModel, saved: Path, images: torch.Tensor) -> None:
    ckpt = fgh.load_checkpoint(saved)
    assert ckpt.config == model.config
    assert ckpt.preprocess == model.preprocess
    assert ckpt.extra["classes"] == ["a", "b"]
    assert ckpt.provenance["fgh_version"] == fgh.__version__
    assert ckpt.provenance["backbone_weights"] == "random"
    reloaded = fgh.load_model(saved)
    with torch.no_grad():
        assert torch.equal(reloaded(images), model(images))
    assert not reloaded.training


def test_fingerprint_identifies_the_weights(model: fgh.HashModel, saved: Path, tmp_path: Path) -> None:
    first = fgh.load_checkpoint(saved).fingerprint
    assert fgh.load_checkpoint(fgh.save_checkpoint(model, tmp_path / "again.pt")).fingerprint == first
    with torch.no_grad():
        model.hash_global.weight[0, 0] += 1
    assert fgh.load_checkpoint(fgh.save_checkpoint(model, tmp_path / "changed.pt")).fingerprint != first


def test_no_temporary_files_are_left(saved: Path) -> None:
    assert [p.name for p in saved.parent.iterdir()] == ["m.pt"]


def test_a_failed_save_keeps_the_previous_file(model: fgh.HashModel, saved: Path) -> None:
    before = saved.read_bytes()
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        fgh.save_checkpoint(model, saved, extra={"bad": lambda: 0})
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["m.pt"]


# The file-size limit makes write() fail with EFBIG, as a full disk fails it with ENOSPC: torch.save
# then raises "unexpected pos …" with the OSError only as the context of its own error.
_SAVE_UNDER_A_FILE_SIZE_LIMIT = """
import resource, sys, torch
import fgh_deploy as fgh
model = fgh.load_model(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
try:
    fgh.save_checkpoint(model, sys.argv[1])
except fgh.FghError as exc:
    print(exc)
"""


def test_a_save_that_the_file_system_refuses_is_one_line_and_keeps_the_previous_file(saved: Path) -> None:
    before = saved.read_bytes()
    assert len(before) > 1 << 20
    run = subprocess.run([sys.executable, "-c", _SAVE_UNDER_A_FILE_SIZE_LIMIT, str(saved)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == f"cannot write {saved}: File too large"
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["m.pt"]


def test_truncated_file_is_refused(saved: Path) -> None:
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(FghError := fgh.FghError, match=r"m\.pt: not a readable checkpoint \(truncated or corrupt"):
        fgh.load_checkpoint(saved)
    assert FghError is fgh.FghError


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(fgh.FghError, match="empty.pt: not a readable checkpoint"):
        fgh.load_checkpoint(tmp_path / "empty.pt")
    with pytest.raises(fgh.FghError, match="nope.pt: no such checkpoint file"):
        fgh.load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(fgh.FghError, match="is a directory"):
        fgh.load_checkpoint(tmp_path)


def test_foreign_files_are_refused(model: fgh.HashModel, tmp_path: Path) -> None:
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(fgh.FghError, match="bare.pt: not an fgh checkpoint.*bare state dict"):
        fgh.load_checkpoint(bare)
    other = tmp_path / "other.pt"
    torch.save({"epoch": 3, "model": model.state_dict()}, other)
    with pytest.raises(fgh.FghError, match="other.pt: not an fgh checkpoint"):
        fgh.load_checkpoint(other)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickled_code_is_never_executed(tmp_path: Path, capsys) -> None:
    evil = tmp_path / "evil.pt"
    torch.save({"format": FORMAT, "x": _Payload()}, evil)
    with pytest.raises(fgh.FghError, match="evil.pt: refused: it contains pickled Python objects"):
        fgh.load_checkpoint(evil)
    assert "must never run" not in capsys.readouterr().out


def _rewrite(path: Path, edit) -> None:
    payload = torch.load(path, weights_only=True)
    edit(payload)
    torch.save(payload, path)


def test_damaged_weights_fail_the_fingerprint(saved: Path) -> None:
    _rewrite(saved, lambda p: p["state_dict"]["hash_global.weight"].mul_(1.001))
    with pytest.raises(fgh.FghError, match="m.pt: damaged checkpoint: weights do not match the recorded fingerprint"):
        fgh.load_checkpoint(saved)


def test_config_that_does_not_match_the_weights_is_refused(saved: Path) -> None:
    def edit(payload):
        payload["config"]["bits"] = 48
        payload["fingerprint"] = fgh.checkpoint.fingerprint(
            fgh.HashConfig.from_dict(payload["config"]), fgh.PreprocessConfig.from_dict(payload["preprocess"]),
            payload["state_dict"])

    _rewrite(saved, edit)
    with pytest.raises(fgh.FghError, match="m.pt: weights do not match its model config"):
        fgh.load_model(saved)


@pytest.mark.parametrize("model, refused", [("semicon", True), ("agmh", True), ("adsh", False), ("a2net", False)])
def test_format_1_checkpoints_of_changed_models_are_refused(model: str, refused: bool, tmp_path: Path) -> None:
    path = fgh.save_checkpoint(fgh.build_model(model, 12, backbone="resnet18", input_size=32), tmp_path / "old.pt")
    _rewrite(path, lambda p: p.update(format_version=1))
    if refused:
        with pytest.raises(fgh.FghError, match=f"old.pt: a {model} checkpoint of format 1.*retrain it"):
            fgh.load_checkpoint(path)
    else:
        assert fgh.load_checkpoint(path).config.model == model


def test_newer_format_is_refused(saved: Path) -> None:
    _rewrite(saved, lambda p: p.update(format_version=99))
    with pytest.raises(fgh.FghError, match="format 99 is newer"):
        fgh.load_checkpoint(saved)


@pytest.mark.parametrize(("section", "field", "value", "reason"), [
    ("preprocess", "input_size", 20000, "bad preprocess.input_size: expected an integer in 32..1024, got 20000"),
    ("preprocess", "input_size", 0, "bad preprocess.input_size: expected an integer in 32..1024, got 0"),
    ("preprocess", "std", (0.2, 0.0, 0.2), "bad preprocess.std: expected 3 positive finite numbers"),
    ("config", "bits", 10**6, "bad config.bits: expected an integer in 1..4096, got 1000000"),
])
def test_out_of_bounds_fields_are_refused_even_with_a_recomputed_fingerprint(
        saved: Path, section: str, field: str, value, reason: str) -> None:
    def edit(payload):
        payload[section][field] = value
        # What a careless tool would do: keep the file self-consistent.
        payload["fingerprint"] = fgh.checkpoint.fingerprint(
            fgh.HashConfig(**payload["config"]), fgh.PreprocessConfig(**payload["preprocess"]), payload["state_dict"])

    _rewrite(saved, edit)
    with pytest.raises(fgh.FghError) as info:
        fgh.load_checkpoint(saved)
    assert str(info.value).startswith(f"{saved}: {reason}") and "\n" not in str(info.value)


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda p: p.update(state_dict=[1, 2]), "state_dict is not a dict of named tensors"),
    (lambda p: p["state_dict"].update(extra="not a tensor"), "state_dict is not a dict of named tensors"),
    (lambda p: p.update(fingerprint=None), "fingerprint is not a string"),
    (lambda p: p.update(extra=[1]), "provenance and extra must be dicts"),
    (lambda p: p.pop("preprocess"), "bad preprocess: expected an object, got NoneType"),
])
def test_damaged_fields_are_one_line(saved: Path, edit, reason: str) -> None:
    _rewrite(saved, edit)
    with pytest.raises(fgh.FghError) as info:
        fgh.load_checkpoint(saved)
    assert str(info.value).startswith(f"{saved}: ") and reason in str(info.value)


@pytest.mark.parametrize("value, reason", [
    (10**8, "a2net: num_parts must be in 1..256, got 100000000"),
    ("4", "a2net: option num_parts must be int (like 4), got '4'"),
    (True, "a2net: option num_parts must be int (like 4), got True"),
])
def test_model_options_from_a_file_are_bounded_and_typed(tmp_path: Path, value, reason: str) -> None:
    path = fgh.save_checkpoint(fgh.build_model("a2net", 16, backbone="resnet18", input_size=64), tmp_path / "a2.pt")

    def edit(payload):
        payload["config"]["options"]["num_parts"] = value
        payload["fingerprint"] = fgh.checkpoint.fingerprint(
            fgh.HashConfig(**payload["config"]), fgh.PreprocessConfig(**payload["preprocess"]), payload["state_dict"])

    _rewrite(path, edit)
    with pytest.raises(fgh.FghError) as info:
        fgh.model_from_checkpoint(fgh.load_checkpoint(path))
    assert str(info.value) == f"{path}: {reason}"
