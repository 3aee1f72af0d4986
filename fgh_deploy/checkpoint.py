"""One checkpoint file carries everything downstream needs: config, preprocessing, weights, provenance.

Layout (a ``torch.save`` dict, read back with ``torch.load(weights_only=True)`` only, so loading a
checkpoint can never execute code)::

    format          "fgh-checkpoint"
    format_version  2 (1: before SEMICON's channel interaction and AGMH's stage were fixed)
    config          HashConfig.to_dict()       model, bits, backbone, options
    preprocess      PreprocessConfig.to_dict() input/resize size, mean/std, interpolation
    state_dict      the model's weights (CPU tensors)
    fingerprint     sha256 over config, preprocess and every weight tensor
    provenance      fgh/torch versions, creation time, backbone weights, anything the caller adds
    extra           tensors and plain values (learned database codes, class names, train state)

The fingerprint identifies the model (an index records it to refuse codes from another model) and
detects damaged weights on load. Writes are atomic: a temporary file in the same folder, fsync,
then rename, so an interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import HashConfig, PreprocessConfig
from .errors import FghError
from .utils import atomic_write, display_path, terminal_safe
from .version import __version__

FORMAT = "fgh-checkpoint"
FORMAT_VERSION = 2
#: Models whose computation changed in format 2, so their format-1 weights would compute other
#: codes: SEMICON's channel interaction (channel order, scale, gates) and AGMH's stride-1 stage
#: (dilated) and SIEA (no biases). ADSH and A²-Net format-1 checkpoints load unchanged.
_CHANGED_IN_2 = {"semicon": "its channel-interaction blocks changed", "agmh": "its stride-1 stage is now dilated"}


@dataclass
class Checkpoint:
    """A loaded checkpoint (see the module docstring for the fields)."""

    path: Path
    config: HashConfig
    preprocess: PreprocessConfig
    state_dict: dict[str, torch.Tensor]
    fingerprint: str
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def fingerprint(config: HashConfig, preprocess: PreprocessConfig, state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over the config, the preprocessing and every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    header = {"config": config.to_dict(), "preprocess": preprocess.to_dict()}
    digest.update(json.dumps(header, sort_keys=True).encode())
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_checkpoint(model: "HashModel", path: str | os.PathLike, *,  # noqa: F821
                    extra: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``model`` (and optional ``extra`` tensors/values) to ``path`` atomically.

    Args:
        model: a :class:`~fgh_deploy.models.HashModel`.
        path: destination file (conventionally ``.pt``).
        extra: tensors and plain Python values only (no numpy arrays or custom classes: the file
            is loaded with ``weights_only=True``).
        provenance: extra provenance fields (training run, dataset, ...).

    Returns:
        The path written.
    """

    path = Path(path)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    backbone_source = getattr(model, "backbone_weights", None)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "preprocess": model.preprocess.to_dict(),
        "state_dict": state,
        "fingerprint": fingerprint(model.config, model.preprocess, state),
        "provenance": {
            "fgh_version": __version__,
            "torch_version": str(torch.__version__),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **({"backbone_weights": backbone_source} if backbone_source else {}),
            **(provenance or {}),
        },
        "extra": dict(extra or {}),
    }
    atomic_write(path, lambda f: torch.save(payload, f))
    return path


def load_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> Checkpoint:
    """Read and validate a checkpoint.

    Args:
        path: the file.
        verify: recompute the fingerprint and refuse damaged weights.

    Raises:
        FghError: missing, truncated, foreign (not written by fgh), newer-format or damaged file;
            the message names the file and the reason.
    """
    path = Path(path)
    shown = display_path(path)
    if not path.exists():
        raise FghError(f"{shown}: no such checkpoint file")
    if path.is_dir():
        raise FghError(f"{shown}: is a directory, not a checkpoint file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = terminal_safe(" ".join(str(exc).split()))
        if "Weights only load failed" in text or "Unsupported global" in text:
            raise FghError(f"{shown}: refused: it contains pickled Python objects, and loading it could run code "
                           f"(fgh checkpoints hold only tensors and plain values)") from exc
        raise FghError(f"{shown}: not a readable checkpoint (truncated or corrupt: {text[:160]})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        hint = ""
        if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
            hint = "; it looks like a bare state dict (use --weights for backbone weights)"
        raise FghError(f"{shown}: not an fgh checkpoint (no '{FORMAT}' header{hint})")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FghError(f"{shown}: checkpoint format {terminal_safe(repr(version))[:40]} is newer than this fgh "
                       f"understands ({FORMAT_VERSION}); upgrade fgh")
    config = payload.get("config")
    model_name = config.get("model") if isinstance(config, dict) else None
    if version < 2 and model_name in _CHANGED_IN_2:
        raise FghError(f"{shown}: a {model_name} checkpoint of format {version}, from an fgh before {model_name} was "
                       f"fixed ({_CHANGED_IN_2[model_name]}); its weights no longer give its codes: retrain it")
    try:
        hash_config = HashConfig.from_dict(payload.get("config"))
        preprocess = PreprocessConfig.from_dict(payload.get("preprocess"))
    except FghError as exc:
        raise FghError(f"{shown}: {exc}") from None
    state_dict, recorded = payload.get("state_dict"), payload.get("fingerprint")
    if not isinstance(state_dict, dict) or not all(
            isinstance(name, str) and isinstance(tensor, torch.Tensor) for name, tensor in state_dict.items()):
        raise FghError(f"{shown}: damaged fgh checkpoint (state_dict is not a dict of named tensors)")
    if not isinstance(recorded, str):
        raise FghError(f"{shown}: damaged fgh checkpoint (fingerprint is not a string)")
    provenance, extra = payload.get("provenance", {}), payload.get("extra", {})
    if not isinstance(provenance, dict) or not isinstance(extra, dict):
        raise FghError(f"{shown}: damaged fgh checkpoint (provenance and extra must be dicts)")
    ckpt = Checkpoint(path=path, config=hash_config, preprocess=preprocess, state_dict=state_dict,
                      fingerprint=recorded, provenance=dict(provenance), extra=dict(extra))
    if verify and fingerprint(ckpt.config, ckpt.preprocess, ckpt.state_dict) != ckpt.fingerprint:
        raise FghError(f"{shown}: damaged checkpoint: weights do not match the recorded fingerprint")
    return ckpt
