"""``fgh eval``: retrieval quality of a checkpoint under the papers' and the deployed protocol, or of an index.

* **asymmetric** (the papers' protocol): query images encoded by the network, database codes =
  the codes learned during training (B). Database images held out for validation have no
  learned code; they are encoded by the network.
* **deploy**: database encoded by the network too, exactly what ``fgh encode`` + ``fgh query`` do.

Both report mAP@all with the tie rule used (stable: distance, then database order) and the
tie-aware expectation with its best/worst range, mAP@k, precision@k, precision within Hamming
radius 2, and the chance level. With ``baselines``, the same metrics for LSH and ITQ codes and
for float cosine search on the backbone's pretrained features (:mod:`train.baselines`): what
training bought.

:func:`evaluate_index` measures what is deployed instead: an index (local or Milvus) searched
exactly as ``fgh query`` searches it, with an engine (see its docstring).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import DataLoader

import numpy as np

from fgh_deploy.checkpoint import load_checkpoint
from fgh_deploy.errors import FghError
from fgh_deploy.images import worker_loader_kwargs
from fgh_deploy.models import HashModel, model_from_checkpoint
from fgh_deploy.utils import check_int, display_path, resolve_device

from .baselines import evaluate_baselines, pretrained_features
from .data import HashingDataset, LabeledImageDataset, Sample, load_dataset
from .dcc import sign_plus
from .metrics import evaluate_retrieval, ranked_list_metrics

TIE_RULE = "distance, then database order (stable)"


@torch.no_grad()
def encode_samples(model: HashModel, samples: Sequence[Sample], root: Path, device: torch.device, *,
                   batch_size: int = 64, workers: int = 2) -> torch.Tensor:
    """±1 codes (sign(0) = +1) of ``samples`` through the eval path, in order."""
    was_training = model.training
    model.eval()
    dataset = LabeledImageDataset(list(samples), root, model.preprocess, train=False)
    size = model.preprocess.input_size
    loader = DataLoader(dataset, batch_size=batch_size, pin_memory=device.type == "cuda",
                        **worker_loader_kwargs(workers, batch_size * 3 * size * size * 4))
    codes = [sign_plus(model(images.to(device, non_blocking=True)).float()).cpu() for images, _, _ in loader]
    model.train(was_training)
    return torch.cat(codes) if codes else torch.zeros(0, model.bits)


def evaluate_checkpoint(checkpoint: str | os.PathLike, data: str | os.PathLike | None = None, *,
                        topks: Sequence[int] = (100, 1000), radius: int = 2, device: str = "auto",
                        workers: int = 2, baselines: bool = False) -> dict[str, Any]:
    """Evaluate a checkpoint on a dataset's query split against its database split.

    Args:
        checkpoint: a ``.pt`` from ``fgh train`` (or any fgh checkpoint: then deploy protocol only).
        data: dataset root (default: the one the checkpoint was trained on). On the training
            data, a run that drew its split from a class-folder tree is evaluated on that split
            (the run's ``splits.tsv``, next to the checkpoint).
        topks: cut-offs for mAP@k / precision@k.
        radius: Hamming radius for precision within radius.
        device: ``auto``, ``cpu`` or ``cuda``.
        workers: decoding processes.
        baselines: also evaluate LSH, ITQ and float cosine on the backbone's pretrained
            features (the weights the checkpoint's training started from).

    Returns:
        A JSON-serialisable dict (``schema_version`` 1) with one metrics dict per protocol,
        and with ``baselines`` a ``baselines`` dict (``lsh``, ``itq``, ``cosine``).
    """
    resolved = resolve_device(device)
    ckpt = load_checkpoint(checkpoint)
    train_config = ckpt.extra.get("train_config")
    train_config = train_config if isinstance(train_config, dict) else {}
    recorded = train_config.get("data")
    data = data or recorded
    if not data or not isinstance(data, (str, os.PathLike)):
        raise FghError(f"{display_path(checkpoint)}: does not record its dataset; pass --data")
    dataset: HashingDataset = load_dataset(data, splits=_run_splits(checkpoint, train_config, data))
    classes = ckpt.extra.get("classes")
    if classes is not None and list(classes) != dataset.classes:
        raise FghError(f"{display_path(checkpoint)}: trained on {len(classes)} classes that differ from the "
                       f"{len(dataset.classes)} classes of {display_path(data)}")
    model = model_from_checkpoint(ckpt, resolved)
    encode = lambda samples: encode_samples(model, samples, dataset.root, resolved, workers=workers)  # noqa: E731
    query_codes = encode(dataset.query)
    query_labels = torch.tensor([s.label for s in dataset.query]).numpy()
    db_labels = torch.tensor([s.label for s in dataset.database]).numpy()
    network_db = encode(dataset.database)
    protocols: dict[str, Any] = {}
    learned = ckpt.extra.get("database_codes")
    if learned is not None:
        asymmetric_db = network_db.clone()
        row_of = {s.relpath: i for i, s in enumerate(dataset.database)}
        paths = ckpt.extra.get("database_paths", [])
        missing = [p for p in paths if p not in row_of]
        if missing:
            raise FghError(f"{display_path(checkpoint)}: {len(missing)} learned database images are not in "
                           f"{display_path(data)} (e.g. {display_path(missing[0])})")
        rows = torch.tensor([row_of[p] for p in paths], dtype=torch.long)
        asymmetric_db[rows] = learned.float()
        protocols["asymmetric"] = {
            "description": "queries by the network, database = learned codes (the papers' protocol)",
            "learned_rows": len(paths), "network_rows": len(dataset.database) - len(paths),
            **evaluate_retrieval(query_codes.numpy(), query_labels, asymmetric_db.numpy(), db_labels,
                                 topks=tuple(topks), radius=radius),
        }
    protocols["deploy"] = {
        "description": "queries and database by the network (what fgh encode + fgh query do)",
        **evaluate_retrieval(query_codes.numpy(), query_labels, network_db.numpy(), db_labels,
                             topks=tuple(topks), radius=radius),
    }
    report = {
        "schema_version": 1,
        "checkpoint": str(checkpoint),
        "model": ckpt.config.to_dict(),
        "data": dataset.summary(),
        "tie_rule": TIE_RULE,
        "selection": ckpt.extra.get("selection"),
        "protocols": protocols,
    }
    if baselines:
        weights = train_config.get("pretrained", True) or True  # a --no-pretrained run: compare with ImageNet's
        features = lambda samples: pretrained_features(  # noqa: E731
            ckpt.config.backbone, weights, ckpt.preprocess, samples, dataset.root, device=resolved, workers=workers)
        report["baselines"] = {
            "description": f"{ckpt.config.bits}-bit LSH and ITQ codes, and float cosine, on the pretrained "
                           f"{ckpt.config.backbone} pooled features (fitted on the database split)",
            **evaluate_baselines(features(dataset.query), query_labels, features(dataset.database), db_labels,
                                 ckpt.config.bits, topks=tuple(topks), radius=radius),
        }
    return report


def evaluate_index(index: str | os.PathLike, engine: str | os.PathLike | None = None, *, queries: int = 1000,
                   topks: Sequence[int] = (10, 100), device: str = "auto",
                   allow_other_gpu: bool = False) -> dict[str, Any]:
    """Retrieval quality of a deployed index as ``fgh query`` answers it: its own images, left out one at a time.

    Up to ``queries`` images of the index (:meth:`~fgh_deploy.index_uri.SearchIndex.sample_paths`)
    are read from its image folder, encoded by ``engine`` and searched in the index for
    ``max(topks) + 1`` hits; each query's own row is removed from its hits (the last hit is
    dropped instead when the query does not find itself). A hit is relevant when its first
    folder, its class in an ImageFolder tree, is the query's. The ranking is the index's own,
    ties included, so an approximate Milvus index (``bin_ivf_flat``) is measured as it searches.

    Args:
        index: the index, any name (a folder, ``milvus://…``, ``FILE.db#COLLECTION``).
        engine: engine or checkpoint (default: the one that built the index); another engine
            of the same model (say a TensorRT FP16 build of the checkpoint that encoded the
            index) is measured against the stored codes.
        queries: images to query with, at least 2.
        topks: cut-offs of mAP@k and precision@k.
        device: where the engine runs.
        allow_other_gpu: run a TensorRT engine built on another GPU model.

    Returns:
        A JSON-serialisable dict (``schema_version`` 1): the index, engine, tie rule, counts,
        ``self_at_distance_0`` (the share of queries whose stored code the engine reproduced
        exactly: 1.0 when the engine is the one that encoded the index), ``chance_precision``
        (a random ranking's precision, estimated from the queries' classes; exact when every
        image is a query) and ``map@k`` / ``precision@k``.

    Raises:
        FghError: fewer than 2 classes among the queries, an image that cannot be read, an
            engine that does not match the index, or any error opening them.
    """
    from fgh_deploy.engines import load_engine
    from fgh_deploy.query import default_engine_path, label_from_path, open_index, search_images

    check_int(queries, "queries", minimum=2)
    if not topks or min(topks) < 1:
        raise FghError(f"top-k cut-offs must be at least 1, got {list(topks)}")
    with open_index(index, verify=False) as idx:
        paths = [p for p in idx.sample_paths(queries) if label_from_path(p) is not None]
        labels = [label_from_path(p) for p in paths]
        if len(set(labels)) < 2:
            raise FghError(f"{idx.label}: evaluating an index needs its images in class folders (at least 2 "
                           f"classes among the queries, found {len(set(labels))})")
        with load_engine(engine or default_engine_path(idx), device=device, allow_other_gpu=allow_other_gpu) as eng:
            results = search_images(idx, eng, [Path(idx.root) / p for p in paths], top_k=max(topks) + 1)
            described = eng.describe()
        database = len(idx) - 1
        relevant = np.zeros((len(paths), max(topks)), dtype=bool)
        at_zero = 0
        for i, (path, label, result) in enumerate(zip(paths, labels, results)):
            own = next((j for j, hit in enumerate(result.hits) if hit.path == path), None)
            at_zero += own is not None and result.hits[own].distance == 0
            hits = [hit for j, hit in enumerate(result.hits) if j != own][:max(topks)]
            relevant[i, :len(hits)] = [label_from_path(hit.path) == label for hit in hits]
        counts = {label: labels.count(label) for label in set(labels)}
        report = {
            "schema_version": 1,
            "protocol": "index",
            "description": "the index's own images as queries, each left out of its hits, searched as fgh query "
                           "searches (classes: first folder)",
            "index": str(index),
            "approximate": idx.approximate,
            "engine": described,
            "tie_rule": idx.tie_rule,
            "database": database,
            "queries": len(paths),
            "classes": len(counts),
            "self_at_distance_0": at_zero / len(paths),
            "chance_precision": sum(counts[label] - 1 for label in labels) / (len(paths) * (len(paths) - 1)),
            **ranked_list_metrics(relevant, topks, max(database, 1)),
        }
    return report


def _run_splits(checkpoint: str | os.PathLike, train_config: dict[str, Any], data: str | os.PathLike) -> Path | None:
    """The split file of the checkpoint's run when ``data`` is its training data and it drew one."""
    splits, recorded = train_config.get("splits"), train_config.get("data")
    if not isinstance(splits, str) or not isinstance(recorded, str):
        return None
    if Path(data).resolve() != Path(recorded).resolve():
        return None
    path = Path(checkpoint).parent / splits  # a relative split file is in the run directory
    if not path.is_file():
        raise FghError(f"{display_path(checkpoint)}: its run's split {display_path(path)} is missing; keep the "
                       f"checkpoint in its run directory (or copy {splits} next to it)")
    return path
