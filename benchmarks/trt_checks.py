"""TensorRT and ONNX Runtime GPU checks for issue 16, for a lent GPU machine (``benchmarks/gpu_checks.sh trt``).

Usage: python benchmarks/trt_checks.py [CHECK ...] [--budget SECONDS] [--size PIXELS] [--work-dir DIR]

Each check runs in a process of its own under a time limit, so a hang or a crash inside TensorRT or
CUDA costs that check only, and prints one result line, ``PASS|FAIL|SKIP <check>: ...`` (details
before it are indented); a summary line ends the run. Exit status 1 when any check failed. Where
CUDA, TensorRT or an ONNX Runtime GPU provider is missing the checks print SKIP with the reason.
Models have random weights (the machine has no internet); ``--size`` is the input size of the
fp16-typing models (the others use the 64 px ADSH-32 of tests/test_tensorrt.py).

Checks, in order:
  graph-stress  CUDA-graph replays (batch 4) interleaved with plain launches (3/5/8) on one engine,
                every result against a plain engine's (max |diff| <= 1e-5)
  timing-cache  a second build loads the first one's timing cache; a corrupted cache file is replaced
  ort-cuda      ONNX Runtime's CUDA provider on cuda:0: its options, its codes against the CPU provider's
  ort-trt       two ONNX Runtime TensorRT-provider sessions: the engine cache makes the second fast
  fp16-typing   TensorRT 10.x only (issue 16, item 8): fgh's FP16 builder flag build vs a strongly typed
                build of the FP16 ONNX, bit agreement with ONNX Runtime FP32 and ms per batch
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

EXIT_SKIP = 5  # a check process's exit status for SKIP; 0 is PASS, anything else FAIL
MIN_CHECK_SECONDS = 20  # a check is not started with less of the budget left
TRT_LOGGER = "fgh_deploy.engines.trt_format"  # where fgh's TensorRT logger forwards TensorRT's messages
ORT_LOGGER = "fgh_deploy.engines.onnx_engine"
FINGERPRINT = "trt-checks"
TINY_SIZE = 64
WORKSPACE_GIB = 1.0


class Skip(Exception):
    """The check cannot run here; the message says why."""


class Failed(Exception):
    """The check ran and found a problem; the message says what."""


@dataclass(frozen=True)
class Context:
    """What a check gets: a work folder shared by the checks of one run, the fp16-typing input size, its deadline."""

    work: Path
    size: int
    deadline: float  # time.monotonic()

    def seconds_left(self) -> float:
        return self.deadline - time.monotonic()


def info(line: str) -> None:
    """A detail line of the running check (indented, so result lines stand out)."""
    print(f"  {line}", flush=True)


# --------------------------------------------------------------------------------------------
# Shared helpers


def require(*, tensorrt: bool = False) -> ModuleType | None:
    """Skip unless a CUDA GPU (and, when asked, TensorRT 10 or newer) is usable; returns tensorrt when asked."""
    import torch

    from fgh_deploy.engines.trt_format import import_tensorrt
    from fgh_deploy.errors import BackendUnavailableError

    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU (torch.cuda.is_available() is False)")
    trt = None
    if tensorrt:
        try:
            trt = import_tensorrt()
        except BackendUnavailableError as exc:
            # The ImportError behind fgh's install hint is the short reason.
            cause = exc.__cause__
            reasons.append(f"TensorRT is not importable ({type(cause).__name__}: {cause})" if cause else str(exc))
    if reasons:
        raise Skip("; ".join(reasons))
    return trt


class _ListHandler(logging.Handler):
    def __init__(self, level: int) -> None:
        super().__init__(level)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(" ".join(record.getMessage().split()))


@contextlib.contextmanager
def captured_log(name: str, level: int) -> Iterator[list[str]]:
    """The messages logged to logger ``name`` at ``level`` or above while the block runs."""
    logger = logging.getLogger(name)
    handler = _ListHandler(level)
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(min(level, logger.getEffectiveLevel()))
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def random_images(count: int, size: int, seed: int) -> Any:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), dtype=torch.uint8, generator=gen)


def onnx_metadata(model: Any) -> dict[str, Any]:
    """The fgh metadata export_onnx seals into the ONNX (what OnnxEngine needs)."""
    return {"model": model.config.to_dict(), "preprocess": model.preprocess.to_dict(), "fingerprint": FINGERPRINT}


def engine_header(model: Any) -> dict[str, Any]:
    """The caller's fields of an engine header for build_engine."""
    return {**onnx_metadata(model), "bits": model.config.bits, "checkpoint": "random weights (trt_checks.py)",
            "rebuild": "python benchmarks/trt_checks.py"}


