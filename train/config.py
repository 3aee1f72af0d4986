"""Training configuration and the presets (``paper`` schedules from models.md, and ``fast``)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from fgh_deploy.errors import FghError


@dataclass
class TrainConfig:
    """Everything a training run depends on (written to ``config.json`` and into checkpoints).

    The schedule follows ADSH: ``iterations`` outer iterations, each sampling ``num_samples``
    database images and training ``epochs`` epochs on them against fixed database codes, then
    updating the codes by DCC. The learning rates step ×``lr_decay`` at the iterations in
    ``lr_steps`` (the scheduler steps once per outer iteration, as in the papers).

    Two parameter groups (each model declares which layer is which): ``lr`` for the layers
    that start from the backbone's pretrained weights, ``lr_new`` for the layers that start
    from random (attention, interaction blocks, hash layers); ``None`` means ``lr`` (the
    papers train everything at one rate). With ``scale_hash_rate`` the hash layers train at
    ``lr_new`` × the model's :meth:`~fgh_deploy.models.HashModel.hash_rate_scale` (feature width
    / fan-in), so a wide hash layer's codes move per step as ADSH's do.
    """

    data: str
    model: str
    bits: int
    out: str
    backbone: str = "resnet50"
    pretrained: bool | str = True
    input_size: int = 224
    model_options: dict[str, Any] = field(default_factory=dict)
    preset: str = "paper"
    iterations: int = 40
    epochs: int = 30
    num_samples: int = 2000
    batch_size: int = 16
    lr: float = 2.5e-4
    lr_new: float | None = None
    scale_hash_rate: bool = True
    #: "sgd" (the papers', with ``momentum``/``nesterov``) or "adamw" (``momentum`` is its β1).
    optimizer: str = "sgd"
    momentum: float = 0.91
    nesterov: bool = True
    weight_decay: float = 1e-4
    lr_steps: list[int] = field(default_factory=lambda: [40])
    lr_decay: float = 0.1
    gamma: float = 200.0
    #: A²-Net adds reconstruction + decorrelation from this fraction of the iterations on.
    aux_start: float = 0.5
    #: AGMH's attention-dispersion loss weight.
    adl_weight: float = 0.5
    crop_scale: tuple[float, float] = (0.08, 1.0)
    #: Keep the shared trunk (and its BatchNorm statistics) at the pretrained weights and train only
    #: the per-branch stages and heads: about 2× faster, for short CPU schedules.
    freeze_trunk: bool = False
    #: With a frozen trunk: compute its output once for this many augmented views of every
    #: training image and train on those (0: run the trunk on every pass).
    trunk_cache_views: int = 0
    #: Host memory the trunk cache may take; fewer views are cached when they would not fit.
    trunk_cache_gb: float = 4.0
    #: Fraction of the database held out to choose best.pt (never the query split).
    val_fraction: float = 0.1
    #: "val" (honest) or "query" (the papers' practice: best over iterations on the test set).
    select_on: str = "val"
    eval_every: int = 1
    workers: int = 4
    seed: int = 0
    device: str = "auto"
    #: "auto" (bf16 where supported on CUDA, else fp16; off on CPU), "bf16", "fp16" or "off".
    amp: str = "auto"

    def validate(self) -> None:
        checks = [
            (self.bits >= 1, "bits must be ≥ 1"),
            (self.iterations >= 1 and self.epochs >= 1, "iterations and epochs must be ≥ 1"),
            (self.num_samples >= 1 and self.batch_size >= 1, "num_samples and batch_size must be ≥ 1"),
            (0.0 <= self.val_fraction < 1.0, "val_fraction must be in [0, 1)"),
            (self.select_on in ("val", "query"), "select_on must be 'val' or 'query'"),
            (self.optimizer in ("sgd", "adamw"), "optimizer must be 'sgd' or 'adamw'"),
            (self.amp in ("auto", "bf16", "fp16", "off"), "amp must be auto, bf16, fp16 or off"),
            (self.eval_every >= 1, "eval_every must be ≥ 1"),
            (0.0 <= self.aux_start <= 1.0 and self.adl_weight >= 0, "aux_start must be in [0, 1], adl_weight ≥ 0"),
            (self.lr > 0 and (self.lr_new is None or self.lr_new > 0), "lr and lr_new must be positive"),
            (self.trunk_cache_views >= 0 and self.trunk_cache_gb > 0,
             "trunk_cache_views must be ≥ 0 and trunk_cache_gb positive"),
            (self.trunk_cache_views == 0 or self.freeze_trunk,
             "trunk_cache_views needs a frozen trunk (freeze_trunk); a trained trunk changes its output"),
        ]
        for ok, message in checks:
            if not ok:
                raise FghError(f"train config: {message}")

    @property
    def new_lr(self) -> float:
        """The rate of the new (randomly initialised) layers."""
        return self.lr if self.lr_new is None else self.lr_new

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if "crop_scale" in values:
            values["crop_scale"] = tuple(values["crop_scale"])
        return cls(**values)


# models.md §2–§5: the public code's schedules (CUB / Aircraft rows). lr_steps at 40 with 40
# iterations means the rate never decays, exactly as in the papers' runs.
PAPER_PRESETS: dict[str, dict[str, Any]] = {
    "semicon": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=2.5e-4, momentum=0.91,
                    nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "adsh": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=2.5e-4, momentum=0.91,
                 nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "agmh": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=32, lr=1e-3, momentum=0.9,
                 nesterov=True, weight_decay=1e-4, lr_steps=[40], scale_hash_rate=False),
    "a2net": dict(optimizer="sgd", iterations=40, epochs=30, num_samples=2000, batch_size=16, lr=1e-4, momentum=0.9,
                  nesterov=False, weight_decay=1e-4, lr_steps=[35], scale_hash_rate=False),
}

# A short schedule for a first result on a CPU (see the README's cub100 table): the trunk frozen
# and computed once per image and view; AdamW, whose per-parameter step sizes do not depend on how
# many bits or branches feed a layer's gradient (SGD at one rate collapsed A²-Net's codes, whose
# hash layer starts reading five copies of one feature, and left SEMICON's two stage copies at
# half ADSH's pace); the pretrained stages at 3e-4, the new layers at 1e-3 (at 1e-2 the hash layer
# collapses every model's codes).
FAST_PRESET: dict[str, Any] = dict(iterations=30, epochs=1, num_samples=500, batch_size=32, optimizer="adamw",
                                   lr=3e-4, lr_new=1e-3, momentum=0.9, weight_decay=1e-4, lr_steps=[24],
                                   crop_scale=(0.35, 1.0), eval_every=5, freeze_trunk=True, trunk_cache_views=4,
                                   # AGMH's SIEA branch is training-only and doubles its CPU cost per image;
                                   # the short schedule spends that time on hash-layer iterations instead.
                                   adl_weight=0.0)

PRESETS = ("paper", "fast")


def make_config(preset: str, *, data: str, model: str, bits: int, out: str, **overrides: Any) -> TrainConfig:
    """A :class:`TrainConfig` from a preset, with explicit overrides (``None`` values are ignored)."""
    if preset == "paper":
        base = PAPER_PRESETS.get(model)
        if base is None:
            raise FghError(f"no paper preset for model {model!r}")
    elif preset == "fast":
        base = dict(FAST_PRESET)
    else:
        raise FghError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    values = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    config = TrainConfig(data=data, model=model, bits=bits, out=out, preset=preset, **values)
    config.validate()
    return config
