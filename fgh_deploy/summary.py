"""Model size and compute: the numbers behind ``fgh models``."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from .backbones import list_backbones
from .models import build_model, list_models, model_entry


@dataclass(frozen=True)
class ModelSummary:
    """One row of ``fgh models``.

    ``params`` counts everything trained; ``inference_params`` only what ``forward`` (the exported
    graph) uses; ``gmacs`` is multiply-accumulates of one image through ``forward``.
    """

    model: str
    backbone: str
    bits: int
    input_size: int
    params: int
    inference_params: int
    gmacs: float
    summary: str
    paper: str

    def to_dict(self) -> dict:
        """The row as ``fgh models --json`` prints it."""
        return asdict(self)


def summarize(name: str, bits: int, backbone: str, input_size: int = 224) -> ModelSummary:
    """Count parameters and MACs without allocating weights (the model is built on the meta device)."""
    with torch.device("meta"):
        model = build_model(name, bits, backbone=backbone, input_size=input_size).eval()
        images = torch.zeros(1, 3, input_size, input_size, dtype=torch.uint8)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(images)
    params = sum(p.numel() for p in model.parameters())
    training_only = sum(p.numel() for m in model.training_only_modules().values() for p in m.parameters())
    entry = model_entry(name)
    return ModelSummary(name, backbone, bits, input_size, params, params - training_only,
                        counter.get_total_flops() / 2e9, entry.summary, entry.paper)


def summarize_all(bits: int, input_size: int = 224, models: list[str] | None = None,
                  backbones: list[str] | None = None) -> list[ModelSummary]:
    """:func:`summarize` for every model × backbone (or the given subsets)."""
    return [summarize(m, bits, b, input_size) for m in (models or list_models()) for b in (backbones or list_backbones())]
