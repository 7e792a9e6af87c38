"""CSV loading speed: mnistlab's reader against the naive csv-module loop, on a 60,000-row file.

    python benchmarks/bench_csv.py [--rows 60000] [--repeat 3]

The file is Kaggle-layout (header label,pixel0..pixel783), made from the real MNIST test images
when /work/shared/data/mnist is present (repeated to --rows), else from random pixels.
"""

from __future__ import annotations

import argparse
import csv as stdcsv
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from mnistlab.data import csv, idx
from mnistlab.data.dataset import Dataset

MNIST = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "mnist"


def digits(rows: int) -> Dataset:
    """`rows` real MNIST test digits (cycled) or, without them, random 28x28 images."""
    images_path = MNIST / "t10k-images-idx3-ubyte.gz"
    if images_path.is_file():
        real = idx.read_idx(images_path, MNIST / "t10k-labels-idx1-ubyte.gz")
        return real.subset(np.arange(rows) % len(real))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (rows, 28, 28), dtype=np.uint8)
    return Dataset(images, np.arange(rows, dtype=np.int64) % 10)


def naive_read(path: Path) -> np.ndarray:
    """What a first script does: csv.reader, int() per cell, one array at the end."""
    with open(path, newline="") as f:
        reader = stdcsv.reader(f)
        next(reader)
        return np.array([[int(cell) for cell in row] for row in reader], dtype=np.uint8)


def best_of(repeat: int, func: Callable[[], object]) -> tuple[float, object]:
    """(fastest wall time of `repeat` calls, the last call's result)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = func()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    dataset = digits(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "train.csv"
        write_s, _ = best_of(args.repeat, lambda: csv.write_csv(path, dataset))
        size_mb = path.stat().st_size / 1e6
        read_s, loaded = best_of(args.repeat, lambda: csv.read_csv(path))
        naive_s, naive = best_of(1, lambda: naive_read(path))
    assert np.array_equal(loaded.images, dataset.images), "read back differs from written"
    assert np.array_equal(naive[:, 1:].reshape(dataset.images.shape), dataset.images)
    print(f"{args.rows} rows, {size_mb:.0f} MB Kaggle-layout CSV")
    print(f"mnistlab read_csv   {read_s:6.2f} s  (best of {args.repeat})")
    print(f"naive csv loop      {naive_s:6.2f} s  ({naive_s / read_s:.1f}x slower)")
    print(f"mnistlab write_csv  {write_s:6.2f} s  (best of {args.repeat})")


if __name__ == "__main__":
    main()
