"""One file over HTTP, the conventional way: streamed to `<file>.part`, resumed with HTTP Range,
retried on transient failures, its size and SHA-256 checked against the published ones; one
process at a time per file (`<file>.lock`). What happens to the verified file is the caller's."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

from filelock import FileLock, Timeout

from mnistlab.data.registry import Archive, Resource
from mnistlab.data.urls import TIMEOUT, USER_AGENT, request
from mnistlab.errors import MnistlabError

RETRY_DELAYS = (1.0, 4.0)  # pauses before the 2nd and 3rd attempt at one mirror
CHUNK = 1 << 16


class MirrorFailed(Exception):
    """This mirror cannot deliver the file; the message says why. Try the next mirror."""


class Transient(MirrorFailed):
    """A failure worth retrying on the same mirror (timeout, cut connection, 5xx)."""


@contextlib.contextmanager
def lock_for(target: Path) -> Iterator[None]:
    """Hold `<target>.lock`: one process downloads, the others wait and then find its result."""
    lock = FileLock(f"{target}.lock")
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            print(f"note: waiting for another process downloading {target}", file=sys.stderr)
            lock.acquire()
    except OSError as exc:
        raise MnistlabError(
            f"{target.parent}: cannot write there ({exc.strerror}); "
            "pass --dest with a writable folder"
        ) from None
    try:
        yield
    finally:
        lock.release()


def from_mirror(
    url: str, part: Path, resource: Resource | Archive, report: Callable[[int], None]
) -> None:
    """Download `url` into `part`, resuming what is there, and verify it (bad: `part` deleted)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            transfer(url, part, resource.size, report)
            break
        except Transient as exc:
            if delay is None:
                attempts = len(RETRY_DELAYS) + 1
                raise MirrorFailed(f"{exc} (gave up after {attempts} attempts)") from None
            time.sleep(delay)
    problem = published_mismatch(part, resource)
    if problem:
        part.unlink()
        raise MirrorFailed(f"downloaded file is wrong: {problem}")


def transfer(url: str, part: Path, size: int, report: Callable[[int], None]) -> None:
    """One request: continue `part` from where it ends (HTTP Range), or start over on a 200."""
    offset = part.stat().st_size if part.exists() else 0
    if offset == size:
        return  # complete from an earlier run; verification follows
    offset = offset if offset < size else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urlopen(request(url, headers), timeout=TIMEOUT) as response:
            resumed = response.status == 206 and response.headers.get(
                "Content-Range", ""
            ).startswith(f"bytes {offset}-")
            offset = offset if resumed else 0  # Range ignored: the body is the whole file
            with open(part, "ab" if offset else "wb") as f:
                offset = _copy(response, f, offset, size, report)
    except HTTPError as exc:
        if exc.code == 416:  # our .part does not fit what the server has: start over
            part.unlink(missing_ok=True)
        retry = exc.code >= 500 or exc.code in (408, 416, 429)
        raise (Transient if retry else MirrorFailed)(f"HTTP {exc.code} {exc.reason}") from None
    except URLError as exc:
        # An unknown host or a refused connection will not change within seconds: next mirror.
        final = isinstance(exc.reason, socket.gaierror | ConnectionRefusedError)
        raise (MirrorFailed if final else Transient)(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise Transient(str(exc) or type(exc).__name__) from None
    if offset > size:
        part.unlink()
        raise MirrorFailed(f"server sent more than the published {size} bytes")
    if offset < size:
        raise Transient(f"connection closed after {offset} of {size} bytes")


def _copy(
    response: http.client.HTTPResponse,
    f: BinaryIO,
    offset: int,
    size: int,
    report: Callable[[int], None],
) -> int:
    """Append the body to `f`, stopping once past `size`; return the file's new length."""
    while offset <= size and (chunk := response.read(CHUNK)):
        f.write(chunk)
        offset += len(chunk)
        report(offset)
    f.flush()
    os.fsync(f.fileno())
    return offset


def published_mismatch(path: Path, resource: Resource | Archive) -> str | None:
    """Why `path` is not byte-for-byte the published file, or None (size checked before hashing)."""
    size = path.stat().st_size
    if size != resource.size:
        return f"{size} bytes, expected {resource.size}"
    with open(path, "rb") as f:
        _, digest = sha256_of(f)
    if digest != resource.sha256:
        return f"SHA-256 {digest}, expected {resource.sha256}"
    return None


def sha256_of(stream: BinaryIO) -> tuple[int, str]:
    """(bytes read, SHA-256 hex) of everything left in `stream`."""
    sha = hashlib.sha256()
    size = 0
    while chunk := stream.read(1 << 20):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()
