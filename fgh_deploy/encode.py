r"""``fgh encode``: an image folder → packed codes in a crash-safe, resumable index.

Decoding runs in DataLoader worker processes while the engine encodes the previous batch. Rows
are committed to the index every few seconds, so a killed run (even ``kill -9``) loses at most
the uncommitted tail, and the next run resumes: images already in the index are not encoded
again, images deleted from the folder (or modified since) are dropped, new ones are appended.
``--rebuild`` builds the new index beside the old one and switches them when it is complete
(see :mod:`fgh_deploy.index`): an interrupted rebuild leaves the old index.

``skipped.tsv`` in the index folder lists, one line each, what was not encoded: files that
could not be decoded, and what the folder scan left out (FIFOs, devices, over-long paths,
directory symlinks not followed). A line is ``PATH<TAB>REASON<LF>``, UTF-8, and both fields are
escaped so that no file name can forge a line or a field: ``\\`` for a backslash, ``\t``,
``\n`` and ``\r``, ``\xNN`` for any other byte below 0x20, for 0x7f and for each byte of the
name that is not valid UTF-8, ``\u0085``, ``\u2028`` and ``\u2029`` for the characters some
readers take for line breaks. Undoing the escapes gives the name's bytes exactly
(``os.fsencode`` of the path).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .bits import pack_codes
from .errors import FghError
from .images import IMAGE_EXTENSIONS, ImageBatchLoader, ImageScan, scan_images
from .index import SKIPPED_LOG, CodeIndex
from .index_uri import MilvusLocation, SearchIndex, parse_index_name
from .utils import atomic_write, display_path, timed

if TYPE_CHECKING:
    from rich.progress import Progress

    from fgh_deploy.engines.base import Engine

    from .milvus_index import MilvusIndexOptions

log = logging.getLogger(__name__)

COMMIT_SECONDS = 2.0
#: What ``fgh encode`` suggests when the index at --out was built by another model or from another folder.
REBUILD_HINT = "use --rebuild to replace it, or another --out"
# With a CUDA engine, nvJPEG decodes by default only below this many decoding workers: its decode
# and per-image resize run on the GPU between engine calls, so its rate stays flat as workers are
# added, while every Pillow worker decodes in parallel with the engine (`fgh bench encode`
# measures both; the README lists the numbers).
GPU_DECODE_BELOW_WORKERS = 3


@dataclass
class EncodeSummary:
    """What one ``fgh encode`` run did (the CLI prints it; ``--json`` dumps it)."""

    index: str
    folder: str
    engine: dict
    bits: int
    images: int = 0
    encoded: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)
    index_bytes: int = 0
    seconds: float = 0.0
    # Wall time of this process by stage; decode_wait is what the decoding workers did not hide.
    timings: dict[str, float] = field(default_factory=dict)
    # Per-image decode and resize time summed over every image, in whichever process did it:
    # with N workers these run in parallel, so they can add up to N times the wall time.
    image_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {"schema_version": 1, **asdict(self), "images_per_second": self.images_per_second}


def _file_stats(root: Path, rel: str) -> tuple[int, int]:
    """(size, mtime_ns) of an image, or (-1, -1) if it cannot be stat'ed (it will fail to decode)."""
    try:
        st = os.stat(root / rel)
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def encode_folder(folder: str | os.PathLike, engine: Engine, out: str | os.PathLike, *,
                  batch_size: int = 64, workers: int | None = None, rebuild: bool = False,
                  progress: bool | None = None, commit_seconds: float = COMMIT_SECONDS,
                  gpu_decode: bool | None = None, follow_links: bool = False,
                  shard: tuple[int, int] | None = None,
                  milvus_options: MilvusIndexOptions | None = None) -> EncodeSummary:
    """Encode every image under ``folder`` into the index ``out`` names (created or resumed).

    Args:
        folder: image folder (recursive; hidden files ignored; see ``follow_links``).
        engine: an opened :class:`engines.base.Engine`.
        out: an index folder, or a Milvus collection (:mod:`fgh_deploy.index_uri`); into Milvus,
            rows are upserted by path, so reruns and concurrent shards never duplicate a row.
        batch_size: images per engine call.
        workers: decoding processes (default: cores − 1, at most 8; 0 decodes in this process).
        rebuild: build a new index instead of resuming; it replaces the old one when complete.
        progress: show a progress bar on stderr (default: only when stderr is a terminal).
        commit_seconds: commit appended rows at least this often (a kill loses at most that much work).
        gpu_decode: decode JPEGs with nvJPEG on the engine's GPU instead of with Pillow in the
            workers (default: when the engine runs on CUDA and fewer than
            ``GPU_DECODE_BELOW_WORKERS`` decoding workers run; more CPU workers were faster).
        follow_links: descend into symlinked directories (each directory once); by default
            they are listed as skipped. Linked files are read either way.
        shard: ``(K, N)``: encode only the images of shard K of N (by path key, see
            :func:`~fgh_deploy.milvus_index.in_shard`), so N workers fill one Milvus collection
            together; Milvus only (a local index has one writer).
        milvus_options: the vector index of a Milvus collection this run creates.

    Returns:
        An :class:`EncodeSummary`; images that could not be read, and what the scan left out,
        are listed in ``skipped`` and in ``skipped.tsv`` inside the index.

    Raises:
        FghError: missing folder, a folder without images (the index is not touched), an index
            built by another model or from another folder (without ``rebuild``), index data
            without a manifest (without ``rebuild``), a damaged or hostile index folder, a
            full disk (the index keeps what was committed), ``gpu_decode`` with an engine not
            on CUDA, ``shard`` or ``milvus_options`` with a local index, ``rebuild`` with Milvus
            (drop the collection instead), a Milvus server that cannot be reached.
    """
    start = time.perf_counter()
    workers = _default_workers() if workers is None else workers
    loop = _LoopOptions(batch_size=batch_size, workers=workers,
                        decode_device=_decode_device(engine, gpu_decode, workers), commit_seconds=commit_seconds,
                        show_progress=sys.stderr.isatty() if progress is None else progress)
    root = Path(folder)
    location = parse_index_name(out)
    if isinstance(location, MilvusLocation):
        if rebuild:
            raise FghError(f"{location.name}: --rebuild is for local indexes; drop the collection to start over")
        return _encode_into_milvus(root, engine, location, loop, follow_links, shard, milvus_options, start)
    if shard is not None or milvus_options is not None:
        what = "--shard" if shard is not None else "--milvus-index"
        raise FghError(f"{what} needs a Milvus index (milvus://HOST/COLLECTION or FILE.db#COLLECTION); "
                       f"{display_path(location)} is a local index, which has one writer")
    out = location
    scan = _scan_images_or_refuse(root, out, follow_links)
    paths = scan.paths
    root_str = str(root.resolve())
    index = _open_or_create(out, engine, root_str, rebuild)
    with index:
        summary = EncodeSummary(index=str(out), folder=root_str, engine=engine.describe(), bits=engine.bits,
                                images=len(paths))
        summary.skipped.extend({"path": path, "reason": reason} for path, reason in scan.skipped)
        stats = {p: _file_stats(root, p) for p in paths}
        plan = index.plan_resume(stats)
        if plan.dropped:
            summary.removed = plan.dropped
            index.compact(plan.keep)
        todo = plan.encode
        summary.reused = len(paths) - len(todo)
        _encode_into(index, engine, root, todo, stats, summary, loop)
        summary.index_bytes = index.nbytes
    _write_skipped_log(out, summary.skipped)
    summary.seconds = time.perf_counter() - start
    return summary


