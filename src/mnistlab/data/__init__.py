"""Data in: named datasets, IDX/CSV/NPZ files and folders, validated into one shape."""

from mnistlab.data.dataset import Dataset, Source, Splits, make_splits, split
from mnistlab.data.loader import load, load_path, overview

__all__ = ["Dataset", "Source", "Splits", "load", "load_path", "make_splits", "overview", "split"]
