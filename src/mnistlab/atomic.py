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
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mnistlab.errors import MnistlabError
from mnistlab.inputs import kind_of

_UMASK = os.umask(0o022)
os.umask(_UMASK)


# What to do about a write the OS refused, by errno (anything else: WRITE_FIX).
_FIXES = {
    errno.EACCES: "pass a path you may write to, or fix its folder's permissions",
    errno.EPERM: "pass a path you may write to, or fix its folder's permissions",
    errno.EROFS: "pass a path on a writable file system",
    errno.ENOTDIR: "a file stands where a folder of the path should be: pass another path",
    errno.EEXIST: "a file stands where a folder of the path should be: pass another path",
    errno.EISDIR: "a folder stands where the file should be: pass a file path",
    errno.ENAMETOOLONG: "pass a shorter name",
    errno.EFBIG: "the file size limit (ulimit -f) or the file system's is too small: raise it",
}
WRITE_FIX = "check the path, its permissions and free space"


def write_error(path: str | Path, exc: OSError) -> MnistlabError:
    """One line for a write the OS refused: the path, the errno's meaning, what to do. A full
    disk also says that nothing already written was lost (the temp file goes, not the target)."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return MnistlabError(
            f"{path}: disk full while writing; free space and rerun "
            "(--resume RUN_DIR continues from the last checkpoint); "
            "nothing already written was lost"
        )
    meaning = os.strerror(exc.errno) if exc.errno else str(exc)
    temp = exc.filename and Path(exc.filename).name.startswith(f".{Path(path).name}.")
    where = exc.filename if exc.filename and not temp else path
    return MnistlabError(f"{where}: cannot write ({meaning}); {_FIXES.get(exc.errno, WRITE_FIX)}")


def check_target(path: str | Path) -> None:
    """Refuse to write over anything but a regular file (or nothing): a device, FIFO, socket or
    folder would be replaced by a regular file by the rename (as root, `--out /dev/null` would
    replace the system's). A symlink is judged by what it points to."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise write_error(path, exc) from None
    if not stat.S_ISREG(mode):
        raise MnistlabError(f"{path}: is {kind_of(mode)}, not a regular file; mnistlab replaces "
                            "a file it writes as a whole: pass the path of a file")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure remove it.

    The one way mnistlab writes a file: the target must be a regular file or absent
    (`check_target`), and any OSError on the way (folders that cannot be made, no permission,
    a read-only file system, a name too long, the file size limit, a full disk) is one
    MnistlabError line naming the path and the errno's meaning (`write_error`)."""
    path = Path(path)
    check_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are as readable as any file
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
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
