"""Shared fixtures: small synthetic datasets written as IDX/CSV/NPZ files, and the real data."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from mnistlab.data import idx
from mnistlab.data.dataset import Dataset

if not torch.cuda.is_available():  # before anything imports Triton: its kernels then run on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


def synthetic(n: int = 30, side: int = 28, labelled: bool = True, seed: int = 0) -> Dataset:
    """Random grey levels over the full 0..255 range; labels cycle through every digit."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
    labels = np.arange(n, dtype=np.int64) % 10 if labelled else None
    return Dataset(images, labels, origin="synthetic")


@pytest.fixture
def make_dataset() -> Callable[..., Dataset]:
    """synthetic(n=30, side=28, labelled=True, seed=0) -> Dataset."""
    return synthetic


@pytest.fixture
def idx_dir(tmp_path: Path) -> Path:
    """A folder holding a gzipped IDX quartet: 30 training and 20 test images of 28x28."""
    parts = {"train": synthetic(30, seed=1), "t10k": synthetic(20, seed=2)}
    for prefix, dataset in parts.items():
        idx.write_idx(
            tmp_path / f"{prefix}-images-idx3-ubyte.gz",
            tmp_path / f"{prefix}-labels-idx1-ubyte.gz",
            dataset,
        )
    return tmp_path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST test set (and training labels) in /work/shared/data/mnist."""
    path = SHARED_DATA / "mnist"
    if not (path / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip(reason=f"real MNIST t10k files not found in {path}")
    return path


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Debian's dataset-fashion-mnist: the full 60k + 10k Fashion-MNIST as gzipped IDX."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(reason=f"Fashion-MNIST not installed in {FASHION_DIR} (dataset-fashion-mnist)")
    return FASHION_DIR
