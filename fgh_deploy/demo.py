"""``fgh demo``: the whole main job on a laptop CPU, offline, in minutes.

train (fast preset, offline-pretrained EfficientNet-Lite0) → export to ONNX with the parity check →
encode the database with the ONNX engine → query with the held-out images → evaluate → an HTML
report. Every stage logs one line to stderr; the result ends with mAP next to the chance level.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import FghError
from .utils import display_path

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    out: Path
    data: Path
    model: str
    bits: int
    map_all: float = 0.0
    map_tie_aware: float = 0.0
    chance_map: float = 0.0
    precision_at_10: float = 0.0
    queries: int = 0
    database: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    next_commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "out": str(self.out), "data": str(self.data), "model": self.model,
                "bits": self.bits, "map@all": self.map_all, "map@all/expected": self.map_tie_aware,
                "chance_map@all": self.chance_map, "precision@10": self.precision_at_10, "queries": self.queries,
                "database": self.database, "stage_seconds": self.stage_seconds, "artifacts": self.artifacts,
                "next_commands": self.next_commands}


# The fast preset shortened further: on the embedded set SEMICON's validation mAP is ~0.9 after
# 6 iterations of 500 samples, and the whole demo must stay under 10 minutes on 2 CPU cores.
DEMO_ITERATIONS = 8
DEMO_SAMPLES = 400
#: Written into ``--out`` first (then the result): marks the folder as a demo's, which a rerun may replace.
DEMO_MARKER = "demo.json"


def run_demo(out: str | os.PathLike = "fgh-demo", *, data: str | os.PathLike | None = None, model: str = "semicon",
             bits: int = 32, iterations: int = DEMO_ITERATIONS, num_samples: int = DEMO_SAMPLES,
             input_size: int = 160, report_queries: int = 12, workers: int = 1, seed: int = 0) -> DemoResult:
    """Run the demo end to end into ``out`` (a fresh run each time: ``out`` is replaced).

    Args:
        out: output folder (run, ONNX model, index, report).
        data: dataset root (default: the embedded synthetic bird set, generated on first use).
        model, bits: what to train.
        iterations, num_samples: override the demo schedule (the test suite shortens it).
        input_size: crop size; 160 keeps a CPU run short (the demo images are 160 px).
        report_queries: queries shown in the HTML report.
        workers: decoding processes.
        seed: training seed.
    """
    import shutil

    from fgh_deploy.engines.onnx_engine import OnnxEngine
    from fgh_deploy.export.pipeline import export_checkpoint
    from fgh_deploy.train.config import make_config
    from fgh_deploy.train.data import load_dataset
    from fgh_deploy.train.metrics import evaluate_retrieval
    from fgh_deploy.train.trainer import train

    from .demo_data import demo_dataset_path
    from .encode import encode_folder
    from .images import load_image
    from .index import CodeIndex
    from .query import search_codes
    from .report import write_html_report

    out = Path(out)
    # Replacing a folder deletes it: only a real folder that an earlier demo marked as its own.
    if out.is_symlink():
        raise FghError(f"{display_path(out)}: is a symbolic link; give the folder itself as --out")
    if out.exists():
        if not out.is_dir():
            raise FghError(f"{display_path(out)}: exists and is not a folder; choose another --out")
        if not (out / DEMO_MARKER).is_file() and any(out.iterdir()):
            raise FghError(f"{display_path(out)}: exists and is not an earlier fgh demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    # Marked before the first stage, so that a demo stopped halfway can still be replaced.
    (out / DEMO_MARKER).write_text(json.dumps({"schema_version": 1, "complete": False}) + "\n")
    stages: dict[str, float] = {}

    def stage(name: str, started: float) -> None:
        stages[name] = round(time.perf_counter() - started, 1)

    t = time.perf_counter()
    root = Path(data) if data else demo_dataset_path()
    dataset = load_dataset(root)
    log.info("Data: %s (%s): %d classes, %d database, %d query images", root, dataset.layout,
             len(dataset.classes), len(dataset.database), len(dataset.query))
    stage("data", t)

    t = time.perf_counter()
    config = make_config("fast", data=str(root), model=model, bits=bits, out=str(out / "run"),
                         backbone="efficientnet_lite0", pretrained=True, input_size=input_size, workers=workers,
                         seed=seed, iterations=iterations, num_samples=num_samples,
                         lr_steps=[max(1, iterations * 3 // 4)], eval_every=max(1, iterations // 4))
    log.info("Train: %s, %d bits, efficientnet_lite0 (offline ImageNet weights), %d iterations × %d samples",
             model, bits, config.iterations, config.num_samples)
    train(config, progress=None)
    checkpoint = out / "run" / "best.pt"
    stage("train", t)

    t = time.perf_counter()
    exported = export_checkpoint(checkpoint, out_dir=out, calib_count=16)
    if not exported.passed:
        raise FghError("the exported ONNX model does not match PyTorch (see the parity lines above)")
    onnx_path = exported.artifacts["onnx"]
    stage("export", t)

    t = time.perf_counter()
    database_folder = out / "database"
    # The index covers the database split only: link those images into their own folder.
    for sample in dataset.database:
        link = database_folder / sample.relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((dataset.root / sample.relpath).resolve())
    with OnnxEngine(onnx_path) as engine:
        log.info("Encode: %d database images with ONNX Runtime (%s)", len(dataset.database), engine.providers[0])
        summary = encode_folder(database_folder, engine, out / "index", workers=workers, progress=False)
        stage("encode", t)

        t = time.perf_counter()
        query_images = [dataset.root / s.relpath for s in dataset.query]
        query_codes = np.concatenate([
            engine.encode(np.stack([load_image(p, engine.preprocess).numpy() for p in query_images[i:i + 64]]))
            for i in range(0, len(query_images), 64)])
    with CodeIndex.open(out / "index") as index:
        label_of = {s.relpath: s.label for s in dataset.database}
        db_labels = np.array([label_of[p] for p in index.all_paths()])
        q_labels = np.array([s.label for s in dataset.query])
        metrics = evaluate_retrieval(query_codes, q_labels, np.asarray(index.codes), db_labels, topks=(10,))
        picks = np.linspace(0, len(query_images) - 1, min(report_queries, len(query_images))).astype(int)
        hits = search_codes(index, query_codes[picks], top_k=10)
        from .query import QueryResult

        results = [QueryResult(str(query_images[i]), h) for i, h in zip(picks, hits)]
        report = write_html_report(out / "report.html", results, index=index, title=f"fgh demo: {model} {bits} bits")
    stage("query+eval", t)

    result = DemoResult(out=out, data=root, model=model, bits=bits, map_all=metrics["map@all/index"],
                        map_tie_aware=metrics["map@all/expected"], chance_map=metrics["chance_map@all"],
                        precision_at_10=metrics["precision@10"], queries=len(query_images),
                        database=summary.images, stage_seconds=stages)
    result.artifacts = {"checkpoint": str(checkpoint), "onnx": str(onnx_path), "index": str(out / "index"),
                        "report": str(report), "metrics": str(out / "run" / "metrics.jsonl")}
    q = shlex.quote
    result.next_commands = [
        f"fgh query {q(str(query_images[0]))} --index {q(str(out / 'index'))} --html {q(str(out / 'query.html'))}",
        f"fgh eval {q(str(checkpoint))}",
        f"fgh export {q(str(checkpoint))} --fp16",
        f"fgh train --data {q(str(root))} --model agmh --bits 48 --preset fast --out runs/agmh48",
    ]
    from .utils import atomic_write

    atomic_write(out / DEMO_MARKER, lambda f: f.write(json.dumps(result.to_dict(), indent=2).encode()))
    return result
