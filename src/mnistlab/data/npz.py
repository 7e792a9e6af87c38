"""NumPy .npz archives in the Keras `mnist.npz` layout: x_train, y_train[, x_test, y_test],
and optionally `classes`, the class names in label order (strings).

Loaded with allow_pickle=False: an archive is data, never code. Images must be integer
(N, H, W) grey levels 0..255 and labels integer class indices, one per image: below the length
of `classes` when the archive names them, else 0..255 (then "0".."K-1", K the highest label + 1).
"""

from __future__ import annotations

import hashlib
import math
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mnistlab.atomic import atomic_path
from mnistlab.data import magic
from mnistlab.data.dataset import (
    DIGITS,
    MAX_CLASSES,
    Dataset,
    Source,
    class_names,
    inferred_classes,
    share_classes,
)
from mnistlab.data.idx import cannot_read
from mnistlab.errors import DataError
from mnistlab.inputs import budget_words, open_input, payload_budget

PARTS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
CLASSES = "classes"
SAVE_HELP = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
# What np.load and zipfile raise on a damaged archive or member: damaged flag bits read as
# "encrypted" (RuntimeError) or an unknown compression method (NotImplementedError); a damaged
# .npy header can claim a shape too large to allocate (MemoryError).
_READ_ERRORS = (
    ValueError,
    OSError,
    EOFError,
    KeyError,
    zipfile.BadZipFile,
    zlib.error,
    MemoryError,
    RuntimeError,
    NotImplementedError,
)


def _open(path: str | Path) -> np.lib.npyio.NpzFile:
    """The archive, once its first bytes show a zip file (so NumPy never tries another format)."""
    try:
        with open_input(path, "an .npz archive") as f:
            head = f.read(6)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if magic.kind(head) == "npy":
        raise DataError(path, "holds a single .npy array, not an .npz archive", SAVE_HELP)
    if magic.kind(head) != "zip":
        raise DataError(path, "not an .npz archive (no zip signature)", SAVE_HELP, where="byte 0")
    try:
        return np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(path, f"not a readable .npz archive ({exc})", SAVE_HELP) from None


def _array(archive: np.lib.npyio.NpzFile, key: str, path: str | Path) -> np.ndarray:
    if key not in archive.files:
        raise DataError(
            path, f"missing array '{key}' (it has: {', '.join(archive.files) or 'none'})", SAVE_HELP
        )
    _check_budget(archive, key, path)
    try:
        return archive[key]
    except _READ_ERRORS as exc:
        raise DataError(
            path,
            f"array '{key}' cannot be read ({exc})",
            f"write '{key}' again as a plain integer array",
            where=key,
        ) from None


def _check_budget(archive: np.lib.npyio.NpzFile, key: str, path: str | Path) -> None:
    """Refuse a member whose .npy header declares more bytes than its compressed size can
    honestly hold (mnistlab.inputs.payload_budget), before NumPy allocates and inflates it: a
    few hundred kB of deflated zeros can declare gigabytes."""
    member = f"{key}.npy" if f"{key}.npy" in archive.zip.namelist() else key
    try:
        info = archive.zip.getinfo(member)
        with archive.zip.open(info) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
    except _READ_ERRORS:
        return  # np.load's own read then says what is wrong, in its words
    declared = math.prod(shape) * dtype.itemsize
    if declared > payload_budget(info.compress_size):
        raise DataError(path, f"array '{key}' declares {declared} bytes (shape {shape}, "
                        f"{dtype}), more than {budget_words(info.compress_size)}",
                        "store the arrays the archive should hold, at their real size",
                        where=key)


def _check(array: np.ndarray, key: str, ndim: int, top: int, path: str | Path,
           more: str = "") -> None:
    """Integer dtype, `ndim` dimensions, no empty axis, every value in 0..top (`more` adds to
    the fix for a value outside)."""
    shape = "(N, H, W)" if ndim == 3 else "(N,)"
    if array.ndim != ndim or 0 in array.shape:
        raise DataError(
            path,
            f"'{key}' has shape {array.shape}, expected {shape}",
            f"store '{key}' with shape {shape}",
            where=key,
        )
    if array.dtype.kind not in "ui":
        raise DataError(
            path,
            f"'{key}' has dtype {array.dtype}, expected integers 0..{top}",
            f"store '{key}' as uint8",
            where=key,
        )
    bad = (array < 0) | (array > top)
    if bad.any():
        index = tuple(int(i) for i in np.unravel_index(np.argmax(bad), array.shape))
        raise DataError(
            path,
            f"'{key}' holds {array[index]}, outside 0..{top}",
            f"store values 0..{top} only{more}",
            where=f"{key}[{', '.join(map(str, index))}]",
        )


