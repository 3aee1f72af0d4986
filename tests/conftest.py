"""Shared fixtures: small, random-weight models and deterministic uint8 images."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CUB100 = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cub100"


def pytest_configure(config: pytest.Config) -> None:
    # Two cores on CI: more intra-op threads only add contention.
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture
def images() -> torch.Tensor:
    """Four deterministic 64×64 uint8 images."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8, generator=gen)


@pytest.fixture(scope="session")
def cub100() -> Path:
    if not CUB100.is_dir():
        pytest.skip(f"real data not found at {CUB100}")
    return CUB100
