"""The training engine: one call trains a stack of N models on one split, resumably.

The members share `RunConfig.architecture` (hidden sizes, activation, dropout placement, input
normalisation); everything else, LayerNorm on/off included, may differ per member.

Data live on the device once, as one float tensor each for train/validation/test; a batch is an
index slice of the epoch's permutation (one permutation per seed, so models of one seed see the
same batches). Metrics accumulate on the device and are read only at a record, a log line or the
end, so a step never waits for the device.

The schedule (mnistlab.config.Schedule):
- A step is one minibatch; steps are numbered 1.. globally. The last partial batch of an epoch is
  used unless `drop_last`.
- A record at every `record_every`-th step and also after the last step, so the final weights are
  always recorded. A record holds per model a "train" row (mean over the steps since the previous
  record of the per-step mean loss/accuracy, train mode) and a "val" row (the whole validation set,
  eval mode).
- A log line per model when the step within the epoch is a multiple of `log_every`, with that
  step's batch loss: `baseline seed0 | epoch 1/10 | step 250/375 | loss 0.2345`.
- Divergence: a model whose batch loss is NaN/inf at step s is `diverged` at s and frozen from
  then on (that step's update is skipped; weights and Adam moments never change again); its rows
  from that record on and its test metrics carry NaN. The other models are unaffected.
- Early stopping and best weights (mnistlab.stopping): after each record, a model with
  `patience` may stop, frozen from then on like a diverged one (its rows go on, recording the
  stopped model); a model with `restore_best` ends with its weights of its best validation
  record, which the test pass and the checkpoint then use.
- Augmentation (mnistlab.augment): a model that augments sees its seed's batch transformed by
  its stream (seed and settings), shared with the models of its seed that augment alike.
- Resume state: at every epoch end and on Ctrl-C (taken between steps), everything needed to
  continue bit for bit goes to `state_path` atomically: safetensors for tensors (weights, Adam
  moments, generator states, permutations, best weights), JSON in its metadata for the rest.
  No pickle. Learning-rate schedules and augmentation draws are functions of the step count,
  so they need nothing saved.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge
from pydantic import ConfigDict, with_config
from safetensors.torch import save
from torch import Tensor
from typing_extensions import TypedDict

from mnistlab import augment
from mnistlab.arithmetic import Arithmetic, differences, honour, requested, variables
from mnistlab.atomic import atomic_write_bytes
from mnistlab.config import MetricRow, RunConfig, Schedule, to_dict
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.errors import CheckpointError, ConfigError, MnistlabError
from mnistlab.model import Checkpoint, InputSpec, json_field, read_safetensors, unstack_model
from mnistlab.stack import Stack, derived_seed
from mnistlab.stopping import Monitor
from mnistlab.validation import NonNegative, Real, validate

STATE_FORMAT = "mnistlab-train-state/1"
EVAL_CHUNK = 4096  # validation/test rows per float32 loss sum (fixes the summation order)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the resume state was saved at `state_path`."""

    def __init__(self, state_path: Path):
        super().__init__(str(state_path))
        self.state_path = state_path


@with_config(ConfigDict(extra="forbid"))
class Progress(TypedDict):
    """A resume state's progress: steps done, steps since the last record, training seconds so
    far, and the records written so far."""

    step: NonNegative
    since: NonNegative
    seconds: Annotated[Real, Ge(0)]
    rows: list[MetricRow]


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


class StepEvent:
    """Passed to `on_step` every STEP_EVERY seconds at most (and after a session's first step):
    where training is. `loss()` is the mean training loss of each model since the last record;
    it reads the device, so it costs a host sync, paid only by a caller that asks."""

    def __init__(self, step: int, total_steps: int, steps_per_epoch: int,
                 loss_sum: Tensor, since: int):
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch
        self._loss_sum, self._since = loss_sum, since

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def loss(self) -> list[float]:
        if not self._since:
            return [math.nan] * len(self._loss_sum)
        return (self._loss_sum / self._since).tolist()


STEP_EVERY = 0.2  # seconds between on_step calls: a live bar's refresh, not a per-step cost


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
    arithmetic: Arithmetic  # how the stack computed (mnistlab.arithmetic)

    def checkpoint(self, k: int) -> Checkpoint:
        """Member k as a plain nn.Sequential, with its config, input spec, seed and the
        arithmetic that trained it."""
        config = self.members[k].config
        dim = self.inputs.shape[0] * self.inputs.shape[1]
        model = unstack_model(self.weights, k, config, dim, len(self.inputs.classes))
        return Checkpoint(model, config, self.inputs, self.members[k].seed,
                          self.arithmetic.as_dict())


