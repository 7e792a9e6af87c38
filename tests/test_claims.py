"""The seed's claims say which data judged them: on MNIST they check the seed's findings; on
other data "about 90 %", a figure about MNIST, is not applicable and the comparisons say whether
the findings carry over. MNIST is known by name or by its published files' checksums."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from mnistlab import claims
from mnistlab.config import PRESETS, SEED_STUDY, to_dict
from mnistlab.data import idx
from mnistlab.data.identity import is_dataset
from mnistlab.experiment.summary import _claims
from mnistlab.report.html import _claims_table

BASELINE = {"run": "baseline",
            "final_val_accuracy": {"mean": 0.897, "ci_low": 0.89, "ci_high": 0.905, "n": 5}}
DIFFERENCES = {
    ("layernorm-dropout", "baseline"): (0.004, 0.001, 0.009),
    ("lr1e-3-p0.2", "lr5e-4-p0.4"): (0.01, 0.004, 0.016),
    ("lr1e-3-p0.2", "lr1e-4-p0.6"): (0.005, 0.002, 0.008),
    ("lr5e-4-p0.4", "lr1e-4-p0.6"): (-0.005, -0.008, -0.002),
}
STEPS = {"lr1e-3-p0.2": 150, "lr5e-4-p0.4": 225, "lr1e-4-p0.6": 600}


def pair(a: str, b: str) -> dict:
    diff, low, high = DIFFERENCES[a, b]
    return {"a": a, "b": b, "diff": diff, "ci_low": low, "ci_high": high}


def test_on_mnist_every_claim_is_judged_and_says_so():
    judged = claims.check([BASELINE], pair, STEPS, "mnist", on_seed_data=True)
    assert [c["verdict"] for c in judged] == ["supported"] * 4
    assert all((c["data"], c["on_seed_data"]) == ("mnist", True) for c in judged)
    assert "'about 90 %' read as 88–92 %" in judged[0]["evidence"]


def test_on_other_data_about_90_is_not_applicable_and_the_comparisons_stand():
    """The same numbers on Fashion-MNIST: the baseline's 89.7 % is reported, not judged; the
    three comparisons get the verdicts they get on MNIST, labelled with the data."""
    on_mnist = claims.check([BASELINE], pair, STEPS, "mnist", on_seed_data=True)
    judged = claims.check([BASELINE], pair, STEPS, "fashion-mnist", on_seed_data=False)
    assert judged[0]["verdict"] == claims.NOT_APPLICABLE
    assert judged[0]["evidence"] == (
        "the seed's 90 % is a figure about MNIST, not about fashion-mnist; here the baseline's "
        "final validation accuracy: mean 89.70 % [89.00, 90.50] over 5 seed(s)")
    assert [c["verdict"] for c in judged[1:]] == [c["verdict"] for c in on_mnist[1:]]
    assert all((c["data"], c["on_seed_data"]) == ("fashion-mnist", False) for c in judged)


def _rows() -> list[dict]:
    """Validation records whose mean reaches 95 % of its end at each STEPS entry."""
    rows = []
    for name in SEED_STUDY:
        reached = STEPS.get(name, 75)
        for step in (75, 150, 225, 300, 600):
            accuracy = 0.9 if step >= reached else 0.5
            rows.append({"run": name, "seed": 0, "step": step, "split": "val",
                         "accuracy": accuracy})
    return rows


class _Comparer:
    """The one method `_claims` asks of stats.Comparer: a fixed table of differences."""

    pair = staticmethod(pair)


def test_the_summary_knows_mnist_by_name_and_other_data_by_theirs(tmp_path):
    configs = {name: to_dict(PRESETS[name]) for name in SEED_STUDY}
    on_mnist = _claims(configs, [BASELINE], _rows(), _Comparer(), "mnist")
    assert on_mnist[0]["verdict"] == "supported" and on_mnist[0]["on_seed_data"]
    other = _claims(configs, [BASELINE], _rows(), _Comparer(), str(tmp_path))
    assert other[0]["verdict"] == "not applicable" and other[0]["data"] == str(tmp_path)
    assert [c["verdict"] for c in other[1:]] == [c["verdict"] for c in on_mnist[1:]]


def test_mnist_is_known_by_name_or_by_its_published_files(mnist_dir, tmp_path):
    assert is_dataset("mnist", "mnist")
    assert not is_dataset("fashion-mnist", "mnist")
    assert not is_dataset("in-memory arrays (10 images, sha256 0123456789abcdef)", "mnist")
    assert is_dataset(mnist_dir, "mnist")  # whatever its name: the files are MNIST's
    copy = tmp_path / "mnist"
    copy.mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(mnist_dir / name, copy / name)
    assert is_dataset(copy, "mnist")
    labels = idx.read_labels(copy / "t10k-labels-idx1-ubyte.gz")
    labels[0] = (labels[0] + 1) % 10  # one label of 10,000 changed: no longer MNIST
    idx.write(copy / "t10k-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    assert not is_dataset(copy, "mnist")


def test_a_folder_named_mnist_holding_other_data_is_not_mnist(tmp_path, make_dataset):
    folder = tmp_path / "mnist"
    folder.mkdir()
    for prefix in ("train", "t10k"):
        idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                      folder / f"{prefix}-labels-idx1-ubyte.gz", make_dataset(30))
    assert not is_dataset(folder, "mnist")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b damaged")
    assert not is_dataset(folder, "mnist")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(folder / "t10k-labels-idx1-ubyte.gz", lone)
    assert not is_dataset(lone, "mnist")
    assert not is_dataset(Path(folder / "t10k-labels-idx1-ubyte.gz"), "mnist")


def test_the_report_says_which_data_judged_the_claims():
    on_mnist = _claims_table(claims.check([BASELINE], pair, STEPS, "mnist", on_seed_data=True))
    assert "<p>Judged on mnist: MNIST, the data the seed study made them on.</p>" in on_mnist
    other = _claims_table(claims.check([BASELINE], pair, STEPS, "data/emnist<47>",
                                       on_seed_data=False))
    assert other.startswith("<p>Judged on data/emnist&lt;47&gt;. The seed study made these "
                            "claims on MNIST:")
    assert "<td>not applicable</td>" in other
    before = [{k: c[k] for k in ("claim", "verdict", "evidence")}
              for c in claims.check([BASELINE], pair, STEPS)]  # a summary from before
    assert _claims_table(before).startswith("<table")
