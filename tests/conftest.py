"""Shared fixtures: small synthetic datasets written as IDX/CSV/NPZ files, and the real data."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mnistlab.data import idx
from mnistlab.data.dataset import Dataset
from mnistlab.errors import MnistlabError

if not torch.cuda.is_available():  # before anything imports Triton: its kernels then run on CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest_plugins = ("pytester",)  # tests/data/test_real_data.py runs pytest on a test file
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


# What ../shared/data/mnist holds, and so what tests may use: all of MNIST (keep their runtime
# small: subsets of the 60,000 training digits, few epochs).
REAL_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
              "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
REAL_MNIST = pytest.StashKey[Path]()
NOT_RUN = pytest.StashKey[str]()


def real_data(name: str, shared: Path, folder: Path) -> Path:
    """A folder holding the REAL_FILES of dataset `name`: `<shared>/<name>` where it exists (CI,
    the project's machines: no network needed), else `folder` with links to mnistlab's own
    verified copy, from its cache or downloaded into it, so the tests see the same files either
    way. A MnistlabError when neither is possible (offline, no copy)."""
    if all((shared / name / file).is_file() for file in REAL_FILES):
        return shared / name
    from mnistlab.data.sources import locate

    copy = locate(name, progress=False)
    for file in REAL_FILES:
        (folder / file).symlink_to(copy / file)
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Real MNIST, found once for the tests that use `mnist_dir` (see `real_data`). Where it
    cannot be had, those tests are deselected and the summary says so in one line that names
    the command that fixes it, rather than one skip line per test."""
    needy = [item for item in items if "mnist_dir" in getattr(item, "fixturenames", ())]
    if not needy:
        return
    folder = Path(tempfile.mkdtemp(prefix="mnistlab-real-"))
    config.add_cleanup(lambda: shutil.rmtree(folder, ignore_errors=True))
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # each mirror's warning: one line below
            config.stash[REAL_MNIST] = real_data("mnist", SHARED_DATA, folder)
    except MnistlabError:
        config.stash[NOT_RUN] = (
            f"{len(needy)} tests need real MNIST and did not run: no {SHARED_DATA / 'mnist'} and "
            "no download (offline?); run `mnistlab data fetch mnist` once, then pytest again")
        config.hook.pytest_deselected(items=needy)
        items[:] = [item for item in items if item not in needy]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if NOT_RUN in config.stash:
        terminalreporter.write_line(config.stash[NOT_RUN], yellow=True)


@pytest.fixture(scope="session")
def mnist_dir(request: pytest.FixtureRequest) -> Path:
    """A folder holding the real MNIST, training and test sets (found at collection, see
    `real_data`)."""
    return request.config.stash[REAL_MNIST]


@pytest.fixture(scope="session")
def mnist_t10k_dir(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST's 10,000 test digits alone (links to its two t10k files): a source without a
    training part, whose test part mnistlab holds out itself; small enough for quick subsets."""
    folder = tmp_path_factory.mktemp("mnist-t10k")
    for name in REAL_FILES[:2]:
        (folder / name).symlink_to(mnist_dir / name)
    return folder


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    """Debian's dataset-fashion-mnist: the full 60k + 10k Fashion-MNIST as gzipped IDX."""
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(reason=f"Fashion-MNIST not installed in {FASHION_DIR} (dataset-fashion-mnist)")
    return FASHION_DIR
