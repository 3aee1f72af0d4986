"""Trunk maps computed once per image and augmentation view, for training with a frozen trunk.

With the trunk frozen (the ``fast`` preset), its output for a given augmented image never
changes, yet a plain loop decodes, augments and runs the trunk again on every pass. Here the
maps of ``views`` augmentations of every training image are computed once, stored as FP16 on
the host, and each training pass draws one view of each image: the passes after the first
``views`` cost only the layers that train.

Each (image, view) augmentation is drawn from its own seed, so the cache is the same whatever
the number of decoding workers, and a resumed run rebuilds exactly the cache it had.

On a CPU, for passes of at least :data:`ONNXRUNTIME_MIN_MAPS` maps, the trunk runs in ONNX
Runtime: about 3× PyTorch eager for efficientnet_lite0 (eager pads every TF-"same" conv and
runs BatchNorm and activations as separate passes), for an export of about ten seconds. Its
outputs differ from eager by ~1e-5, far below the FP16 rounding of the stored maps.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from fgh_deploy.images import worker_loader_kwargs

from .data import LabeledImageDataset

log = logging.getLogger(__name__)

#: Fewest maps for which exporting the trunk to ONNX Runtime pays off (the export takes seconds).
ONNXRUNTIME_MIN_MAPS = 1024
#: Bytes per stored map element (FP16: BatchNorm/ReLU outputs need range and 3 digits, not more).
_STORAGE = torch.float16


class _SeededViews(Dataset):
    """Item ``view · n + row``: the training augmentation of image ``row`` drawn from seed (seed, view, row)."""

    def __init__(self, images: LabeledImageDataset, views: int, seed: int) -> None:
        self.images, self.views, self.seed = images, views, seed

    def __len__(self) -> int:
        return self.views * len(self.images)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, int]:
        view, row = divmod(item, len(self.images))
        if not self.images.train:
            return self.images[row][0], item
        # torchvision's random transforms draw from torch's global generator: fork it so the
        # caller's stream is untouched, seed it per item so workers cannot change the draw.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + view * 100_003 + row) % (2**63))
            return self.images[row][0], item


@dataclass
class TrunkCache:
    """``maps[view, row]``: the frozen trunk's output for one augmentation of one image."""

    maps: torch.Tensor

    @property
    def views(self) -> int:
        return self.maps.shape[0]

    def gather(self, rows: torch.Tensor, views: torch.Tensor, device: torch.device) -> torch.Tensor:
        """FP32 maps of ``rows`` (each in its own ``views`` entry) on ``device``."""
        maps = self.maps[views, rows]
        if device.type == "cuda":
            maps = maps.pin_memory()
        return maps.to(device, non_blocking=True).float()


def bytes_per_map(model: torch.nn.Module, input_size: int) -> int:
    """Bytes one stored trunk map takes (from the trunk's output shape on a blank image)."""
    param = next(model.trunk.parameters())
    probe = torch.zeros(1, 3, input_size, input_size, device=param.device)
    with torch.no_grad():
        shape = model.trunk(probe).shape
    return int(torch.Size(shape[1:]).numel()) * torch.finfo(_STORAGE).bits // 8


