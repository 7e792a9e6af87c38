"""In-memory datasets and the seeded, stratified split every run trains on."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from mnistlab.errors import DataError

DIGITS = tuple(str(d) for d in range(10))
# Classes a source may have when nothing names them: labels are then bytes (IDX, CSV) 0..255.
MAX_CLASSES = 256


def class_names(n: int) -> tuple[str, ...]:
    """Names for `n` classes that nothing names: "0", "1", ... "n-1" (the label values)."""
    return tuple(str(i) for i in range(n))


def inferred_classes(*labels: np.ndarray | None) -> tuple[str, ...]:
    """The classes of data whose source does not name them: highest label + 1 over every
    labelled part (train and test together, so both parts share one class list), named by
    `class_names`. A part without labels adds nothing; no labels at all give ()."""
    top = max((int(part.max()) for part in labels if part is not None and len(part)), default=-1)
    return class_names(top + 1)


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 (N, H, W), labels as int64 (N,) or None when unlabelled (Kaggle test.csv).

    `classes` names the classes in label order; every label indexes it. Readers decide it (see
    `mnistlab.data.loader`): the source's own names, or "0".."K-1" from the labels.
    """

    images: np.ndarray
    labels: np.ndarray | None
    classes: tuple[str, ...] = DIGITS
    origin: str = ""

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(
                f"images must be uint8 (N, H, W), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels is not None and (
            self.labels.dtype != np.int64 or self.labels.shape != (len(self.images),)
        ):
            raise ValueError("labels must be int64 with one label per image")
        if self.labels is not None and len(self.labels) and not (
            self.labels.min() >= 0 and self.labels.max() < len(self.classes)
        ):
            raise ValueError(f"labels must index the {len(self.classes)} classes, got "
                             f"{self.labels.min()}..{self.labels.max()}")

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index: np.ndarray, origin: str | None = None) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset(self.images[index], labels, self.classes, origin or self.origin)

    def class_counts(self) -> dict[str, int]:
        if self.labels is None:
            return {}
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(c) for name, c in zip(self.classes, counts, strict=True)}


@dataclass(frozen=True)
class Source:
    """What a data source holds: a training part and, when the source has one, a test part."""

    name: str
    train: Dataset
    test: Dataset | None = None


def share_classes(train: Dataset, test: Dataset | None) -> tuple[Dataset, Dataset | None]:
    """A source's parts with one class list. Parts read with the same declared names already
    agree; parts whose classes were inferred from their own labels (or an unlabelled part, which
    has none) get the classes inferred from both parts' labels together."""
    if test is None or test.classes == train.classes:
        return train, test
    classes = inferred_classes(train.labels, test.labels)
    return replace(train, classes=classes), replace(test, classes=classes)


@dataclass(frozen=True)
class Splits:
    """Train/validation from the training part; test never touched until the end.

    `note` says how the parts were made when it is not the obvious way (e.g. a source with only
    one labelled part, whose test part is then held out of it).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    note: str = ""


def split_indices(
    labels: np.ndarray, fraction: float, seed: int = 0, stratified: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (keep, held_out): a seeded, disjoint cover of range(len(labels)), both sorted.

    Stratified: every class gives round(fraction * its count) rows to the held-out part, so class
    proportions match in both parts.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    if stratified:
        held = [
            members[rng.permutation(len(members))[: round(fraction * len(members))]]
            for members in (np.flatnonzero(labels == c) for c in np.unique(labels))
        ]
        held_out = np.sort(np.concatenate(held)) if held else np.empty(0, np.int64)
    else:
        held_out = np.sort(rng.permutation(n)[: round(fraction * n)])
    keep = np.setdiff1d(np.arange(n), held_out, assume_unique=True)
    return keep, held_out


def split(
    dataset: Dataset, val_fraction: float = 0.2, seed: int = 0, stratified: bool = True
) -> tuple[Dataset, Dataset]:
    """(train, val): seeded, stratified, deterministic, disjoint, covering every row."""
    if dataset.labels is None:
        raise DataError(
            dataset.origin, "cannot split unlabelled data", "use a labelled training file"
        )
    keep, held = split_indices(dataset.labels, val_fraction, seed, stratified)
    _nonempty(dataset, keep, held, "training", "validation", val_fraction)
    return dataset.subset(keep), dataset.subset(held)


def _nonempty(dataset: Dataset, keep: np.ndarray, held: np.ndarray, kept: str, held_as: str,
              fraction: float) -> None:
    """Refuse a split that leaves either part without rows: nothing could train or be scored."""
    if len(keep) and len(held):
        return
    empty = kept if not len(keep) else held_as
    raise DataError(
        dataset.origin,
        f"{len(dataset)} labelled rows leave the {empty} part empty "
        f"({fraction:.4g} of each class held out as {held_as}, rounded per class)",
        "use more data, or a fraction that leaves rows on both sides (val_fraction 0.2 is usual)",
    )


# The held-out test share when a source has a single labelled part (MNIST's 10k test set alone).
HELD_OUT_TEST_FRACTION = 1 / 6


def make_splits(source: Source, val_fraction: float = 0.2, seed: int = 0) -> Splits:
    """Splits for a study. Without a labelled test part, one is held out of the training part."""
    pool, note = source.train, ""
    test = source.test
    if test is None or test.labels is None:
        keep, held = split_indices(pool.labels, HELD_OUT_TEST_FRACTION, seed=seed + 10_007)
        _nonempty(pool, keep, held, "training", "test", HELD_OUT_TEST_FRACTION)
        pool, test = pool.subset(keep), pool.subset(held, origin=f"{pool.origin} (held out)")
        note = (
            f"{source.name} has one labelled part: {len(test)} rows (1/6, stratified) held out "
            f"as the test set, the other {len(pool)} split "
            f"{1 - val_fraction:.0%}/{val_fraction:.0%} into train/validation"
        )
    train, val = split(pool, val_fraction, seed)
    return Splits(train, val, test, note)
