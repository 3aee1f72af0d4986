"""A shortened `fgh demo` end to end: train → ONNX → encode → query → evaluate → HTML report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_short_demo_beats_chance_by_a_wide_margin(tmp_path: Path) -> None:
    env = {"FGH_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-m", "fgh_deploy.cli", "demo", "--out", str(tmp_path / "demo"), "--iterations", "4",
         "--num-samples", "300", "--json"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    print(f"\nshort demo: mAP {result['map@all']:.3f} (tie-aware {result['map@all/expected']:.3f}) vs chance "
          f"{result['chance_map@all']:.3f}; stages {result['stage_seconds']}")
    assert result["queries"] == 200 and result["database"] == 600
    assert result["map@all/expected"] > result["chance_map@all"] + 0.15
    for stage in ("Data:", "Train:", "ONNX: export success", "Parity:", "Encode:"):
        assert stage in proc.stderr
    report = Path(result["artifacts"]["report"]).read_text()
    assert report.count("data:image/jpeg;base64,") > 12 * 10
    assert Path(result["artifacts"]["onnx"]).is_file() and (tmp_path / "demo" / "demo.json").is_file()
