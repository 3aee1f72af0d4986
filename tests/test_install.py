"""What `pip install .` puts in site-packages: the one namespace fgh_deploy, never train/export/engines.

A user's project almost always has its own train.py or export.py; under `python -m` and `torchrun -m`
the working directory comes first on sys.path, so a top-level fgh module of that name would be
shadowed by the user's file. The install goes into a fresh virtual environment that borrows only
the dependencies (torch, onnx, ...) from the one running the tests.
"""

from __future__ import annotations

import json
import os
import site
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest
import setuptools
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# pyproject.toml's build requirement; older setuptools (Python 3.11's venv default) cannot build fgh.
BUILD_BACKEND_READY = int(setuptools.__version__.split(".")[0]) >= 77
SHADOWS = ("train.py", "export.py", "engines.py")


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory) -> Path:
    """A new virtual environment with fgh installed from this checkout (not editable)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    # No pip or setuptools of its own: this environment's pip installs into it (--python), with the
    # borrowed setuptools (Python 3.11's bundled one is too old for pyproject.toml).
    venv.create(env, with_pip=False)
    python = env / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Dependencies come from the test environment's site-packages, after the new one's own.
    Path(purelib, "borrowed_dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    install = [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
               "--disable-pip-version-check"]
    if BUILD_BACKEND_READY:
        install.append("--no-build-isolation")  # use this environment's setuptools: no index needed
    result = subprocess.run([*install, str(ROOT)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return env


def _python(env: Path) -> Path:
    return env / "bin" / "python"


def test_only_fgh_deploy_lands_in_site_packages(fresh_env: Path, tmp_path: Path) -> None:
    python = _python(fresh_env)
    files = subprocess.run(  # away from the checkout, whose build metadata would be found first
        [python, "-c", "import json, importlib.metadata as m; print(json.dumps([str(f) for f in m.files('fgh')]))"],
        cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    top_level = {Path(f).parts[0] for f in json.loads(files)}
    assert top_level - {"..", "fgh_deploy"} == {"fgh-0.1.0.dist-info"}  # "..": the console script in bin/
    assert any(f.endswith("fgh_deploy/train/trainer.py") for f in json.loads(files))


def test_user_modules_named_train_export_engines_cannot_shadow_fgh(fresh_env: Path, tmp_path: Path) -> None:
    python = _python(fresh_env)
    project = tmp_path / "user_project"
    project.mkdir()
    for name in SHADOWS:  # a user's own scripts, which must never be imported by fgh
        (project / name).write_text(f"raise SystemExit('fgh imported the user\\'s {name}')\n")
    elsewhere = subprocess.run([python, "-c", "import train"], cwd=tmp_path, capture_output=True, text=True)
    assert elsewhere.returncode == 1 and "No module named 'train'" in elsewhere.stderr

    help_text = subprocess.run([python, "-m", "fgh_deploy.cli", "--help"], cwd=project, capture_output=True,
                               text=True, timeout=300)
    assert help_text.returncode == 0, help_text.stderr
    assert "train" in help_text.stdout and "export" in help_text.stdout

    data = tmp_path / "birds"
    rng = np.random.default_rng(0)
    for c in range(2):
        (data / f"species{c}").mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 60, (40, 40, 3), dtype=np.uint8)
            pixels[..., c] += 150
            Image.fromarray(pixels).save(data / f"species{c}" / f"{i}.png")
    run = tmp_path / "run"
    trained = subprocess.run(
        [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fgh_deploy.cli",
         "train", "--data", str(data), "--out", str(run), "--model", "adsh", "--bits", "8", "--backbone", "resnet18",
         "--no-pretrained", "--input-size", "32", "--preset", "fast", "--iterations", "1", "--epochs", "1",
         "--num-samples", "8", "--batch-size", "4", "--workers", "0", "--device", "cpu", "--json"],
        cwd=project, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads(trained.stdout)["iterations"] == 1
    assert (run / "last.pt").is_file() and (run / "splits.tsv").is_file()