def random_model(name: str, bits: int, size: int) -> Any:
    """A resnet18 hash model with seeded random weights, in eval mode."""
    import torch

    import fgh_deploy as fgh

    torch.manual_seed(0)
    return fgh.build_model(name, bits, backbone="resnet18", input_size=size).eval()


def tiny_adsh(ctx: Context) -> SimpleNamespace:
    """The ADSH-32 resnet18 64 px model of tests/test_tensorrt.py and its FP32 ONNX, exported once per work folder."""
    from fgh_deploy.export.onnx import export_onnx

    model = random_model("adsh", 32, TINY_SIZE)
    onnx_path = ctx.work / "adsh32.64px.onnx"
    if not onnx_path.is_file():
        export_onnx(model, onnx_path, metadata=onnx_metadata(model))
    return SimpleNamespace(model=model, onnx=onnx_path, header=engine_header(model))


def compare_codes(got: Any, want: Any) -> tuple[float, float]:
    """(fraction of code bits whose sign agrees, max |difference|)."""
    import numpy as np

    return float(((got >= 0) == (want >= 0)).mean()), float(np.abs(got - want).max())


# --------------------------------------------------------------------------------------------
# graph-stress

GRAPH_BATCH, PLAIN_BATCHES, STRESS_ITERATIONS, GRAPH_TOLERANCE = 4, (3, 5, 8), 100, 1e-5


