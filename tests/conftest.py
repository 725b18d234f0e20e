"""Shared test set-up: one thread, seeded, float64 where the oracle is involved."""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture
def float64() -> Iterator[None]:
    """Run a test with float64 as torch's default dtype (oracle comparisons)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