def _encode_into_milvus(root: Path, engine: Engine, location: MilvusLocation, loop: _LoopOptions,
                        follow_links: bool, shard: tuple[int, int] | None,
                        milvus_options: MilvusIndexOptions | None, start: float) -> EncodeSummary:
    """:func:`encode_folder` into a Milvus collection: upsert what is new or changed, delete what is gone.

    With ``shard``, only that shard's images are listed, encoded and (when gone) deleted, so
    shards never touch each other's rows. A killed run leaves only whole upserted rows; the
    rerun skips them (same size and mtime) and encodes the rest. Rows stored twice (the same
    shard run twice at once) are repaired at the end of the run.
    """
    from .milvus_index import MilvusIndex, in_shard, unstorable_path

    scan = _scan_images_or_refuse(root, location.name, follow_links)
    listed = [p for p in scan.paths if shard is None or in_shard(p, shard)]
    skipped = [(p, why) for p, why in scan.skipped if shard is None or in_shard(p, shard)]
    skipped += [(p, why) for p in listed if (why := unstorable_path(p))]
    paths = [p for p in listed if not unstorable_path(p)]
    root_str = str(root.resolve())
    index = MilvusIndex.open_or_create(location, bits=engine.bits, fingerprint=engine.fingerprint, model=engine.model,
                                       preprocess=engine.preprocess.to_dict(), engine=engine.describe(), root=root_str,
                                       options=milvus_options, hint="encode into another collection")
    with index:
        summary = EncodeSummary(index=location.name, folder=root_str, engine=engine.describe(), bits=engine.bits,
                                images=len(listed))
        summary.skipped.extend({"path": path, "reason": reason} for path, reason in skipped)
        stats = {p: _file_stats(root, p) for p in paths}
        stored = index.stored_stats(paths)
        todo = [p for p in paths if stored.get(p) != stats[p]]
        summary.reused = len(paths) - len(todo)
        summary.removed = index.remove_unlisted(paths, shard)
        _encode_into(index, engine, root, todo, stats, summary, loop)
        repaired = index.repair_duplicates(len(paths), shard)
        if repaired:
            log.warning("%s: %d image(s) were stored more than once (the same shard encoded twice at the same "
                        "time?); now stored once", location.name, repaired)
        summary.index_bytes = index.nbytes
    summary.seconds = time.perf_counter() - start
    return summary