def _class_list(archive: np.lib.npyio.NpzFile, path: str | Path) -> tuple[str, ...]:
    """The archive's `classes`: a non-empty 1-D array of distinct, non-blank strings."""
    names = _array(archive, CLASSES, path)
    fix = "store the names as classes=np.array(['name of 0', 'name of 1', ...])"
    if names.dtype.kind != "U" or names.ndim != 1 or not len(names):
        raise DataError(path, f"'{CLASSES}' is {names.dtype} {names.shape}, not a list of class "
                        "names", fix, where=CLASSES)
    listed = tuple(str(n) for n in names)
    blank = [i for i, n in enumerate(listed) if not n.strip()]
    twice = sorted({n for n in listed if listed.count(n) > 1})
    if blank or twice:
        problem = f"class {blank[0]} has no name" if blank else f"'{twice[0]}' is named twice"
        raise DataError(path, f"'{CLASSES}': {problem}", fix, where=CLASSES)
    return listed


def _part(
    archive: np.lib.npyio.NpzFile, part: str, path: str | Path, classes: tuple[str, ...] | None
) -> Dataset:
    x_key, y_key = PARTS[part]
    images, labels = _array(archive, x_key, path), _array(archive, y_key, path)
    _check(images, x_key, 3, 255, path)
    _check(labels, y_key, 1, (MAX_CLASSES if classes is None else len(classes)) - 1, path)
    if len(labels) != len(images):
        raise DataError(
            path,
            f"{len(labels)} labels in '{y_key}' for {len(images)} images in '{x_key}'",
            "store one label per image",
            where=y_key,
        )
    labels = labels.astype(np.int64)
    classes = inferred_classes(labels) if classes is None else classes
    return Dataset(images.astype(np.uint8), labels, classes, origin=f"{path}:{part}")


def read_npz(
    path: str | Path, classes: tuple[str, ...] | None = DIGITS
) -> tuple[Dataset, Dataset | None]:
    """(train, test) from an .npz archive; test is None when it has neither x_test nor y_test.

    `classes` bound the labels; None: the archive's own `classes` when it has them, else
    "0".."K-1", K the highest label of both parts + 1.
    """
    with _open(path) as archive:
        if classes is None and CLASSES in archive.files:
            classes = _class_list(archive, path)
        train = _part(archive, "train", path, classes)
        has_test = any(key in archive.files for key in PARTS["test"])
        return share_classes(train, _part(archive, "test", path, classes) if has_test else None)


def arrays_source(images: np.ndarray, labels: np.ndarray,
                  classes: Sequence[str] = DIGITS) -> Source:
    """In-memory images (N, H, W) or flattened square rows (N, H*W), grey levels 0..255, and
    class indices, checked as an archive's arrays are; `classes` names them (the digits unless
    given: the Python API's data=(images, labels, classes)). Named by their content, so a run
    that trained on them records which arrays it needs again to resume."""
    where, classes = "in-memory arrays", tuple(classes)
    images, labels = np.asarray(images), np.asarray(labels)
    side = int(np.sqrt(images.shape[1])) if images.ndim == 2 else 0
    if images.ndim == 2 and side * side == images.shape[1]:
        images = images.reshape(len(images), side, side)
    if images.dtype.kind == "f":
        raise DataError(where, f"images are {images.dtype}, expected integers 0..255",
                        "pass uint8 grey levels, e.g. (x * 255).round().astype('uint8')")
    _check(images, "images", 3, 255, where)
    _check(labels, "labels", 1, len(classes) - 1, where,
           ", or name every class: data=(images, labels, class_names)")
    if len(labels) != len(images):
        raise DataError(where, f"{len(labels)} labels for {len(images)} images",
                        "pass one label per image")
    images, labels = images.astype(np.uint8), labels.astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    name = f"{where} ({len(images)} images, sha256 {digest})"
    return Source(name, Dataset(images, labels, classes, origin=where))


def write_npz(path: str | Path, train: Dataset, test: Dataset | None = None) -> None:
    """Write labelled parts as a compressed .npz in the Keras layout (uint8 arrays), atomically;
    class names other than the label numbers ("0", "1", ...) go in `classes`."""
    arrays = {}
    if train.classes != class_names(len(train.classes)):
        arrays[CLASSES] = np.array(train.classes)
    for part, dataset in (("train", train), ("test", test)):
        if dataset is None:
            continue
        if dataset.labels is None:
            raise ValueError(f"the {part} part is unlabelled; the .npz layout needs labels")
        x_key, y_key = PARTS[part]
        label_type = np.uint8 if len(dataset.classes) <= MAX_CLASSES else np.int64
        arrays[x_key], arrays[y_key] = dataset.images, dataset.labels.astype(label_type)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez_compressed(f, **arrays)
