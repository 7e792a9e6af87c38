"""A trained model on a labelled set: accuracy, loss, confusion matrix, per-class scores, errors."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.nn import functional as F

from mnistlab.config import load_study
from mnistlab.data import Dataset, load, make_splits
from mnistlab.errors import DataError, MnistlabError
from mnistlab.model import Checkpoint, load_checkpoint
from mnistlab.runs import RunDir


class Mistake(NamedTuple):
    """One misclassified image: its index in the evaluated set and what the model said."""

    index: int
    true: int
    predicted: int
    confidence: float


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one model on one set. `confusion[i, j]` counts true class i predicted as j.

    `worst` lists wrong predictions, most confident first: the errors most worth looking at.
    """

    accuracy: float
    loss: float
    confusion: np.ndarray
    worst: list[Mistake]

    @property
    def support(self) -> np.ndarray:
        return self.confusion.sum(axis=1)

    @property
    def precision(self) -> np.ndarray:
        """Per class; 0 for a class never predicted (scikit-learn's zero_division=0)."""
        return _ratio(np.diag(self.confusion), self.confusion.sum(axis=0))

    @property
    def recall(self) -> np.ndarray:
        return _ratio(np.diag(self.confusion), self.support)

    @property
    def f1(self) -> np.ndarray:
        p, r = self.precision, self.recall
        return _ratio(2 * p * r, p + r)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def _check(ckpt: Checkpoint, dataset: Dataset) -> None:
    """Refuse data the model cannot score, naming the data and what to pass instead."""
    where = dataset.origin or "data"
    if dataset.labels is None:
        raise DataError(where, "has no labels to evaluate against",
                        "pass a labelled source (for unlabelled images use `mnistlab predict`)")
    if dataset.images.shape[1:] != tuple(ckpt.inputs.shape):
        h, w = dataset.images.shape[1:]
        raise DataError(where, f"images are {h}x{w} but the model expects "
                        f"{ckpt.inputs.shape[0]}x{ckpt.inputs.shape[1]}",
                        "pass data of the shape the model was trained on")
    n_classes = len(ckpt.inputs.classes)
    if len(dataset) and int(dataset.labels.max()) >= n_classes:
        raise DataError(where, f"has label {int(dataset.labels.max())} but the model knows "
                        f"{n_classes} classes", "pass data with the model's classes")


