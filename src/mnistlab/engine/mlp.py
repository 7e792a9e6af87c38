"""The MLP's engine: one call trains a stack of N MLPs on one split, resumably.

The members share `RunConfig.architecture` (hidden sizes, activation, dropout placement, input
normalisation); everything else, LayerNorm on/off included, may differ per member. Their
weights are one `MLPStack` (engine.stack); a step gathers each model's batch (its seed's rows of
the epoch's permutation, augmented where it augments), runs the stack's forward pass, the loss,
the backward pass and Adam, replayed as a CUDA graph where the stack's arithmetic says so.
The schedule, records and faults are the loop's (engine.loop), the resume state engine.resume's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mnistlab.config import Schedule
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.engine import augment
from mnistlab.engine.backends.arithmetic import (
    Arithmetic,
    differences,
    honour,
    requested,
    variables,
)
from mnistlab.engine.device import keep_freed_memory, resolve_device, set_matmul
from mnistlab.engine.loop import StepEvent, run_schedule
from mnistlab.engine.records import (
    Member,
    RecordBooks,
    RecordEvent,
    TrainResult,
    check_members,
    input_spec,
    joined_predictions,
    steps_per_epoch,
)
from mnistlab.engine.resume import FIX, ResumeState, fingerprint
from mnistlab.engine.seeds import derived_seed
from mnistlab.engine.stack import MLPStack
from mnistlab.engine.stopping import Monitor
from mnistlab.errors import CheckpointError, MnistlabError
from mnistlab.model import InputSpec

STATE_FORMAT = "mnistlab-train-state/1"


class MLPTraining(RecordBooks, ResumeState):
    """One train_mlp() call's mutable state: exactly what a resume state file holds."""

    FORMAT = STATE_FORMAT

    def __init__(self, splits: Splits, members: list[Member], schedule: Schedule,
                 device: torch.device, spec: InputSpec, arithmetic: Arithmetic):
        self.members, self.schedule, self.device = members, schedule, device
        self.x, self.y = self._on_device(splits.train, spec)
        self.val = self._on_device(splits.val, spec)
        n, batch = len(self.x), schedule.batch_size
        self.steps_per_epoch = steps_per_epoch(n, schedule)
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
        self._sources(spec, arithmetic)
        configs, seeds = [m.config for m in members], [m.seed for m in members]
        self.stack = MLPStack.initial(configs, seeds, self.x.shape[1], len(spec.classes),
                                      device, self.total, arithmetic)
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
        self.fingerprint = fingerprint(members, schedule, splits, device, arithmetic, test=True)

    def _on_device(self, part: Dataset, spec: InputSpec) -> tuple[Tensor, Tensor]:
        labels = torch.as_tensor(part.labels)
        return spec.prepare(part.images).to(self.device), labels.to(self.device)

    def _sources(self, spec: InputSpec, arithmetic: Arithmetic) -> None:
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
                                           self.device, arithmetic)

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

    # --- resume state (engine.resume) ----------------------------------------------------------

    def _books(self) -> dict[str, Tensor]:
        """The state's tensors besides the stack's and the epoch's batch order."""
        return {
            **{f"order_rng.{j}": g.get_state() for j, g in enumerate(self.order_rngs)},
            "frozen": self.frozen, "diverged_at": self.diverged_at,
            "loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
            **({"best_param": self.best} if self.best is not None else {}),
        }

    def _load_stack(self, tensors: dict[str, Tensor]) -> None:
        self.stack.load_state(tensors, self.step)

    def _check_fingerprint(self, path: Path, saved: object) -> None:
        """A state of another run, or of another arithmetic, is refused naming what differs; a
        state from before its test data or arithmetic were recorded, naming the version."""
        if not isinstance(saved, dict):
            raise CheckpointError(f"{path}: damaged resume state metadata (the fingerprint is no "
                                  f"table); {FIX}")
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


def train_mlp(
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
    """Train every member on `splits` (engine.loop describes the schedule and faults).

    With `resume` and an existing `state_path`, continue from it; the result equals an
    uninterrupted run's exactly. A missing state file starts from scratch. `arithmetic`
    (backends.arithmetic) is how the stack computes; by default what the environment asks for
    on the device, and an explicit one must be possible here. `on_step` hears where training
    is, a few times a second (StepEvent), for a live progress bar.
    """
    members = list(members)
    check_members(members)
    dev = resolve_device(device)
    arithmetic = honour(arithmetic, dev, "engine.train") if arithmetic else requested(dev)
    set_matmul(arithmetic)
    if dev.type == "cpu":
        keep_freed_memory()
    spec = input_spec(splits.train, members[0].config.input_norm)
    run = MLPTraining(splits, members, schedule, dev, spec, arithmetic)
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
                       run.seconds, str(dev), members, spec, weights, joined_predictions(blocks),
                       arithmetic)
