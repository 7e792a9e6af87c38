"""Which dataset files were verified against their published sums, and are unchanged since.

Why: hashing a dataset's files (Fashion-MNIST: 30 MB of gzip, 47 MB decompressed) took a
quarter of a second of every command that names it. A file verified once is trusted while its
identity is the one recorded then: size, modification and change times (the change time moves
on any write and cannot be set back by `touch`), inode and device. A file changed within
RACY_SECONDS of its check is not recorded, as git's index does with "racily clean" entries: a
write in the same clock tick as the check would keep both times.

The records live in `verified.json` in the cache root ($MNISTLAB_DATA or the user cache),
keyed by the file's absolute path and the sum it was checked against (a registry with new sums
checks again). A record that cannot be written (a read-only home) only means checking again.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from mnistlab.atomic import atomic_write_json

FILE = "verified.json"
RACY_SECONDS = 2.0


def _identity(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _key(path: Path, checksum: str) -> str:
    return f"{path.resolve()} {checksum}"


def _read(root: Path) -> dict[str, list[int]]:
    try:
        records = json.loads((root / FILE).read_text())
    except (OSError, ValueError):
        return {}
    return records if isinstance(records, dict) else {}


def unchanged(root: Path, path: Path, checksum: str) -> bool:
    """True where `path` was verified against `checksum` and has not changed since."""
    try:
        return _read(root).get(_key(path, checksum)) == _identity(path)
    except OSError:
        return False


def record(root: Path, checked: Iterable[tuple[Path, str]]) -> None:
    """Record each (path, checksum) just verified, but for files changed too recently."""
    now = time.time_ns()
    records = {key: identity for key, identity in _read(root).items()  # forget deleted files
               if os.path.exists(key.rsplit(" ", 1)[0])}
    added = False
    for path, checksum in checked:
        with contextlib.suppress(OSError):
            identity = _identity(path)
            if now - max(identity[1], identity[2]) >= RACY_SECONDS * 1e9:
                records[_key(path, checksum)] = identity
                added = True
    if added:
        with contextlib.suppress(OSError):
            os.makedirs(root, exist_ok=True)
            atomic_write_json(root / FILE, records)