def _onnxruntime_trunk(model: torch.nn.Module, input_size: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """uint8 images → trunk maps, through ONNX Runtime on the CPU; ``None`` where it cannot run."""
    try:
        import onnxruntime as ort

        graph = torch.nn.Sequential(model.normalize, model.trunk).eval()
        # A batch of 2, not 1: the exporter specialises a size-1 example dimension.
        example = torch.zeros(2, 3, input_size, input_size, dtype=torch.uint8)
        with torch.no_grad():
            program = torch.onnx.export(graph, (example,), dynamo=True, external_data=False, verbose=False,
                                        input_names=["images"], output_names=["maps"],
                                        dynamic_shapes={"input": {0: torch.export.Dim("batch", min=1, max=4096)}})
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(program.model_proto.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:  # an exporter or runtime that cannot take this trunk: eager still works
        log.info("trunk cache: running the trunk in PyTorch (ONNX Runtime unavailable: %s)",
                 " ".join(str(exc).split())[:200])
        return None
    return lambda pixels: torch.from_numpy(session.run(None, {"images": pixels.contiguous().numpy()})[0])


@torch.no_grad()
def trunk_maps(model: torch.nn.Module, images: LabeledImageDataset, views: int = 1, *, seed: int = 0,
               device: torch.device, workers: int, batch_size: int = 64, progress: bool = False,
               label: str = "trunk", engine: str = "auto") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(items, maps)`` batches of the eval-mode trunk over ``views`` augmentations of every image.

    Item ``view · len(images) + row`` is view ``view`` of image ``row``; the maps are FP32 on
    ``device`` (on a CPU from ONNX Runtime when it can run the trunk, else from PyTorch).

    Args:
        model: a :class:`~fgh_deploy.models.HashModel`; only ``normalize`` and ``trunk`` are used.
        images: the images (train mode: random views, each seeded; eval mode: one fixed view).
        views: augmentations per image.
        seed: seeds every (view, image) augmentation.
        device: where the trunk runs.
        workers: decoding processes.
        batch_size: images per trunk call.
        progress: show a progress bar on stderr.
        label: what the progress bar calls this pass.
        engine: ``"auto"`` (ONNX Runtime on a CPU from :data:`ONNXRUNTIME_MIN_MAPS` maps on),
            ``"onnxruntime"`` (on a CPU, where it can run) or ``"torch"``.
    """
    if engine not in ("auto", "onnxruntime", "torch"):
        raise ValueError(f"engine must be auto, onnxruntime or torch, got {engine!r}")
    if not len(images) or views < 1:
        raise ValueError(f"{label}: no images ({len(images)} images, {views} views)")
    size = images.cfg.input_size
    loader = DataLoader(_SeededViews(images, views, seed), batch_size=batch_size, pin_memory=device.type == "cuda",
                        **worker_loader_kwargs(workers, batch_size * 3 * size * size * 4))
    was_training = model.trunk.training
    model.trunk.eval()
    use_onnxruntime = device.type == "cpu" and (
        engine == "onnxruntime" or engine == "auto" and views * len(images) >= ONNXRUNTIME_MIN_MAPS)
    fast = _onnxruntime_trunk(model, images.cfg.input_size) if use_onnxruntime else None
    try:
        for pixels, items in _progress(loader, label) if progress else loader:
            if fast is not None:
                yield items, fast(pixels)
            else:
                x = model.normalize(pixels.to(device, non_blocking=True)).contiguous(memory_format=torch.channels_last)
                yield items, model.trunk(x)
    finally:
        model.trunk.train(was_training)


def build_trunk_cache(model: torch.nn.Module, images: LabeledImageDataset, views: int, *, seed: int,
                      device: torch.device, workers: int, progress: bool = False, label: str = "trunk cache",
                      engine: str = "auto") -> TrunkCache:
    """Run the (frozen) trunk over ``views`` augmentations of every image once and keep the maps.

    Arguments as for :func:`trunk_maps`.
    """
    started = time.perf_counter()
    n = len(images)
    maps: torch.Tensor | None = None
    for items, out in trunk_maps(model, images, views, seed=seed, device=device, workers=workers,
                                 progress=progress, label=label, engine=engine):
        out = out.to("cpu", _STORAGE)
        if maps is None:
            maps = torch.empty((views, n, *out.shape[1:]), dtype=_STORAGE)
        maps.view(views * n, *out.shape[1:])[items] = out
    if maps is None:  # trunk_maps refuses an empty pass; this keeps type checkers honest
        raise ValueError(f"{label}: no images")
    log.info("%s: %d view(s) of %d images in %.1f s (%.0f MB)", label, views, n, time.perf_counter() - started,
             maps.numel() * maps.element_size() / 1e6)
    return TrunkCache(maps)


def _progress(loader: DataLoader, label: str):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True,
                  console=Console(stderr=True)) as bar:
        task = bar.add_task(label, total=len(loader))
        for batch in loader:
            yield batch
            bar.update(task, advance=1)


def views_that_fit(requested: int, images: int, map_bytes: int, limit_gb: float) -> int:
    """How many of ``requested`` views of ``images`` maps fit in ``limit_gb`` (0: not even one)."""
    per_view = images * map_bytes
    return max(0, min(requested, int(limit_gb * 1e9 // max(per_view, 1))))


