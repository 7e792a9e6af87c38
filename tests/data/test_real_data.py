"""Where the tests find real MNIST (conftest.real_data): the shared copy without any network,
else mnistlab's own verified fetch, else one line in pytest's summary naming the fix."""

from __future__ import annotations

import gzip
import hashlib
import socket
from pathlib import Path

import pytest
from conftest import REAL_FILES, real_data
from http_server import FileServer

from mnistlab.data import sources, transfer
from mnistlab.data.dataset import DIGITS
from mnistlab.data.sources import DatasetInfo, Resource
from mnistlab.errors import MnistlabError

pytestmark = pytest.mark.timeout(60)
NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
PAYLOADS = {name: bytes(range(i, i + 16)) for i, name in enumerate(NAMES)}
GZ = {name: gzip.compress(data, mtime=0) for name, data in PAYLOADS.items()}
CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def info(mirror: str) -> DatasetInfo:
    sha = lambda data: hashlib.sha256(data).hexdigest()  # noqa: E731
    files = tuple(Resource(n, len(GZ[n]), sha(GZ[n]), len(PAYLOADS[n]), sha(PAYLOADS[n]))
                  for n in NAMES)
    return DatasetInfo("tiny", DIGITS, files, (mirror,))


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MNISTLAB_DATA", str(tmp_path / "cache"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    monkeypatch.setattr(transfer, "RETRY_DELAYS", (0.0, 0.0))
    return tmp_path / "cache"


def test_the_shared_copy_is_used_without_the_network(tmp_path, cache, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "tiny").mkdir(parents=True)
    for name in REAL_FILES:
        (shared / "tiny" / name).write_bytes(GZ[name])
    monkeypatch.setitem(sources.REGISTRY, "tiny", info("http://127.0.0.1:9/never/"))
    monkeypatch.setattr(socket, "create_connection", None)  # any network use would fail
    assert real_data("tiny", shared, tmp_path / "unused") == shared / "tiny"


def test_a_shared_copy_without_the_training_images_is_not_used(tmp_path, cache, monkeypatch):
    shared = tmp_path / "shared"
    (shared / "tiny").mkdir(parents=True)
    for name in REAL_FILES[:2]:  # the test set alone, as ../shared held before
        (shared / "tiny" / name).write_bytes(GZ[name])
    monkeypatch.setitem(sources.REGISTRY, "tiny", info("http://127.0.0.1:9/never/"))
    with pytest.raises(MnistlabError, match="no mirror delivered train-images"):
        real_data("tiny", shared, tmp_path)


def test_without_the_shared_copy_the_tests_fetch_a_verified_one(tmp_path, cache, monkeypatch):
    server = FileServer({f"/m/{n}": d for n, d in GZ.items()}).start()
    (tmp_path / "a").mkdir()
    try:
        monkeypatch.setitem(sources.REGISTRY, "tiny", info(f"{server.url}/m/"))
        folder = real_data("tiny", tmp_path / "no-shared", tmp_path / "a")
    finally:
        server.stop()
    assert {n: (cache / "tiny" / n).read_bytes() for n in NAMES} == GZ  # verified, cached
    assert sorted(p.name for p in folder.iterdir()) == sorted(REAL_FILES)  # as in ../shared
    assert all((folder / n).read_bytes() == GZ[n] for n in REAL_FILES)
    monkeypatch.setitem(sources.REGISTRY, "tiny", info("http://127.0.0.1:9/never/"))
    (tmp_path / "b").mkdir()
    real_data("tiny", tmp_path / "no-shared", tmp_path / "b")  # from the cache: no network


def test_with_neither_real_data_says_why(tmp_path, cache, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(sources.REGISTRY, "tiny", info(f"http://127.0.0.1:{port}/"))
    with pytest.raises(MnistlabError, match="no mirror delivered"):
        real_data("tiny", tmp_path / "no-shared", tmp_path)


def test_with_neither_pytest_says_so_in_one_line(pytester, tmp_path):
    """A fresh clone offline: the tests that need real MNIST do not run, and pytest's summary
    says so once, naming the command that fixes it (not one skip line per test)."""
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8"))  # its ../shared is absent
    pytester.makepyfile(test_real="""
        def test_one(mnist_dir): pass
        def test_two(mnist_dir): pass
        def test_without(): pass
    """)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    env = {"MNISTLAB_DATA": str(tmp_path / "empty"), "https_proxy": dead, "http_proxy": dead}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-ra")
    result.assert_outcomes(passed=1, deselected=2)
    said = [line for line in result.outlines if "mnistlab data fetch mnist" in line]
    shared = pytester.path.resolve().parent.parent / "shared" / "data" / "mnist"
    assert said == [f"2 tests need real MNIST and did not run: no {shared} and no download "
                    "(offline?); run `mnistlab data fetch mnist` once, then pytest again"]
    assert not [line for line in result.outlines + result.errlines if "warning" in line]
