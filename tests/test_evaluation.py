"""Evaluation of a real (briefly trained) model on the real MNIST test images."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab.cli import app
from mnistlab.config import RunConfig, Schedule, StudyConfig
from mnistlab.data import Dataset, load
from mnistlab.errors import DataError, MnistlabError
from mnistlab.evaluation import (
    Evaluation,
    Predictions,
    evaluation,
    logits,
    predictions,
    score,
)
from mnistlab.model import Checkpoint, InputSpec, build_mlp
from mnistlab.modules import load_checkpoint, save_checkpoint
from mnistlab.report.table import format_evaluation

SMALL = {"hidden": (64,), "dropout_after": (1,)}  # trains in about a second on two cores


def train_checkpoint(config: RunConfig, data: Dataset, seed: int, steps: int = 300) -> Checkpoint:
    """A model trained for `steps` Adam steps of 128 random images: good, far from perfect.

    One thread: these tiny matrix products are several times faster without thread hand-offs,
    more so on a busy machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config, data, seed, steps)
    finally:
        torch.set_num_threads(threads)


def _train(config: RunConfig, data: Dataset, seed: int, steps: int) -> Checkpoint:
    torch.manual_seed(seed)
    inputs = InputSpec(classes=data.classes)
    x, y = inputs.prepare(data.images), torch.as_tensor(data.labels)
    model = build_mlp(config, n_classes=len(data.classes))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    for _ in range(steps):
        batch = torch.randint(len(x), (128,))
        loss = F.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return Checkpoint(model, config, inputs, seed)


@pytest.fixture(scope="module")
def data(mnist_t10k_dir) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of the real MNIST test set."""
    full = load(mnist_t10k_dir, progress=False).train
    return full.subset(np.arange(8000)), full.subset(np.arange(8000, 10000), origin="t10k[8000:]")


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mlp-seed0.safetensors"
    config = RunConfig(name="mlp", lr=1e-3, dropout=0.3, layernorm=True, **SMALL)
    save_checkpoint(path, train_checkpoint(config, data[0], seed=0))
    return path


def test_metrics_match_a_direct_computation(checkpoint, data):
    ckpt, held = load_checkpoint(checkpoint), data[1]
    ev = score(ckpt, held, worst=20)
    with torch.no_grad():
        out = ckpt.model(ckpt.inputs.prepare(held.images))
    labels = torch.as_tensor(held.labels)
    predicted = out.argmax(1).numpy()
    assert 0.80 < ev.accuracy < 1.0  # trained, and still makes mistakes to show
    assert ev.accuracy == pytest.approx(float((predicted == held.labels).mean()))
    assert ev.loss == pytest.approx(F.cross_entropy(out, labels).item(), rel=1e-5)
    assert ev.confusion.sum() == len(held)
    assert ev.confusion.trace() / len(held) == pytest.approx(ev.accuracy)
    for c in range(10):
        true_c, pred_c = held.labels == c, predicted == c
        assert ev.confusion[c, 3] == np.sum(true_c & (predicted == 3))
        assert ev.support[c] == true_c.sum()
        assert ev.recall[c] == pytest.approx(np.sum(true_c & pred_c) / true_c.sum())
        assert ev.precision[c] == pytest.approx(np.sum(true_c & pred_c) / pred_c.sum())
        p, r = ev.precision[c], ev.recall[c]
        assert ev.f1[c] == pytest.approx(2 * p * r / (p + r))


def test_macro_averages_are_the_means_over_classes(checkpoint, data):
    ckpt, held = load_checkpoint(checkpoint), data[1]
    ev = score(ckpt, held)
    with torch.no_grad():
        predicted = ckpt.model(ckpt.inputs.prepare(held.images)).argmax(1).numpy()
    scores = []
    for c in range(10):
        hits = np.sum((held.labels == c) & (predicted == c))
        p, r = hits / np.sum(predicted == c), hits / np.sum(held.labels == c)
        scores.append((p, r, 2 * p * r / (p + r)))
    want = dict(zip(("precision", "recall", "f1"), np.mean(scores, axis=0), strict=True))
    assert ev.macro == pytest.approx(want, rel=1e-12)
    assert ev.macro["recall"] != pytest.approx(ev.accuracy, abs=1e-4)  # not the micro average


def _confusion(rows: list[list[int]]) -> Evaluation:
    confusion = np.array(rows)
    return Evaluation(float(np.trace(confusion) / confusion.sum()), 0.0, confusion, [])


def test_macro_averages_count_the_classes_that_occur():
    """As scikit-learn's average="macro": a class neither in the data nor predicted does not
    count; one predicted but absent counts, with precision, recall and F1 of 0."""
    absent = _confusion([[3, 1, 0], [1, 5, 0], [0, 0, 0]])
    assert absent.macro == pytest.approx({"precision": (3 / 4 + 5 / 6) / 2,
                                          "recall": (3 / 4 + 5 / 6) / 2,
                                          "f1": (3 / 4 + 5 / 6) / 2})
    predicted_only = _confusion([[3, 1, 0], [1, 4, 1], [0, 0, 0]])
    p1, r1 = 4 / 5, 4 / 6
    assert predicted_only.macro == pytest.approx({
        "precision": (3 / 4 + p1 + 0) / 3, "recall": (3 / 4 + r1 + 0) / 3,
        "f1": (3 / 4 + 2 * p1 * r1 / (p1 + r1) + 0) / 3})


def test_worst_errors_are_the_most_confident_mistakes(checkpoint, data):
    ckpt, held = load_checkpoint(checkpoint), data[1]
    ev = score(ckpt, held, worst=20)
    with torch.no_grad():
        prob = ckpt.model(ckpt.inputs.prepare(held.images)).softmax(1)
    confidence, predicted = prob.max(1)
    wrong = np.flatnonzero(predicted.numpy() != held.labels)
    assert len(ev.worst) == 20 < len(wrong)
    listed = [m.index for m in ev.worst]
    assert set(listed) <= set(wrong)
    confidences = [m.confidence for m in ev.worst]
    assert confidences == sorted(confidences, reverse=True)
    unlisted = np.setdiff1d(wrong, listed)
    assert confidence[unlisted].max().item() <= ev.worst[-1].confidence
    m = ev.worst[0]
    assert (m.true, m.predicted) == (held.labels[m.index], predicted[m.index].item())
    assert m.confidence == pytest.approx(confidence[m.index].item())
    assert np.array_equal(m.image, held.images[m.index])  # the grid needs no data set


def test_stored_predictions_give_the_same_evaluation(checkpoint, data, tmp_path):
    """What a run directory keeps of a model's test pass scores exactly as the model does."""
    ckpt, held = load_checkpoint(checkpoint), data[1]
    path = tmp_path / "mlp-seed0.safetensors"
    path.write_bytes(predictions(ckpt, held).to_bytes())
    stored, direct = evaluation(Predictions.load(path)), score(ckpt, held)
    assert stored.accuracy == direct.accuracy
    assert np.array_equal(stored.confusion, direct.confusion)
    assert stored.loss == pytest.approx(direct.loss, rel=1e-6)
    assert [m[:4] for m in stored.worst] == [m[:4] for m in direct.worst]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(stored.worst, direct.worst,
                                                                strict=True))
    assert path.stat().st_size < 12 * len(held) + 25 * 28 * 28 + 2000  # compact: no logits


