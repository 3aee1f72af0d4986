"""The ADSH asymmetric training loop shared by all four models (models.md §1).

Per outer iteration: sample ``num_samples`` database images, train ``epochs`` epochs against the
fixed database codes B, then update B by discrete cyclic coordinate descent. What differs from
the public code, on purpose:

* "best" is chosen on a validation split held out from the database (``select_on="val"``), not
  on the query split; ``select_on="query"`` reproduces the papers' selection, labelled as such.
* every outer iteration reseeds from (seed, iteration), so ``--resume`` after a kill continues
  exactly as an uninterrupted run would (on CPU, bit for bit);
* two parameter groups: the layers that start from pretrained weights train at ``lr``, the new
  ones at ``lr_new`` (printed at the start);
* with a frozen trunk and ``trunk_cache_views``, the trunk runs once per image and view, not
  on every pass (:mod:`train.trunk_cache`); the validation images' trunk maps are cached too;
* data loading runs in worker processes with pinned memory; channels-last memory (faster
  convolutions on CPUs and GPUs), AMP on CUDA; ``torchrun`` gives distributed data-parallel
  training (NCCL on GPUs, gloo on CPU).

Outputs in ``out/``: ``last.pt`` (model + full training state, written after every iteration),
``best.pt``, ``metrics.jsonl`` (one line per iteration) and ``config.json``; on a plain class-folder
tree also ``splits.tsv``, the database/query split drawn for the run (eval and resume read it).

A resumed run continues in ``out`` (see :func:`train.config.resume_config`) and may run more
iterations than first planned; the iteration A²-Net's auxiliary losses start at stays where the
run first put it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from fgh_deploy.checkpoint import load_checkpoint, save_checkpoint
from fgh_deploy.errors import FghError
from fgh_deploy.images import worker_loader_kwargs
from fgh_deploy.models import HashModel, build_model
from fgh_deploy.models._base import HASH, NEW, PRETRAINED
from fgh_deploy.utils import atomic_write, display_path, resolve_device

from .config import CONFIG_FILE, TrainConfig
from .data import (CLASS_FOLDERS, HashingDataset, LabeledImageDataset, Sample, hold_out_validation, load_dataset,
                   one_hot, splits_tsv)
from .dcc import sign_plus, update_database_codes
from .evaluate import encode_samples
from .losses import soft_similarity, training_losses, wanted_outputs
from .metrics import mean_average_precision
from .trunk_cache import TrunkCache, build_trunk_cache, bytes_per_map, views_that_fit

log = logging.getLogger(__name__)

LAST, BEST, METRICS, CONFIG, SPLITS = "last.pt", "best.pt", "metrics.jsonl", CONFIG_FILE, "splits.tsv"


@dataclass
class TrainResult:
    out: Path
    iterations: int
    best_iteration: int
    best_map: float
    last_map: float | None
    selected_on: str
    seconds: float
    #: False on the other ranks of a distributed run (only rank 0 reports).
    is_main: bool = True


class _TrainForward(nn.Module):
    """Makes the training forward the module's forward, so DistributedDataParallel hooks see it.

    It takes images, or trunk maps when the trunk's output comes from a :class:`TrunkCache`.
    """

    def __init__(self, model: HashModel, from_trunk: bool) -> None:
        super().__init__()
        self.model = model
        self.from_trunk = from_trunk

    def forward(self, inputs: torch.Tensor, want: frozenset[str]) -> dict[str, torch.Tensor]:
        if self.from_trunk:
            return self.model.train_outputs(inputs, want)
        return self.model.forward_train(inputs, want)


class _SeededShuffle(Sampler[int]):
    """A permutation of range(n) drawn from a fixed seed (one per iteration and epoch)."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def __iter__(self) -> Iterator[int]:
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed)).tolist())

    def __len__(self) -> int:
        return self.n


def distinct_codes(codes: torch.Tensor) -> int:
    """How many different binary codes (signs, u >= 0 → 1) a batch of real-valued codes holds."""
    return len(torch.unique(codes >= 0, dim=0))


def _iteration_seed(seed: int, iteration: int, epoch: int = 0) -> int:
    return (seed * 1_000_003 + iteration * 1_009 + epoch) % (2**63)


def _setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises torch.distributed when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve_device(device)
    if world > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(resolved)
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, resolved


