"""A model's answers on a labelled set, and the metrics read from them.

`Predictions` are what the run directory keeps of each model's test pass: for every test image
the predicted class, its probability and the true class's probability, plus the images of the
model's most confident errors. Accuracy, loss, the confusion matrix, per-class scores and the
worst errors (`Evaluation`) are computed from them alone, so reports and statistics need neither
the data set nor the model. A checkpoint scored on other data goes through the same path.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NamedTuple

import numpy as np
from annotated_types import MinLen
from safetensors.numpy import save

from mnistlab.data import Dataset
from mnistlab.errors import CheckpointError, ConfigError, DataError
from mnistlab.validation import Text, validate

if TYPE_CHECKING:  # PyTorch is imported where a model runs or a file is read: a worker that
    import torch  # only draws Evaluations (mnistlab.report.workers) starts without it

    from mnistlab.model import Checkpoint

PREDICTIONS_FORMAT = "mnistlab-predictions/1"
WORST = 25  # confident errors kept per model, with their images, for the misclassified grid


class Mistake(NamedTuple):
    """One misclassified image: its index in the evaluated set, what the model said, the image."""

    index: int
    true: int
    predicted: int
    confidence: float
    image: np.ndarray


@dataclass(frozen=True)
class Predictions:
    """One model's answer for each image of a labelled set (arrays of equal length)."""

    labels: np.ndarray  # int64: the true class
    predicted: np.ndarray  # int64: the class with the highest logit
    probability: np.ndarray  # float32: softmax probability of the predicted class
    true_probability: np.ndarray  # float32: softmax probability of the true class
    classes: tuple[str, ...]
    worst_index: np.ndarray  # int64: the most confident errors, most confident first
    worst_images: np.ndarray  # uint8 (K, H, W): their images

    @classmethod
    def of(cls, predicted: np.ndarray, probability: np.ndarray, true_probability: np.ndarray,
           dataset: Dataset, worst: int = WORST) -> Predictions:
        """From a model's outputs on `dataset`, keeping the images of its `worst` errors."""
        labels = np.asarray(dataset.labels, dtype=np.int64)
        predicted = np.asarray(predicted, dtype=np.int64)
        probability = np.asarray(probability, dtype=np.float32)
        wrong = np.flatnonzero(predicted != labels)
        order = wrong[np.argsort(-probability[wrong], kind="stable")][:worst]
        return cls(labels, predicted, probability, np.asarray(true_probability, np.float32),
                   tuple(dataset.classes), order, dataset.images[order])

    def to_bytes(self) -> bytes:
        tensors = {
            "labels": self.labels.astype(np.int16), "predicted": self.predicted.astype(np.int16),
            "probability": self.probability, "true_probability": self.true_probability,
            "worst_index": self.worst_index, "worst_images": self.worst_images,
        }
        meta = {"format": PREDICTIONS_FORMAT, "classes": json.dumps(list(self.classes))}
        return save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=meta)

    @classmethod
    def load(cls, path: Path) -> Predictions:
        """Read a predictions file; a damaged or foreign one is a one-line CheckpointError."""
        fix = ("delete that model's stack file (checkpoints/stack-*.json naming it) and finish "
               "the run with --resume, which retrains that stack")
        from mnistlab.model import json_field, read_safetensors

        tensors, meta = read_safetensors(path, PREDICTIONS_FORMAT, "predictions file", fix)
        try:
            classes = validate(_CLASSES, json_field(meta, "classes"), "classes")
            a = _arrays(tensors, len(classes))
        except (ValueError, ConfigError) as exc:
            raise CheckpointError(f"{path}: damaged predictions file ({exc}); {fix}") from None
        return cls(a["labels"].astype(np.int64), a["predicted"].astype(np.int64),
                   a["probability"], a["true_probability"], classes, a["worst_index"],
                   a["worst_images"])


# What Predictions.to_bytes writes: each array's dtype (a torch dtype's name) and number of
# dimensions.
_LAYOUT = {"labels": ("int16", 1), "predicted": ("int16", 1), "probability": ("float32", 1),
           "true_probability": ("float32", 1), "worst_index": ("int64", 1),
           "worst_images": ("uint8", 3)}
_CLASSES = Annotated[tuple[Text, ...], MinLen(1), "must be a list of class names"]