def check_graph_stress(ctx: Context) -> str:
    import numpy as np
    import torch

    from fgh_deploy.engines.trt_engine import TensorRTEngine
    from fgh_deploy.export.tensorrt import build_engine

    require(tensorrt=True)
    tiny = tiny_adsh(ctx)
    # Level 1: a quick build; what is checked is the replay, not the tactics.
    engine_path = build_engine(tiny.onnx, ctx.work / "graph.fp32.engine", precision="fp32", batch=(1, 8, 16),
                               workspace_gib=WORKSPACE_GIB, optimization_level=1, header=tiny.header,
                               log=lambda line: None)
    gen = torch.Generator().manual_seed(3)
    replays, worst, bad = 0, 0.0, []
    with TensorRTEngine(engine_path, cuda_graph_batch=GRAPH_BATCH) as graphed, TensorRTEngine(engine_path) as plain:
        for i in range(STRESS_ITERATIONS):
            size = GRAPH_BATCH if i % 2 == 0 else PLAIN_BATCHES[(i // 2) % len(PLAIN_BATCHES)]
            images = torch.randint(0, 256, (size, 3, TINY_SIZE, TINY_SIZE), dtype=torch.uint8, generator=gen)
            if i % 3 == 0:
                # Some batches already on the GPU: the engine's stream must wait for the caller's copy.
                images = images.cuda()
            diff = float(np.abs(graphed.encode(images) - plain.encode(images)).max())
            if size == GRAPH_BATCH:
                replays += 1
            worst = max(worst, diff)
            if diff > GRAPH_TOLERANCE:
                bad.append(f"#{i} (batch {size}): {diff:.1e}")
    summary = (f"{STRESS_ITERATIONS} batches ({replays} graph replays of {GRAPH_BATCH}, the rest plain "
               f"{'/'.join(map(str, PLAIN_BATCHES))}) against a plain engine, max |diff| {worst:.1e}")
    if bad:
        raise Failed(f"{len(bad)} batches differ by more than {GRAPH_TOLERANCE:g}: {', '.join(bad[:5])}; {summary}")
    return summary


# --------------------------------------------------------------------------------------------
# timing-cache


def timed_build(tiny: SimpleNamespace, engine_path: Path, cache: Path) -> SimpleNamespace:
    """An FP32 build of the tiny model with ``cache`` (fgh's default optimization level): seconds, fgh's log
    lines, and TensorRT's errors meanwhile (errors do not always fail a build)."""
    from fgh_deploy.export.tensorrt import build_engine

    lines: list[str] = []
    start = time.perf_counter()
    with captured_log(TRT_LOGGER, logging.DEBUG) as trt_log:
        build_engine(tiny.onnx, engine_path, precision="fp32", batch=(1, 8, 16), workspace_gib=WORKSPACE_GIB,
                     timing_cache=cache, header=tiny.header, log=lines.append)
    return SimpleNamespace(seconds=time.perf_counter() - start, log=lines,
                           cache_lines=[line for line in lines if "timing cache" in line],
                           trt_errors=[m for m in trt_log if m.startswith("TensorRT error:")])


def check_timing_cache(ctx: Context) -> str:
    require(tensorrt=True)
    tiny = tiny_adsh(ctx)
    cache, engine = ctx.work / "timing-check.cache", ctx.work / "timing-check.fp32.engine"
    first = timed_build(tiny, engine, cache)
    second = timed_build(tiny, engine, cache)
    info(f"first build {first.seconds:.1f} s: {' | '.join(first.cache_lines)}")
    info(f"second build {second.seconds:.1f} s: {' | '.join(second.cache_lines)}")
    if not any(line.startswith("TensorRT: timing cache loaded from") for line in second.log):
        raise Failed(f"the second build did not load the first one's cache: {second.cache_lines}")
    garbage = os.urandom(cache.stat().st_size)
    cache.write_bytes(garbage)
    corrupted = timed_build(tiny, engine, cache)  # a failed build raises: FAIL
    info(f"build over a corrupted cache {corrupted.seconds:.1f} s: {' | '.join(corrupted.cache_lines)}")
    if corrupted.trt_errors:
        info(f"TensorRT's errors meanwhile: {' | '.join(corrupted.trt_errors)}")
    if not any("starting a new one" in line for line in corrupted.log):
        raise Failed(f"the corrupted cache was not reported as replaced: {corrupted.cache_lines}")
    if cache.read_bytes() == garbage:
        raise Failed("the corrupted cache file was not replaced after the build")
    return (f"builds {first.seconds:.1f} s (new cache), {second.seconds:.1f} s (cache loaded); "
            f"a corrupted cache is replaced and the build succeeds ({corrupted.seconds:.1f} s)")


# --------------------------------------------------------------------------------------------
# ort-cuda, ort-trt


def require_ort_provider(provider: str) -> ModuleType:
    """onnxruntime, once a CUDA GPU is here and ONNX Runtime was built with ``provider``."""
    import onnxruntime as ort

    require()
    if provider not in ort.get_available_providers():
        raise Skip(f"ONNX Runtime {ort.__version__} has no {provider} (built with: "
                   f"{', '.join(ort.get_available_providers())})")
    return ort


def check_ort_cuda(ctx: Context) -> str:
    from fgh_deploy.engines.onnx_engine import CPU, CUDA, OnnxEngine

    require_ort_provider(CUDA)
    tiny = tiny_adsh(ctx)
    images = random_images(32, TINY_SIZE, seed=4)
    with captured_log(ORT_LOGGER, logging.WARNING) as warnings:
        gpu = OnnxEngine(tiny.onnx, providers=[CUDA, CPU], device="cuda:0")
    if gpu.providers[0] != CUDA:
        raise Failed(f"the session runs on {gpu.providers}: {' | '.join(warnings)}")
    info(f"session.get_providers(): {gpu.session.get_providers()}")
    info(f"session.get_provider_options(): {gpu.session.get_provider_options()}")
    agreement, max_diff = compare_codes(gpu.encode(images), OnnxEngine(tiny.onnx, device="cpu").encode(images))
    result = f"CUDA vs CPU provider on {len(images)} images: bit agreement {agreement:.2%}, max |diff| {max_diff:.1e}"
    if agreement < 0.99:
        raise Failed(result)
    return result


def cache_contents(folder: Path) -> str:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return ", ".join(f"{p.relative_to(folder)} ({p.stat().st_size / 1e6:.1f} MB)" for p in files) or "empty"


def check_ort_trt(ctx: Context) -> str:
    from fgh_deploy.engines.onnx_engine import CPU, CUDA, TRT, OnnxEngine

    require_ort_provider(TRT)
    # A copy in a folder of its own: the cache beside it starts empty.
    model = ctx.work / "ort-trt" / "adsh32.onnx"
    model.parent.mkdir(exist_ok=True)
    shutil.copy(tiny_adsh(ctx).onnx, model)
    images = random_images(8, TINY_SIZE, seed=5)
    sessions = []
    for _ in range(2):
        start = time.perf_counter()
        with captured_log(ORT_LOGGER, logging.WARNING) as warnings:
            engine = OnnxEngine(model, providers=[TRT, CUDA, CPU], device="cuda:0")
        created = time.perf_counter()
        if engine.providers[0] != TRT:
            raise Skip(f"ONNX Runtime could not initialise the TensorRT provider: {' | '.join(warnings)}")
        engine.encode(images)  # TensorRT builds (or loads) its engine on the first batch of a shape
        sessions.append((created - start, time.perf_counter() - created))
        del engine
    (create1, encode1), (create2, encode2) = sessions
    cache = model.with_suffix(".ort-trt")
    info(f"cache {cache}: {cache_contents(cache)}")
    result = (f"session 1: create {create1:.1f} s + first encode {encode1:.1f} s; "
              f"session 2: create {create2:.1f} s + first encode {encode2:.1f} s")
    if not any(cache.rglob("*.engine")):
        raise Failed(f"no engine in the cache folder; {result}")
    if create2 + encode2 > 0.5 * (create1 + encode1):
        raise Failed(f"the second session is not fast (more than half the first's time); {result}")
    return result


# --------------------------------------------------------------------------------------------
# fp16-typing (issue 16, item 8)

PROFILE = (1, 16, 64)
TIMED_BATCHES, WARMUP, ITERATIONS = (16, 64), 5, 30


def build_strongly_typed(trt: ModuleType, onnx16: Path, engine_path: Path, like: Path, cache: Path) -> Path:
    """A strongly typed engine of the FP16 ONNX, built with TensorRT's own API, in fgh's file format.

    For this measurement only (fgh builds strongly typed networks on TensorRT 11 alone). The header
    is the engine ``like``'s (same model, profile and I/O) with this ONNX's hash; write_engine
    reseals it. The timing cache of the weakly typed build is reused to shorten this one.
    """
    from fgh_deploy.engines.trt_format import get_logger, read_engine_header, write_engine
    from fgh_deploy.utils import sha256_file

    logger = get_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx16)):
        raise Failed(f"TensorRT cannot parse {onnx16.name}: "
                     f"{'; '.join(str(parser.get_error(i)) for i in range(parser.num_errors))}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(WORKSPACE_GIB * 2**30))
    config.set_timing_cache(config.create_timing_cache(cache.read_bytes()), ignore_mismatch=False)
    images = network.get_input(0)
    sample = tuple(images.shape)[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(images.name, *((batch, *sample) for batch in PROFILE))
    config.add_optimization_profile(profile)
    logger.errors.clear()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise Failed(f"the strongly typed build failed: {logger.last_errors() or 'no error reported'}")
    header, _ = read_engine_header(like)
    return write_engine(engine_path, {**header, "onnx_sha256": sha256_file(onnx16)}, plan)


def ms_per_batch(engine: Any, batch: int) -> float:
    """Mean milliseconds of one encode of ``batch`` images already on the GPU (codes back on the host)."""
    import torch

    size = engine.input_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=engine.device)
    for _ in range(WARMUP):
        engine.encode(images)
    start = time.perf_counter()
    for _ in range(ITERATIONS):
        engine.encode(images)
    return (time.perf_counter() - start) * 1e3 / ITERATIONS


def measure_engine(path: Path, images: Any, reference: Any) -> SimpleNamespace:
    from fgh_deploy.engines.trt_engine import TensorRTEngine

    with TensorRTEngine(path) as engine:
        agreement, max_diff = compare_codes(engine.encode(images), reference)
        ms = {batch: ms_per_batch(engine, batch) for batch in TIMED_BATCHES}
    return SimpleNamespace(agreement=agreement, max_diff=max_diff, ms=ms)


def fp16_verdict(weak: SimpleNamespace, strong: SimpleNamespace) -> str:
    points = (strong.agreement - weak.agreement) * 100
    speed = strong.ms[64] / weak.ms[64]
    compared = f"bit agreement {points:+.2f} points, time at batch 64 x{speed:.2f}"
    if points >= -0.5 and speed <= 1.1:
        return f"strongly typed FP16 ONNX is as good as the FP16 builder flag ({compared}): 10.x could build like 11.x"
    return f"keep the FP16 builder flag on 10.x: strongly typed is worse ({compared})"


def compare_fp16_builds(trt: ModuleType, ctx: Context, name: str, bits: int, cache: Path) -> str:
    """Both FP16 engines of one model, against ONNX Runtime FP32 on the CPU; prints the numbers and a verdict."""
    from fgh_deploy.engines.onnx_engine import OnnxEngine
    from fgh_deploy.export.onnx import HalfPrecisionModel, export_onnx
    from fgh_deploy.export.tensorrt import build_engine

    model = random_model(name, bits, ctx.size)
    folder = ctx.work / f"{name}{bits}.{ctx.size}px"
    onnx32 = export_onnx(model, folder / "fp32.onnx", metadata=onnx_metadata(model))
    onnx16 = export_onnx(HalfPrecisionModel(model).to("cuda"), folder / "fp16.onnx", metadata=onnx_metadata(model))
    log: list[str] = []
    start = time.perf_counter()
    weak = build_engine(onnx32, folder / "flag.fp16.engine", precision="fp16", batch=PROFILE,
                        workspace_gib=WORKSPACE_GIB, timing_cache=cache, header=engine_header(model), log=log.append)
    built = time.perf_counter()
    strong = build_strongly_typed(trt, onnx16, folder / "typed.fp16.engine", weak, cache)
    seconds = {"flag": built - start, "typed": time.perf_counter() - built}
    info(f"{name}: {' | '.join(line for line in log if 'pinned' in line)}")
    images = random_images(64, ctx.size, seed=6)
    reference = OnnxEngine(onnx32, device="cpu").encode(images)
    results = {"flag": measure_engine(weak, images, reference), "typed": measure_engine(strong, images, reference)}
    for kind, label in (("flag", "FP32 ONNX + FP16 flag, FP32 pinning"), ("typed", "FP16 ONNX, strongly typed")):
        r = results[kind]
        info(f"{name}{bits} {ctx.size}px {label}: built in {seconds[kind]:.1f} s, bit agreement with ONNX Runtime "
             f"FP32 {r.agreement:.2%} (max |diff| {r.max_diff:.1e}), "
             + ", ".join(f"{r.ms[b]:.2f} ms per batch of {b}" for b in TIMED_BATCHES))
    verdict = fp16_verdict(results["flag"], results["typed"])
    print(f"VERDICT {name}: {verdict}", flush=True)
    return (f"{name} flag {results['flag'].agreement:.2%} / typed {results['typed'].agreement:.2%}, "
            f"{results['flag'].ms[64]:.2f} / {results['typed'].ms[64]:.2f} ms at 64")


def check_fp16_typing(ctx: Context) -> str:
    from fgh_deploy.engines.trt_format import api_family

    trt = require(tensorrt=True)
    if api_family(trt) == 11:
        raise Skip(f"TensorRT {trt.__version__} is the 11.x family: always strongly typed (no FP16 builder flag), "
                   f"nothing to compare")
    cache = ctx.work / "fp16-typing.cache"
    results: list[str] = []
    # ADSH first; SEMICON (softmax, sqrt: the fragile layers) when the time left allows another round.
    for name, bits in (("adsh", 32), ("semicon", 48)):
        start = time.perf_counter()
        results.append(compare_fp16_builds(trt, ctx, name, bits, cache))
        spent = time.perf_counter() - start
        if name == "adsh" and ctx.seconds_left() < 1.5 * spent:
            info(f"semicon left out: {ctx.seconds_left():.0f} s left, adsh took {spent:.0f} s")
            break
    return "; ".join(results)


# --------------------------------------------------------------------------------------------
# Running the checks

CHECKS: dict[str, tuple[Callable[[Context], str], int]] = {  # name: (check, time limit in seconds)
    "graph-stress": (check_graph_stress, 60),
    "timing-cache": (check_timing_cache, 90),
    "ort-cuda": (check_ort_cuda, 45),
    "ort-trt": (check_ort_trt, 90),
    "fp16-typing": (check_fp16_typing, 240),
}


def run_check_here(name: str, ctx: Context) -> int:
    """Run one check in this process and print its result line; returns the exit status for the runner."""
    try:
        detail = CHECKS[name][0](ctx)
    except Skip as exc:
        print(f"SKIP {name}: {exc}", flush=True)
        return EXIT_SKIP
    except Failed as exc:
        print(f"FAIL {name}: {exc}", flush=True)
        return 1
    except Exception as exc:  # any other error fails this check only; the traceback helps on an unattended run
        traceback.print_exc()
        print(f"FAIL {name}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}", flush=True)
        return 1
    print(f"PASS {name}: {detail}", flush=True)
    return 0


def run_check_process(name: str, limit: float, args: argparse.Namespace, work: Path) -> str:
    """Run one check in a new process under ``limit`` seconds; its status (PASS, FAIL or SKIP)."""
    command = [sys.executable, __file__, name, "--child", f"{limit:.0f}", "--work-dir", str(work),
               "--size", str(args.size)]
    try:
        code = subprocess.run(command, timeout=limit).returncode
    except subprocess.TimeoutExpired:
        print(f"FAIL {name}: no result within {limit:.0f} s (killed)", flush=True)
        return "FAIL"
    if code < 0:
        print(f"FAIL {name}: crashed (signal {-code})", flush=True)
    elif code not in (0, 1, EXIT_SKIP):
        print(f"FAIL {name}: exited with status {code}", flush=True)
    return {0: "PASS", EXIT_SKIP: "SKIP"}.get(code, "FAIL")


def run_all(args: argparse.Namespace, work: Path) -> int:
    deadline = time.monotonic() + args.budget
    statuses: dict[str, str] = {}
    for name in args.checks:
        limit = min(CHECKS[name][1], deadline - time.monotonic())
        if limit < MIN_CHECK_SECONDS:
            print(f"SKIP {name}: the time budget of {args.budget} s is spent", flush=True)
            statuses[name] = "SKIP"
            continue
        print(f"--- {name} (at most {limit:.0f} s)", flush=True)
        statuses[name] = run_check_process(name, limit, args, work)
    counts = []
    for status in ("PASS", "FAIL", "SKIP"):
        names = [name for name, s in statuses.items() if s == status]
        counts.append(f"{len(names)} {status}" + (f" ({', '.join(names)})" if names and status != "PASS" else ""))
    print(f"SUMMARY trt_checks: {', '.join(counts)}", flush=True)
    return 1 if "FAIL" in statuses.values() else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[2:]))
    parser.add_argument("checks", nargs="*", metavar="CHECK", default=list(CHECKS),
                        help=f"checks to run, in this order (default: all): {', '.join(CHECKS)}")
    parser.add_argument("--budget", type=int, default=300, metavar="SECONDS",
                        help="seconds for all checks together (default 300)")
    parser.add_argument("--size", type=int, default=224, metavar="PIXELS",
                        help="input size of the fp16-typing models (default 224)")
    parser.add_argument("--work-dir", type=Path, metavar="DIR",
                        help="folder for models and engines (default: a temporary one, removed afterwards)")
    # The runner starts each check as `trt_checks.py CHECK --child SECONDS --work-dir DIR`.
    parser.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    unknown = [name for name in args.checks if name not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.child is not None and (len(args.checks) != 1 or args.work_dir is None):
        parser.error("--child runs exactly one check, in --work-dir")
    return args


def setup_logging() -> None:
    """Warnings (TensorRT's among them, through fgh's logger) on stderr; a check may capture more for itself."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.WARNING)


def main() -> int:
    args = parse_args()
    if args.child is not None:
        setup_logging()
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return run_check_here(args.checks[0], Context(args.work_dir, args.size, time.monotonic() + args.child))
    if args.work_dir is not None:
        args.work_dir.mkdir(parents=True, exist_ok=True)
        return run_all(args, args.work_dir)
    with tempfile.TemporaryDirectory(prefix="fgh-trt-checks-") as work:
        return run_all(args, Path(work))


if __name__ == "__main__":
    sys.exit(main())
