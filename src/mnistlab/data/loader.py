"""From a name or a path to a Source: find the files, pick each reader by content, check the parts.

A directory may hold an IDX set (train-*/t10k-* images and labels, gzipped or raw), a CSV pair
(Kaggle train.csv + test.csv, or mnist_train.csv + mnist_test.csv), a single CSV or an .npz.

Classes: a registered dataset names its own (digits, Fashion-MNIST's clothes, ...), and so does
an .npz that holds a `classes` array. Anything else has "0".."K-1", K = the highest label of its
labelled parts + 1 (47 for labels 0..46; a class no image has below the highest still counts),
so the output layer, metrics and plots follow the data; labels are then 0..255. A label beyond
the named classes is a one-line error naming the file, the place and the range.
"""

from __future__ import annotations

import re
from pathlib import Path

from mnistlab.data import magic
from mnistlab.data.csv import read_csv
from mnistlab.data.dataset import Dataset, Source, share_classes
from mnistlab.data.idx import MNIST_LAYOUT, Layout, cannot_read, read_idx
from mnistlab.data.npz import read_npz
from mnistlab.errors import DataError, MnistlabError
from mnistlab.inputs import not_regular, open_input

# labels: idx1-ubyte, or QMNIST's idx2-int table
IDX_NAME = re.compile(r"(train|t10k)-(images|labels)[.-]idx(?:[13]-ubyte|2-int)(\.gz)?")
CSV_PAIRS = (("train.csv", "test.csv"), ("mnist_train.csv", "mnist_test.csv"))
EXPECTED = (
    "IDX files (train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz and/or the t10k- "
    "pair), train.csv + test.csv, mnist_train.csv + mnist_test.csv, one .csv or one .npz"
)
Parts = tuple[Dataset, Dataset | None]


def _sniff(path: Path) -> str:
    """Which reader fits: "zip" (an .npz), "npy", "idx" or "" (CSV), from the first (gunzipped)
    bytes, not the name (mnistlab.data.magic). A corrupt gzip stream goes to the CSV reader,
    which reports the corruption with its offset."""
    try:
        with open_input(path, "a data file") as f:
            return magic.kind(magic.payload_head(f.read(512), 8))
    except OSError as exc:
        raise cannot_read(path, exc) from None


def _load_file(path: Path, classes: tuple[str, ...] | None) -> Parts:
    kind = _sniff(path)
    if kind == "zip":
        return read_npz(path, classes)
    if kind == "npy":
        raise DataError(
            path,
            "a single NumPy array (.npy), whatever its name, not an .npz archive of images "
            "and labels",
            "save the arrays together with numpy.savez(path, x_train=..., y_train=..., "
            "x_test=..., y_test=...)",
        )
    if kind == "idx":
        raise DataError(
            path,
            "an IDX file alone has no partner (images need labels)",
            "pass the folder that holds both the images and the labels files",
        )
    return read_csv(path, classes), None


def _idx_pairs(directory: Path) -> dict[str, tuple[Path, Path]]:
    """{"train"|"t10k": (images, labels)} for each complete pair; raw files win over .gz twins."""
    found: dict[tuple[str, str], Path] = {}
    for path in sorted(directory.iterdir(), key=lambda p: p.name.endswith(".gz"), reverse=True):
        match = IDX_NAME.fullmatch(path.name)
        if match and path.is_file():
            found[match.group(1), match.group(2)] = path  # raw files come last and overwrite
    pairs = {
        s: (found[s, "images"], found[s, "labels"])
        for s in ("train", "t10k")
        if (s, "images") in found and (s, "labels") in found
    }
    if found and not pairs:
        lone = ", ".join(p.name for p in found.values())
        raise DataError(
            directory,
            f"IDX files without their partner ({lone})",
            "add the matching images/labels file of each split",
        )
    return pairs


def _load_idx(
    pairs: dict[str, tuple[Path, Path]], classes: tuple[str, ...] | None, layout: Layout
) -> Parts:
    parts = {
        s: read_idx(images, labels, classes, layout) for s, (images, labels) in pairs.items()
    }
    if "train" in parts:
        return parts["train"], parts.get("t10k")
    return parts["t10k"], None  # a test set alone is the one labelled part; Splits hold out a test


