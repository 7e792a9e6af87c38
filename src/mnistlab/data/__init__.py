"""Data in: named datasets, IDX/CSV/NPZ files and folders, validated into one shape."""

from mnistlab.data.dataset import Dataset, Source, Splits, make_splits, split
from mnistlab.data.loader import describe, load, load_path

__all__ = ["Dataset", "Source", "Splits", "describe", "load", "load_path", "make_splits", "split"]