def resolve_device(name: str) -> torch.device:
    """auto → CUDA, then MPS, then CPU; a named device must exist here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next((d for d, ok in available.items() if ok), "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MnistlabError(f"unknown device '{name}'; use auto, cpu, cuda or mps") from None
    if device.type not in ("cpu", *available):
        raise MnistlabError(f"unsupported device '{name}'; use auto, cpu, cuda or mps")
    if device.type != "cpu" and not available[device.type]:
        raise MnistlabError(f"device '{name}' is not available on this machine; use auto or cpu")
    return device


def _set_matmul(arithmetic: Arithmetic) -> None:
    """cuBLAS's float32 products as `arithmetic` says: "tf32" rounds their inputs to TF32's
    10-bit mantissa on tensor cores (faster, other numbers). The switch is process-wide, so it
    is set for every CUDA run: the run's arithmetic decides, not whatever ran before."""
    if arithmetic.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = arithmetic.matmul == "tf32"


def input_spec(train: Dataset, input_norm: str) -> InputSpec:
    """Shape, classes and normalisation; "standardize" uses the training split's pixel mean/std."""
    mean, std = 0.0, 1.0
    if input_norm == "standardize":
        counts = np.bincount(train.images.ravel(), minlength=256).astype(np.float64)
        values = np.arange(256) / 255.0
        mean = float(counts @ values / counts.sum())
        std = float(np.sqrt(counts @ (values - mean) ** 2 / counts.sum())) or 1.0
    return InputSpec(tuple(train.images.shape[1:]), tuple(train.classes), mean, std)


@dataclass
class TestPredictions:
    """Each model's answer for every test image: what the run directory keeps of the test pass."""

    predicted: Tensor  # (N, T) int16: the class with the highest logit
    probability: Tensor  # (N, T) float32: softmax probability of that class
    true_probability: Tensor  # (N, T) float32: softmax probability of the true class


