"""What both engines share: members, the records they keep, evaluation, and what a run returns.

The members of a stack share `RunConfig.architecture`; everything else may differ per member.
Data live on the device once, as one float tensor each for train/validation/test; metrics
accumulate on the device and are read only at a record, a log line or the end, so a step never
waits for the device. A record's validation pass and the test pass at the end score every model
with `evaluate`, in eval mode, with a fixed summation order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Dataset
from mnistlab.engine import augment
from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.engine.schedules import check_length
from mnistlab.errors import MnistlabError
from mnistlab.model import Checkpoint, InputSpec, unstack_model

EVAL_CHUNK = 4096  # validation/test rows per float32 loss sum (fixes the summation order)


@dataclass(frozen=True)
class Member:
    """One model of the stack."""

    config: RunConfig
    seed: int


@dataclass
class RecordEvent:
    """Passed to `on_record` after every record."""

    step: int
    total_steps: int
    epoch: float
    rows: list[dict]


@dataclass
class TestPredictions:
    """Each model's answer for every test image: what the run directory keeps of the test pass."""

    predicted: Tensor  # (N, T) int16: the class with the highest logit
    probability: Tensor  # (N, T) float32: softmax probability of that class
    true_probability: Tensor  # (N, T) float32: softmax probability of the true class


@dataclass
class TrainResult:
    rows: list[dict]  # run, seed, step, epoch, split ("train"|"val"), loss, accuracy
    test: list[dict]  # per member: {"loss", "accuracy"} on splits.test, once at the end
    diverged: list[int | None]  # per member: the step whose loss was NaN/inf, else None
    stopped: list[int | None]  # per member: the record step it stopped early at, else None
    restored: list[int | None]  # per member: the record step whose weights it ends with
    # (restore_best), else None: its last weights
    seconds: float  # training wall time (all sessions of a resumed run; no data loading)
    device: str
    members: list[Member]
    inputs: InputSpec
    weights: dict[str, Tensor]  # the stacked weights, on the CPU
    predictions: TestPredictions  # every model's answer for every test image
    arithmetic: Arithmetic  # how the stack computed (backends.arithmetic)

    def checkpoint(self, k: int) -> Checkpoint:
        """Member k as a plain nn.Sequential, with its config, input spec, seed and the
        arithmetic that trained it."""
        config = self.members[k].config
        dim = self.inputs.shape[0] * self.inputs.shape[1]
        model = unstack_model(self.weights, k, config, dim, len(self.inputs.classes))
        return Checkpoint(model, config, self.inputs, self.members[k].seed,
                          self.arithmetic.as_dict())


def check_members(members: Sequence[Member]) -> None:
    if not members:
        raise MnistlabError("engine.train needs at least one member")
    first = members[0].config
    for m in members:
        if m.config.architecture != first.architecture:
            raise MnistlabError(
                f"runs '{first.name}' and '{m.config.name}' differ in architecture (hidden, "
                "activation, dropout_after, input_norm; LayerNorm may differ); train them in "
                "separate stacks"
            )
    keys = [(m.config.name, m.seed) for m in members]
    if len(set(keys)) != len(keys):
        raise MnistlabError("each (run name, seed) may appear once in a stack; rename duplicates")


def steps_per_epoch(n_train: int, schedule: Schedule) -> int:
    """Steps (batches) in an epoch of `n_train` images: the last, partial batch counts unless
    the schedule drops it."""
    batch = schedule.batch_size
    return n_train // batch if schedule.drop_last else math.ceil(n_train / batch)


def check_bounds(config: RunConfig, schedule: Schedule, train: Dataset) -> None:
    """Refuse, before anything is allocated, the settings that only the data can bound: the
    shift of `config`'s augmentation within the images, its learning-rate table's length in
    steps."""
    augment.check_fits(config, train.images.shape[1:])
    check_length(config, steps_per_epoch(len(train), schedule) * schedule.epochs)


def input_spec(train: Dataset, input_norm: str) -> InputSpec:
    """Shape, classes and normalisation; "standardize" uses the training split's pixel mean/std."""
    mean, std = 0.0, 1.0
    if input_norm == "standardize":
        counts = np.bincount(train.images.ravel(), minlength=256).astype(np.float64)
        values = np.arange(256) / 255.0
        mean = float(counts @ values / counts.sum())
        std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())) or 1.0
    return InputSpec(tuple(train.images.shape[1:]), tuple(train.classes), mean, std)