def test_inference_is_batched_deterministic_and_in_eval_mode(checkpoint, data):
    ckpt = load_checkpoint(checkpoint)
    ckpt.model.train()  # a caller's leftover train mode must not turn dropout on
    images = data[1].images[:100]
    assert torch.allclose(logits(ckpt, images, batch_size=7), logits(ckpt, images), atol=1e-6)
    first, second = score(ckpt, data[1]), score(ckpt, data[1])
    assert first.loss == second.loss
    assert [m[:4] for m in first.worst] == [m[:4] for m in second.worst]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first.worst, second.worst,
                                                                strict=True))


def test_unusable_data_is_a_one_line_error_naming_it():
    ckpt = Checkpoint(build_mlp(RunConfig()), RunConfig(), InputSpec())
    images = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"^unlabelled.csv: has no labels.*mnistlab predict"):
        score(ckpt, Dataset(images, None, origin="unlabelled.csv"))
    small = Dataset(np.zeros((4, 14, 14), np.uint8), np.zeros(4, np.int64), origin="small.npz")
    with pytest.raises(DataError, match=r"^small.npz: images are 14x14 but the model expects 28"):
        score(ckpt, small)
    many = Dataset(images, np.array([0, 1, 12, 3]), classes=tuple("abcdefghijklm"), origin="x.idx")
    with pytest.raises(DataError, match=r"^x.idx: has label 12 but the model knows 10 classes"):
        score(ckpt, many)


