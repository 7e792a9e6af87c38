"""IDX files (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), gzipped or raw: read, validate, write.

The format is a 4-byte magic number (two zero bytes, element type 0x08 = unsigned byte, number of
dimensions), one big-endian uint32 per dimension, then the bytes. Every byte is accounted for: a
short or over-long file is an error naming the offset, never a silently misshaped array.

Labels may also be QMNIST's `*-idx2-int` table (element type 0x0C, big-endian int32, one row of
columns per image): the class is column 0. A `Layout` undoes how a published set departs from
MNIST's conventions (EMNIST: images stored transposed, letters labelled from 1).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mnistlab.atomic import atomic_write_bytes
from mnistlab.data.dataset import DIGITS, MAX_CLASSES, Dataset, inferred_classes
from mnistlab.data.magic import GZIP, payload_head
from mnistlab.errors import DataError
from mnistlab.inputs import FLOOR, MAX_PAYLOAD, RATIO, payload_budget, read_input

UBYTE = 0x08
INT32 = 0x0C
ELEMENTS = {UBYTE: np.dtype(np.uint8), INT32: np.dtype(">i4")}  # the element types read here
IMAGES_NDIM, LABELS_NDIM = 3, 1
REFETCH = "download the file again (or delete it so mnistlab fetches a fresh copy)"
SLACK = 1 << 20  # decompressed beyond an IDX header's declared size, to say how much more follows
_CHUNK = 1 << 12  # compressed bytes per step: at most ~4 MB of output (zlib's ratio is ~1000:1)


def cannot_read(path: str | Path, exc: OSError) -> DataError:
    """The one-line error for a file the OS will not give us (missing, a folder, no permission)."""
    return DataError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions")


def _file(path: str | Path) -> bytes:
    """The bytes of a regular file (a FIFO or device is refused before reading: mnistlab.inputs)
    of at most MAX_PAYLOAD bytes."""
    try:
        return read_input(path, "a data file", MAX_PAYLOAD)
    except OSError as exc:
        raise cannot_read(path, exc) from None


def read_bytes(path: str | Path) -> bytes:
    """The file's payload: gunzipped when it starts with the gzip magic bytes, whatever its name;
    one that decompresses to more than MAX_PAYLOAD bytes is a DataError."""
    data = _file(path)
    return gunzip(data, path) if data.startswith(GZIP) else data


def gunzip(data: bytes, path: str | Path, limit: int | None = None,
           bound: str = "mnistlab reads") -> bytes:
    """Decompress every gzip member in `data`, stopping with a DataError past `limit` bytes of
    output (default MAX_PAYLOAD), so a gzip bomb costs no more memory than that; corruption is a
    DataError at its byte offset. `bound` says where the limit comes from. Whatever the limit,
    the payload may not exceed the ratio cap of mnistlab.inputs (RATIO × the compressed size,
    at least FLOOR): that is all real data ever need, where a bomb needs ~1000×."""
    limit = MAX_PAYLOAD if limit is None else limit
    if payload_budget(len(data)) < limit:
        limit = payload_budget(len(data))
        bound = (f"its {len(data)} compressed bytes may hold ({RATIO}× their size, at least "
                 f"{FLOOR >> 20} MiB; real data compress 5-10×)")
    out, size = [], 0
    for piece in _inflate(data, path):
        out.append(piece)
        size += len(piece)
        if size > limit:
            raise DataError(path, f"the gzip payload is longer than {bound} ({limit} bytes)",
                            REFETCH, where=f"payload byte {limit}")
    return b"".join(out)


def _inflate(data: bytes, path: str | Path) -> Iterator[bytes]:
    """The payload of every gzip member in `data`, piece by piece (a few MB at most each), so a
    reader can stop as soon as it has seen enough."""
    pos = 0
    while pos < len(data):
        if not data.startswith(GZIP, pos):
            raise DataError(
                path,
                f"{len(data) - pos} unexpected bytes after the gzip stream",
                REFETCH,
                where=f"byte {pos}",
            )
        pos = yield from _inflate_member(data, pos, path)


def _inflate_member(data: bytes, pos: int, path: str | Path) -> Iterator[bytes]:
    """Yield one member's payload; return the offset just past the member."""
    stream = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    for start in range(pos, len(data), _CHUNK):
        chunk = data[start : start + _CHUNK]
        before = stream.copy()  # kept so a failure can be replayed byte by byte to its offset
        try:
            yield stream.decompress(chunk)
        except zlib.error as exc:
            offset = start + _failing_byte(before, chunk)
            reason = str(exc).rpartition(": ")[2] or str(exc)  # zlib's words after "Error -3 ...: "
            raise DataError(
                path, f"corrupt gzip data ({reason})", REFETCH, where=f"byte {offset}"
            ) from None
        if stream.eof:
            return start + len(chunk) - len(stream.unused_data)
    raise DataError(
        path, "gzip stream ends early: the file is truncated", REFETCH, where=f"byte {len(data)}"
    )