def _arrays(tensors: Mapping[str, torch.Tensor], n_classes: int) -> dict[str, np.ndarray]:
    """A predictions file's arrays, checked to be what Predictions.to_bytes writes (ValueError
    naming the first that is not): every later computation can then trust them."""
    import torch

    if set(tensors) != set(_LAYOUT):
        raise ValueError(f"holds {sorted(tensors)}, not {sorted(_LAYOUT)}")
    for key, (name, ndim) in _LAYOUT.items():
        dtype = getattr(torch, name)
        if tensors[key].dtype != dtype or tensors[key].ndim != ndim:
            raise ValueError(f"{key} is {tensors[key].dtype} {tuple(tensors[key].shape)}, not "
                             f"{ndim}-dimensional {dtype}")
    a = {k: v.numpy() for k, v in tensors.items()}
    n = len(a["labels"])
    if any(len(a[k]) != n for k in ("predicted", "probability", "true_probability")):
        raise ValueError("labels, predicted and probabilities differ in length")
    for key, high in (("labels", n_classes), ("predicted", n_classes), ("worst_index", n)):
        if len(a[key]) and not 0 <= a[key].min() <= a[key].max() < high:
            raise ValueError(f"{key} outside 0..{high - 1}")
    if len(a["worst_index"]) != len(a["worst_images"]):
        raise ValueError("worst_index and worst_images differ in length")
    return a


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

    @property
    def macro(self) -> dict[str, float]:
        """Precision, recall and F1 averaged over the classes that occur (as true or as
        predicted class), each counting once however rare it is: scikit-learn's "macro"."""
        seen = (self.support > 0) | (self.confusion.sum(axis=0) > 0)
        scores = {"precision": self.precision, "recall": self.recall, "f1": self.f1}
        return {k: float(v[seen].mean()) if seen.any() else math.nan for k, v in scores.items()}


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(len(num)), where=den > 0)


def evaluation(p: Predictions) -> Evaluation:
    """Accuracy, mean cross-entropy, confusion matrix and worst errors from stored answers."""
    n, k = len(p.labels), len(p.classes)
    confusion = np.bincount(p.labels * k + p.predicted, minlength=k * k).reshape(k, k)
    loss = float(-np.mean(np.log(p.true_probability.astype(np.float64)))) if n else math.nan
    worst = [Mistake(int(i), int(p.labels[i]), int(p.predicted[i]), float(p.probability[i]),
                     image) for i, image in zip(p.worst_index, p.worst_images, strict=True)]
    accuracy = float(np.trace(confusion) / n) if n else math.nan
    return Evaluation(accuracy, loss, confusion, worst)


def pool(by_seed: Mapping[int, Predictions], shown: int) -> Evaluation:
    """One configuration over its seeds: mean accuracy and loss, the confusion matrix summed
    (each seed scored every image once), and the worst errors of the `shown` seed."""
    per_seed = [evaluation(p) for p in by_seed.values()]
    return Evaluation(
        accuracy=float(np.mean([e.accuracy for e in per_seed])),
        loss=float(np.mean([e.loss for e in per_seed])),
        confusion=np.sum([e.confusion for e in per_seed], axis=0),
        worst=evaluation(by_seed[shown]).worst,
    )


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


def logits(ckpt: Checkpoint, images: np.ndarray, batch_size: int = 4096) -> torch.Tensor:
    """Model outputs (N, classes) for uint8 images, in eval mode, batch by batch to bound memory."""
    import torch

    ckpt.model.eval()
    with torch.inference_mode():
        parts = [ckpt.model(ckpt.inputs.prepare(images[i : i + batch_size]))
                 for i in range(0, len(images), batch_size)]
        return torch.cat(parts) if parts else torch.empty(0, len(ckpt.inputs.classes))


def predictions(ckpt: Checkpoint, dataset: Dataset, worst: int = WORST) -> Predictions:
    """The checkpoint's answers on a labelled `dataset`, its classes named as the model names
    them: data whose classes were inferred from their labels may lack the model's last ones."""
    import torch

    from mnistlab.model import finite_outputs

    _check(ckpt, dataset)
    dataset = replace(dataset, classes=tuple(ckpt.inputs.classes))
    probs = finite_outputs(ckpt, logits(ckpt, dataset.images).softmax(dim=1))
    probability, predicted = probs.max(dim=1)
    labels = torch.as_tensor(dataset.labels)
    true = probs.gather(1, labels.view(-1, 1)).flatten() if len(labels) else probability
    return Predictions.of(predicted.numpy(), probability.numpy(), true.numpy(), dataset, worst)


def score(ckpt: Checkpoint, dataset: Dataset, worst: int = WORST) -> Evaluation:
    """Score `ckpt` on a labelled `dataset`; `worst` caps the list of confident mistakes."""
    return evaluation(predictions(ckpt, dataset, worst))
