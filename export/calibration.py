"""Images for parity checks: a folder of real images, or a deterministic built-in handful."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from fgh_deploy.config import PreprocessConfig
from fgh_deploy.errors import FghError
from fgh_deploy.images import ImageDecodeError, list_images, load_image


def synthetic_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """``count`` uint8 images (count, 3, size, size): smooth colour gradients with a few shapes.

    Not natural images, but they exercise every channel and contrast range deterministically (the
    same bytes for the same seed on every machine), so parity never depends on a download.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    images = np.empty((count, 3, size, size), dtype=np.uint8)
    for i in range(count):
        base = np.stack([rng.uniform(0, 1) * xx + rng.uniform(0, 1) * yy + rng.uniform(-0.3, 0.3)
                         for _ in range(3)])
        for _ in range(int(rng.integers(2, 6))):
            cy, cx, ry, rx = rng.uniform(0, 1, 4) * [1, 1, 0.4, 0.4] + [0, 0, 0.05, 0.05]
            inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            base[:, inside] = rng.uniform(0, 1, (3, 1))
        noise = rng.normal(0, 0.03, base.shape)
        images[i] = np.clip((base + noise) * 255, 0, 255).astype(np.uint8)
    return torch.from_numpy(images)


def calibration_images(folder: str | os.PathLike | None, cfg: PreprocessConfig, count: int = 32) -> tuple[torch.Tensor, str]:
    """Up to ``count`` images from ``folder`` (evenly spread over its sorted listing), else synthetic.

    Returns:
        (uint8 batch, a short description of where the images came from).
    """
    if folder is None:
        return synthetic_images(count, cfg.input_size), f"{count} built-in synthetic images"
    root = Path(folder)
    paths = list_images(root)
    if not paths:
        raise FghError(f"{root}: no images for the parity check")
    picks = [paths[int(i)] for i in np.linspace(0, len(paths) - 1, min(count, len(paths)))]
    images = []
    for rel in dict.fromkeys(picks):
        try:
            images.append(load_image(root / rel, cfg))
        except ImageDecodeError:
            continue  # a broken file in a calibration folder is not the export's problem
    if not images:
        raise FghError(f"{root}: none of the sampled images could be decoded")
    return torch.stack(images), f"{len(images)} images from {root}"