@dataclass(frozen=True)
class _LoopOptions:
    """How the encoding loop runs, resolved from :func:`encode_folder`'s arguments."""

    batch_size: int
    workers: int
    decode_device: torch.device | None  # nvJPEG on this device, or None for Pillow in the workers
    commit_seconds: float
    show_progress: bool


def _scan_images_or_refuse(root: Path, out: Path | str, follow_links: bool) -> ImageScan:
    """The images under ``root``; none at all is an error, before the index is touched."""
    scan = scan_images(root, follow_links=follow_links)
    if not scan.paths:
        # An empty (or unmounted) folder would otherwise empty the index: every row "deleted".
        left_out = f"; {len(scan.skipped)} entries left out, e.g. {display_path(scan.skipped[0][0])}: " \
                   f"{scan.skipped[0][1]}" if scan.skipped else ""
        raise FghError(f"{display_path(root)}: no images found ({'/'.join(IMAGE_EXTENSIONS)} files, searched "
                       f"recursively{left_out}); {display_path(out)} was not touched")
    return scan


def engine_cuda_device(engine: Engine) -> torch.device | None:
    """The CUDA device the engine runs on, if any."""
    device = getattr(engine, "device", None)
    return device if isinstance(device, torch.device) and device.type == "cuda" else None


def _decode_device(engine: Engine, gpu_decode: bool | None, workers: int) -> torch.device | None:
    """Where JPEGs are decoded: the engine's CUDA device, or ``None`` for Pillow in the workers."""
    cuda = engine_cuda_device(engine)
    if gpu_decode and cuda is None:
        raise FghError(f"{engine.path}: GPU decoding needs an engine on a CUDA device "
                       f"(this {engine.kind} engine runs on {getattr(engine, 'device', None) or 'the CPU'})")
    if gpu_decode is None:
        gpu_decode = workers < GPU_DECODE_BELOW_WORKERS
    return cuda if gpu_decode else None


def _open_or_create(out: Path, engine: Engine, root: str, rebuild: bool) -> CodeIndex:
    meta = dict(bits=engine.bits, fingerprint=engine.fingerprint, model=engine.model,
                preprocess=engine.preprocess.to_dict(), engine=engine.describe(), root=root)
    if rebuild or not CodeIndex.exists(out):
        return CodeIndex.create(out, overwrite=rebuild, **meta)
    index = CodeIndex.open(out, writable=True)
    try:
        index.check_compatible(engine.bits, engine.fingerprint, hint=REBUILD_HINT)
        if index.root != root:
            raise FghError(f"{display_path(out)}: built from {display_path(index.root)}, not "
                           f"{display_path(root)}; {REBUILD_HINT}")
    except FghError:
        index.close()
        raise
    return index


