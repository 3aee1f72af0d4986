"""The ``fgh`` command line: each command parses options, calls one library function, prints.

Results go to stdout (a table, or JSON with ``--json``); progress and logs go to stderr. A
:class:`~fgh_deploy.errors.FghError` becomes one line on stderr and a non-zero exit code; any other
exception is a bug and keeps its traceback. Nothing printed is read as Rich markup (a file may be
called ``photo [copy].jpg``), and every path and user string passes through
:mod:`fgh_deploy.display` (a file name may hold escape sequences).
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .demo import DEMO_ITERATIONS, DEMO_SAMPLES
from .errors import FghError
from .utils import display_path, parse_int_list, terminal_safe
from .version import __version__

app = typer.Typer(
    name="fgh",
    help="Fine-grained image hashing: train, export, encode, query.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_show_locals=False,
)
stdout = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)

JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
IndexOption = Annotated[str, typer.Option("--index", "-i", help="Index from fgh encode: a folder, "
                                          "milvus://HOST[:PORT]/COLLECTION, milvus+https://… or FILE.db#COLLECTION.")]
BitsOption = Annotated[int, typer.Option("--bits", "-b", min=1, help="Code length in bits.")]
InputSizeOption = Annotated[int, typer.Option("--input-size", min=32, help="Square input size in pixels.")]


def _print_json(payload: Any) -> None:
    # ensure_ascii keeps undecodable file-name bytes (lone surrogates, os.fsdecode) as \udcXX escapes,
    # which json.loads and os.fsencode turn back into the original bytes.
    sys.stdout.write(json.dumps(payload, indent=2, ensure_ascii=True) + "\n")


class _TerminalSafeFormatter(logging.Formatter):
    """Log messages with control characters escaped (tracebacks keep their lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        return terminal_safe(super().formatMessage(record))


@app.callback(invoke_without_command=True)
def _root(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging on stderr.")] = False,
    version: Annotated[bool, typer.Option("--version", help="Print the version and exit.")] = False,
) -> None:
    if version:
        stdout.print(f"fgh {__version__}")
        raise typer.Exit()
    if ctx.invoked_subcommand is None:
        stdout.print(ctx.get_help())
        raise typer.Exit()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_TerminalSafeFormatter("%(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # Third-party libraries log their internals at INFO (e.g. onnxscript's graph rewrites).
    for noisy in ("onnxscript", "onnx_ir", "torch", "urllib3", "PIL"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose else logging.WARNING)


@app.command()
def models(
    bits: BitsOption = 48,
    input_size: InputSizeOption = 224,
    model: Annotated[list[str] | None, typer.Option("--model", "-m", help="Only these models.")] = None,
    backbone: Annotated[list[str] | None, typer.Option("--backbone", help="Only these backbones.")] = None,
    as_json: JsonOption = False,
) -> None:
    """List the hashing models × backbones with parameters and GMACs at the input size."""
    from .summary import summarize_all

    rows = summarize_all(bits, input_size, model, backbone)
    if as_json:
        _print_json({"schema_version": 1, "models": [r.to_dict() for r in rows]})
        return
    table = Table(title=f"fgh models at {bits} bits, {input_size}×{input_size} input")
    table.add_column("model", no_wrap=True)
    table.add_column("backbone", no_wrap=True)
    for column in ("params (M)", "deployed params (M)", "GMACs"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in rows:
        table.add_row(r.model, r.backbone, f"{r.params / 1e6:.1f}", f"{r.inference_params / 1e6:.1f}", f"{r.gmacs:.2f}")
    stdout.print(table)
    seen: dict[str, str] = {r.model: f"{r.summary}. {r.paper}" for r in rows}
    for name, text in seen.items():
        stdout.print(f"  {name:8s} {text}", soft_wrap=True)
    err.print("Build one in Python: fgh_deploy.build_model(name, bits, backbone=..., pretrained=True)", soft_wrap=True)


EngineOption = Annotated[Path, typer.Option(
    "--engine", "--model", "-m", help="Engine or checkpoint: .pt (PyTorch), .onnx (ONNX Runtime), .engine (TensorRT).",
    dir_okay=False)]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu or cuda[:N] (PyTorch engines).")]
AllowOtherGpuOption = Annotated[bool, typer.Option(
    "--allow-other-gpu", help="Run a TensorRT engine built on another GPU model or MIG slice of the same "
                              "architecture (by default it is refused: plans are tuned for one GPU model).")]
SearchDeviceOption = Annotated[str, typer.Option(
    "--search-device", help="Where the Hamming search runs: cpu, or cuda[:N] (codes copied to the GPU).")]
MilvusIndexTypeOption = Annotated[str | None, typer.Option(
    "--milvus-index", help="Vector index of a new Milvus collection: bin_flat (exact, the default) or bin_ivf_flat "
    "(approximate, for billions of codes; not in Milvus Lite).")]
MilvusNlistOption = Annotated[int | None, typer.Option("--milvus-nlist", min=1, help="bin_ivf_flat clusters (1024).")]
MilvusNprobeOption = Annotated[int | None, typer.Option(
    "--milvus-nprobe", min=1, help="bin_ivf_flat clusters scanned per query (16), recorded with the collection.")]
MilvusShardsOption = Annotated[int | None, typer.Option(
    "--milvus-shards", min=1, help="Milvus shards of a new collection (1).")]


def _milvus_options(index_type: str | None, nlist: int | None, nprobe: int | None, shards: int | None) -> Any:
    """A MilvusIndexOptions when any --milvus-* option was given, else None."""
    from .milvus_index import MilvusIndexOptions

    given = {name: value for name, value in
             (("index_type", index_type), ("nlist", nlist), ("nprobe", nprobe), ("shards", shards)) if value is not None}
    return MilvusIndexOptions(**given) if given else None


GpuDecodeOption = Annotated[bool | None, typer.Option(
    "--gpu-decode/--cpu-decode",
    help="Decode JPEGs with nvJPEG on the engine's GPU, or with Pillow in the workers (default: GPU when the "
         "engine runs on CUDA and fewer than 3 workers decode; more Pillow workers are faster).")]


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


@app.command()
def encode(
    folder: Annotated[Path, typer.Argument(help="Image folder (searched recursively).")],
    engine: EngineOption,
    out: Annotated[str, typer.Option("--out", "-o", help="Index (created or resumed): a folder, "
                                     "milvus://HOST[:PORT]/COLLECTION, milvus+https://… or FILE.db#COLLECTION.")],
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Decoding processes.")] = None,
    rebuild: Annotated[bool, typer.Option(
        "--rebuild", help="Build a new index; it replaces the one at --out only once complete.")] = False,
    follow_links: Annotated[bool, typer.Option(
        "--follow-links", help="Descend into symlinked folders (by default they are listed as skipped).")] = False,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    gpu_decode: GpuDecodeOption = None,
    shard: Annotated[str | None, typer.Option(
        "--shard", help="K/N: encode only shard K of N (by path hash), so N workers fill one Milvus collection.")] = None,
    milvus_index: MilvusIndexTypeOption = None,
    milvus_nlist: MilvusNlistOption = None,
    milvus_nprobe: MilvusNprobeOption = None,
    milvus_shards: MilvusShardsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Encode an image folder into packed bit codes (resumable; unreadable images are skipped and listed)."""
    from fgh_deploy.engines import load_engine

    from .encode import SKIPPED_LOG, encode_folder
    from .index_uri import is_milvus
    from .milvus_index import parse_shard

    shard_of = None if shard is None else parse_shard(shard)
    with load_engine(engine, device=device, allow_other_gpu=allow_other_gpu) as eng:
        summary = encode_folder(folder, eng, out, batch_size=batch_size, workers=workers, rebuild=rebuild,
                                progress=None if not as_json else False, gpu_decode=gpu_decode,
                                follow_links=follow_links, shard=shard_of,
                                milvus_options=_milvus_options(milvus_index, milvus_nlist, milvus_nprobe, milvus_shards))
    if as_json:
        _print_json(summary.to_dict())
        return
    for s in summary.skipped[:20]:
        err.print(f"skipped {display_path(s['path'])}: {terminal_safe(s['reason'])}", soft_wrap=True)
    if len(summary.skipped) > 20:
        err.print(f"... and {len(summary.skipped) - 20} more", soft_wrap=True)
    table = Table(title=f"fgh encode → {display_path(out)}" + (f" (shard {shard})" if shard else ""),
                  show_header=False)
    table.add_column(justify="right")
    table.add_column()
    rows = [
        ("images", f"{summary.images} ({summary.encoded} encoded, {summary.reused} already indexed, "
                   f"{summary.removed} removed)"),
        ("skipped", f"{len(summary.skipped)}"
         + (f" (listed in {display_path(Path(out) / SKIPPED_LOG)})" if summary.skipped and not is_milvus(out)
            else "")),
        ("bits", str(summary.bits)),
        ("index size", _human_bytes(summary.index_bytes)),
        ("elapsed", f"{summary.seconds:.1f} s"),
        ("throughput", f"{summary.images_per_second:.1f} images/s"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    stdout.print(table)
    err.print(f"Next: fgh query IMAGE.jpg --index {shlex.quote(display_path(out))}", soft_wrap=True)


@app.command()
def query(
    images: Annotated[list[Path], typer.Argument(help="Query image(s).")],
    index: IndexOption,
    engine: Annotated[Path | None, typer.Option(
        "--engine", "--model", "-m", help="Engine or checkpoint (default: the one that built the index).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 10,
    radius: Annotated[int | None, typer.Option("--radius", "-r", min=0, help="All hits within this distance (capped at --top-k).")] = None,
    html: Annotated[Path | None, typer.Option("--html", help="Also write a self-contained HTML report with thumbnails.")] = None,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    search_device: SearchDeviceOption = "cpu",
    as_json: JsonOption = False,
) -> None:
    """Find the nearest images by exact Hamming distance (ties: database order, or path in Milvus)."""
    from fgh_deploy.engines import load_engine

    from .query import default_engine_path, open_index, results_json, search_images

    with open_index(index) as idx, load_engine(engine or default_engine_path(idx), device=device,
                                                  allow_other_gpu=allow_other_gpu) as eng:
        results = search_images(idx, eng, images, top_k=top_k, radius=radius, search_device=search_device)
        bits, total = idx.bits, len(idx)
        payload = results_json(str(index), idx, results, top_k=top_k, radius=radius)
        if html is not None:
            from .report import write_html_report

            write_html_report(html, results, index=idx)
            err.print(f"Report: {display_path(html)}", soft_wrap=True)
    if as_json:
        _print_json(payload)
        return
    for result in results:
        stdout.print(f"{display_path(result.query)}: {len(result.hits)} hits of {total} ({bits} bits)", soft_wrap=True)
        table = Table()
        table.add_column("rank", justify="right")
        table.add_column("distance", justify="right")
        table.add_column("path", overflow="fold")
        for hit in result.hits:
            table.add_row(str(hit.rank), str(hit.distance), display_path(hit.path))
        stdout.print(table)


def _with_train_config_options(command: Any) -> Any:
    """Give ``command`` one option per :class:`TrainConfig` field, and ``--set`` for those without one.

    Typer reads a command's options from its signature, so they are written into it from the
    fields: each option's names and help are declared next to its field (``train.config.TRAIN_OPTIONS``);
    every value reaches ``command`` as typed (a string, a switch's bool, a repeated option's list)
    and :func:`~fgh_deploy.train.config.command_line_values` converts it by the field's type.
    """
    import inspect

    from fgh_deploy.train.config import TRAIN_OPTIONS

    def keyword(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)

    parameters = []
    for option in TRAIN_OPTIONS.values():
        if not option.own_option:
            continue
        if option.kind == "switch":
            names = (f"{option.flags[0]}/{option.off}", *option.flags[1:])
            switch = Annotated[bool | None, typer.Option(*names, help=option.help)]
            parameters.append(keyword(option.name, switch, None))
            continue
        received = list[str] | None if option.kind == "pairs" else str | None
        parameters.append(keyword(option.name, Annotated[received, typer.Option(
            *option.flags, help=option.help, metavar=option.metavar)], option.cli_default))
        if option.off_name:
            parameters.append(keyword(option.off_name, Annotated[bool, typer.Option(option.off, help=option.off_help)],
                                      False))
    settable = ", ".join(option.name for option in TRAIN_OPTIONS.values() if not option.own_option)
    assignments = Annotated[list[str] | None, typer.Option(
        "--set", metavar="FIELD=VALUE", help=f"Set a train config field without an option of its own: {settable} "
                                             f"(repeatable).")]
    parameters.append(keyword("assignments", assignments, None))
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.kind != p.VAR_KEYWORD]
    command.__signature__ = inspect.Signature([*parameters, *own])
    return command


@app.command()
@_with_train_config_options
def train(
    *,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out after its last completed iteration (--iterations may extend it).")] = False,
    as_json: JsonOption = False,
    **options: Any,
) -> None:
    """Train a hashing model with ADSH asymmetric hashing (writes last.pt, best.pt, metrics.jsonl)."""
    from fgh_deploy.train.config import command_line_values, make_config, resume_config
    from fgh_deploy.train.trainer import train as run_training

    given = command_line_values(options, options.pop("assignments") or ())
    out = given.pop("out")
    if resume:
        config = resume_config(out, given)
    else:
        missing = [f"--{name}" for name in ("data", "model", "bits") if name not in given]
        if missing:
            raise FghError(f"fgh train needs {', '.join(missing)} (or --resume --out RUN)")
        config = make_config(given.pop("preset", "paper"), out=out, **given)
    result = run_training(config, resume=resume, progress=None if not as_json else False)
    if not result.is_main:
        return
    payload = {"schema_version": 1, "out": str(result.out), "iterations": result.iterations,
               "best_iteration": result.best_iteration + 1, "best_map": result.best_map, "last_map": result.last_map,
               "selected_on": result.selected_on, "seconds": round(result.seconds, 1)}
    if as_json:
        _print_json(payload)
        return
    err.print(f"Done in {result.seconds:.0f} s: best mAP {result.best_map:.4f} on {result.selected_on} at iteration "
              f"{result.best_iteration + 1}; checkpoints in {display_path(result.out)}", soft_wrap=True)
    err.print(f"Next: fgh eval {shlex.quote(display_path(result.out / 'best.pt'))}", soft_wrap=True)


@app.command(name="eval")
def eval_(
    checkpoint: Annotated[Path | None, typer.Argument(
        help="Checkpoint from fgh train; with --index, the engine or checkpoint to query with (default: the "
             "index's).", show_default=False)] = None,
    index: Annotated[str | None, typer.Option(
        "--index", "-i", help="Evaluate this index instead (a folder, milvus://HOST[:PORT]/COLLECTION, "
                              "milvus+https://… or FILE.db#COLLECTION): its own images as queries, each left out.",
        show_default=False)] = None,
    queries: Annotated[int, typer.Option("--queries", min=2, help="With --index: how many of its images query.")] = 1000,
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset root (default: the training data).")] = None,
    top_k: Annotated[list[int] | None, typer.Option(
        "--top-k", help="Cut-offs for mAP@k and precision@k (default 100 and 1000; 10 and 100 with --index).")] = None,
    radius: Annotated[int, typer.Option("--radius", min=0)] = 2,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 2,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    baselines: Annotated[bool, typer.Option(
        "--baselines", help="Also LSH and ITQ codes and float cosine on the backbone's pretrained features.")] = False,
    as_json: JsonOption = False,
) -> None:
    """mAP and precision of a checkpoint (the papers' asymmetric protocol and the deployed one), or of an index."""
    if index is not None:
        _eval_index(index, checkpoint, queries=queries, top_k=top_k, device=device, allow_other_gpu=allow_other_gpu,
                    as_json=as_json, dataset_options=data is not None or baselines)
        return
    if checkpoint is None:
        raise FghError("fgh eval needs a checkpoint (fgh eval RUN/best.pt) or an index (fgh eval --index NAME)")
    from fgh_deploy.train.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(checkpoint, data, topks=tuple(top_k or (100, 1000)), radius=radius,
                                 device=device, workers=workers, baselines=baselines)
    if as_json:
        _print_json(report)
        return
    protocols = dict(report["protocols"])
    columns = {"lsh": "LSH", "itq": "ITQ", "cosine": "float cosine"}
    for name, label in columns.items():
        if name in report.get("baselines", {}):
            protocols[label] = report["baselines"][name]
    stdout.print(f"fgh eval {display_path(checkpoint)}: {report['model']['model']} {report['model']['bits']} bits, "
                 f"{report['data']['query']} queries × {report['data']['database']} database", soft_wrap=True)
    table = Table()
    table.add_column("metric")
    for name in protocols:
        table.add_column(name, justify="right")
    first = next(iter(protocols.values()))
    keys = [("map@all/index", "mAP@all (ties: database order)"), ("map@all/expected", "mAP@all tie-aware"),
            ("map@all/best", "  best tie order"), ("map@all/worst", "  worst tie order")]
    keys += [(k, k.replace("map", "mAP").replace("precision", "P")) for k in first
             if k.startswith(("map@", "precision@", "recall@")) and not k.startswith("map@all")]
    keys += [("chance_map@all", "chance mAP@all"), ("distinct_distances", "distinct distances")]
    for key, label in keys:
        table.add_row(label, *[_fmt(p.get(key)) for p in protocols.values()])
    stdout.print(table)
    for name, p in report["protocols"].items():
        stdout.print(f"  {name}: {p['description']}", soft_wrap=True)
    if "baselines" in report:
        stdout.print(f"  baselines: {report['baselines']['description']}", soft_wrap=True)
    selection = report.get("selection") or {}
    if selection:
        stdout.print(f"  checkpoint chosen on the {selection.get('split')} split "
                     f"(iteration {int(selection.get('best_iteration', -1)) + 1})", soft_wrap=True)


def _eval_index(index: str, engine: Path | None, *, queries: int, top_k: list[int] | None, device: str,
                allow_other_gpu: bool, as_json: bool, dataset_options: bool) -> None:
    from fgh_deploy.train.evaluate import evaluate_index

    if dataset_options:
        raise FghError("--data and --baselines evaluate a checkpoint on a dataset; an --index brings its own images")
    report = evaluate_index(index, engine, queries=queries, topks=tuple(top_k or (10, 100)), device=device,
                            allow_other_gpu=allow_other_gpu)
    if as_json:
        _print_json(report)
        return
    stdout.print(f"fgh eval --index {display_path(index)}: {report['queries']} of its images as queries "
                 f"({report['classes']} classes) against the other {report['database']}", soft_wrap=True)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in report:
        if key.startswith(("map@", "precision@")):
            table.add_row(key.replace("map", "mAP").replace("precision", "P"), _fmt(report[key]))
    table.add_row("chance P", _fmt(report["chance_precision"]))
    table.add_row("own code found at d=0", _fmt(report["self_at_distance_0"]))
    stdout.print(table)
    stdout.print(f"  engine: {display_path(report['engine'].get('path', '?'))}; ties: {report['tie_rule']}"
                 + (f"; APPROXIMATE: {report['approximate']}" if report["approximate"] else ""), soft_wrap=True)
    stdout.print(f"  {report['description']}", soft_wrap=True)


@app.command(name="export")
def export_(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (.pt) to export.")],
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Where artefacts go (default: next to the checkpoint).")] = None,
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write an FP16 ONNX graph (FP32 islands kept) and check it.")] = False,
    trt: Annotated[bool, typer.Option("--trt", help="Build a TensorRT engine (needs TensorRT and a GPU).")] = False,
    precision: Annotated[str, typer.Option("--precision", help="TensorRT engine precision: fp16 or fp32.")] = "fp16",
    calib: Annotated[Path | None, typer.Option("--calib", help="Image folder for the parity checks (default: built-in images).")] = None,
    calib_count: Annotated[int, typer.Option("--calib-count", min=1)] = 32,
    batch: Annotated[str, typer.Option("--batch", help="TensorRT profile MIN,OPT,MAX batch.")] = "1,16,64",
    workspace: Annotated[float, typer.Option("--workspace", help="TensorRT workspace limit in GiB.")] = 2.0,
    opt_level: Annotated[int, typer.Option("--opt-level", min=0, max=5, help="TensorRT builder optimisation level.")] = 3,
    dla_core: Annotated[int | None, typer.Option("--dla-core", min=0, help="Build for this DLA core, GPU fallback (Jetson).")] = None,
    timing_cache: Annotated[Path | None, typer.Option("--timing-cache", help="TensorRT timing cache file (reused).")] = None,
    min_agreement: Annotated[float, typer.Option("--min-agreement", help="Fail when bit agreement falls below this.")] = 0.995,
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint to ONNX (and FP16 ONNX, TensorRT), checking codes against PyTorch."""
    from fgh_deploy.export.pipeline import export_checkpoint
    from fgh_deploy.export.tensorrt import TrtBuildOptions

    profile = parse_int_list(batch, "--batch")
    if len(profile) != 3:
        raise FghError(f"--batch expects MIN,OPT,MAX, got '{terminal_safe(batch)}'")
    # Checked even without --trt, so a bad option fails before the ONNX stages run.
    trt_options = TrtBuildOptions(precision=precision, batch=profile, workspace_gib=workspace,
                                  optimization_level=opt_level, dla_core=dla_core, timing_cache=timing_cache)
    result = export_checkpoint(checkpoint, out_dir=out_dir, fp16=fp16, trt_options=trt_options if trt else None,
                               calib=calib, calib_count=calib_count, min_agreement=min_agreement)
    if as_json:
        _print_json(result.to_dict())
    if not result.passed:
        failed = [p.name for p in result.parity if not p.passed]
        raise FghError(f"parity check failed ({'; '.join(failed)}): bit agreement below {min_agreement:.2%}")
    if result.skipped:
        from .errors import BackendUnavailableError

        raise BackendUnavailableError("; ".join(f"{stage} not built: {why}" for stage, why in result.skipped.items()))


MaxBatchOption = Annotated[int, typer.Option("--max-batch", min=1, help="Most images per engine call (1: no batching).")]
MaxWaitOption = Annotated[float, typer.Option(
    "--max-wait-ms", min=0, help="How long the engine waits for more images once one arrived.")]


@app.command()
def serve(
    index: IndexOption,
    engine: Annotated[Path | None, typer.Option(
        "--engine", "--model", "-m", help="Engine or checkpoint (default: the one that built the index).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind (loopback unless told otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535)] = 8000,
    token: Annotated[str | None, typer.Option(
        "--token", envvar="FGH_SERVE_TOKEN", show_envvar=True,
        help="Bearer token required by /search*, /images and /metrics.")] = None,
    max_batch: MaxBatchOption = 16,
    max_wait_ms: MaxWaitOption = 5.0,
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", min=0.001, help="Largest request body (413 above).")] = 32.0,
    max_k: Annotated[int, typer.Option("--max-k", min=1, help="Largest k a request may ask for (422 above).")] = 1000,
    timeout: Annotated[float, typer.Option("--timeout", min=0.001, help="Seconds to receive a body, and to answer.")] = 30.0,
    decode_threads: Annotated[int | None, typer.Option("--decode-threads", min=1, help="Threads decoding uploads.")] = None,
    reload_seconds: Annotated[float, typer.Option(
        "--reload-seconds", min=0.001, help="How often the index is checked for new commits.")] = 1.0,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    search_device: SearchDeviceOption = "cpu",
    access_log: Annotated[bool, typer.Option("--access-log", help="Log one line per request.")] = False,
) -> None:
    """Serve search by image over HTTP: warm engine, dynamic batching, live index, metrics, a search page."""
    from .serve import ServeOptions, serve as run_server

    options = ServeOptions(max_batch=max_batch, max_wait_ms=max_wait_ms, token=token,
                           max_upload_bytes=int(max_upload_mb * 2**20), max_k=max_k,
                           request_timeout_s=timeout, reload_seconds=reload_seconds, decode_threads=decode_threads,
                           search_device=search_device)
    run_server(index, engine, host=host, port=port, device=device, allow_other_gpu=allow_other_gpu, options=options,
               access_log=access_log)


@app.command()
def doctor(as_json: JsonOption = False) -> None:
    """Versions of torch, CUDA, cuDNN, ONNX Runtime, TensorRT; the GPU; what fgh export --trt would do."""
    from .doctor import diagnose

    report = diagnose()
    if as_json:
        _print_json(report)
        return
    t, o, r = report["torch"], report["onnxruntime"], report["tensorrt"]
    table = Table(title=f"fgh doctor ({report['platform']}, Python {report['python']})", show_header=False)
    table.add_column(justify="right", style="bold")
    table.add_column(overflow="fold")
    table.add_row("fgh", report["fgh"])
    table.add_row("torch", f"{t['version']} (CUDA build {t['cuda_build'] or 'none'}, "
                           f"cuDNN {t['cudnn'] or 'none'}, CUDA available: {t['cuda_available']})")
    for gpu in t["gpus"]:
        table.add_row(f"GPU {gpu['index']}", f"{gpu['name']}, compute capability {gpu['compute_capability']}, "
                                              f"{gpu['multiprocessors']} SMs, {gpu['memory_gib']} GiB")
    if not t["gpus"]:
        table.add_row("GPU", "none")
    table.add_row("onnxruntime", f"{o.get('version', o.get('error'))} "
                                 f"({', '.join(f'{k} {v}' for k, v in o['distributions'].items())})")
    table.add_row("ORT providers", f"working: {', '.join(o.get('working_providers', [])) or 'none'}; "
                                   f"built: {', '.join(o.get('built_providers', []))}")
    table.add_row("TensorRT", f"{r['version']} (API family {r['api_family']})" if r["available"] else "not available")
    table.add_row("export --trt", r["export_plan"])
    table.add_row("search (CPU)", f"{report['search']['cpu_kernel']}: {report['search']['note']}")
    stdout.print(table)
    for warning in o["warnings"]:
        err.print(f"WARNING: {warning}", soft_wrap=True)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (replaced on every run).")] = Path("fgh-demo"),
    data: Annotated[Path | None, typer.Option("--data", "-d", help="Dataset root (default: the embedded synthetic birds).")] = None,
    model: Annotated[str, typer.Option("--model", "-m")] = "semicon",
    bits: BitsOption = 32,
    iterations: Annotated[int, typer.Option("--iterations", min=1, help="Shorten or lengthen training.")] = DEMO_ITERATIONS,
    num_samples: Annotated[int, typer.Option("--num-samples", min=1, help="Images sampled per iteration.")] = DEMO_SAMPLES,
    input_size: InputSizeOption = 160,
    workers: Annotated[int, typer.Option("--workers", min=0)] = 1,
    as_json: JsonOption = False,
) -> None:
    """The whole main job offline: train, export to ONNX, encode, query, evaluate, HTML report."""
    from .demo import run_demo

    result = run_demo(out, data=data, model=model, bits=bits, iterations=iterations, num_samples=num_samples,
                      input_size=input_size, workers=workers)
    if as_json:
        _print_json(result.to_dict())
        return
    stdout.print(f"mAP@all {result.map_all:.4f} (tie-aware {result.map_tie_aware:.4f}) vs chance "
                 f"{result.chance_map:.4f}; precision@10 {result.precision_at_10:.4f} — {result.queries} queries × "
                 f"{result.database} database images, {result.model} {result.bits} bits", soft_wrap=True)
    stdout.print("Stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in result.stage_seconds.items()), soft_wrap=True)
    for name, path in result.artifacts.items():
        stdout.print(f"  {name:10s} {display_path(path)}", soft_wrap=True)
    stdout.print("Next:", soft_wrap=True)
    for command in result.next_commands:
        stdout.print(f"  {terminal_safe(command)}", soft_wrap=True)


index_app = typer.Typer(help="Copy indexes between fgh's local format and Milvus.", no_args_is_help=True)
app.add_typer(index_app, name="index")


@index_app.command("push")
def index_push_cmd(
    local: Annotated[Path, typer.Argument(help="Local index folder.")],
    uri: Annotated[str, typer.Argument(help="milvus://HOST[:PORT]/COLLECTION, milvus+https://… or FILE.db#COLLECTION.")],
    milvus_index: MilvusIndexTypeOption = None,
    milvus_nlist: MilvusNlistOption = None,
    milvus_nprobe: MilvusNprobeOption = None,
    milvus_shards: MilvusShardsOption = None,
) -> None:
    """Copy a local index into a Milvus collection (created if absent; rows upserted by path, so reruns are safe)."""
    from .milvus_index import push_index

    rows = push_index(local, _milvus_location(uri),
                      _milvus_options(milvus_index, milvus_nlist, milvus_nprobe, milvus_shards))
    stdout.print(f"pushed {rows} rows from {display_path(local)} to {terminal_safe(uri)}", soft_wrap=True)


@index_app.command("pull")
def index_pull_cmd(
    uri: Annotated[str, typer.Argument(help="milvus://HOST[:PORT]/COLLECTION, milvus+https://… or FILE.db#COLLECTION.")],
    local: Annotated[Path, typer.Argument(help="New local index folder.")],
) -> None:
    """Copy a Milvus collection into a new local index (rows in path order, Milvus's tie order)."""
    from .milvus_index import pull_index

    rows = pull_index(_milvus_location(uri), local)
    stdout.print(f"pulled {rows} rows from {terminal_safe(uri)} to {display_path(local)}", soft_wrap=True)


def _milvus_location(uri: str) -> Any:
    from .index_uri import MilvusLocation, parse_index_name

    location = parse_index_name(uri)
    if not isinstance(location, MilvusLocation):
        raise FghError(f"'{terminal_safe(uri)}' is not a Milvus name: milvus://HOST[:PORT]/COLLECTION, "
                       "milvus+https://… or FILE.db#COLLECTION")
    return location


bench_app = typer.Typer(help="Benchmarks: engine latency, search vs FAISS, end-to-end encode, the HTTP service.",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@bench_app.command("engine")
def bench_engine_cmd(
    engine: Annotated[Path, typer.Argument(help="Engine or checkpoint (.pt, .onnx, .engine).")],
    batch: Annotated[str, typer.Option("--batch", help="Batch sizes, comma-separated.")] = "1,8,32",
    iterations: Annotated[int, typer.Option("--iterations", min=1)] = 20,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 3,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    as_json: JsonOption = False,
) -> None:
    """Latency p50/p95/p99 and images/s per batch size."""
    from fgh_deploy.engines import load_engine

    from .bench import bench_engine

    with load_engine(engine, device=device, allow_other_gpu=allow_other_gpu) as eng:
        report = bench_engine(eng, batch_sizes=parse_int_list(batch, "--batch"), warmup=warmup, iterations=iterations)
    if as_json:
        _print_json(report)
        return
    stdout.print(f"fgh bench engine {display_path(engine)} ({report['engine']['kind']})", soft_wrap=True)
    table = Table()
    for column in ("batch", "p50 ms", "p95 ms", "p99 ms", "images/s"):
        table.add_column(column, justify="right")
    for r in report["results"]:
        lat = r["latency_ms"]
        table.add_row(str(r["batch_size"]), f"{lat['p50']:.2f}", f"{lat['p95']:.2f}", f"{lat['p99']:.2f}",
                      f"{r['images_per_second']:.1f}")
    stdout.print(table)


@bench_app.command("search")
def bench_search_cmd(
    n: Annotated[int, typer.Option("--n", min=1, help="Database codes.")] = 1_000_000,
    bits: Annotated[str, typer.Option("--bits", help="Code lengths, comma-separated.")] = "48,128",
    queries: Annotated[str, typer.Option("--queries", help="Query batch sizes, comma-separated.")] = "1,64",
    k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 10,
    repeats: Annotated[int, typer.Option("--repeats", min=1)] = 5,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Threads for both libraries.")] = None,
    search_device: SearchDeviceOption = "cpu",
    kernel: Annotated[str, typer.Option(
        "--kernel", help="Our CPU distance kernel: auto, compiled (the fused C loop) or numpy.")] = "auto",
    as_json: JsonOption = False,
) -> None:
    """Exact k-NN codes/s and latency, ours vs FAISS IndexBinaryFlat (when faiss is installed), same run."""
    from .bench import bench_search

    reports = [bench_search(n, b, queries=parse_int_list(queries, "--queries"), k=k, repeats=repeats, threads=threads,
                            device=search_device, kernel=kernel) for b in parse_int_list(bits, "--bits")]
    if as_json:
        _print_json({"schema_version": 1, "benchmark": "search", "reports": reports})
        return
    kernels = ", ".join(dict.fromkeys(report["ours"]["kernel"] for report in reports))
    stdout.print(f"fgh bench search: {n:,} random codes, k={k}, ours on {search_device} ({kernels})", soft_wrap=True)
    table = Table()
    for column in ("bits", "queries", "ours ms/query", "ours Mcodes/s", "FAISS Mcodes/s", "speed-up", "same results"):
        table.add_column(column, justify="right")
    for report in reports:
        for r in report["results"]:
            faiss = r.get("faiss") or {}
            table.add_row(str(report["bits"]), str(r["queries"]), f"{r['ours']['seconds_per_query'] * 1e3:.2f}",
                          f"{r['ours']['codes_per_second'] / 1e6:.0f}",
                          f"{faiss['codes_per_second'] / 1e6:.0f}" if faiss else "-",
                          f"{r['speedup_vs_faiss']:.2f}×" if r.get("speedup_vs_faiss") else "-",
                          "-" if r.get("same_distances") is None else str(r["same_distances"]))
    stdout.print(table)
    if not reports[0]["faiss"].get("available"):
        err.print(f"FAISS not compared: {reports[0]['faiss'].get('reason')}", soft_wrap=True)


@bench_app.command("encode")
def bench_encode_cmd(
    folder: Annotated[Path, typer.Argument(help="Image folder.")],
    engine: EngineOption,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1)] = 64,
    workers: Annotated[int | None, typer.Option("--workers", min=0)] = None,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Only the first N images.")] = None,
    device: DeviceOption = "auto",
    allow_other_gpu: AllowOtherGpuOption = False,
    gpu_decode: GpuDecodeOption = None,
    as_json: JsonOption = False,
) -> None:
    """End-to-end encode images/s with the time breakdown (decode wait, engine, pack, write)."""
    from fgh_deploy.engines import load_engine

    from .bench import bench_encode

    with load_engine(engine, device=device, allow_other_gpu=allow_other_gpu) as eng:
        report = bench_encode(folder, eng, batch_size=batch_size, workers=workers, limit=limit,
                              gpu_decode=gpu_decode)
    if as_json:
        _print_json(report)
        return
    stdout.print(f"{report['encoded']} images in {report['seconds']:.1f} s: {report['images_per_second']:.1f} "
                 f"images/s, {report['bytes_per_image']:.1f} bytes per indexed image", soft_wrap=True)
    stdout.print(f"  (after an untimed warm-up batch of {report['warmup_seconds']:.1f} s)", soft_wrap=True)
    for stage, seconds in report["timings"].items():
        stdout.print(f"  {stage:12s} {seconds:8.2f} s  {report['timing_fractions'].get(stage, 0):6.1%}", soft_wrap=True)
    per_image = report["image_seconds"]
    stdout.print(f"  per image, summed over {max(report['workers'], 1)} decoding process(es): decode "
                 f"{per_image['decode'] / max(report['encoded'], 1) * 1e3:.1f} ms, resize+crop "
                 f"{per_image['preprocess'] / max(report['encoded'], 1) * 1e3:.1f} ms", soft_wrap=True)


@bench_app.command("serve")
def bench_serve_cmd(
    index: IndexOption,
    engine: Annotated[Path | None, typer.Option(
        "--engine", "--model", "-m", help="Engine or checkpoint (default: the one that built the index).")] = None,
    clients: Annotated[str, typer.Option("--clients", help="Concurrent clients, comma-separated.")] = "1,4,16",
    seconds: Annotated[float, typer.Option("--seconds", min=1, max=600, help="Duration of each run.")] = 10.0,
    max_batch: MaxBatchOption = 16,
    max_wait_ms: MaxWaitOption = 5.0,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1)] = 10,
    url: Annotated[str | None, typer.Option(
        "--url", help="Load an already running server (as it is configured) instead of starting one.")] = None,
    token: Annotated[str | None, typer.Option("--token", envvar="FGH_SERVE_TOKEN", help="Bearer token for --url.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Load fgh serve over loopback: throughput, p50/p95/p99 latency, errors, mean batch; batched vs unbatched.

    Up to 32 of the index's own images (spread over its rows, or sampled from a Milvus collection) are the queries.
    """
    from .bench import bench_serve

    report = bench_serve(index, engine, clients=parse_int_list(clients, "--clients"), seconds=seconds,
                         max_batch=max_batch, max_wait_ms=max_wait_ms, top_k=top_k, url=url, token=token)
    if as_json:
        _print_json(report)
        return
    stdout.print(f"fgh bench serve: {report['queries']} query images from {display_path(index)}, "
                 f"{report['seconds']:g} s per run, k={top_k}", soft_wrap=True)
    table = Table()
    for column in ("mode", "clients", "req/s", "p50 ms", "p95 ms", "p99 ms", "errors", "batch"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in report["results"]:
        lat = r["latency_ms"]
        table.add_row(r["mode"], str(r["clients"]), f"{r['requests_per_second']:.1f}", _fmt_ms(lat["p50"]),
                      _fmt_ms(lat["p95"]), _fmt_ms(lat["p99"]), str(r["errors"]),
                      "-" if r["mean_batch_size"] is None else f"{r['mean_batch_size']:.2f}")
    stdout.print(table)
    stdout.print("  batch: mean images per engine call during the run", soft_wrap=True)


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        app(args=argv, prog_name="fgh")
    except FghError as exc:
        err.print(f"fgh: error: {terminal_safe(str(exc))}", soft_wrap=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # the file system said no (full disk, permissions, a vanished file): one line
        where = f"{display_path(exc.filename)}: " if exc.filename else ""
        err.print(f"fgh: error: {where}{terminal_safe(exc.strerror or str(exc))}", soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("fgh: interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
