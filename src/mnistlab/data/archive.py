"""Named members read out of a tarball or a zip, and nothing else extracted.

A member is matched by its exact name, which is never used as a path; it must be a regular file,
and one that declares more bytes than its caller allows is refused before a byte of it is read.
A tarball is read as a stream (one pass, the members not wanted passed over); a zip is read by
its central directory, and its own checks (declared size, CRC-32) hold while reading.
"""

from __future__ import annotations

import tarfile
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from pathlib import Path

from mnistlab.data.magic import ZIP


class ArchiveError(Exception):
    """The archive cannot give a wanted member; the message says why."""


def read_members(path: Path, wanted: Mapping[str, int]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each member of the archive at `path` named in `wanted`, once each, in
    archive order; `wanted` maps a member's name to the most bytes it may hold. A member not
    found is not yielded: the caller says what is missing."""
    with open(path, "rb") as f:
        is_zip = f.read(4) in ZIP
    yield from (_zip if is_zip else _tar)(path, wanted)


def _check(name: str, size: int, limit: int, regular: bool) -> None:
    if not regular:
        raise ArchiveError(f"member {name} is not a regular file")
    if size > limit:
        raise ArchiveError(
            f"member {name} declares {size} bytes, more than the {limit} expected (not read)"
        )


def _tar(path: Path, wanted: Mapping[str, int]) -> Iterator[tuple[str, bytes]]:
    seen: set[str] = set()
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if member.name not in wanted or member.name in seen:
                    continue
                _check(member.name, member.size, wanted[member.name], member.isreg())
                stream = tar.extractfile(member)
                data = stream.read() if stream is not None else b""
                if len(data) != member.size:
                    raise ArchiveError(f"member {member.name} ends after {len(data)} of its "
                                       f"{member.size} bytes")
                seen.add(member.name)
                yield member.name, data
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise ArchiveError(f"not a readable tar archive ({exc})") from None


def _zip(path: Path, wanted: Mapping[str, int]) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as archive:
            found = {info.filename: info for info in archive.infolist()}
            for name, limit in wanted.items():
                info = found.get(name)
                if info is None:
                    continue
                _check(name, info.file_size, limit, not info.is_dir())
                with archive.open(info) as member:
                    data = member.read(limit + 1)  # the declared size is checked while reading
                yield name, data
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError,
            zlib.error) as exc:
        raise ArchiveError(f"not a readable zip archive ({exc})") from None
