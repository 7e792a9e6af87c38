"""What a data file holds, read from its first bytes and never from its name: the one place the
formats' magic numbers are written down. Each reader checks the rest of its own header."""

from __future__ import annotations

import zlib

GZIP = b"\x1f\x8b"
ZIP = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty one; an .npz is a zip
NPY = b"\x93NUMPY"  # a single NumPy array (.npy)
IDX_UBYTE = b"\0\0\x08"  # an IDX file of unsigned bytes: two zero bytes, element type 0x08
_CHUNK = 1 << 12  # compressed bytes inflated for a head: far more than any header needs


def payload_head(data: bytes, size: int) -> bytes:
    """The first `size` payload bytes of `data`, gunzipped when it is gzip; fewer (perhaps none)
    when the data are too short or corrupt there: the full read then says why."""
    if not data.startswith(GZIP):
        return data[:size]
    try:
        return zlib.decompressobj(wbits=16 + zlib.MAX_WBITS).decompress(data[:_CHUNK], size)
    except zlib.error:
        return b""


def kind(head: bytes) -> str:
    """"zip", "npy", "idx" or "" (anything else: a reader of text, CSV, decides) for a file's
    first payload bytes (payload_head: a gzipped file is judged by what it holds)."""
    if head[:4] in ZIP:
        return "zip"
    if head.startswith(NPY):
        return "npy"
    return "idx" if head.startswith(IDX_UBYTE) else ""
