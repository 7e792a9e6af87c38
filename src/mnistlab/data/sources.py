"""Named datasets (MNIST, Fashion-MNIST): their published files, where copies live, how to get them.

A named dataset is four gzipped IDX files with published sizes and SHA-256 sums. `locate` finds a
verified copy (the cache, then system dataset folders such as Debian's) and downloads only when
there is none; `fetch` downloads, or re-verifies, into any folder.

A download streams to `<file>.part`, resumes with HTTP Range, is verified, then renamed into
place, while `<file>.lock` makes concurrent processes wait for one download: the final name only
ever holds a verified file.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import http.client
import os
import socket
import sys
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO
from urllib.error import HTTPError, URLError
from urllib.request import Request, urlopen

import platformdirs
from filelock import FileLock, Timeout
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mnistlab._version import __version__
from mnistlab.data.dataset import DIGITS
from mnistlab.errors import MnistlabError

TIMEOUT = 30.0  # seconds for a connect or a read: a stalled mirror fails instead of hanging
RETRY_DELAYS = (1.0, 4.0)  # pauses before the 2nd and 3rd attempt at one mirror
CHUNK = 1 << 16
USER_AGENT = f"mnistlab/{__version__}"
SYSTEM_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets"),)  # Debian's dataset-* packages


@dataclass(frozen=True)
class Resource:
    """One published file: size and SHA-256 of the .gz as served, and of its decompressed payload.

    The payload pair recognises re-compressed copies (Debian's package, copies made by hand),
    whose .gz bytes differ from the published ones while the data are the same.
    """

    filename: str
    size: int
    sha256: str
    payload_size: int
    payload_sha256: str


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: class names, its four files, and base URLs tried in order."""

    name: str
    classes: tuple[str, ...]
    files: tuple[Resource, ...]
    mirrors: tuple[str, ...]


# .gz sums: the published ones (TensorFlow Datasets, torchvision, the Fashion-MNIST README).
# Payload sums: computed from the real data (Debian's dataset-fashion-mnist, MNIST copies).
REGISTRY: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        name="mnist",
        classes=DIGITS,
        files=(
            Resource(
                "train-images-idx3-ubyte.gz",
                9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                47_040_016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
            ),
            Resource(
                "train-labels-idx1-ubyte.gz",
                28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                60_008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
            ),
            Resource(
                "t10k-images-idx3-ubyte.gz",
                1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                7_840_016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
            ),
            Resource(
                "t10k-labels-idx1-ubyte.gz",
                4_542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                10_008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
            ),
        ),
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
        ),
    ),
    "fashion-mnist": DatasetInfo(
        name="fashion-mnist",
        classes=(
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        files=(
            Resource(
                "train-images-idx3-ubyte.gz",
                26_421_880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                47_040_016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            Resource(
                "train-labels-idx1-ubyte.gz",
                29_515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                60_008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            Resource(
                "t10k-images-idx3-ubyte.gz",
                4_422_102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                7_840_016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            Resource(
                "t10k-labels-idx1-ubyte.gz",
                5_148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                10_008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        mirrors=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
    ),
}


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file; the message says why. Try the next mirror."""


class _Transient(_MirrorFailed):
    """A failure worth retrying on the same mirror (timeout, cut connection, 5xx)."""


def cache_dir(name: str) -> Path:
    """Where dataset `name` is cached: $MNISTLAB_DATA/<name> if set, else the user cache folder."""
    root = os.environ.get("MNISTLAB_DATA") or platformdirs.user_cache_dir("mnistlab")
    return Path(root).expanduser() / name


def mismatch(path: Path, resource: Resource) -> str | None:
    """Why `path` is not a good copy of `resource`, or None when it is.

    Good means the published .gz bytes, or any gzip file whose decompressed data are the published
    payload (a re-compressed copy).
    """
    if not path.is_file():
        return "missing"
    if _published_mismatch(path, resource) is None:
        return None
    try:
        with gzip.open(path, "rb") as f:
            size, digest = _digest(f)
    except (OSError, EOFError, zlib.error) as exc:
        return f"not a readable gzip file ({exc})"
    if (size, digest) == (resource.payload_size, resource.payload_sha256):
        return None
    return (
        f"decompressed data differ from the published {resource.filename} "
        f"({size} bytes, SHA-256 {digest}; expected {resource.payload_size} bytes, "
        f"SHA-256 {resource.payload_sha256})"
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
    mirrors: Sequence[str] | None = None,
    progress: bool = True,
) -> Path:
    """Download every file of dataset `name` into `dest` (default: its cache folder); return it.

    Files already there and verified are kept. Mirrors default to the registry's, tried in order.
    """
    info = _info(name)
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
            _download(resource, folder, urls, bar)
    return folder


def _info(name: str) -> DatasetInfo:
    try:
        return REGISTRY[name]
    except KeyError:
        raise MnistlabError(
            f"unknown dataset {name!r}; use one of {', '.join(REGISTRY)}, "
            "or pass the path of a local copy"
        ) from None


def _verified(folder: Path, info: DatasetInfo) -> bool:
    """True when all files are there and good; a complete but wrong copy is reported, not used."""
    paths = [folder / r.filename for r in info.files]
    if not all(p.is_file() for p in paths):
        return False
    problems = [(p, why) for p, r in zip(paths, info.files, strict=True) if (why := mismatch(p, r))]
    for path, why in problems:
        print(f"warning: {path}: {why}; not using {folder}", file=sys.stderr)
    return not problems


def _download(resource: Resource, folder: Path, mirrors: Sequence[str], bar: Progress) -> Path:
    """Put a verified `resource` at folder/filename, from the first mirror that delivers it."""
    target = folder / resource.filename
    if mismatch(target, resource) is None:
        return target
    with _lock(target):
        if mismatch(target, resource) is None:
            return target  # another process downloaded it while we waited
        part = target.with_name(target.name + ".part")
        task = bar.add_task(resource.filename, total=resource.size)
        for base in mirrors:
            url = base.rstrip("/") + "/" + resource.filename
            try:
                _from_mirror(url, part, resource, lambda n: bar.update(task, completed=n))
            except _MirrorFailed as exc:
                print(f"warning: {url}: {exc}", file=sys.stderr)
                continue
            os.replace(part, target)
            return target
    raise MnistlabError(
        f"{target}: no mirror delivered {resource.filename} (tried {', '.join(mirrors)}; "
        "reasons above); check the network, or copy the file there yourself, "
        "or point --data at a local copy"
    )


@contextlib.contextmanager
def _lock(target: Path) -> Iterator[None]:
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


def _from_mirror(url: str, part: Path, resource: Resource, report: Callable[[int], None]) -> None:
    """Download `url` into `part`, resuming what is there, and verify it (bad: `part` deleted)."""
    for delay in (*RETRY_DELAYS, None):
        try:
            _transfer(url, part, resource.size, report)
            break
        except _Transient as exc:
            if delay is None:
                attempts = len(RETRY_DELAYS) + 1
                raise _MirrorFailed(f"{exc} (gave up after {attempts} attempts)") from None
            time.sleep(delay)
    problem = _published_mismatch(part, resource)
    if problem:
        part.unlink()
        raise _MirrorFailed(f"downloaded file is wrong: {problem}")


def _transfer(url: str, part: Path, size: int, report: Callable[[int], None]) -> None:
    """One request: continue `part` from where it ends (HTTP Range), or start over on a 200."""
    offset = part.stat().st_size if part.exists() else 0
    if offset == size:
        return  # complete from an earlier run; verification follows
    offset = offset if offset < size else 0
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with urlopen(Request(url, headers=headers), timeout=TIMEOUT) as response:
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
        raise (_Transient if retry else _MirrorFailed)(f"HTTP {exc.code} {exc.reason}") from None
    except URLError as exc:
        # An unknown host or a refused connection will not change within seconds: next mirror.
        final = isinstance(exc.reason, socket.gaierror | ConnectionRefusedError)
        raise (_MirrorFailed if final else _Transient)(str(exc.reason)) from None
    except (OSError, http.client.HTTPException) as exc:
        raise _Transient(str(exc) or type(exc).__name__) from None
    if offset > size:
        part.unlink()
        raise _MirrorFailed(f"server sent more than the published {size} bytes")
    if offset < size:
        raise _Transient(f"connection closed after {offset} of {size} bytes")


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


def _published_mismatch(path: Path, resource: Resource) -> str | None:
    """Why `path` is not byte-for-byte the published file, or None (size checked before hashing)."""
    size = path.stat().st_size
    if size != resource.size:
        return f"{size} bytes, expected {resource.size}"
    with open(path, "rb") as f:
        _, digest = _digest(f)
    if digest != resource.sha256:
        return f"SHA-256 {digest}, expected {resource.sha256}"
    return None


def _digest(stream: BinaryIO) -> tuple[int, str]:
    """(bytes read, SHA-256 hex) of everything left in `stream`."""
    sha = hashlib.sha256()
    size = 0
    while chunk := stream.read(1 << 20):
        sha.update(chunk)
        size += len(chunk)
    return size, sha.hexdigest()


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
