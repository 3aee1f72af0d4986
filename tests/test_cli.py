"""The `fgh` console script: JSON on stdout, one-line errors, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fgh_deploy.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "from fgh_deploy.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=300)


def test_models_json_lists_every_model_and_backbone() -> None:
    result = run_cli("models", "--bits", "32", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert payload["schema_version"] == 1
    rows = {(r["model"], r["backbone"]): r for r in payload["models"]}
    assert len(rows) == 12
    semicon = rows["semicon", "resnet50"]
    # models.md §2: ≈42.4 M parameters and ≈7 GMACs at 224 px.
    assert 42e6 < semicon["params"] < 43e6 and 6.9 < semicon["gmacs"] < 7.4
    agmh = rows["agmh", "resnet50"]
    assert agmh["inference_params"] < agmh["params"]  # SIEA is training-only


def test_models_table_is_human_readable(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["models", "--bits", "12", "--model", "adsh", "--backbone", "resnet18"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "adsh" in out and "resnet18" in out and "GMACs" in out


def test_errors_are_one_line_with_a_non_zero_exit() -> None:
    result = run_cli("models", "--model", "nope")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fgh: error: unknown model 'nope'; choose from adsh, a2net, semicon, agmh"]
    assert result.stdout == ""


@pytest.mark.parametrize(("args", "message"), [
    (("--backbone", "vgg16"), "fgh: error: unknown backbone 'vgg16'; choose from resnet50, resnet18, efficientnet_lite0"),
    (("--model", "semicon", "--bits", "5"), "fgh: error: semicon needs at least 6 bits (one per part), got 5"),
])
def test_library_value_errors_are_one_line(args: tuple[str, ...], message: str) -> None:
    # The registry's ConfigError reaches the CLI's one error boundary unconverted.
    result = run_cli("models", *args)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [message]


def test_usage_errors_exit_2() -> None:
    assert run_cli("models", "--bits", "0").returncode == 2


def test_bench_search_json_smoke() -> None:
    result = run_cli("bench", "search", "--n", "2000", "--bits", "16,33", "--queries", "1,3", "--repeats", "1", "--json")
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert [r["bits"] for r in payload["reports"]] == [16, 33]
    for report in payload["reports"]:
        assert [r["queries"] for r in report["results"]] == [1, 3]