class ScorableStack(Protocol):
    """What `evaluate` asks of a stack (either engine's)."""

    n: int
    backend: Any  # its `eval_dtype` and `eval_block` (rows per forward pass; None: EVAL_CHUNK)

    def forward(self, x: Tensor, train: bool = False) -> tuple[Tensor, Any]: ...


def evaluate(
    stack: ScorableStack, x: Tensor, y: Tensor, predictions: list[Tensor] | None = None
) -> tuple[list[float], list[float]]:
    """Mean loss and accuracy per model over all of (x, y), in eval mode.

    With `predictions` (an empty list), each block's (predicted class, its probability, the
    true class's probability), each (N, rows), is appended to it.
    """
    wide = stack.backend.eval_dtype
    loss = torch.zeros(stack.n, dtype=wide, device=x.device)
    correct = torch.zeros(stack.n, dtype=torch.int64, device=x.device)
    block = stack.backend.eval_block or EVAL_CHUNK  # rows per forward pass
    for a in range(0, len(x), EVAL_CHUNK):
        picked = []  # log p(label) per model and row, for one chunk's loss sum
        stop = min(a + EVAL_CHUNK, len(x))
        for b in range(a, stop, block):
            xb, yb = x[b : min(b + block, stop)], y[b : min(b + block, stop)]
            logits, _ = stack.forward(xb.expand(stack.n, -1, -1))
            logp = torch.log_softmax(logits, -1)
            picked.append(logp.gather(-1, yb.expand(stack.n, -1).unsqueeze(-1)))
            predicted = logits.argmax(-1)
            correct += (predicted == yb).sum(1)
            if predictions is not None:
                top = logp.gather(-1, predicted.unsqueeze(-1)).squeeze(-1).exp()
                predictions.append(torch.stack(
                    [predicted.to(torch.float32), top, picked[-1].squeeze(-1).exp()]).cpu())
        loss -= torch.cat(picked, 1).sum((1, 2))
    n = len(x) or math.nan
    return (loss / n).tolist(), (correct.to(wide) / n).tolist()


def joined_predictions(blocks: list[Tensor]) -> TestPredictions:
    """The test pass's prediction blocks (`evaluate`'s) as one TestPredictions."""
    joined = torch.cat(blocks, 2) if blocks else torch.empty(3, 0, 0)
    return TestPredictions(joined[0].to(torch.int16), joined[1].contiguous(),
                           joined[2].contiguous())


class RecordBooks:
    """The schedule's books that both engines keep alike (mlp.MLPTraining and
    general.ModuleTraining): records, log lines and divergence marks, from the training state a
    subclass holds (`stack`, `val`, `members`, `schedule`, `step`, `since`, `steps_per_epoch`,
    `rows`, the device tensors `loss_sum`, `acc_sum`, `last_loss`, `diverged_at`) and its
    `watch`."""

    def record(self) -> list[dict]:
        val_loss, val_acc = evaluate(self.stack, *self.val)
        train_loss = (self.loss_sum / self.since).tolist()
        train_acc = (self.acc_sum / self.since).tolist()
        dead = [d > 0 for d in self.diverged_at.tolist()]
        epoch = round(self.step / self.steps_per_epoch, 6)
        rows = [
            {"run": m.config.name, "seed": m.seed, "step": self.step, "epoch": epoch,
             "split": split, "loss": math.nan if dead[k] else loss[k],
             "accuracy": math.nan if dead[k] else acc[k]}
            for k, m in enumerate(self.members)
            for split, loss, acc in (("train", train_loss, train_acc), ("val", val_loss, val_acc))
        ]
        self.loss_sum.zero_()
        self.acc_sum.zero_()
        self.since = 0
        self.rows += rows
        self.watch([math.nan if dead[k] else a for k, a in enumerate(val_acc)])
        return rows

    def log_lines(self) -> list[str]:
        epoch, i = divmod(self.step - 1, self.steps_per_epoch)
        if (i + 1) % self.schedule.log_every:
            return []
        where = f"epoch {epoch + 1}/{self.schedule.epochs} | step {i + 1}/{self.steps_per_epoch}"
        return [
            f"{m.config.name} seed{m.seed} | {where} | loss {loss:.4f}"
            for m, loss in zip(self.members, self.last_loss.tolist(), strict=True)
        ]

    def diverged(self) -> list[int | None]:
        return [d or None for d in self.diverged_at.tolist()]
