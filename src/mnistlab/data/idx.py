"""IDX files (`*-idx3-ubyte` images, `*-idx1-ubyte` labels), gzipped or raw: read, validate, write.

The format is a 4-byte magic number (two zero bytes, element type 0x08 = unsigned byte, number of
dimensions), one big-endian uint32 per dimension, then the bytes. Every byte is accounted for: a
short or over-long file is an error naming the offset, never a silently misshaped array.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mnistlab.atomic import atomic_write_bytes
from mnistlab.data.dataset import DIGITS, Dataset
from mnistlab.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
UBYTE = 0x08
IMAGES_NDIM, LABELS_NDIM = 3, 1
REFETCH = "download the file again (or delete it so mnistlab fetches a fresh copy)"
MAX_PAYLOAD = 1 << 30  # bytes a gzip file may decompress to: 1 GiB, 9× the largest MNIST CSV
SLACK = 1 << 20  # decompressed beyond an IDX header's declared size, to say how much more follows
_CHUNK = 1 << 12  # compressed bytes per step: at most ~4 MB of output (zlib's ratio is ~1000:1)


def cannot_read(path: str | Path, exc: OSError) -> DataError:
    """The one-line error for a file the OS will not give us (missing, a folder, no permission)."""
    return DataError(path, f"cannot read ({exc.strerror or exc})", "check the path and permissions")


def _file(path: str | Path) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise cannot_read(path, exc) from None


def read_bytes(path: str | Path) -> bytes:
    """The file's payload: gunzipped when it starts with the gzip magic bytes, whatever its name;
    one that decompresses to more than MAX_PAYLOAD bytes is a DataError."""
    data = _file(path)
    return gunzip(data, path) if data.startswith(GZIP_MAGIC) else data


def gunzip(data: bytes, path: str | Path, limit: int | None = None,
           bound: str = "mnistlab reads") -> bytes:
    """Decompress every gzip member in `data`, stopping with a DataError past `limit` bytes of
    output (default MAX_PAYLOAD), so a gzip bomb costs no more memory than that; corruption is a
    DataError at its byte offset. `bound` says where the limit comes from."""
    limit = MAX_PAYLOAD if limit is None else limit
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
        if not data.startswith(GZIP_MAGIC, pos):
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


def read_array(path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped or raw) of `ndim` dimensions. A gzipped file's
    header is read first, and the rest decompressed no further than the header declares."""
    data = _file(path)
    if data.startswith(GZIP_MAGIC):
        limit = min(_declared_size(data, path, ndim) + SLACK, MAX_PAYLOAD)
        data = gunzip(data, path, limit, "its IDX header declares")
    return parse(data, path, ndim)


def _declared_size(data: bytes, path: str | Path, ndim: int) -> int:
    """The payload size the IDX header at the start of gzipped `data` declares; MAX_PAYLOAD
    when the header is not readable from the first bytes (gunzip or parse then say why)."""
    header = 4 + 4 * ndim
    try:
        head = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data[:_CHUNK], header)
    except zlib.error:
        return MAX_PAYLOAD
    if len(head) < header:
        return MAX_PAYLOAD
    return header + math.prod(_dims(head, path, ndim))


def parse(data: bytes, path: str | Path, ndim: int) -> np.ndarray:
    """The uint8 array held by IDX bytes of `ndim` dimensions, after checking every header field."""
    kind = "images" if ndim == IMAGES_NDIM else "labels"
    dims = _dims(data, path, ndim)
    header = 4 + 4 * ndim
    end = header + math.prod(dims)
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
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def _dims(data: bytes, path: str | Path, ndim: int) -> tuple[int, ...]:
    """The dimensions an IDX header declares, after checking its magic number and element type."""
    kind, suffix = ("images", "idx3-ubyte") if ndim == IMAGES_NDIM else ("labels", "idx1-ubyte")
    header = 4 + 4 * ndim
    magic = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and (data[:2] != b"\0\0" or data[3] != ndim):
        raise DataError(
            path,
            f"not an IDX {kind} file (magic number 0x{magic:08x}, expected "
            f"0x{(UBYTE << 8) | ndim:08x})",
            f"pass a *-{suffix} {kind} file",
            where="byte 0",
        )
    if len(data) >= 4 and data[2] != UBYTE:
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


def read_labels(path: str | Path, num_classes: int = len(DIGITS)) -> np.ndarray:
    """Labels as int64 (N,) from an `*-idx1-ubyte[.gz]` file, each checked to be a class index."""
    labels = read_array(path, LABELS_NDIM).astype(np.int64)
    bad = np.flatnonzero(labels >= num_classes)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            path,
            f"label {labels[i]} of item {i} is outside 0..{num_classes - 1}",
            "pass the labels file that belongs to this dataset",
            where=f"byte {8 + i}",
        )
    return labels


def read_idx(
    images_path: str | Path, labels_path: str | Path, classes: tuple[str, ...] = DIGITS
) -> Dataset:
    """One labelled part (train or t10k) from its images and labels files."""
    images, labels = read_images(images_path), read_labels(labels_path, len(classes))
    if len(images) != len(labels):
        raise DataError(
            labels_path,
            f"{len(labels)} labels for {len(images)} images in {images_path}",
            "pass the images and labels files of the same split",
        )
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