def evaluate(
    stack: Stack, x: Tensor, y: Tensor, predictions: list[Tensor] | None = None
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


def _test_predictions(blocks: list[Tensor]) -> TestPredictions:
    joined = torch.cat(blocks, 2) if blocks else torch.empty(3, 0, 0)
    return TestPredictions(joined[0].to(torch.int16), joined[1].contiguous(),
                           joined[2].contiguous())


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C sets a flag the loop checks between steps, so a saved state is never half a step."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


class RecordBooks:
    """The schedule's books that both engines keep alike (this one and mnistlab.general's):
    records, log lines and divergence marks, from the training state a subclass holds
    (`stack`, `val`, `members`, `schedule`, `step`, `since`, `steps_per_epoch`, `rows`, the
    device tensors `loss_sum`, `acc_sum`, `last_loss`, `diverged_at`) and its `watch`."""

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


class _Training(RecordBooks):
    """One train() call's mutable state: exactly what a resume state file holds."""

    def __init__(self, splits: Splits, members: list[Member], schedule: Schedule,
                 device: torch.device, spec: InputSpec, arithmetic: Arithmetic):
        self.members, self.schedule, self.device = members, schedule, device
        self.x, self.y = self._on_device(splits.train, spec)
        self.val = self._on_device(splits.val, spec)
        n, batch = len(self.x), schedule.batch_size
        self.steps_per_epoch = n // batch if schedule.drop_last else math.ceil(n / batch)
        if self.steps_per_epoch == 0 or len(self.val[0]) == 0:
            raise MnistlabError(
                f"{splits.train.origin}: {n} training / {len(self.val[0])} validation images are "
                f"too few for batch size {batch}; use more data or a smaller batch"
            )
        self.total = self.steps_per_epoch * schedule.epochs
        self.seeds = list(dict.fromkeys(m.seed for m in members))
        self.group = torch.tensor([self.seeds.index(m.seed) for m in members], device=device)
        self.order_rngs = [
            torch.Generator().manual_seed(derived_seed("order", s)) for s in self.seeds
        ]
        self._sources(spec)
        configs, seeds = [m.config for m in members], [m.seed for m in members]
        self.stack = Stack.initial(configs, seeds, self.x.shape[1], len(spec.classes), device,
                                   self.total, arithmetic)
        self.monitor = Monitor(configs)
        restoring = any(c.restore_best for c in configs)
        self.best = torch.zeros_like(self.stack.flat["param"]) if restoring else None
        zeros = torch.zeros(len(members), device=device)
        self.frozen, self.loss_sum, self.acc_sum = zeros, zeros.clone(), zeros.clone()
        self.diverged_at = torch.zeros(len(members), dtype=torch.int64, device=device)
        self.perms: Tensor | None = None
        self.last_loss = zeros.clone()
        # The step's running sums and divergence marks, updated in place by the backend's loss.
        self.books = {"loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
                      "last_loss": self.last_loss, "frozen": self.frozen,
                      "diverged_at": self.diverged_at}
        self.run_step = self.stack.backend.step_runner(self._step)  # a CUDA graph's replay, say
        self.step, self.since, self.seconds = 0, 0, 0.0
        self.rows: list[dict] = []
        self.fingerprint = json.loads(json.dumps({
            "members": [[to_dict(m.config), m.seed] for m in members],
            "schedule": to_dict(schedule),
            "data": _digest(splits.train.images, splits.train.labels, splits.val.images,
                            splits.val.labels),
            "test": _digest(splits.test.images, splits.test.labels),  # scored once, at the end
            "device": device.type,
            "arithmetic": arithmetic.as_dict(),
        }))

    def _on_device(self, part: Dataset, spec: InputSpec) -> tuple[Tensor, Tensor]:
        labels = torch.as_tensor(part.labels)
        return spec.prepare(part.images).to(self.device), labels.to(self.device)

    def _sources(self, spec: InputSpec) -> None:
        """Where each model's inputs come from: rows of the step's batch, one per source.

        Without augmentation a source is a seed's batch: one row that every model shares (one
        seed), or each model its seed's row. With it, a source is a seed alone (the models that
        do not augment) or a seed with its augmentation settings, the augmented ones last.
        """
        streams = [(m.seed, augment.settings(m.config)) for m in self.members]
        self.augmenter: augment.Augmenter | None = None
        self.maps: Tensor | None = None  # the epoch's augmentation transforms
        if not any(values for _, values in streams):
            single = len(self.seeds) == 1
            self.source_seed, self.source_of, self.plain = None if single else self.group, None, 0
            return
        sources = sorted(dict.fromkeys(streams), key=lambda source: source[1] is not None)
        self.plain = sum(values is None for _, values in sources)
        self.source_seed = torch.tensor([self.seeds.index(seed) for seed, _ in sources],
                                        device=self.device)
        of = [sources.index(stream) for stream in streams]
        identity = of == list(range(len(sources)))
        self.source_of = None if identity else torch.tensor(of, device=self.device)
        black = spec.prepare(np.zeros((1, *spec.shape), np.uint8))[0, 0].item()
        self.augmenter = augment.Augmenter(sources[self.plain :], spec.shape, black,
                                           self.steps_per_epoch, self.schedule.batch_size,
                                           self.device)

    def step_inputs(self) -> tuple[Tensor, ...]:
        """The current step's row indices (seeds, B), one permutation per seed and epoch, and
        with augmentation the step's transforms."""
        i = self.step % self.steps_per_epoch
        if i == 0:
            perms = [torch.randperm(len(self.x), generator=g) for g in self.order_rngs]
            self.perms = torch.stack(perms).to(self.device)
            self._draw_transforms()
        index = self.perms[:, i * self.schedule.batch_size : (i + 1) * self.schedule.batch_size]
        return (index,) if self.maps is None else (index, self.maps[:, i])

    def _draw_transforms(self) -> None:
        """The current epoch's augmentation transforms (a function of the epoch alone)."""
        if self.augmenter is not None:
            self.maps = self.augmenter.epoch(self.step // self.steps_per_epoch)

    def gather(self, index: Tensor, maps: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Inputs (N, B, D) and labels (N, B) for `index`: each model its source's batch
        (see `_sources`), augmented by `maps` where the source augments."""
        rows = index if self.source_seed is None else index[self.source_seed]
        x = self.x.index_select(0, rows.flatten()).view(*rows.shape, -1)  # faster than x[rows]
        y = self.y[rows]
        if maps is not None:
            x[self.plain :] = self.augmenter.apply(x[self.plain :], maps)
        if len(rows) == 1:
            return x.expand(len(self.members), -1, -1), y.expand(len(self.members), -1)
        if self.source_of is None:
            return x, y
        return x[self.source_of], y[self.source_of]

    def train_step(self) -> None:
        inputs = self.step_inputs()
        self.step += 1
        self.since += 1
        self.run_step(*inputs)

    def _step(self, index: Tensor, maps: Tensor | None = None) -> None:
        """A step's device work: no host reads and state changed only in place (graphable)."""
        x, y = self.gather(index, maps)
        logits, hidden = self.stack.forward(x, train=True)
        dlogits = self.stack.backend.loss(logits, y, self.books)
        self.stack.backward(dlogits, hidden)
        self.stack.adam(self.frozen)

    def watch(self, accuracy: list[float]) -> None:
        """Best weights and early stopping after this record's validation `accuracy`."""
        keep, stop = self.monitor.update(self.step, accuracy, self.step == self.total)
        for k in keep:
            self.best[k].copy_(self.stack.flat["param"][k])
        for k in stop:
            self.frozen[k] = 1.0

    def restore_best(self) -> None:
        """The weights of each restoring model's best record, in place of its last ones."""
        for k, step in enumerate(self.monitor.restored()):
            if step is not None:
                self.stack.flat["param"][k].copy_(self.best[k])

    # --- resume state -------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The state as CPU copies and metadata: training may go on while they are written."""
        books = {**self._books(), **({"perms": self.perms} if self.perms is not None else {})}
        progress = {"step": self.step, "since": self.since, "seconds": self.seconds,
                    "rows": self.rows}
        meta = {"format": STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint),
                "progress": json.dumps(progress)}
        books = {k: v.detach().to("cpu", copy=True) for k, v in books.items()}
        return {**self.stack.state(host_copy=True), **books}, meta

    def _books(self) -> dict[str, Tensor]:
        """The state's tensors besides the stack's and the epoch's batch order."""
        return {
            **{f"order_rng.{j}": g.get_state() for j, g in enumerate(self.order_rngs)},
            "frozen": self.frozen, "diverged_at": self.diverged_at,
            "loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
            **({"best_param": self.best} if self.best is not None else {}),
        }

    def load(self, path: Path) -> None:
        """Continue from the resume state at `path`. Anything in it that is not what this run
        would have written (types, step counts, records, batch order) is a one-line
        CheckpointError; a state of another run is refused naming what differs."""
        fix = "pass the state file of this run, or start a new run without resuming"
        tensors, meta = read_safetensors(path, STATE_FORMAT, "resume state", fix, "resume state")
        try:
            saved = json_field(meta, "fingerprint")
            progress = validate(Progress, json_field(meta, "progress"), "progress")
            if not isinstance(saved, dict):
                raise ValueError("the fingerprint is no table")
        except (ConfigError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state metadata ({exc}); {fix}") from None
        self._check_arithmetic(path, saved.get("arithmetic"))
        if "test" not in saved:
            raise MnistlabError(f"{path}: this resume state does not record its test data (an "
                                "older mnistlab wrote it); finish it with that version, or "
                                "start a new run")
        for what, mine in self.fingerprint.items():
            if saved.get(what) != mine:
                what = "test data" if what == "test" else what
                raise MnistlabError(
                    f"{path}: this resume state was written for other {what} than this run's; "
                    "resume with the same configurations, seeds, schedule, data and device, "
                    "or start a new run"
                )
        try:
            self._check_progress(progress)
            self._restore(tensors, progress)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state ({exc}); {fix}") from None

    def _check_arithmetic(self, path: Path, saved: object) -> None:
        """A state trained with other switches would resume into numbers that match neither
        way's uninterrupted run: refused, naming the switch and its variable."""
        mine = self.stack.arithmetic
        if saved is None:
            raise MnistlabError(f"{path}: this resume state does not record its arithmetic (an "
                                "older mnistlab wrote it); finish it with that version, or "
                                "start a new run")
        theirs = Arithmetic.from_dict(saved, str(path))
        changed = differences(theirs, mine)
        if changed:
            raise MnistlabError(
                f"{path}: this resume state was trained with other arithmetic ("
                f"{'; '.join(changed)}); resume with the run's own (set "
                f"{', '.join(variables(theirs))}, or resume through `mnistlab ... --resume`, "
                "which does so), or start a new run")

    def _check_progress(self, progress: Progress) -> None:
        """The progress this run could have reached: 0 <= step <= total, `since` the steps after
        the last record, and records only of this stack's models up to `step`."""
        step, since = progress["step"], progress["since"]
        expected_since = 0 if step == self.total else step % self.schedule.record_every
        if step > self.total or since != expected_since:
            raise ValueError(f"step {step} of {self.total} with {since} since the last record")
        members = {(m.config.name, m.seed) for m in self.members}
        for row in progress["rows"]:
            if (row["run"], row["seed"]) not in members or row["step"] > step:
                raise ValueError(f"a record of {row['run']} seed {row['seed']} at step "
                                 f"{row['step']} that this run cannot have written")

    def _check_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        """Exactly the tensors this run saves, each of its dtype and shape (perms: see
        _permutations), and divergence marks that agree with the records: frozen from the step
        it diverged or the record it stopped at (`_replay` has read the records)."""
        expected = {**self.stack.state(), **self._books()}
        unknown = sorted(set(tensors) - set(expected) - {"perms"})
        if unknown:
            raise ValueError(f"unknown tensors {', '.join(unknown[:3])}")
        for name, mine in expected.items():
            found = tensors.get(name)
            if found is None or found.dtype != mine.dtype or found.shape != mine.shape:
                raise ValueError(f"{name} is missing or not {mine.dtype} {tuple(mine.shape)}")
        frozen, dead = tensors["frozen"], tensors["diverged_at"]
        stopped = torch.tensor([s is not None for s in self.monitor.stopped])
        if not (torch.equal(frozen, ((dead > 0) | stopped).to(frozen.dtype)) and dead.min() >= 0
                and dead.max() <= step):
            raise ValueError("frozen disagrees with diverged_at and the records")

    def _replay(self, rows: list[MetricRow]) -> None:
        """The monitor's state after `rows`: each record's validation accuracies, in order (a
        record missing a model's row is a damaged state: KeyError)."""
        val = {(r["step"], r["run"], r["seed"]): r["accuracy"] for r in rows
               if r["split"] == "val"}
        for step in sorted({step for step, _, _ in val}):
            accuracy = [val[step, m.config.name, m.seed] for m in self.members]
            self.monitor.update(step, accuracy, step == self.total)

    def _restore(self, tensors: dict[str, Tensor], progress: Progress) -> None:
        self._replay(progress["rows"])
        self._check_tensors(tensors, progress["step"])
        self.step, self.since = progress["step"], progress["since"]
        self.seconds, self.rows = progress["seconds"], [dict(r) for r in progress["rows"]]
        self.stack.load_state(tensors, self.step)
        for j, g in enumerate(self.order_rngs):
            g.set_state(tensors[f"order_rng.{j}"])
        for name, tensor in self._books().items():
            if not name.startswith("order_rng."):
                tensor.copy_(tensors[name])
        if "perms" in tensors or self.step % self.steps_per_epoch:
            self.perms = self._permutations(tensors.get("perms")).to(self.device)
        if self.step % self.steps_per_epoch:
            self._draw_transforms()

    def _permutations(self, perms: Tensor | None) -> Tensor:
        """The saved epoch's batch order: one permutation of the training rows per seed (which
        a state taken mid-epoch must hold)."""
        rows = torch.arange(len(self.x)).expand(len(self.seeds), -1)
        if perms is None:
            raise ValueError(f"no perms at step {self.step}, in the middle of an epoch")
        if (perms.dtype != torch.int64 or perms.shape != rows.shape
                or not torch.equal(perms.sort(dim=1).values, rows)):
            raise ValueError(f"perms {tuple(perms.shape)} are not {len(self.seeds)} "
                             f"permutations of {len(self.x)} rows")
        return perms


def write_state(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Write a resume state atomically. Serialised in memory and written by atomic_path (not by
    safetensors' own file writer), so a full disk is the one-line disk-full error and the file
    gets the usual permissions."""
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


class _StateWriter:
    """Writes epoch-end resume states on a background thread, one at a time and in order.

    Why: writing and syncing a state file takes tens of milliseconds, as long as dozens of GPU
    steps. The copy to host memory is taken before training goes on; a failed write (a full
    disk) is raised at the next save or at the end. Each file is still written atomically.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        self.wait()

        def write() -> None:
            try:
                write_state(path, tensors, meta)
            except BaseException as exc:  # handed to the training thread by wait()
                self.error = exc

        self.thread = threading.Thread(target=write, name="mnistlab-state", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def _check_members(members: Sequence[Member]) -> None:
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


def _keep_freed_memory() -> None:
    """Let glibc keep freed buffers for reuse instead of handing them back to the OS.

    By default a step's multi-megabyte temporaries are unmapped when freed and page-faulted in
    again on the next step: about a fifth of a CPU step here (measured). Elsewhere (macOS, no
    glibc) there is nothing to tune.
    """
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library handle to look into (Windows)
        return
    if mallopt is not None:
        mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: only huge blocks get their own mapping
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(
    splits: Splits,
    members: Sequence[Member],
    schedule: Schedule,
    *,
    device: str = "auto",
    state_path: Path | None = None,
    resume: bool = False,
    on_record: Callable[[RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    arithmetic: Arithmetic | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TrainResult:
    """Train every member on `splits` (see the module docstring for the schedule and faults).

    With `resume` and an existing `state_path`, continue from it; the result equals an
    uninterrupted run's exactly. A missing state file starts from scratch. `arithmetic`
    (mnistlab.arithmetic) is how the stack computes; by default what the environment asks for
    on the device, and an explicit one must be possible here. `on_step` hears where training
    is, a few times a second (StepEvent), for a live progress bar.
    """
    members = list(members)
    _check_members(members)
    dev = resolve_device(device)
    arithmetic = honour(arithmetic, dev, "engine.train") if arithmetic else requested(dev)
    _set_matmul(arithmetic)
    if dev.type == "cpu":
        _keep_freed_memory()
    spec = input_spec(splits.train, members[0].config.input_norm)
    run = _Training(splits, members, schedule, dev, spec, arithmetic)
    if resume and state_path is not None and Path(state_path).is_file():
        run.load(Path(state_path))
    test_loss, test_acc, blocks = run_schedule(
        run, dev, lambda: run._on_device(splits.test, spec), state_path=state_path,
        on_record=on_record, on_log=on_log, on_step=on_step)
    diverged = run.diverged()
    test = [
        {"loss": math.nan, "accuracy": math.nan} if d else {"loss": lo, "accuracy": acc}
        for d, lo, acc in zip(diverged, test_loss, test_acc, strict=True)
    ]
    weights = {k: v.cpu() for k, v in run.stack.params.items()}
    return TrainResult(run.rows, test, diverged, run.monitor.stopped, run.monitor.restored(),
                       run.seconds, str(dev), members, spec, weights, _test_predictions(blocks),
                       arithmetic)


def run_schedule(
    run: RecordBooks, dev: torch.device, test_part: Callable[[], tuple[Tensor, Tensor]], *,
    state_path: Path | None, on_record: Callable[[RecordEvent], None] | None,
    on_log: Callable[[str], None] | None, on_step: Callable[[StepEvent], None] | None = None,
) -> tuple[list[float], list[float], list[Tensor]]:
    """Both engines' loop over `run` (a training state: `_Training` here, mnistlab.general's
    for other networks): steps, records, log lines, epoch-end resume states, Ctrl-C (the state
    saved, then Interrupted), best weights, and the test pass once at the end on
    `test_part()`. Returns the test losses, accuracies and prediction blocks."""
    schedule = run.schedule
    start = time.perf_counter() - run.seconds
    writer = _StateWriter()
    next_report = 0.0  # on_step: the first step reports at once, then every STEP_EVERY seconds
    with torch.no_grad(), _deferred_interrupt() as interrupted:
        try:
            while run.step < run.total:
                run.train_step()
                if on_step and (now := time.monotonic()) >= next_report:
                    next_report = now + STEP_EVERY
                    on_step(StepEvent(run.step, run.total, run.steps_per_epoch, run.loss_sum,
                                      run.since))
                if run.step % schedule.record_every == 0 or run.step == run.total:
                    rows = run.record()
                    if on_record:
                        epoch = run.step / run.steps_per_epoch
                        on_record(RecordEvent(run.step, run.total, epoch, rows))
                for line in run.log_lines() if on_log else ():
                    on_log(line)
                if interrupted():
                    raise KeyboardInterrupt
                if state_path is not None and run.step % run.steps_per_epoch == 0:
                    _sync(dev)
                    run.seconds = time.perf_counter() - start
                    writer.submit(Path(state_path), *run.snapshot())
        except KeyboardInterrupt:
            writer.wait()
            if state_path is None:
                raise
            run.seconds = time.perf_counter() - start
            write_state(Path(state_path), *run.snapshot())
            raise Interrupted(Path(state_path)) from None
        writer.wait()
        _sync(dev)
        run.seconds = time.perf_counter() - start
        run.restore_best()
        test_x, test_y = test_part()
        blocks: list[Tensor] = []
        test_loss, test_acc = evaluate(run.stack, test_x, test_y, blocks)
    return test_loss, test_acc, blocks