def _amp_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    if device.type != "cuda" or config.amp == "off":
        return None
    if config.amp == "fp16":
        return torch.float16
    if config.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def _loader(samples: list[Sample], data: HashingDataset, model: HashModel, config: TrainConfig, *,
            batches: list[list[int]], device: torch.device) -> DataLoader:
    dataset = LabeledImageDataset(samples, data.root, model.preprocess, train=True, crop_scale=config.crop_scale)
    size = model.preprocess.input_size
    workers = worker_loader_kwargs(config.workers, max(map(len, batches), default=1) * 3 * size * size * 4)
    return DataLoader(dataset, batch_sampler=batches, pin_memory=device.type == "cuda", persistent_workers=False,
                      **workers,
                      multiprocessing_context="fork" if workers["num_workers"] and sys.platform == "linux" else None)


def _chunks(order: list[int], batch_size: int) -> list[list[int]]:
    """``order`` in batches of ``batch_size``; a last batch of one image joins the one before.

    BatchNorm in training needs more than one value per channel, which one image at a 1×1
    feature map (small inputs) does not give.
    """
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(chunks) > 1 and len(chunks[-1]) == 1:
        chunks[-2].extend(chunks.pop())
    return chunks


class Trainer:
    """One training run; :meth:`run` does everything (also callable from Python)."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> None:
        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.rank, self.world, self.device = _setup_distributed(config.device)
        self.is_main = self.rank == 0
        self.show_progress = self.is_main and (sys.stderr.isatty() if progress is None else progress)

    # ---------------------------------------------------------------- setup

    def _prepare(self) -> None:
        cfg = self.config
        if self.resume and not (self.out / LAST).exists():
            raise FghError(f"{display_path(self.out)}: nothing to resume (no {LAST}); start without --resume")
        if not self.resume and self.is_main and (self.out / LAST).exists():
            raise FghError(f"{display_path(self.out)}: already holds a run ({LAST}); pass --resume to continue it "
                           f"or choose another --out")
        self.data = load_dataset(cfg.data, splits=self._splits_path(), split_seed=cfg.seed,
                                 query_fraction=cfg.query_fraction)
        self.train_db, self.val = hold_out_validation(self.data.database, cfg.val_fraction, seed=cfg.seed) \
            if cfg.val_fraction > 0 else (list(self.data.database), [])
        num_classes = len(self.data.classes)
        self.labels = one_hot(torch.tensor([s.label for s in self.train_db]), num_classes)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg.model, cfg.bits, backbone=cfg.backbone, pretrained=cfg.pretrained,
                                 input_size=cfg.input_size, **cfg.model_options).to(self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        if cfg.freeze_trunk:
            self.model.trunk.requires_grad_(False)
        if cfg.adl_weight == 0:
            # AGMH's attention branch only feeds its attention-dispersion loss: with the loss off it
            # never runs, and frozen parameters keep it out of the optimizer and of DDP's reduction.
            for module in self.model.training_only_modules().values():
                module.requires_grad_(False)
        if cfg.optimizer == "adamw":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(
                self._parameter_groups(), lr=cfg.lr, betas=(cfg.momentum, 0.999), weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.SGD(self._parameter_groups(), lr=cfg.lr, momentum=cfg.momentum,
                                             nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=cfg.lr_steps,
                                                              gamma=cfg.lr_decay)
        # The public code starts B from a real-valued Gaussian (models.md §1.1).
        self.codes = torch.randn(len(self.train_db), cfg.bits, generator=torch.Generator().manual_seed(cfg.seed))
        self.start_iteration = 0
        self.aux_start_iteration = int(cfg.iterations * cfg.aux_start)
        self.best_map, self.best_iteration = -1.0, -1
        self.last_map: float | None = None
        self.amp_dtype = _amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.trunk_cache, self.val_cache = self._build_caches()
        step = _TrainForward(self.model, from_trunk=self.trunk_cache is not None)
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            step = nn.parallel.DistributedDataParallel(step, device_ids=ids)
        self.step_module = step
        if self.resume:
            self._load_state()
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            if self.data.layout == CLASS_FOLDERS:
                self._write_splits()
            # On resume too: the run's config now records where it is and how long it runs.
            atomic_write(self.out / CONFIG,
                         lambda f: f.write(json.dumps(self.config.to_dict(), indent=2).encode()))
            if not self.resume:
                (self.out / METRICS).unlink(missing_ok=True)

    def _splits_path(self) -> Path | None:
        """The run's split file (a relative ``splits`` is in the run directory), if it has one."""
        if self.config.splits is None:
            return None
        return self.out / self.config.splits

    def _write_splits(self) -> None:
        """Record the split drawn from a class-folder tree in the run, so eval and resume reuse it."""
        path = self.out / SPLITS
        atomic_write(path, lambda f: f.write(splits_tsv(self.data).encode("utf-8")))
        self.config = dataclasses.replace(self.config, splits=SPLITS)
        database, query = len(self.data.database), len(self.data.query)
        log.info("split %d images of %d classes: %d database / %d query (seed %d), written to %s",
                 database + query, self.data.num_classes, database, query, self.config.seed, display_path(path))

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's groups (pretrained at ``lr``, new at ``lr_new``, hash scaled), logged once."""
        cfg = self.config
        hash_scale = self.model.hash_rate_scale() if cfg.scale_hash_rate else 1.0
        rates = {PRETRAINED: cfg.lr, NEW: cfg.new_lr, HASH: cfg.new_lr * hash_scale}
        groups, lines = [], []
        for name, params in self.model.parameter_groups().items():
            trainable = [p for p in params if p.requires_grad]
            frozen = sum(p.numel() for p in params if not p.requires_grad)
            if trainable:
                groups.append({"params": trainable, "lr": rates[name], "name": name})
            count = sum(p.numel() for p in trainable) / 1e6
            lines.append(f"{name} {count:.2f} M params at lr {rates[name]:g}"
                         + (f" (lr-new × {hash_scale:.2f}, feature width / fan-in)" if name == HASH and hash_scale < 1 else "")
                         + (f" (+{frozen / 1e6:.2f} M frozen)" if frozen else ""))
        if self.is_main:
            log.info("parameter groups: %s", "; ".join(lines))
        return groups

    def _build_caches(self) -> tuple[TrunkCache | None, TrunkCache | None]:
        """Trunk maps of the training images' views and of the validation images, if configured."""
        cfg = self.config
        if not cfg.trunk_cache_views:
            return None, None
        map_bytes = bytes_per_map(self.model, cfg.input_size)
        views = views_that_fit(cfg.trunk_cache_views, len(self.train_db) + len(self.val), map_bytes,
                               cfg.trunk_cache_gb)
        if views == 0:
            if self.is_main:
                log.warning("trunk cache: one view of %d images needs %.1f GB, over trunk_cache_gb=%g; running "
                            "the trunk on every pass instead", len(self.train_db), len(self.train_db) * map_bytes / 1e9,
                            cfg.trunk_cache_gb)
            return None, None
        if views < cfg.trunk_cache_views and self.is_main:
            log.warning("trunk cache: %d of %d views fit in trunk_cache_gb=%g", views, cfg.trunk_cache_views,
                        cfg.trunk_cache_gb)
        preprocess = self.model.preprocess
        train_images = LabeledImageDataset(self.train_db, self.data.root, preprocess, train=True,
                                           crop_scale=cfg.crop_scale)
        common = dict(seed=cfg.seed, device=self.device, workers=cfg.workers, progress=self.show_progress)
        cache = build_trunk_cache(self.model, train_images, views, label="trunk cache (training views)", **common)
        val = None
        if self.val and cfg.select_on == "val":
            val_images = LabeledImageDataset(self.val, self.data.root, preprocess, train=False)
            val = build_trunk_cache(self.model, val_images, 1, label="trunk cache (validation)", **common)
        return cache, val

    def _load_state(self) -> None:
        path = self.out / LAST
        where = display_path(path)
        ckpt = load_checkpoint(path)
        state = ckpt.extra.get("train_state")
        if not isinstance(state, dict):
            raise FghError(f"{where}: has no training state to resume from")
        try:
            saved = TrainConfig.from_dict(ckpt.extra.get("train_config"))
        except FghError as exc:
            raise FghError(f"{where}: {exc}") from None
        for key in ("data", "splits", "model", "bits", "backbone", "input_size", "num_samples", "seed"):
            if getattr(saved, key) != getattr(self.config, key):
                raise FghError(f"{where}: was trained with {key}={getattr(saved, key)!r}, not "
                               f"{getattr(self.config, key)!r}; resume with the same settings")
        try:
            completed = int(state["iteration"]) + 1
            self.model.load_state_dict(ckpt.state_dict)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.codes = state["codes"].float()
            self.best_map, self.best_iteration = float(state["best_map"]), int(state["best_iteration"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            raise FghError(f"{where}: its training state is incomplete or damaged "
                           f"({type(exc).__name__}: {str(exc)[:120]})") from None
        if self.codes.shape != (len(self.train_db), self.config.bits):
            raise FghError(f"{where}: holds {tuple(self.codes.shape)} database codes, the data gives "
                           f"({len(self.train_db)}, {self.config.bits}); was the dataset changed?")
        if self.config.iterations < completed:
            raise FghError(f"{where}: the run already completed {completed} iterations; iterations="
                           f"{self.config.iterations} cannot shorten it")
        self.start_iteration = completed
        # Runs saved before the start was recorded planned it from their own length.
        self.aux_start_iteration = int(state.get("aux_start_iteration", int(saved.iterations * saved.aux_start)))
        self.last_map = state.get("last_map")
        if self.is_main:
            _truncate_metrics(self.out / METRICS, self.start_iteration)
            extended = f", extended from {saved.iterations} to {self.config.iterations} iterations" \
                if saved.iterations != self.config.iterations else ""
            log.info("resuming %s after iteration %d%s", display_path(self.out), completed - 1, extended)

    # ---------------------------------------------------------------- loop

    def run(self) -> TrainResult:
        started = time.perf_counter()
        self._prepare()
        cfg = self.config
        for iteration in range(self.start_iteration, cfg.iterations):
            record = self._iteration(iteration)
            evaluate = (iteration + 1) % cfg.eval_every == 0 or iteration + 1 == cfg.iterations
            if evaluate:
                record.update(self._evaluate())
                self.last_map = record["map"]
            improved = evaluate and record["map"] > self.best_map
            if improved:
                self.best_map, self.best_iteration = record["map"], iteration
            record.update(best_map=self.best_map, best_iteration=self.best_iteration)
            if self.is_main:
                # Metrics line first, then last.pt: a crash in between re-runs this iteration on
                # resume, which rewrites the line.
                with open(self.out / METRICS, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                self._save(self.out / LAST, iteration, with_state=True)
                if improved or (self.best_iteration < 0 and iteration + 1 == cfg.iterations):
                    self._save(self.out / BEST, iteration, with_state=False)
            self._log(record)
        if self.is_main and not (self.out / BEST).exists():
            self._save(self.out / BEST, cfg.iterations - 1, with_state=False)
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return TrainResult(self.out, cfg.iterations, self.best_iteration, self.best_map, self.last_map,
                           cfg.select_on, time.perf_counter() - started, self.is_main)

    def _iteration(self, iteration: int) -> dict[str, Any]:
        cfg = self.config
        torch.manual_seed(_iteration_seed(cfg.seed, iteration))
        tick = time.perf_counter()
        n = len(self.train_db)
        omega = torch.randperm(n, generator=torch.Generator().manual_seed(_iteration_seed(cfg.seed, iteration)))
        omega = omega[: min(cfg.num_samples, n)]
        similarity = soft_similarity(self.labels[omega], self.labels)
        sampled = [self.train_db[i] for i in omega.tolist()]
        outputs = torch.zeros(len(omega), cfg.bits)
        written = torch.zeros(len(omega))
        codes_dev = self.codes.to(self.device)
        sim_dev = similarity.to(self.device)
        omega_dev = omega.to(self.device)
        use_aux = iteration >= self.aux_start_iteration
        want = wanted_outputs(use_reconstruction=use_aux, adl_weight=cfg.adl_weight)
        sums: dict[str, float] = {}
        self.model.train()
        if cfg.freeze_trunk:
            self.model.trunk.eval()  # frozen BatchNorm statistics too
        for epoch in range(cfg.epochs):
            for inputs, local in self._progress(self._batches(sampled, omega, iteration, epoch), iteration, epoch,
                                                sums):
                inputs = inputs.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                local_dev = local.to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    out = self.step_module(inputs, want)
                u = out["codes"].float()
                terms = training_losses(out, sim_dev[local_dev], codes_dev, codes_dev[omega_dev[local_dev]],
                                        gamma=cfg.gamma, use_reconstruction=use_aux, adl_weight=cfg.adl_weight)
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise FghError(f"training diverged at iteration {iteration} (loss {loss.item()}); "
                                   f"lower --lr or use --amp off")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                outputs[local] = u.detach().cpu()
                written[local] = 1.0
                bs = len(local)
                for key, value in terms.items():
                    sums[key] = sums.get(key, 0.0) + float(value.detach()) * bs
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach()) * bs
                sums["seen"] = sums.get("seen", 0.0) + bs
        self.scheduler.step()
        if self.world > 1:
            # Each rank saw its own shard: combine U (DistributedSampler may repeat a few rows).
            stacked = torch.stack([outputs * written[:, None], written[:, None].expand_as(outputs)]).to(self.device)
            dist.all_reduce(stacked)
            outputs = (stacked[0] / stacked[1].clamp(min=1)).cpu()
        self.codes = update_database_codes(self.codes, outputs, similarity, omega, cfg.gamma)
        seconds = time.perf_counter() - tick
        seen = sums.pop("seen", 0.0)
        record: dict[str, Any] = {"iteration": iteration, "seconds": round(seconds, 2),
                                  "images_per_second": round(seen * self.world / seconds, 2)}
        record.update({f"lr/{group['name']}": group["lr"] for group in self.optimizer.param_groups})
        record.update({k: v / max(seen, 1.0) for k, v in sums.items()})
        return record

    def _batches(self, sampled: list[Sample], omega: torch.Tensor, iteration: int,
                 epoch: int) -> "_Batches":
        """One epoch's ``(images or trunk maps, local indices into the sample)`` batches."""
        cfg = self.config
        seed = _iteration_seed(cfg.seed, iteration, epoch + 1)
        if self.world > 1:
            sampler: Sampler = DistributedSampler(range(len(sampled)), num_replicas=self.world, rank=self.rank,
                                                  shuffle=True, seed=seed)
        else:
            sampler = _SeededShuffle(len(sampled), seed)
        chunks = _chunks(list(sampler), cfg.batch_size)
        if self.trunk_cache is None:
            loader = _loader(sampled, self.data, self.model, cfg, batches=chunks, device=self.device)
            return _Batches(((images, local) for images, _, local in loader), len(loader))
        # Which cached view each pass uses: drawn per (iteration, epoch), so every epoch sees new views.
        views = torch.randint(self.trunk_cache.views, (len(sampled),), generator=torch.Generator().manual_seed(seed))
        cache, cpu = self.trunk_cache, torch.device("cpu")
        locals_ = [torch.tensor(chunk, dtype=torch.long) for chunk in chunks]
        return _Batches(((cache.gather(omega[local], views[local], cpu), local) for local in locals_), len(locals_))

    def _progress(self, batches: "_Batches", iteration: int, epoch: int, sums: dict[str, float]) -> Iterator:
        """The batches; on a terminal also a bar with the running loss and images/s."""
        if not self.show_progress:
            yield from batches
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (TextColumn(f"iter {iteration + 1}/{self.config.iterations} epoch {epoch + 1}"), BarColumn(),
                   MofNCompleteColumn(), TextColumn("loss {task.fields[loss]:.4f}"),
                   TextColumn("{task.fields[rate]:.1f} img/s"), TimeRemainingColumn())
        started, seen_before = time.perf_counter(), sums.get("seen", 0.0)
        with Progress(*columns, transient=True, console=Console(stderr=True)) as bar:
            task = bar.add_task("train", total=len(batches), loss=0.0, rate=0.0)
            for batch in batches:
                yield batch
                seen = sums.get("seen", 0.0)
                bar.update(task, advance=1, loss=sums.get("loss", 0.0) / max(seen, 1.0),
                           rate=(seen - seen_before) * self.world / max(time.perf_counter() - started, 1e-9))

    def _evaluate(self) -> dict[str, Any]:
        """mAP@all (asymmetric: network queries vs learned codes) on the selection split."""
        cfg = self.config
        if cfg.select_on == "query":
            queries, split = self.data.query, "query (papers' selection on the test set)"
        elif self.val:
            queries, split = self.val, "val"
        else:
            return {}
        if self.val_cache is not None and queries is self.val:
            query_codes = self._encode_cached(self.val_cache)
        else:
            query_codes = encode_samples(self.model, queries, self.data.root, self.device, workers=cfg.workers)
        query_labels = torch.tensor([s.label for s in queries])
        db_labels = torch.tensor([s.label for s in self.train_db])
        score = mean_average_precision(query_codes.numpy(), query_labels.numpy(), self.codes.numpy(),
                                       db_labels.numpy(), ties="index")
        distinct = distinct_codes(query_codes)
        if distinct <= max(1, len(queries) // 100):
            # A collapse does not recover by itself: every image pushes the one shared code the same way.
            log.warning("the %d %s images get only %d distinct code(s): the codes have collapsed and mAP is at "
                        "chance; train again with a lower --lr (this run: %g)", len(queries), split.split(" ")[0],
                        distinct, cfg.lr)
        return {"map": float(score), "map_split": split, "distinct_codes": distinct}

    @torch.no_grad()
    def _encode_cached(self, cache: TrunkCache, batch_size: int = 64) -> torch.Tensor:
        """±1 codes of the images whose eval-view trunk maps ``cache`` holds (eval mode)."""
        was_training = self.model.training
        self.model.eval()
        rows = torch.arange(cache.maps.shape[1])
        codes = [sign_plus(self.model.codes(self.model.features(
            cache.gather(chunk, torch.zeros_like(chunk), self.device).contiguous(memory_format=torch.channels_last)
        )).float()).cpu() for chunk in rows.split(batch_size)]
        self.model.train(was_training)
        return torch.cat(codes)

    def _save(self, path: Path, iteration: int, *, with_state: bool) -> None:
        model = self.model
        extra: dict[str, Any] = {
            "train_config": self.config.to_dict(),
            "iteration": iteration,
            "classes": list(self.data.classes),
            "database_paths": [s.relpath for s in self.train_db],
            "database_labels": torch.tensor([s.label for s in self.train_db]),
            # Learned ±1 database codes of the training rows (the asymmetric protocol's database).
            "database_codes": self.codes.to(torch.int8),
            "selection": {"split": self.config.select_on, "best_map": self.best_map,
                          "best_iteration": self.best_iteration},
        }
        if with_state:
            extra["train_state"] = {
                "iteration": iteration,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "codes": self.codes,
                "aux_start_iteration": self.aux_start_iteration,
                "best_map": self.best_map,
                "best_iteration": self.best_iteration,
                "last_map": self.last_map,
            }
        save_checkpoint(model, path, extra=extra,
                        provenance={"dataset": str(self.data.root), "dataset_layout": self.data.layout})

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        parts = [f"iter {record['iteration'] + 1}/{self.config.iterations}", f"loss {record.get('loss', math.nan):.4f}"]
        parts += [f"{k} {record[k]:.4f}" for k in ("hash", "quant", "rec", "dec", "adl") if k in record]
        parts.append(f"{record['images_per_second']:.1f} img/s")
        if "map" in record:
            parts.append(f"mAP({record['map_split'].split()[0]}) {record['map']:.4f}")
        log.info("  ".join(parts))


class _Batches:
    """An iterable of batches that knows how many it holds (for the progress bar)."""

    def __init__(self, batches: Iterator, count: int) -> None:
        self._batches, self._count = batches, count

    def __iter__(self) -> Iterator:
        return iter(self._batches)

    def __len__(self) -> int:
        return self._count


def _truncate_metrics(path: Path, next_iteration: int) -> None:
    """Drop metric lines of iterations that a resume will run again, and lines cut short by a kill."""
    if not path.exists():
        return
    kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
            if (iteration := _metrics_iteration(line)) is not None and iteration < next_iteration]
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def _metrics_iteration(line: str) -> int | None:
    """The iteration a metrics line records, or ``None`` for a line that is not a whole record."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    iteration = record.get("iteration") if isinstance(record, dict) else None
    return iteration if isinstance(iteration, int) else None


def train(config: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Run (or resume) a training run; see :class:`Trainer`."""
    return Trainer(config, resume=resume, progress=progress).run()