def _failing_byte(stream: zlib._Decompress, chunk: bytes) -> int:
    """Index in `chunk` of the byte at which `stream` reports corruption."""
    for i in range(len(chunk)):
        try:
            stream.decompress(chunk[i : i + 1])
        except zlib.error:
            return i
    return len(chunk) - 1


@dataclass(frozen=True)
class Layout:
    """How a published IDX set departs from MNIST's conventions; undone on load."""

    transposed: bool = False  # images stored column by column (EMNIST): transposed back
    first_label: int = 0  # the label the files give the first class (EMNIST letters: 1)


MNIST_LAYOUT = Layout()  # MNIST's own conventions: nothing to undo


def read_array(path: str | Path, ndim: int, element: int = UBYTE) -> np.ndarray:
    """The array of an IDX file (gzipped or raw) of `ndim` dimensions and `element` type. A
    gzipped file's header is read first, and the rest decompressed no further than it declares."""
    return _array(_file(path), path, ndim, element)


def _array(data: bytes, path: str | Path, ndim: int, element: int) -> np.ndarray:
    if data.startswith(GZIP):
        limit = min(_declared_size(data, path, ndim, element) + SLACK, MAX_PAYLOAD)
        data = gunzip(data, path, limit, "its IDX header declares")
    return parse(data, path, ndim, element)


def _declared_size(data: bytes, path: str | Path, ndim: int, element: int = UBYTE) -> int:
    """The payload size the IDX header at the start of gzipped `data` declares; MAX_PAYLOAD
    when the header is not readable from the first bytes (gunzip or parse then say why)."""
    header = 4 + 4 * ndim
    head = payload_head(data, header)
    if len(head) < header:
        return MAX_PAYLOAD
    return header + math.prod(_dims(head, path, ndim, element)) * ELEMENTS[element].itemsize


