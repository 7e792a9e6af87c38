"""Opening input files: regular files only, and a size budget for what they may become.

Why: every reader trusts what it is given to end. A FIFO never ends (a read waits forever for a
writer), /dev/zero never ends either (a read fills memory), and a small compressed file can
decompress to a thousand times its size. So every input goes through `open_input`, which opens
without waiting (O_NONBLOCK) and refuses anything that is not a regular file before a byte is
read, and every decompressing reader asks `payload_budget` how far it may go before it
allocates: as far as the file's own declared size allows, and never beyond RATIO times the
compressed size (real image data shrinks 5-10×; a deflate bomb ~1000×) or MAX_PAYLOAD.
A leaf module, beside mnistlab.atomic (its counterpart for outputs).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from mnistlab.errors import DataError

MAX_PAYLOAD = 1 << 30  # bytes an input may be or decompress to: 1 GiB, 9× the largest MNIST CSV
RATIO = 64  # decompressed / compressed beyond which a payload is refused (real data: 5-10)
FLOOR = 16 << 20  # a payload this small is allowed whatever its ratio (tiny synthetic files)

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def kind_of(mode: int) -> str:
    """What a file of `mode` is, in words ("a FIFO (named pipe)"), or "a regular file"."""
    return next((name for test, name in _KINDS if test(mode)), "a regular file")


def not_regular(path: str | Path, mode: int, what: str = "a file") -> DataError:
    """The one-line error for an input that is no regular file (it could block or never end)."""
    return DataError(path, f"is {kind_of(mode)}, not a regular file",
                     f"pass {what} (mnistlab reads regular files only)")


def open_input(path: str | Path, what: str = "a file") -> BinaryIO:
    """`path` opened for binary reading, once it is known to be a regular file (symlinks to one
    are followed). Opening never waits: a FIFO, device, socket or folder is a DataError naming
    what it is; what the OS refuses (missing, no permission) is raised as its OSError, for the
    caller to word. `what` names the expected input in the message ("an image file")."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
                 | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise not_regular(path, mode, what)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_input(path: str | Path, what: str = "a file", limit: int = MAX_PAYLOAD) -> bytes:
    """The bytes of the regular file `path` (see `open_input`); one larger than `limit` is a
    DataError before anything is read."""
    with open_input(path, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise DataError(path, f"{size} bytes, more than the {limit} mnistlab reads",
                            f"pass {what} of a sensible size")
        return f.read()


def payload_budget(compressed: int) -> int:
    """Bytes a compressed input of `compressed` bytes may decompress to (see the module's
    docstring): RATIO × its size, at least FLOOR, at most MAX_PAYLOAD."""
    return min(MAX_PAYLOAD, max(FLOOR, RATIO * compressed))


def budget_words(compressed: int) -> str:
    """Where `payload_budget(compressed)` comes from, for an error message."""
    return (f"{payload_budget(compressed)} bytes, the most a {compressed}-byte compressed file "
            f"may hold here ({RATIO}× its size, at least {FLOOR >> 20} MiB, at most "
            f"{MAX_PAYLOAD >> 30} GiB; real data compress 5-10×)")
