"""Classes other than 10: the data decide how many (and their names), and every stage follows.

A 47-class IDX folder (EMNIST balanced's count) and a 3-class NPZ that names its classes study end
to end through the command line; the readers' class rules, the confusion plot at 47, 62 and 300
classes, the terminal tables and evaluation on data that lacks the model's last classes are
checked on their own.
"""

from __future__ import annotations

import csv as std_csv
import itertools
import json
import re
import string
from pathlib import Path

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image
from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.data import csv, idx, load_path, npz
from mnistlab.data.dataset import DIGITS, Dataset, class_names
from mnistlab.errors import DataError
from mnistlab.evaluation import Evaluation, Predictions, score
from mnistlab.modules import load_checkpoint
from mnistlab.report import plots
from mnistlab.report.table import format_evaluation

BYCLASS = tuple(string.digits + string.ascii_uppercase + string.ascii_lowercase)  # EMNIST's 62


def learnable(k: int, per_class: int, seed: int, side: int = 28) -> Dataset:
    """`per_class` noisy copies of one random template per class, labels 0..k-1 in order."""
    rng = np.random.default_rng(seed)
    templates = np.random.default_rng(99).integers(0, 256, (k, side, side))
    labels = np.repeat(np.arange(k, dtype=np.int64), per_class)
    noise = rng.integers(-40, 41, (len(labels), side, side))
    images = np.clip(templates[labels] + noise, 0, 255).astype(np.uint8)
    return Dataset(images, labels, class_names(k))


def _idx_folder(folder: Path, train: Dataset, test: Dataset) -> Path:
    folder.mkdir()
    for prefix, part in (("train", train), ("t10k", test)):
        idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                      folder / f"{prefix}-labels-idx1-ubyte.gz", part)
    return folder