def _encode_into(index: SearchIndex, engine: Engine, root: Path, todo: list[str],
                 stats: dict[str, tuple[int, int]], summary: EncodeSummary, options: _LoopOptions) -> None:
    """Decode, encode and append ``todo``, committing every ``commit_seconds``; time each stage."""
    timings = {"decode_wait": 0.0, "gpu_decode": 0.0, "engine": 0.0, "pack": 0.0, "write": 0.0}
    # On a GPU every new batch shape costs new kernel plans, far more than encoding a few black
    # images: short batches (the last one, ones with skipped files) are padded to the full size.
    on_gpu = engine_cuda_device(engine) is not None
    pad_to = options.batch_size if on_gpu else 0
    loader = ImageBatchLoader(todo, engine.preprocess, root=root, batch_size=options.batch_size,
                              num_workers=options.workers, pin_memory=on_gpu, jpeg_device=options.decode_device)
    progress = _progress_bar(options.show_progress)
    last_commit = time.perf_counter()
    started = time.perf_counter()
    with progress, _worker_deaths_as_errors(loader):
        task = progress.add_task("encode", total=len(todo), rate=0.0)
        tick = time.perf_counter()
        for indices, images, failures in loader:
            timings["decode_wait"] += time.perf_counter() - tick
            for failure in failures:
                summary.skipped.append({"path": todo[failure.index], "reason": failure.reason})
            if len(indices):
                rel = [todo[i] for i in indices]
                _append_batch(index, engine, images, rel, stats, pad_to, timings)
                summary.encoded += len(indices)
            if time.perf_counter() - last_commit >= options.commit_seconds:
                with timed(timings, "write"):
                    index.commit()
                last_commit = time.perf_counter()
            done = summary.encoded + len(summary.skipped)
            progress.update(task, completed=done, rate=done / max(time.perf_counter() - started, 1e-9))
            tick = time.perf_counter()
        with timed(timings, "write"):
            index.commit()
    # The loader decodes on the GPU while this loop waits for the next batch.
    timings["gpu_decode"] = loader.device_decode_seconds
    timings["decode_wait"] -= loader.device_decode_seconds
    summary.timings = {k: round(v, 4) for k, v in timings.items()}
    summary.image_seconds = {"decode": round(loader.worker_decode_seconds, 4),
                             "preprocess": round(loader.worker_preprocess_seconds, 4)}


def _append_batch(index: SearchIndex, engine: Engine, images: torch.Tensor, rel: list[str],
                  stats: dict[str, tuple[int, int]], pad_to: int, timings: dict[str, float]) -> None:
    """Encode one batch (padded to ``pad_to`` rows when that is more) and append its rows, uncommitted."""
    with timed(timings, "engine"):
        codes = engine.encode(padded_batch(images, pad_to))[: len(rel)]
    with timed(timings, "pack"):
        packed = pack_codes(codes)
    with timed(timings, "write"):
        index.append(packed, rel, np.array([stats[p] for p in rel], dtype=np.int64))


def _progress_bar(show: bool) -> Progress:
    """The encoding progress bar on stderr (disabled, but still usable, when not ``show``)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("encoding"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
               TextColumn("{task.fields[rate]:.1f} img/s"), TimeElapsedColumn(), TimeRemainingColumn()]
    return Progress(*columns, disable=not show, transient=False, console=Console(stderr=True))


@contextmanager
def _worker_deaths_as_errors(loader: ImageBatchLoader) -> Iterator[None]:
    """A decoding worker's death, reported by DataLoader anywhere in the loop, as one line."""
    try:
        yield
    except RuntimeError as exc:
        death = loader.worker_death()
        if death is None:
            raise
        raise death from exc


def padded_batch(images: torch.Tensor, size: int) -> torch.Tensor:
    """``images`` with black images appended up to ``size`` rows."""
    missing = size - len(images)
    if missing <= 0:
        return images
    return torch.cat([images, images.new_zeros((missing, *images.shape[1:]))])


# Characters escaped in a skipped.tsv field (the format is in the module docstring); lone
# surrogates are the bytes of a name that are not UTF-8 (os.fsdecode's surrogate escapes).
_TSV_UNSAFE = re.compile(r"[\\\x00-\x1f\x7f\x85\u2028\u2029\udc80-\udcff]")
_TSV_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _tsv_escape(match: re.Match[str]) -> str:
    char = match.group()
    if char in _TSV_NAMED:
        return _TSV_NAMED[char]
    code = ord(char)
    if code in (0x85, 0x2028, 0x2029):
        return f"\\u{code:04x}"
    return f"\\x{code & 0xff:02x}"  # a control byte, or the byte a surrogate escape stands for


def _tsv_field(text: str) -> str:
    """``text`` (a path or a reason, possibly with surrogate escapes) as one skipped.tsv field."""
    return _TSV_UNSAFE.sub(_tsv_escape, text)


def _write_skipped_log(out: Path, skipped: list[dict]) -> None:
    """One line per skipped entry (path TAB reason, escaped), replaced on every run."""
    text = "".join(f"{_tsv_field(s['path'])}\t{_tsv_field(s['reason'])}\n" for s in skipped)
    try:
        atomic_write(out / SKIPPED_LOG, lambda f: f.write(text.encode("utf-8")))
    except OSError as exc:
        # The index itself is committed by now: say so, in one line.
        raise FghError(f"{display_path(out)}: cannot write {SKIPPED_LOG} ({exc.strerror or exc}); the index "
                       "itself is complete") from None