def parse(data: bytes, path: str | Path, ndim: int, element: int = UBYTE) -> np.ndarray:
    """The array held by IDX bytes of `ndim` dimensions and `element` type (uint8, or int32 as
    int64), after checking every header field."""
    kind = "images" if ndim == IMAGES_NDIM else "labels"
    dims = _dims(data, path, ndim, element)
    header = 4 + 4 * ndim
    dtype = ELEMENTS[element]
    end = header + math.prod(dims) * dtype.itemsize
    if len(data) != end:
        what = (
            "file ends early" if len(data) < end else f"{len(data) - end} unexpected bytes follow"
        )
        shape = f" of {'x'.join(map(str, dims[1:]))}" if ndim > 1 else ""
        raise DataError(
            path,
            f"{what}: the header promises {dims[0]} {kind}{shape} ending at byte {end}",
            REFETCH,
            where=f"byte {min(len(data), end)}",
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.copy() if element == UBYTE else array.astype(np.int64)


def _dims(data: bytes, path: str | Path, ndim: int, element: int = UBYTE) -> tuple[int, ...]:
    """The dimensions an IDX header declares, after checking its magic number and element type."""
    kind, suffix = ("images", "idx3-ubyte") if ndim == IMAGES_NDIM else ("labels", "idx1-ubyte")
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and (data[:2] != b"\0\0" or data[3] != ndim):
        raise DataError(
            path,
            f"not an IDX {kind} file (magic number 0x{magic:08x}, expected "
            f"0x{(element << 8) | ndim:08x})",
            f"pass a *-{suffix} {kind} file",
            where="byte 0",
        )
    if len(data) >= 4 and data[2] != element:
        raise DataError(
            path,
            f"IDX element type 0x{data[2]:02x} is not supported (only 0x08, unsigned bytes)",
            "convert the data to uint8",
            where="byte 2",
        )
    if len(data) < header:
        raise DataError(
            path,
            f"file ends inside the {header}-byte IDX header ({len(data)} bytes)",
            REFETCH,
            where=f"byte {len(data)}",
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if 0 in dims:
        raise DataError(
            path,
            f"header declares an empty array of shape {dims}",
            f"pass a file that holds {kind}",
            where="byte 4",
        )
    return dims


def read_images(path: str | Path) -> np.ndarray:
    """Images as uint8 (N, H, W) from an `*-idx3-ubyte[.gz]` file."""
    return read_array(path, IMAGES_NDIM)


def read_labels(path: str | Path, num_classes: int = len(DIGITS), first: int = 0) -> np.ndarray:
    """Labels as int64 (N,) from an `*-idx1-ubyte[.gz]` file, or from column 0 of an
    `*-idx2-int[.gz]` table (QMNIST), each checked to be a class index. The files label the
    first class `first` (EMNIST letters: 1); the labels returned start at 0."""
    data = _file(path)
    if payload_head(data, 4)[2:4] == bytes([INT32, 2]):
        table = _array(data, path, 2, INT32)
        labels, start, stride = table[:, 0], 12, 4 * table.shape[1]
    else:
        labels, start, stride = _array(data, path, LABELS_NDIM, UBYTE).astype(np.int64), 8, 1
    bad = np.flatnonzero((labels < first) | (labels >= first + num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            path,
            f"label {labels[i]} of item {i} is outside {first}..{first + num_classes - 1}",
            "pass the labels file that belongs to this dataset",
            where=f"byte {start + stride * i}",
        )
    return labels - first if first else labels


def read_idx(
    images_path: str | Path, labels_path: str | Path, classes: tuple[str, ...] | None = DIGITS,
    layout: Layout = MNIST_LAYOUT,
) -> Dataset:
    """One labelled part (train or t10k) from its images and labels files. `classes` bound the
    labels; None: nothing names them, so they are "0".."K-1", K the highest label + 1. `layout`
    says how the files depart from MNIST's conventions (EMNIST's images are stored transposed:
    they come back upright)."""
    num_classes = MAX_CLASSES if classes is None else len(classes)
    images = read_images(images_path)
    labels = read_labels(labels_path, num_classes, layout.first_label)
    if layout.transposed:
        images = np.ascontiguousarray(images.transpose(0, 2, 1))
    if len(images) != len(labels):
        raise DataError(
            labels_path,
            f"{len(labels)} labels for {len(images)} images in {images_path}",
            "pass the images and labels files of the same split",
        )
    classes = inferred_classes(labels) if classes is None else classes
    return Dataset(images, labels, classes, origin=str(images_path))


def encode(array: np.ndarray) -> bytes:
    """IDX bytes of a uint8 array (images (N, H, W) or labels (N,))."""
    if array.dtype != np.uint8:
        if array.size and (array.min() < 0 or array.max() > 255):
            raise ValueError("IDX stores unsigned bytes: values must be in 0..255")
        array = array.astype(np.uint8)
    magic = struct.pack(">BBBB", 0, 0, UBYTE, array.ndim)
    return (
        magic + struct.pack(f">{array.ndim}I", *array.shape) + np.ascontiguousarray(array).tobytes()
    )


def write(path: str | Path, array: np.ndarray) -> None:
    """Write `array` as an IDX file, atomically; gzipped when the name ends in `.gz`."""
    data = encode(array)
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)  # mtime=0: same data, same bytes
    atomic_write_bytes(path, data)


def write_idx(images_path: str | Path, labels_path: str | Path, dataset: Dataset) -> None:
    """Write a labelled Dataset as an IDX images file and an IDX labels file."""
    if dataset.labels is None:
        raise ValueError("IDX needs labels: this dataset is unlabelled")
    write(images_path, dataset.images)
    write(labels_path, dataset.labels)
