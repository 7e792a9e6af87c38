"""NumPy .npz archives in the Keras `mnist.npz` layout: x_train, y_train[, x_test, y_test].

Loaded with allow_pickle=False: an archive is data, never code. Images must be integer
(N, H, W) grey levels 0..255 and labels integer class indices, one per image.
"""

from __future__ import annotations

import hashlib
import zipfile
import zlib
from pathlib import Path

import numpy as np

from mnistlab.atomic import atomic_path
from mnistlab.data.dataset import DIGITS, Dataset, Source
from mnistlab.data.idx import cannot_read
from mnistlab.errors import DataError

PARTS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test")}
SAVE_HELP = "save it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")  # a first entry, or an empty archive
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
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if head.startswith(b"\x93NUMPY"):
        raise DataError(path, "holds a single .npy array, not an .npz archive", SAVE_HELP)
    if head[:4] not in ZIP_MAGICS:
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
    try:
        return archive[key]
    except _READ_ERRORS as exc:
        raise DataError(
            path,
            f"array '{key}' cannot be read ({exc})",
            f"write '{key}' again as a plain integer array",
            where=key,
        ) from None


def _check(array: np.ndarray, key: str, ndim: int, top: int, path: str | Path) -> None:
    """Integer dtype, `ndim` dimensions, no empty axis, every value in 0..top."""
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
            f"store values 0..{top} only",
            where=f"{key}[{', '.join(map(str, index))}]",
        )


def _part(
    archive: np.lib.npyio.NpzFile, part: str, path: str | Path, classes: tuple[str, ...]
) -> Dataset:
    x_key, y_key = PARTS[part]
    images, labels = _array(archive, x_key, path), _array(archive, y_key, path)
    _check(images, x_key, 3, 255, path)
    _check(labels, y_key, 1, len(classes) - 1, path)
    if len(labels) != len(images):
        raise DataError(
            path,
            f"{len(labels)} labels in '{y_key}' for {len(images)} images in '{x_key}'",
            "store one label per image",
            where=y_key,
        )
    return Dataset(
        images.astype(np.uint8), labels.astype(np.int64), classes, origin=f"{path}:{part}"
    )


def read_npz(path: str | Path, classes: tuple[str, ...] = DIGITS) -> tuple[Dataset, Dataset | None]:
    """(train, test) from an .npz archive; test is None when it has neither x_test nor y_test."""
    with _open(path) as archive:
        train = _part(archive, "train", path, classes)
        has_test = any(key in archive.files for key in PARTS["test"])
        return train, _part(archive, "test", path, classes) if has_test else None


def arrays_source(images: np.ndarray, labels: np.ndarray,
                  classes: tuple[str, ...] = DIGITS) -> Source:
    """In-memory images (N, H, W) or flattened square rows (N, H*W), grey levels 0..255, and
    class indices, checked as an archive's arrays are. Named by their content, so a run that
    trained on them records which arrays it needs again to resume."""
    where = "in-memory arrays"
    images, labels = np.asarray(images), np.asarray(labels)
    side = int(np.sqrt(images.shape[1])) if images.ndim == 2 else 0
    if images.ndim == 2 and side * side == images.shape[1]:
        images = images.reshape(len(images), side, side)
    if images.dtype.kind == "f":
        raise DataError(where, f"images are {images.dtype}, expected integers 0..255",
                        "pass uint8 grey levels, e.g. (x * 255).round().astype('uint8')")
    _check(images, "images", 3, 255, where)
    _check(labels, "labels", 1, len(classes) - 1, where)
    if len(labels) != len(images):
        raise DataError(where, f"{len(labels)} labels for {len(images)} images",
                        "pass one label per image")
    images, labels = images.astype(np.uint8), labels.astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()[:16]
    name = f"{where} ({len(images)} images, sha256 {digest})"
    return Source(name, Dataset(images, labels, classes, origin=where))


def write_npz(path: str | Path, train: Dataset, test: Dataset | None = None) -> None:
    """Write labelled parts as a compressed .npz in the Keras layout (uint8 arrays), atomically."""
    arrays = {}
    for part, dataset in (("train", train), ("test", test)):
        if dataset is None:
            continue
        if dataset.labels is None:
            raise ValueError(f"the {part} part is unlabelled; the .npz layout needs labels")
        x_key, y_key = PARTS[part]
        arrays[x_key], arrays[y_key] = dataset.images, dataset.labels.astype(np.uint8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no suffix
        np.savez_compressed(f, **arrays)