@torch.inference_mode()
def logits(ckpt: Checkpoint, images: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """Model outputs (N, classes) for uint8 images, in eval mode, batch by batch to bound memory."""
    ckpt.model.eval()
    parts = [ckpt.model(ckpt.inputs.prepare(images[i : i + batch_size]))
             for i in range(0, len(images), batch_size)]
    return torch.cat(parts) if parts else torch.empty(0, len(ckpt.inputs.classes))


def evaluate(ckpt: Checkpoint, dataset: Dataset, worst: int = 25) -> Evaluation:
    """Score `ckpt` on a labelled `dataset`; `worst` caps the list of confident mistakes."""
    _check(ckpt, dataset)
    out = logits(ckpt, dataset.images)
    labels = torch.as_tensor(dataset.labels)
    n_classes = len(ckpt.inputs.classes)
    loss = F.cross_entropy(out, labels).item() if len(labels) else math.nan
    confidence, predicted = out.softmax(dim=1).max(dim=1)
    confusion = np.bincount(
        (labels * n_classes + predicted).numpy(), minlength=n_classes * n_classes
    ).reshape(n_classes, n_classes)
    wrong = torch.nonzero(predicted != labels).flatten()
    order = wrong[torch.argsort(confidence[wrong], descending=True, stable=True)][:worst]
    mistakes = [
        Mistake(int(i), int(labels[i]), int(predicted[i]), float(confidence[i])) for i in order
    ]
    accuracy = float(np.trace(confusion) / len(labels)) if len(labels) else math.nan
    return Evaluation(accuracy, loss, confusion, mistakes)


def _table(title: str, left: tuple[str, ...], right: tuple[str, ...]) -> Any:
    """A Rich table: label columns left-aligned, number columns right-aligned."""
    from rich.table import Table

    table = Table(*left, title=title)
    for name in right:
        table.add_column(name, justify="right")
    return table


def format_evaluation(ev: Evaluation, classes: tuple[str, ...] | list[str], worst: int = 10) -> str:
    """Plain-text tables for the terminal: totals, per-class scores, confusion matrix, errors."""
    from rich.console import Console

    per_class = _table("per class", ("class",), ("precision", "recall", "F1", "support"))
    for name, p, r, f, s in zip(classes, ev.precision, ev.recall, ev.f1, ev.support, strict=True):
        per_class.add_row(name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    confusion = _table("confusion matrix (rows: true class)", ("true \\ pred",), tuple(classes))
    for name, row in zip(classes, ev.confusion, strict=True):
        confusion.add_row(name, *(str(c) for c in row))
    mistakes = _table("most confident errors", ("true", "predicted"), ("confidence", "index"))
    for m in ev.worst[:worst]:
        mistakes.add_row(classes[m.true], classes[m.predicted], f"{m.confidence:.1%}", str(m.index))
    buffer = io.StringIO()
    console = Console(file=buffer, width=120, color_system=None, highlight=False)
    console.print(f"accuracy {ev.accuracy:.4f}   loss {ev.loss:.4f}   "
                  f"({int(ev.support.sum())} images)", markup=False)
    for t in (per_class, confusion, mistakes):
        console.print(t)
    return buffer.getvalue()


def finished_summary(run: RunDir) -> dict:
    """summary.json, which exists once a study has finished; else a one-line error saying so."""
    if not run.summary_path.is_file():
        raise MnistlabError(f"{run.summary_path}: missing, so the study has not finished; "
                            f"finish it with `mnistlab study --resume {run.root}`")
    return run.read_summary()


def best_checkpoint(run: RunDir, summary: dict) -> Path:
    """The best configuration's checkpoint (summary's comparisons) from its best-testing seed."""
    best = summary.get("comparisons", {}).get("best")
    rows = [r for r in summary.get("runs", [])
            if r["run"] == best and math.isfinite(r.get("test_accuracy") or math.nan)]
    if not rows:
        raise MnistlabError(f"{run.summary_path}: names no best configuration with a finite test "
                            "accuracy; rerun the study or pass a CHECKPOINT")
    seed = max(rows, key=lambda r: r["test_accuracy"])["seed"]
    return run.model_path(best, seed)


def study_test_set(run: RunDir, data: str | None = None) -> tuple[Dataset, str]:
    """The test part the study used (its data, val fraction and split seed), and how it was made.

    `data` replaces the study's source, e.g. a local path for a study run elsewhere.
    """
    study = load_study(run.config_path)
    source = data or study.data
    splits = make_splits(load(source, progress=False), study.val_fraction, study.split_seed)
    return splits.test, splits.note


def evaluate_command(target: Path, data: str | None, out: Path | None) -> str:
    """`mnistlab evaluate RUN_DIR|CHECKPOINT`: score, write the two plots, return the text to print.

    RUN_DIR: the best configuration's best seed on the study's own test part. CHECKPOINT: needs
    `data`; scored on its test part, or on its training part when it has none (said in the text).
    Plots go to `out`, by default RUN_DIR/plots or the checkpoint's folder.
    """
    from mnistlab.report.plots import evaluation_plots

    target = Path(target)
    if target.is_dir():
        run = RunDir.existing(target)
        summary = finished_summary(run)
        path, name = best_checkpoint(run, summary), summary["comparisons"]["best"]
        dataset, note = study_test_set(run, data)
        folder = out or run.plots
    else:
        path = target
        dataset, note = _source_part(target, data)
        name, folder = path.stem, out or path.parent
    ckpt = load_checkpoint(path)
    ev = evaluate(ckpt, dataset)
    written = evaluation_plots(ev, dataset, ckpt.inputs.classes, Path(folder), name)
    lines = [f"checkpoint: {path}", f"data: {dataset.origin} ({len(dataset)} images)"]
    lines += [note] if note else []
    lines += [format_evaluation(ev, ckpt.inputs.classes).rstrip()]
    lines += [f"wrote {p}" for p in written]
    return "\n".join(lines) + "\n"


def _source_part(checkpoint: Path, data: str | None) -> tuple[Dataset, str]:
    """A source's test part, or its training part (with a note saying so) when it has none."""
    if data is None:
        raise MnistlabError(f"{checkpoint}: a checkpoint alone has no data to score; "
                            "pass --data mnist|fashion-mnist|PATH (or a RUN_DIR instead)")
    source = load(data, progress=False)
    if source.test is not None and source.test.labels is not None:
        return source.test, ""
    return source.train, (f"{data} has no labelled test part: scored on its training part, "
                          "which the model may have seen")