def test_format_evaluation_shows_every_table(checkpoint, data):
    ev = score(load_checkpoint(checkpoint), data[1])
    text = format_evaluation(ev, data[1].classes)
    assert f"accuracy {ev.accuracy:.4f}" in text and "(2000 images)" in text
    for title in ("per class", "confusion matrix", "most confident errors"):
        assert title in text
    macro = " ".join(f"{v:.4f}" for v in ev.macro.values())
    assert " ".join(["macro avg", *macro.split(), "2000"]) in " ".join(text.replace("│", " ")
                                                                       .split())
    m = ev.worst[0]
    assert f"{m.confidence:.1%}" in text and str(m.index) in text
    assert "\x1b[" not in text  # plain text, no terminal escape codes


def test_evaluate_a_checkpoint(checkpoint, mnist_t10k_dir, tmp_path):
    scored = ml.evaluate(checkpoint, data=str(mnist_t10k_dir), plots=tmp_path)
    # MNIST's t10k alone has no test part: scored on its training part, and the note says so.
    assert "no labelled test part" in scored.note and "(10000 images)" in scored.data
    assert scored.evaluation.support.sum() == 10000
    assert sorted(p.name for p in scored.plots) == ["confusion_mlp-seed0.png",
                                                    "misclassified_mlp-seed0.png"]
    for path in scored.plots:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300


def test_evaluate_cli(checkpoint, mnist_t10k_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(mnist_t10k_dir),
                             "--out", str(tmp_path)])
    assert ok.exit_code == 0, ok.output
    assert "confusion matrix" in ok.output and "no labelled test part" in ok.output
    assert f"wrote {tmp_path / 'confusion_mlp-seed0.png'}" in ok.output
    missing = runner.invoke(app, ["evaluate", str(checkpoint)])
    assert missing.exit_code == 2
    assert "error:" in missing.output and "--data" in missing.output
    with pytest.raises(MnistlabError, match="pass --data"):
        ml.evaluate(checkpoint, plots=tmp_path)
    nowhere = runner.invoke(app, ["evaluate", str(tmp_path / "nowhere")])
    assert nowhere.exit_code == 2 and "no such file or run directory" in nowhere.output


def test_evaluate_json_says_what_the_text_says(checkpoint, mnist_t10k_dir, tmp_path):
    args = ["evaluate", str(checkpoint), "--data", str(mnist_t10k_dir), "--out", str(tmp_path)]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    scored = ml.evaluate(checkpoint, data=str(mnist_t10k_dir), plots=tmp_path)
    ev = scored.evaluation
    assert (record["model"], record["data"], record["note"]) == (scored.model, scored.data,
                                                                 scored.note)
    assert record["accuracy"] == ev.accuracy and record["loss"] == ev.loss
    assert record["images"] == 10000 and np.array_equal(record["confusion"], ev.confusion)
    assert record["macro_average"] == ev.macro
    for i, row in enumerate(record["per_class"]):
        assert (row["label"], row["index"]) == (str(i), i)
        assert [row[k] for k in ("precision", "recall", "f1", "support")] == [
            ev.precision[i], ev.recall[i], ev.f1[i], ev.support[i]]
    assert record["per_seed"] == []  # a checkpoint is one model
    worst = record["worst_errors"]
    assert len(worst) == len(ev.worst) > 0
    for shown, mistake in zip(worst, ev.worst, strict=True):
        assert shown == {"image": mistake.index,
                         "true": {"label": str(mistake.true), "index": mistake.true},
                         "predicted": {"label": str(mistake.predicted),
                                       "index": mistake.predicted},
                         "confidence": mistake.confidence}
    assert record["plots"] == [str(p) for p in scored.plots]
    assert all(Path(p).is_file() for p in record["plots"])
    text = CliRunner().invoke(app, args).stdout
    assert f"accuracy {record['accuracy']:.4f}" in text and "macro avg" in text


def test_evaluate_json_of_a_run_directory_gives_each_seed(idx_dir, tmp_path):
    study = StudyConfig(name="two-seeds", runs=(RunConfig(name="small", hidden=(16,),
                                                          dropout_after=()),),
                        seeds=(0, 1), schedule=Schedule(epochs=1), device="cpu")
    run = ml.study(study, data=str(idx_dir), out=tmp_path, progress=False, report=False).path
    result = CliRunner().invoke(app, ["evaluate", str(run), "--json"])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert [s["seed"] for s in record["per_seed"]] == [0, 1]
    accuracies = [s["accuracy"] for s in record["per_seed"]]
    assert record["accuracy"] == pytest.approx(np.mean(accuracies))
    assert record["images"] == 2 * 20  # the confusion matrix is summed over the seeds
    assert record["model"].startswith("small (seeds 0, 1: ")