def _load_dir(directory: Path, classes: tuple[str, ...] | None, layout: Layout) -> Parts:
    pairs = _idx_pairs(directory)
    if pairs:
        return _load_idx(pairs, classes, layout)
    for train_name, test_name in CSV_PAIRS:
        if (directory / train_name).is_file() and (directory / test_name).is_file():
            return read_csv(directory / train_name, classes), read_csv(
                directory / test_name, classes
            )
    candidates = sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and p.name.endswith((".csv", ".csv.gz", ".npz"))
    )
    if len(candidates) == 1:
        return _load_file(candidates[0], classes)
    problem = (
        f"several candidate files ({', '.join(p.name for p in candidates)})"
        if candidates
        else "no MNIST-format data found"
    )
    raise DataError(directory, problem, f"pass one file, or a folder holding {EXPECTED}")


def load_path(
    path: str | Path, *, name: str | None = None, classes: tuple[str, ...] | None = None,
    layout: Layout = MNIST_LAYOUT,
) -> Source:
    """The Source held by a file or directory; `name` defaults to the path's. `classes` are the
    names a registry gives; None: the file's own (.npz `classes`) or "0".."K-1" from the labels
    (see the module's docstring). `layout`: how a registered set's IDX files depart from MNIST's
    (EMNIST's transposed images, letters labelled from 1), undone on load."""
    path = Path(path)
    if path.is_dir():
        train, test = _load_dir(path, classes, layout)
    elif path.is_file():
        train, test = _load_file(path, classes)
    elif path.exists():  # a FIFO, a device, a socket: reading it could wait or never end
        raise not_regular(path, path.stat().st_mode, "a data file or folder")
    else:
        raise DataError(path, "no such file or directory", "check the path")
    if test is not None and test.images.shape[1:] != train.images.shape[1:]:
        raise DataError(
            test.origin,
            f"images are {_shape(test)} but the training images are {_shape(train)}",
            "use train and test files of the same dataset",
        )
    return Source(name or path.name, *share_classes(train, test))


def load(source: str | Path, *, download: bool = True, progress: bool = True) -> Source:
    """A registered dataset name (fetched and cached as needed) or an existing file/directory."""
    from mnistlab.data import sources  # lazy: a path needs neither the registry nor the network

    if isinstance(source, str) and source in sources.REGISTRY:
        info = sources.REGISTRY[source]
        directory = sources.locate(source, download=download, progress=progress)
        return load_path(directory, name=info.name, classes=tuple(info.classes),
                         layout=info.layout)
    if Path(source).exists():
        return load_path(source)
    from mnistlab.suggest import did_you_mean

    raise MnistlabError(
        f"{source}: neither a known dataset ({', '.join(sorted(sources.REGISTRY))}) "
        f"nor an existing file or folder{did_you_mean(str(source), sources.REGISTRY)}; pass a "
        "dataset name or a path that exists"
    )


def _shape(dataset: Dataset) -> str:
    return "x".join(map(str, dataset.images.shape[1:]))


def _overview_part(title: str, dataset: Dataset) -> list[str]:
    lines = [
        f"{title}: {dataset.origin}",
        f"  rows: {len(dataset)}",
        f"  image shape: {_shape(dataset)}",
        f"  pixel min/max: {int(dataset.images.min())}/{int(dataset.images.max())}",
    ]
    if dataset.labels is None:
        lines.append("  labels: none (unlabelled)")
    else:
        counts = ", ".join(f"{name}: {n}" for name, n in dataset.class_counts().items())
        lines += [f"  labels: yes, {len(dataset.classes)} classes", f"  class counts: {counts}"]
    lines.append("  nulls found: 0")  # every reader rejects a missing value with its location
    return lines


def overview(source: Source) -> str:
    """The `mnistlab data check` overview: per part rows, shape, classes and counts, pixel range."""
    lines = [f"source: {source.name}", *_overview_part("train", source.train)]
    lines += _overview_part("test", source.test) if source.test is not None else ["test: none"]
    return "\n".join(lines)
