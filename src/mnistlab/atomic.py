"""Atomic writes: a file is replaced whole or not at all.

A write goes to a temp file in the same folder, is flushed and fsynced, then renamed over the
target, so a crash or a full disk leaves the previous version intact and never a half-written
file. A leaf module: data readers, the engine, the run directory and reports all write through it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mnistlab.errors import MnistlabError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be as readable as any file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MnistlabError(
                f"{path}: disk full while writing; free space and rerun "
                "(--resume RUN_DIR continues from the last checkpoint); "
                "nothing already written was lost"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    """JSON written atomically. A diverged run's metrics are NaN, written as the `NaN` token that
    Python, pandas and JavaScript's JSON5 read (strict parsers need `allow_nan` or equivalent)."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")
