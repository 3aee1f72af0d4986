"""``fgh demo``: the whole main job on a laptop CPU, offline, in minutes.

One stage function per step of the job, each what a user would run by hand, each logging its
line to stderr: data → train (fast preset, offline-pretrained EfficientNet-Lite0) → export to ONNX
with the parity check (logged by the exporter) → encode the database and the held-out queries
with the ONNX engine, each into an index as ``fgh encode`` does → query the database with the
query codes as ``fgh query`` does, evaluate, and write an HTML report. The result ends with mAP
next to the chance level.

Library imports sit inside the stages: ``fgh --help`` imports this module for its defaults and
should not pay for torch, ONNX Runtime and the trainer.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import FghError
from .utils import atomic_write, display_path, timed

if TYPE_CHECKING:
    from fgh_deploy.train.data import HashingDataset, Sample

    from .index import CodeIndex

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """What one demo run gives: the retrieval quality, the stage times and where everything is."""

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
        """The ``--json`` payload (and the content of ``demo.json``)."""
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
#: Neighbours per query in the metrics' precision@k and in the report.
TOP_K = 10


@dataclass(frozen=True)
class DemoOptions:
    """What the demo trains and shows (see :func:`run_demo` for each field)."""

    model: str = "semicon"
    bits: int = 32
    iterations: int = DEMO_ITERATIONS
    num_samples: int = DEMO_SAMPLES
    input_size: int = 160
    report_queries: int = 12
    workers: int = 1
    seed: int = 0


@dataclass(frozen=True)
class _Evaluation:
    """The query stage's outcome: the metrics, the query images in order, and the report file."""

    metrics: dict[str, float]
    queries: list[Path]
    report: Path


def run_demo(out: str | os.PathLike = "fgh-demo", *, data: str | os.PathLike | None = None, model: str = "semicon",
             bits: int = 32, iterations: int = DEMO_ITERATIONS, num_samples: int = DEMO_SAMPLES,
             input_size: int = 160, report_queries: int = 12, workers: int = 1, seed: int = 0) -> DemoResult:
    """Run the demo end to end into ``out`` (a fresh run each time: ``out`` is replaced).

    Args:
        out: output folder (run, ONNX model, indexes, report).
        data: dataset root (default: the embedded synthetic bird set, generated on first use).
        model, bits: what to train.
        iterations, num_samples: override the demo schedule (the test suite shortens it).
        input_size: crop size; 160 keeps a CPU run short (the demo images are 160 px).
        report_queries: queries shown in the HTML report.
        workers: decoding processes.
        seed: training seed.

    Returns:
        The metrics, stage times, artifacts and next commands (also written to ``out/demo.json``).

    Raises:
        FghError: ``out`` is not a folder an earlier demo made, or a stage fails (bad data, an
            ONNX model that does not match PyTorch, ...).
    """
    options = DemoOptions(model=model, bits=bits, iterations=iterations, num_samples=num_samples,
                          input_size=input_size, report_queries=report_queries, workers=workers, seed=seed)
    out = Path(out)
    _claim_out_folder(out)
    seconds: dict[str, float] = {}
    with timed(seconds, "data"):
        dataset = _load_data(data)
    with timed(seconds, "train"):
        checkpoint = _train(dataset, out / "run", options)
    with timed(seconds, "export"):
        onnx_path = _export(checkpoint, out)
    with timed(seconds, "encode"):
        database_images = _encode(dataset, onnx_path, out, options.workers)
    with timed(seconds, "query+eval"):
        evaluation = _query_and_evaluate(dataset, out, options)
    metrics = evaluation.metrics
    result = DemoResult(
        out=out, data=dataset.root, model=model, bits=bits, map_all=metrics["map@all/index"],
        map_tie_aware=metrics["map@all/expected"], chance_map=metrics["chance_map@all"],
        precision_at_10=metrics[f"precision@{TOP_K}"], queries=len(evaluation.queries), database=database_images,
        stage_seconds={stage: round(s, 1) for stage, s in seconds.items()},
        artifacts={"checkpoint": str(checkpoint), "onnx": str(onnx_path), "index": str(out / "index"),
                   "report": str(evaluation.report), "metrics": str(out / "run" / "metrics.jsonl")},
        next_commands=_next_commands(out, dataset.root, checkpoint, evaluation.queries[0]))
    atomic_write(out / DEMO_MARKER, lambda f: f.write(json.dumps(result.to_dict(), indent=2).encode()))
    return result


