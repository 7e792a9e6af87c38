"""Evaluation of a real (briefly trained) model on the real MNIST test images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab.config import RunConfig
from mnistlab.data import Dataset, load
from mnistlab.errors import DataError, MnistlabError
from mnistlab.evaluation import Predictions, evaluate, evaluation, logits, predictions
from mnistlab.model import Checkpoint, InputSpec, build_mlp, load_checkpoint, save_checkpoint
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
def data(mnist_dir) -> tuple[Dataset, Dataset]:
    """(training part, held-out part) of the real MNIST test set."""
    full = load(mnist_dir, progress=False).train
    return full.subset(np.arange(8000)), full.subset(np.arange(8000, 10000), origin="t10k[8000:]")


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "mlp-seed0.safetensors"
    config = RunConfig(name="mlp", lr=1e-3, dropout=0.3, layernorm=True, **SMALL)
    save_checkpoint(path, train_checkpoint(config, data[0], seed=0))
    return path


def test_metrics_match_a_direct_computation(checkpoint, data):
    ckpt, held = load_checkpoint(checkpoint), data[1]
    ev = evaluate(ckpt, held, worst=20)
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


def test_worst_errors_are_the_most_confident_mistakes(checkpoint, data):
    ckpt, held = load_checkpoint(checkpoint), data[1]
    ev = evaluate(ckpt, held, worst=20)
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
    stored, direct = evaluation(Predictions.load(path)), evaluate(ckpt, held)
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
    first, second = evaluate(ckpt, data[1]), evaluate(ckpt, data[1])
    assert first.loss == second.loss
    assert [m[:4] for m in first.worst] == [m[:4] for m in second.worst]
    assert all(np.array_equal(a.image, b.image) for a, b in zip(first.worst, second.worst,
                                                                strict=True))


def test_unusable_data_is_a_one_line_error_naming_it():
    ckpt = Checkpoint(build_mlp(RunConfig()), RunConfig(), InputSpec())
    images = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(DataError, match=r"^unlabelled.csv: has no labels.*mnistlab predict"):
        evaluate(ckpt, Dataset(images, None, origin="unlabelled.csv"))
    small = Dataset(np.zeros((4, 14, 14), np.uint8), np.zeros(4, np.int64), origin="small.npz")
    with pytest.raises(DataError, match=r"^small.npz: images are 14x14 but the model expects 28"):
        evaluate(ckpt, small)
    many = Dataset(images, np.array([0, 1, 12, 3]), classes=tuple("abcdefghijklm"), origin="x.idx")
    with pytest.raises(DataError, match=r"^x.idx: has label 12 but the model knows 10 classes"):
        evaluate(ckpt, many)


def test_format_evaluation_shows_every_table(checkpoint, data):
    ev = evaluate(load_checkpoint(checkpoint), data[1])
    text = format_evaluation(ev, data[1].classes)
    assert f"accuracy {ev.accuracy:.4f}" in text and "(2000 images)" in text
    for title in ("per class", "confusion matrix", "most confident errors"):
        assert title in text
    m = ev.worst[0]
    assert f"{m.confidence:.1%}" in text and str(m.index) in text
    assert "\x1b[" not in text  # plain text, no terminal escape codes


def test_evaluate_a_checkpoint(checkpoint, mnist_dir, tmp_path):
    scored = ml.evaluate(checkpoint, data=str(mnist_dir), plots=tmp_path)
    # MNIST's t10k alone has no test part: scored on its training part, and the note says so.
    assert "no labelled test part" in scored.note and "(10000 images)" in scored.data
    assert scored.evaluation.support.sum() == 10000
    assert sorted(p.name for p in scored.plots) == ["confusion_mlp-seed0.png",
                                                    "misclassified_mlp-seed0.png"]
    for path in scored.plots:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 300


def test_evaluate_cli(checkpoint, mnist_dir, tmp_path):
    from mnistlab.cli import app

    runner = CliRunner()
    ok = runner.invoke(app, ["evaluate", str(checkpoint), "--data", str(mnist_dir),
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