def _run(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def _study_end_to_end(data: Path, classes: tuple[str, ...], test: Dataset, tmp: Path) -> dict:
    """`mnistlab study --data DATA`, then evaluate, predict and export its winner, checking
    that every stage has exactly `classes`. Returns summary.json."""
    k = len(classes)
    _run("study", "--data", str(data), "--seeds", "2", "--epochs", "1", "--device", "cpu",
         "--out", str(tmp / "runs"), "-q")
    (run,) = (tmp / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["classes"] == list(classes)
    winner, seed = summary["selection"]["winner"], summary["selection"]["seed"]
    checkpoint = run / "checkpoints" / f"{winner}-seed{seed}.safetensors"
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.inputs.classes == classes and ckpt.model[-1].out_features == k
    stored = Predictions.load(run / "predictions" / f"{winner}-seed{seed}.safetensors")
    assert stored.classes == classes and len(stored.labels) == len(test)

    page = (run / "report.html").read_text()
    per_class = page.split("The winner per class")[1].split("</table>")[0]
    rows = re.findall(r"<tr><td>([^<]*)</td>", per_class)
    assert rows == [name.replace("&", "&amp;") for name in classes]
    assert (run / "plots" / f"confusion_{winner}.png").is_file()
    assert any((run / "tb").glob(f"{winner}/seed*/images/events.out.tfevents.*"))  # issue 23

    record = json.loads(_run("evaluate", str(run), "--json"))
    assert [c["label"] for c in record["per_class"]] == list(classes)
    assert np.array(record["confusion"]).shape == (k, k)
    assert sum(c["support"] for c in record["per_class"]) == 2 * len(test)  # summed over seeds
    text = _run("evaluate", str(run))
    wide = "most frequent confusions" if k > 12 else "confusion matrix (rows: true class)"
    assert wide in text

    picture = tmp / "first.png"
    Image.fromarray(test.images[0]).save(picture)
    (image,) = json.loads(_run("predict", str(checkpoint), str(picture), "--json"))
    assert len(image["top3"]) == min(3, k) and image["label"] == classes[image["index"]]
    assert all(t["label"] == classes[t["index"]] for t in image["top3"])
    rows_csv, submission = tmp / "test.csv", tmp / "submission.csv"
    csv.write_csv(rows_csv, Dataset(test.images, None), "kaggle")
    _run("predict", str(checkpoint), "--csv", str(rows_csv), "--submission", str(submission))
    with open(submission, newline="") as f:
        labels = [row[1] for row in list(std_csv.reader(f))[1:]]
    assert len(labels) == len(test) and set(labels) <= set(classes)

    onnxruntime = pytest.importorskip("onnxruntime", reason="ONNX export needs mnistlab[onnx]")
    model = tmp / "model.onnx"
    assert f"N×{k};" in _run("export", str(checkpoint), "--onnx", str(model))
    session = onnxruntime.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": test.images[:5].astype(np.float32)})
    assert logits.shape == (5, k)
    assert json.loads(session.get_modelmeta().custom_metadata_map["classes"]) == list(classes)
    return summary


def test_a_47_class_idx_folder_studies_end_to_end(tmp_path):
    """EMNIST balanced's 47 classes, nothing naming them: labels 0..46 make classes "0".."46"."""
    train, test = learnable(47, 8, seed=1), learnable(47, 3, seed=2)
    data = _idx_folder(tmp_path / "emnist-like", train, test)
    summary = _study_end_to_end(data, class_names(47), test, tmp_path)
    assert summary["sizes"] == {"train": 282, "val": 94, "test": 141}
    about_90 = summary["claims"][0]
    assert (about_90["data"], about_90["on_seed_data"]) == (str(data), False)
    assert about_90["verdict"] == "not applicable"


def test_a_3_class_npz_with_named_classes_studies_end_to_end(tmp_path):
    """An .npz naming its classes: the names reach every output, the submission too."""
    named = ("cat", "dog", "bird & fish")
    train, test = learnable(3, 40, seed=1), learnable(3, 10, seed=2)
    path = tmp_path / "three.npz"
    npz.write_npz(path, Dataset(train.images, train.labels, named),
                  Dataset(test.images, test.labels, named))
    _study_end_to_end(path, named, test, tmp_path)


# --- how the data decide the classes ----------------------------------------------------------


def test_a_path_has_its_highest_label_plus_one_classes_over_both_parts(tmp_path):
    train, test = learnable(47, 2, seed=1, side=4), learnable(41, 1, seed=2, side=4)
    source = load_path(_idx_folder(tmp_path / "d", train, test))
    assert source.train.classes == source.test.classes == class_names(47)
    source = load_path(_idx_folder(tmp_path / "e", test, train))  # the test part goes further
    assert source.train.classes == source.test.classes == class_names(47)


def test_an_unlabelled_test_part_takes_the_training_classes(tmp_path):
    csv.write_csv(tmp_path / "train.csv", learnable(3, 4, seed=1, side=4))
    csv.write_csv(tmp_path / "test.csv", Dataset(learnable(3, 1, seed=2, side=4).images, None))
    source = load_path(tmp_path)
    assert source.train.classes == source.test.classes == ("0", "1", "2")
    assert source.test.labels is None


def test_declared_classes_bound_the_labels(tmp_path):
    """A registry's classes (here the digits) make a label past them the usual one-line error."""
    folder = _idx_folder(tmp_path / "d", learnable(47, 1, seed=1, side=4),
                         learnable(10, 1, seed=2, side=4))
    with pytest.raises(DataError) as info:
        load_path(folder, name="mnist", classes=DIGITS)
    assert str(info.value) == (f"{folder / 'train-labels-idx1-ubyte.gz'}:byte 18: label 10 of "
                               "item 10 is outside 0..9; pass the labels file that belongs to "
                               "this dataset")


def test_an_npz_class_list_names_and_bounds_the_classes(tmp_path):
    images = np.zeros((4, 3, 3), np.uint8)
    path = tmp_path / "named.npz"
    names = np.array(["a", "b", "c"])
    np.savez(path, x_train=images, y_train=np.array([0, 1, 2, 1]), classes=names)
    assert load_path(path).train.classes == ("a", "b", "c")
    np.savez(path, x_train=images, y_train=np.array([0, 1, 3, 1]), classes=names)
    with pytest.raises(DataError) as info:
        load_path(path)
    assert str(info.value) == (f"{path}:y_train[2]: 'y_train' holds 3, outside 0..2; store "
                               "values 0..2 only")


@pytest.mark.parametrize(("names", "problem"), [
    (np.array([1, 2, 3]), "'classes' is int64 (3,), not a list of class names"),
    (np.array([["a", "b"]]), "'classes' is <U1 (1, 2), not a list of class names"),
    (np.array(["a", " ", "c"]), "'classes': class 1 has no name"),
    (np.array(["a", "b", "a"]), "'classes': 'a' is named twice"),
])
def test_a_bad_npz_class_list_is_one_line_naming_the_fix(tmp_path, names, problem):
    path = tmp_path / "bad.npz"
    np.savez(path, x_train=np.zeros((2, 3, 3), np.uint8), y_train=np.array([0, 1]), classes=names)
    with pytest.raises(DataError) as info:
        load_path(path)
    assert str(info.value) == (f"{path}:classes: {problem}; store the names as "
                               "classes=np.array(['name of 0', 'name of 1', ...])")


def test_a_label_beyond_any_byte_is_refused_without_declared_classes(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("label,pixel0\n3,0\n256,0\n")
    with pytest.raises(DataError, match=r"line 3, column 1: label 256 is outside 0\.\.255"):
        load_path(path)


def test_a_dataset_refuses_labels_its_classes_do_not_cover():
    with pytest.raises(ValueError, match=r"labels must index the 3 classes, got 0\.\.3"):
        Dataset(np.zeros((2, 2, 2), np.uint8), np.array([0, 3]), ("a", "b", "c"))


def test_data_lacking_the_models_last_classes_are_scored_with_the_models_classes(tmp_path):
    """Classes inferred from a test file whose labels stop at 5 are 6, the model has 10: the
    answers, the confusion matrix and the names are the model's."""
    ckpt_dir = tmp_path / "run"
    train, test = learnable(10, 20, seed=1), learnable(6, 5, seed=2)
    data = _idx_folder(tmp_path / "d", train, train)
    _run("train", "--data", str(data), "--hidden", "16", "--dropout-after", "", "--epochs", "1",
         "--device", "cpu", "--out", str(ckpt_dir), "-q")
    (checkpoint,) = ckpt_dir.glob("*/checkpoints/*.safetensors")
    part = load_path(_idx_folder(tmp_path / "six", test, test)).test
    assert part.classes == class_names(6)
    ev = score(load_checkpoint(checkpoint), part)
    assert ev.confusion.shape == (10, 10) and ev.confusion.sum() == len(test)


# --- the confusion plot and the tables at many classes ------------------------------------------


def _evaluation(k: int, per_class: int = 300, seed: int = 0) -> Evaluation:
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(k), per_class)
    predicted = np.where(rng.random(len(labels)) < 0.8, labels, rng.integers(0, k, len(labels)))
    confusion = np.bincount(labels * k + predicted, minlength=k * k).reshape(k, k)
    return Evaluation(float(np.trace(confusion) / confusion.sum()), 0.5, confusion, [])


def _boxes(labels: list) -> list:
    return [t.get_window_extent() for t in labels if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("classes", [
    DIGITS, class_names(47), BYCLASS, tuple(f"character {i}" for i in range(47)),
    class_names(300),
], ids=["10 digits", "47", "62 byclass", "47 long names", "300"])
def test_confusion_class_names_never_overlap(classes):
    """Drawn as they would be saved, no two class names touch along either axis, and each
    written count fits inside its cell."""
    k = len(classes)
    per_class = 1 if k == 300 else 300  # 300 classes: a sparse matrix, drawn quickly
    fig = plots.confusion_figure(_evaluation(k, per_class), classes, "t")
    FigureCanvasAgg(fig).draw()
    (ax, _) = fig.axes
    xs = sorted(_boxes(ax.get_xticklabels()), key=lambda b: b.x0)
    ys = sorted(_boxes(ax.get_yticklabels()), key=lambda b: b.y0)
    assert len(xs) == len(ys) >= min(k, 100)
    assert all(a.x1 <= b.x0 for a, b in itertools.pairwise(xs))
    assert all(a.y1 <= b.y0 for a, b in itertools.pairwise(ys))
    cell = ax.get_window_extent().width / k
    assert all(t.get_window_extent().width < cell for t in ax.texts)


def test_a_confusion_plot_of_62_classes_is_one_readable_png(tmp_path):
    path = plots.confusion(_evaluation(62), BYCLASS, tmp_path / "c.png", "byclass")
    with Image.open(path) as png:
        assert max(png.size) <= 2700  # 22-inch matrix at 110 dpi, plus names and colour bar


def test_the_terminal_shows_the_matrix_up_to_12_classes_and_the_top_confusions_beyond():
    small = format_evaluation(_evaluation(12), class_names(12))
    assert "confusion matrix (rows: true class)" in small
    big = format_evaluation(_evaluation(47, seed=3), class_names(47))
    assert "confusion matrix (rows" not in big and "most frequent confusions" in big
    ev = _evaluation(47, seed=3)
    off = ev.confusion - np.diag(np.diag(ev.confusion))
    true, predicted = np.unravel_index(np.argmax(off), off.shape)
    first = big.split("of the true")[1].splitlines()[2]
    assert first.split("│")[1:4] == [f" {true:<4} ", f" {predicted:<9} ",
                                     f" {off[true, predicted]:>6} "]
    per_class = big.split("most frequent confusions")[0]
    assert [line.split("│")[1].strip() for line in per_class.splitlines()
            if line.startswith("│")] == [*class_names(47), "macro avg"]


def test_in_memory_arrays_take_class_names_as_a_third_element():
    images, labels = np.zeros((47, 4, 4), np.uint8), np.arange(47)
    source = npz.arrays_source(images, labels, [f"c{i}" for i in range(47)])
    assert source.train.classes == tuple(f"c{i}" for i in range(47))
    with pytest.raises(DataError) as info:
        npz.arrays_source(images, labels)  # the digits, unless named
    assert str(info.value) == ("in-memory arrays:labels[10]: 'labels' holds 10, outside 0..9; "
                               "store values 0..9 only, or name every class: "
                               "data=(images, labels, class_names)")