def _claim_out_folder(out: Path) -> None:
    """Empty ``out`` for a new run and mark it as the demo's.

    Replacing a folder deletes it: only a real folder that an earlier demo marked as its own
    (or an empty one) is replaced. The mark is written before the first stage, so that a demo
    stopped halfway can still be replaced by the next.
    """
    if out.is_symlink():
        raise FghError(f"{display_path(out)}: is a symbolic link; give the folder itself as --out")
    if out.exists():
        if not out.is_dir():
            raise FghError(f"{display_path(out)}: exists and is not a folder; choose another --out")
        if not (out / DEMO_MARKER).is_file() and any(out.iterdir()):
            raise FghError(f"{display_path(out)}: exists and is not an earlier fgh demo; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / DEMO_MARKER).write_text(json.dumps({"schema_version": 1, "complete": False}) + "\n")


def _load_data(data: str | os.PathLike | None) -> HashingDataset:
    """The dataset at ``data``, or the embedded synthetic birds (generated into the cache on first use)."""
    from fgh_deploy.train.data import load_dataset

    from .demo_data import demo_dataset_path

    dataset = load_dataset(Path(data) if data else demo_dataset_path())
    log.info("Data: %s (%s): %d classes, %d database, %d query images", dataset.root, dataset.layout,
             len(dataset.classes), len(dataset.database), len(dataset.query))
    return dataset


def _train(dataset: HashingDataset, run: Path, options: DemoOptions) -> Path:
    """Train on the database split into ``run`` with the fast preset, shortened; returns ``best.pt``.

    EfficientNet-Lite0's ImageNet weights ship in a package, so the demo needs no network.
    """
    from fgh_deploy.train.config import make_config
    from fgh_deploy.train.trainer import train

    iterations = options.iterations
    config = make_config("fast", data=str(dataset.root), model=options.model, bits=options.bits, out=str(run),
                         backbone="efficientnet_lite0", pretrained=True, input_size=options.input_size,
                         workers=options.workers, seed=options.seed, iterations=iterations,
                         num_samples=options.num_samples, lr_steps=[max(1, iterations * 3 // 4)],
                         eval_every=max(1, iterations // 4))
    log.info("Train: %s, %d bits, efficientnet_lite0 (offline ImageNet weights), %d iterations × %d samples",
             options.model, options.bits, config.iterations, config.num_samples)
    train(config, progress=None)
    return run / "best.pt"


def _export(checkpoint: Path, out: Path) -> Path:
    """Export ``checkpoint`` to ONNX in ``out`` (the exporter logs its stages); returns the ONNX file.

    Raises:
        FghError: the ONNX model's codes disagree with PyTorch's (the parity check).
    """
    from fgh_deploy.export.pipeline import export_checkpoint

    exported = export_checkpoint(checkpoint, out_dir=out, calib_count=16)
    if not exported.passed:
        raise FghError("the exported ONNX model does not match PyTorch (see the parity lines above)")
    return Path(exported.artifacts["onnx"])


def _encode(dataset: HashingDataset, onnx_path: Path, out: Path, workers: int) -> int:
    """Encode the database split into ``out/index`` and the query split into ``out/query-index``.

    Both go through :func:`~fgh_deploy.encode.encode_folder`, the decoding and batching of
    ``fgh encode``. The database index is what the report searches; the query index holds the
    codes the metrics need. Returns the number of database images.
    """
    from fgh_deploy.engines.onnx_engine import OnnxEngine

    from .encode import encode_folder

    with OnnxEngine(onnx_path) as engine:
        log.info("Encode: %d database and %d query images with ONNX Runtime (%s)", len(dataset.database),
                 len(dataset.query), engine.providers[0])
        database = encode_folder(_link_split(dataset, dataset.database, out / "database"), engine, out / "index",
                                 workers=workers, progress=False)
        encode_folder(_link_split(dataset, dataset.query, out / "queries"), engine, out / "query-index",
                      workers=workers, progress=False)
    return database.images


def _link_split(dataset: HashingDataset, samples: Sequence[Sample], folder: Path) -> Path:
    """A folder of links to ``samples`` (at their relative paths): an index covers one split only."""
    for sample in samples:
        link = folder / sample.relpath
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to((dataset.root / sample.relpath).resolve())
    return folder


def _query_and_evaluate(dataset: HashingDataset, out: Path, options: DemoOptions) -> _Evaluation:
    """Rank the database for every query code, score the rankings, and report a few queries in HTML.

    The report's queries are spread evenly over the query split and searched with
    :func:`~fgh_deploy.query.search_codes`, which ``fgh query`` uses.
    """
    from fgh_deploy.train.metrics import evaluate_retrieval

    from .index import CodeIndex
    from .query import QueryResult, search_codes
    from .report import write_html_report

    with CodeIndex.open(out / "index") as database, CodeIndex.open(out / "query-index") as query_index:
        queries, query_codes = _in_split_order(dataset.query, query_index)
        metrics = evaluate_retrieval(query_codes, np.array([s.label for s in queries]), np.asarray(database.codes),
                                     _labels_in_index_order(dataset.database, database), topks=(TOP_K,))
        log.info("Query: %d queries × %d database images: mAP@all %.4f (chance %.4f)", len(queries), len(database),
                 metrics["map@all/index"], metrics["chance_map@all"])
        picks = np.linspace(0, len(queries) - 1, min(options.report_queries, len(queries))).astype(int)
        hits = search_codes(database, query_codes[picks], top_k=TOP_K)
        shown = [QueryResult(str(dataset.root / queries[i].relpath), h) for i, h in zip(picks, hits)]
        report = write_html_report(out / "report.html", shown, index=database,
                                   title=f"fgh demo: {options.model} {options.bits} bits")
    return _Evaluation(metrics, [dataset.root / s.relpath for s in queries], Path(report))


def _in_split_order(samples: Sequence[Sample], index: CodeIndex) -> tuple[list[Sample], np.ndarray]:
    """The samples ``index`` holds, in split order, and their packed codes in that order.

    An image the encoder skipped (unreadable) is left out, as it is from the database.
    """
    row_of = {path: row for row, path in enumerate(index.all_paths())}
    kept = [s for s in samples if s.relpath in row_of]
    return kept, np.asarray(index.codes)[[row_of[s.relpath] for s in kept]]


def _labels_in_index_order(samples: Sequence[Sample], index: CodeIndex) -> np.ndarray:
    """The class of every image in ``index``, row by row (the index orders images as it found them)."""
    label_of = {s.relpath: s.label for s in samples}
    return np.array([label_of[path] for path in index.all_paths()])


def _next_commands(out: Path, root: Path, checkpoint: Path, query: Path) -> list[str]:
    """What to try after the demo, shell-quoted: query by image, evaluate, export FP16, train another model."""
    q = shlex.quote
    return [
        f"fgh query {q(str(query))} --index {q(str(out / 'index'))} --html {q(str(out / 'query.html'))}",
        f"fgh eval {q(str(checkpoint))}",
        f"fgh export {q(str(checkpoint))} --fp16",
        f"fgh train --data {q(str(root))} --model agmh --bits 48 --preset fast --out runs/agmh48",
    ]
