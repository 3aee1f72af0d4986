"""fgh train against careless and hostile input: bad options, damaged run files, moved and copied runs.

Every refusal is one line on stderr, a non-zero exit, and nothing written.
"""

from __future__ import annotations

import json
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import fgh_deploy as fgh
from fgh_deploy.cli import main
from fgh_deploy.train.config import TRAIN_OPTIONS, command_line_values, make_config, resume_config
from fgh_deploy.train.evaluate import evaluate_checkpoint
from fgh_deploy.train.trainer import BEST, CONFIG, LAST, METRICS, SPLITS

TINY = ["--model", "adsh", "--bits", "8", "--backbone", "resnet18", "--no-pretrained", "--input-size", "32",
        "--preset", "fast", "--epochs", "1", "--num-samples", "8", "--batch-size", "4", "--workers", "0",
        "--val-fraction", "0.25", "--seed", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def class_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The layout users have: ``root/<class>/*.png``, 3 classes × 5 images (no split)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(["cardinal", "jay", "wren"]):
        (root / name).mkdir()
        for i in range(5):
            pixels = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def fgh_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in args])
    return exit_info.value.code


def refused(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """The one-line error of ``fgh <args>``, which must fail."""
    code = fgh_cli(*args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None), lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("fgh: error: ")
    return lines[0]


def files_of(run: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(run.iterdir()) if path.is_file()}


# --- option errors: one line naming the option, nothing written -------------------------------------


@pytest.mark.parametrize(("options", "needle"), [
    (["--model", "bogus"], "unknown model 'bogus'"),
    (["--backbone", "bogus"], "unknown backbone 'bogus'"),
    (["--model", "semicon", "--bits", "5"], "bits: semicon needs at least 6 bits"),
    (["--bits", "100000"], "bits must be from 1 to 4096"),
    (["--lr-steps", "x,y"], "--lr-steps expects positive integers"),
    (["--crop-scale", "a"], "--crop-scale expects two numbers"),
    (["--crop-scale", "0.5"], "crop_scale must be 2 numbers"),
    (["--crop-scale", "0.9,0.5"], "crop_scale must be two numbers 0 < min ≤ max ≤ 1"),
    (["--momentum", "-1"], "momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "weight_decay must be ≥ 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--option", "nonsense=3"], "model_options (--option): adsh: unknown option(s) nonsense"),
    (["--model", "a2net", "--option", "num_parts=many"], "a2net's num_parts must be an integer, got 'many'"),
    (["--device", "bogus"], "--device"),
    (["--input-size", "4096"], "input_size must be from 32 to 1024"),
    (["--query-fraction", "1"], "query_fraction must be in (0, 1)"),
    (["--weights", "no-such-weights.pth"], "no-such-weights.pth: no such weights file"),
])
def test_bad_train_options_are_refused_before_anything_is_written(
        options: list[str], needle: str, class_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    line = refused(capsys, "train", "--data", class_tree, "--out", run, *TINY, *options)
    assert needle in line, line
    assert not run.exists()
    assert sorted(p.name for p in class_tree.iterdir()) == ["cardinal", "jay", "wren"]


@pytest.mark.parametrize(("options", "needle"), [
    (["--bits", "eight"], "--bits expects an integer, got 'eight'"),
    (["--lr-new", "fast"], "--lr-new expects a number or none, got 'fast'"),
    (["--set", "lr_decay"], "--set expects field=value, got 'lr_decay'"),
    (["--set", "lr_decay=steep"], "--set lr_decay expects a number, got 'steep'"),
    (["--set", "lr=0.1"], "--set lr: lr has an option of its own, --lr"),
    (["--set", "nonsense=1"], "--set: no train config field 'nonsense'; --set takes splits, lr_decay, trunk_cache_gb"),
    (["--set", "trunk_cache_gb=0"], "trunk_cache_views must be ≥ 0 and trunk_cache_gb positive"),
])
def test_values_are_read_by_their_field_type_and_set_takes_the_fields_without_an_option(
        options: list[str], needle: str, class_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    line = refused(capsys, "train", "--data", class_tree, "--out", run, *TINY, *options)
    assert needle in line, line
    assert not run.exists()


def test_command_line_values_follow_the_config_field_types() -> None:
    values = command_line_values(
        {"data": "photos/", "bits": "16", "lr": "1e-3", "lr_new": "none", "crop_scale": "0.3,1", "lr_steps": "20,30",
         "nesterov": False, "model_options": ["num_parts=4", "name=x"], "pretrained": None, "no_pretrained": True,
         "seed": None},
        ["lr_decay=0.5", "trunk_cache_gb=2", "splits=my splits.tsv"])
    assert values == {"data": "photos", "bits": 16, "lr": 1e-3, "lr_new": None, "crop_scale": (0.3, 1.0),
                      "lr_steps": [20, 30], "nesterov": False, "model_options": {"num_parts": 4, "name": "x"},
                      "pretrained": False, "lr_decay": 0.5, "trunk_cache_gb": 2.0, "splits": "my splits.tsv"}
    assert command_line_values({"pretrained": "w.pth", "no_pretrained": True}) == {"pretrained": "w.pth"}


def test_train_help_shows_every_config_field(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("TERMINAL_WIDTH", "200")
    assert fgh_cli("train", "--help") == 0
    shown = capsys.readouterr().out
    for option in TRAIN_OPTIONS.values():
        if option.own_option:
            assert option.flags[0] in shown and option.help[:30] in shown, option.name
        else:
            assert option.name in shown.split("--set", 1)[1], option.name


def test_out_that_is_a_file_is_refused_and_left_alone(class_tree: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    model_file = tmp_path / "m.pt"
    model_file.write_bytes(b"weights")
    line = refused(capsys, "train", "--data", class_tree, "--out", model_file, *TINY)
    assert f"out {model_file} is a file, not a run directory" in line
    line = refused(capsys, "train", "--data", class_tree, "--out", model_file / "run", *TINY)
    assert f"is under {model_file}, which is a file" in line
    assert model_file.read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


def test_a_checkpoint_the_file_system_refuses_is_one_line_naming_the_file(class_tree: Path, tmp_path: Path) -> None:
    """A full disk, as a file-size limit shows it (EFBIG where a full disk gives ENOSPC, same code path)."""
    run = tmp_path / "run"

    def limit_file_size() -> None:  # in the child only; Python ignores SIGXFSZ, so write() fails instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))

    result = subprocess.run([sys.executable, "-m", "fgh_deploy.cli", "train", "--data", str(class_tree),
                             "--out", str(run), *TINY], capture_output=True, text=True, timeout=600,
                            preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"fgh: error: cannot write {run}/"), result.stderr
    assert last_line.endswith(".pt: File too large"), result.stderr
    assert "Traceback" not in result.stderr
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    assert json.loads((run / CONFIG).read_text())["bits"] == 8  # what was written before is whole


def test_train_without_data_model_or_bits_names_what_is_missing(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, "train", "--out", tmp_path / "run", "--model", "adsh")
    assert "fgh train needs --data, --bits (or --resume --out RUN)" in line
    assert not (tmp_path / "run").exists()


# --- a damaged config.json on --resume ----------------------------------------------------------


def _recorded(tmp_path: Path, **overrides) -> dict:
    return make_config("fast", data=str(tmp_path / "data"), model="adsh", bits=8, out=str(tmp_path / "elsewhere"),
                       backbone="resnet18", **overrides).to_dict()


@pytest.mark.parametrize(("content", "needle"), [
    (b"", "empty; the run's configuration is lost"),
    (b"  \n", "empty; the run's configuration is lost"),
    (b'{"data": "d", "model": ', "not valid JSON"),
    (b"\xff\xfe{}", "it is not UTF-8"),
    (b"[1, 2, 3]", "it is a JSON list, not an object"),
    (b"[" * 100_000 + b"]" * 100_000, "it is nested 100000 levels deep"),
    (b" " * (1 << 20) + b"{}", "larger than 1048576 bytes"),
    (b'{"data": "d", "out": "o"}', "train config lacks model, bits"),
    (b'{"data": "d", "model": "adsh", "bits": "8", "out": "o"}', "bits must be an integer, got '8'"),
    (b'{"data": "d", "model": "adsh", "bits": 8, "out": "o", "lr": null}', "lr must be a finite number, got None"),
    (b'{"data": "d", "model": "adsh", "bits": 8, "out": "o", "crop_scale": 0.5}', "crop_scale must be 2 numbers"),
    (b'{"data": "d", "model": "adsh", "bits": 8, "out": "o", "model_options": [1]}', "model_options must be an object"),
    (b'{"data": "d", "model": "adsh", "bits": 8, "out": "o", "workers": 100000}', "workers must be from 0 to 256"),
    (b'{"data": "d", "model": "adsh\\u001b[2J", "bits": 8, "out": "o"}', "unknown model 'adsh\\x1b[2J'"),
])
def test_a_damaged_config_json_is_named_in_one_line(content: bytes, needle: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_bytes(content)
    line = refused(capsys, "train", "--resume", "--out", run)
    assert f"{run / CONFIG}: " in line and needle in line, line
    assert "\x1b" not in line
    assert [p.name for p in run.iterdir()] == [CONFIG] and (run / CONFIG).read_bytes() == content


def test_resume_without_a_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(capsys, "train", "--resume", "--out", tmp_path / "nothing")
    assert f"{tmp_path / 'nothing'}: nothing to resume (no config.json)" in line
    assert not (tmp_path / "nothing").exists()


# --- --resume and the options given with it ---------------------------------------------------------


def test_resume_refuses_options_that_change_the_run_and_names_them(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text(json.dumps(_recorded(tmp_path)))
    line = refused(capsys, "train", "--resume", "--out", run, "--bits", "16", "--lr", "0.1", "--model", "semicon",
                   "--data", tmp_path / "other", "--option", "alpha=0.3", "--iterations", "50")
    assert "refusing --data, --model, --bits, --option, --lr (they would change it" in line, line
    line = refused(capsys, "train", "--resume", "--out", run, "--preset", "paper", "--backbone", "resnet50")
    assert "refusing --backbone, --preset" in line, line
    assert [p.name for p in run.iterdir()] == [CONFIG]


def test_resume_names_the_options_it_refuses_as_they_were_given(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text(json.dumps(_recorded(tmp_path)))
    line = refused(capsys, "train", "--resume", "--out", run, "--set", "lr_decay=0.5", "--no-pretrained",
                   "--train-trunk")
    assert "refusing --weights/--no-pretrained, --freeze-trunk, --set lr_decay (they would change it" in line, line


def test_resume_accepts_the_recorded_values_and_may_extend_or_move_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    recorded = _recorded(tmp_path)
    (run / CONFIG).write_text(json.dumps(recorded))
    # The command that started the run, repeated with --resume (data spelt differently: the same folder).
    config = resume_config(run, dict(data=str(tmp_path / "x" / ".." / "data"), model="adsh", bits=8,
                                     backbone="resnet18", preset="fast", lr=recorded["lr"], crop_scale=(0.35, 1.0)))
    assert config.out == str(run)  # not the recorded "elsewhere": the run is where it is
    assert config.to_dict() == {**recorded, "out": str(run)}
    longer = resume_config(run, dict(iterations=45, workers=0, device="cpu"))
    assert (longer.iterations, longer.workers, longer.device) == (45, 0, "cpu")
    with pytest.raises(ValueError, match="out"):
        resume_config(run, dict(out="somewhere"))


# --- a copied or moved run continues where it is -------------------------------------------------


def test_resume_of_a_copy_leaves_the_original_untouched_and_a_moved_run_resumes(
        class_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    original = tmp_path / "original"
    assert fgh_cli("train", "--data", class_tree, "--out", original, *TINY, "--iterations", "1") == 0
    before = files_of(original)
    assert {LAST, BEST, METRICS, CONFIG, SPLITS} <= set(before)

    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    assert fgh_cli("train", "--resume", "--out", copy) == 0  # nothing left to run
    assert fgh_cli("train", "--resume", "--out", copy, "--iterations", "2") == 0
    assert files_of(original) == before
    assert json.loads((copy / CONFIG).read_text())["out"] == str(copy)
    assert fgh.load_checkpoint(copy / LAST).extra["iteration"] == 1
    assert [json.loads(line)["iteration"] for line in (copy / METRICS).read_text().splitlines()] == [0, 1]

    moved = tmp_path / "moved"
    original.rename(moved)
    assert fgh_cli("train", "--resume", "--out", moved, "--iterations", "2") == 0
    assert not original.exists()
    ckpt = fgh.load_checkpoint(moved / LAST)
    assert ckpt.extra["iteration"] == 1 and ckpt.extra["train_config"]["out"] == str(moved)
    # Both continued the same run the same way (CPU, one process: bit for bit).
    assert fgh.load_checkpoint(copy / LAST).fingerprint == ckpt.fingerprint
    # The moved run's checkpoint still finds the split it was trained on.
    report = evaluate_checkpoint(moved / BEST, topks=(2,), workers=0, device="cpu")
    assert report["data"]["query"] == sum(line.endswith("\tquery") for line in (moved / SPLITS).read_text().splitlines())

    capsys.readouterr()
    line = refused(capsys, "train", "--resume", "--out", moved, "--iterations", "1")
    assert "already completed 2 iterations; iterations=1 cannot shorten it" in line
