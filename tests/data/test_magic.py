"""mnistlab.data.magic: the one reading of the formats' first bytes, gzipped or not."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest

from mnistlab.data import idx, magic


def _npz() -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, x_train=np.zeros((1, 2, 2), np.uint8))
    return buffer.getvalue()


def _npy() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.zeros(3))
    return buffer.getvalue()


@pytest.mark.parametrize(("data", "kind"), [
    (_npz(), "zip"),
    (b"PK\x05\x06" + bytes(18), "zip"),  # an empty zip
    (_npy(), "npy"),
    (idx.encode(np.zeros((2, 3, 3), np.uint8)), "idx"),
    (b"label,pixel0\n1,0\n", ""),
    (b"PK but no zip", ""),
    (b"", ""),
])
def test_a_file_is_judged_by_its_payload_gzipped_or_not(data, kind):
    assert magic.kind(magic.payload_head(data, 8)) == kind
    assert magic.kind(magic.payload_head(gzip.compress(data), 8)) == kind


def test_a_corrupt_gzip_head_is_no_kind():
    assert magic.payload_head(magic.GZIP + b"\x08\x00garbage", 8) == b""
