"""The general engine: any model other than the MLP trained as a stack (engine.module_stack).

The MLP has its own engine (engine.mlp: stacked matrix products, a hand-written backward pass).
Every other model — `lenet5`, or a factory the user names (`RunConfig.model`) — trains here. The
schedule is the MLP engine's, record for record: the same batches (one permutation per seed and
epoch), augmentation streams, learning-rate tables (engine.schedules), label smoothing, records,
log lines, divergence freezing, early stopping and best weights (engine.stopping), resume states
(engine.resume) and the same `TrainResult`, so the pipeline, the run directory, the statistics
and the report take either engine's results alike.
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
from mnistlab.engine.backends.arithmetic import Arithmetic, honour, requested
from mnistlab.engine.device import resolve_device, set_matmul
from mnistlab.engine.loop import run_schedule
from mnistlab.engine.module_stack import ModuleStack
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
from mnistlab.engine.resume import ResumeState, fingerprint
from mnistlab.engine.seeds import derived_seed
from mnistlab.engine.stopping import Monitor
from mnistlab.errors import MnistlabError
from mnistlab.model import Checkpoint, InputSpec
from mnistlab.modules import build, on_images

STATE_FORMAT = "mnistlab-module-state/1"


class ModuleResult(TrainResult):
    """A general stack's TrainResult: `weights` hold each parameter and buffer stacked."""

    def checkpoint(self, k: int) -> Checkpoint:
        """Member k as its factory's module (on flat pixel rows, see `on_images`)."""
        config = self.members[k].config
        with torch.random.fork_rng(devices=[]):
            net = build(config.model, self.inputs)
        state = net.state_dict()
        net.load_state_dict({name: self.weights[name][k] for name in state}, strict=True)
        return Checkpoint(on_images(net, self.inputs.shape), config, self.inputs,
                          self.members[k].seed, self.arithmetic.as_dict())


class ModuleTraining(RecordBooks, ResumeState):
    """One train_modules() call's mutable state: exactly what a resume state file holds."""

    FORMAT = STATE_FORMAT

    def __init__(self, splits: Splits, members: list[Member], schedule: Schedule,
                 device: torch.device, spec: InputSpec, arithmetic: Arithmetic):
        self.members, self.schedule, self.device, self.spec = members, schedule, device, spec
        self.x, self.y = self.on_device(splits.train)
        self.val = self.on_device(splits.val)
        n, batch = len(self.x), schedule.batch_size
        self.steps_per_epoch = steps_per_epoch(n, schedule)
        if self.steps_per_epoch == 0 or len(self.val[0]) == 0:
            raise MnistlabError(
                f"{splits.train.origin}: {n} training / {len(self.val[0])} validation images are "
                f"too few for batch size {batch}; use more data or a smaller batch")
        self.total = self.steps_per_epoch * schedule.epochs
        self.seeds = list(dict.fromkeys(m.seed for m in members))
        self.order_rngs = [torch.Generator().manual_seed(derived_seed("order", s))
                           for s in self.seeds]
        self._sources(arithmetic)
        self.stack = ModuleStack(members, spec, device, self.total)
        configs = [m.config for m in members]
        self.monitor = Monitor(configs)
        restoring = any(c.restore_best for c in configs)
        self.best = ({k: v.clone() for k, v in self.stack.state().items()
                      if k.startswith(("param.", "buffer."))} if restoring else {})
        zeros = torch.zeros(len(members), device=device)
        self.frozen, self.loss_sum, self.acc_sum = zeros, zeros.clone(), zeros.clone()
        self.last_loss = zeros.clone()
        self.diverged_at = torch.zeros(len(members), dtype=torch.int64, device=device)
        self.perms: Tensor | None = None
        self.maps: Tensor | None = None
        self.step, self.since, self.seconds = 0, 0, 0.0
        self.rows: list[dict] = []
        self.fingerprint = fingerprint(members, schedule, splits, device, arithmetic, test=False)

    def on_device(self, part: Dataset) -> tuple[Tensor, Tensor]:
        labels = torch.as_tensor(part.labels)
        return self.spec.prepare(part.images).to(self.device), labels.to(self.device)

    def _sources(self, arithmetic: Arithmetic) -> None:
        """Where each model's images come from: one source per seed and augmentation (the
        MLP engine's streams, so a model sees the same images in either engine)."""
        streams = [(m.seed, augment.settings(m.config)) for m in self.members]
        sources = list(dict.fromkeys(streams))
        self.source_seed = torch.tensor([self.seeds.index(s) for s, _ in sources])
        self.source_of = torch.tensor([sources.index(s) for s in streams], device=self.device)
        self.augmented = [j for j, (_, values) in enumerate(sources) if values is not None]
        self.augmenter = None
        if self.augmented:
            black = self.spec.prepare(np.zeros((1, *self.spec.shape), np.uint8))[0, 0].item()
            self.augmenter = augment.Augmenter([sources[j] for j in self.augmented],
                                               self.spec.shape, black, self.steps_per_epoch,
                                               self.schedule.batch_size, self.device,
                                               arithmetic)

    def _epoch_start(self) -> None:
        perms = [torch.randperm(len(self.x), generator=g) for g in self.order_rngs]
        self.perms = torch.stack(perms).to(self.device)
        self._draw_transforms()

    def _draw_transforms(self) -> None:
        if self.augmenter is not None:
            self.maps = self.augmenter.epoch(self.step // self.steps_per_epoch)

    def batch(self) -> tuple[Tensor, Tensor]:
        """This step's images (N, B, H*W) and labels (N, B): each model its source's."""
        i = self.step % self.steps_per_epoch
        if i == 0:
            self._epoch_start()
        assert self.perms is not None
        size = self.schedule.batch_size
        rows = self.perms[self.source_seed.to(self.device), i * size : (i + 1) * size]
        x = self.x[rows]
        if self.augmenter is not None and self.maps is not None:
            x[self.augmented] = self.augmenter.apply(x[self.augmented], self.maps[:, i])
        return x[self.source_of], self.y[rows][self.source_of]

    def train_step(self) -> None:
        x, y = self.batch()
        self.step += 1
        self.since += 1
        loss, accuracy = self.stack.train_step(x, y, self.step, self.frozen)
        bad = ~torch.isfinite(loss)
        self.diverged_at.copy_(torch.where(bad & (self.frozen == 0), self.step, self.diverged_at))
        torch.maximum(self.frozen, bad.to(self.frozen.dtype), out=self.frozen)
        self.loss_sum.add_(loss)
        self.acc_sum.add_(accuracy)
        self.last_loss.copy_(loss)

    def watch(self, accuracy: list[float]) -> None:
        """Best weights and early stopping after this record's validation `accuracy`."""
        keep, stop = self.monitor.update(self.step, accuracy, self.step == self.total)
        state = self.stack.state()
        for k in keep:
            for name, best in self.best.items():
                best[k].copy_(state[name][k])
        for k in stop:
            self.frozen[k] = 1.0

    def restore_best(self) -> None:
        state = self.stack.state()
        for k, step in enumerate(self.monitor.restored()):
            if step is not None:
                for name, best in self.best.items():
                    state[name][k].copy_(best[k])

    # --- resume state (engine.resume) ----------------------------------------------------------

    def _books(self) -> dict[str, Tensor]:
        """The state's tensors besides the stack's and the epoch's batch order."""
        return {
            **{f"order_rng.{j}": g.get_state() for j, g in enumerate(self.order_rngs)},
            "frozen": self.frozen, "diverged_at": self.diverged_at,
            "loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
            **{f"best.{k}": v for k, v in self.best.items()},
        }

    def _load_stack(self, tensors: dict[str, Tensor]) -> None:
        self.stack.load_state(tensors)

    def _check_fingerprint(self, path: Path, saved: object) -> None:
        """A state of another run is refused naming what differs."""
        for what, mine in self.fingerprint.items():
            if not isinstance(saved, dict) or saved.get(what) != mine:
                raise MnistlabError(
                    f"{path}: this resume state was written for other {what} than this run's; "
                    "resume with the same configurations, seeds, schedule, data, device and "
                    "arithmetic, or start a new run")


def train_modules(
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
) -> TrainResult:
    """Train every member (one model, `RunConfig.model`, other than the MLP) on `splits`, as
    `mlp.train_mlp` trains MLPs: the same schedule, records, faults, resume and result."""
    members = list(members)
    check_members(members)
    if members[0].config.model == "mlp":
        raise MnistlabError("train_modules trains models other than the MLP; use engine.train")
    dev = resolve_device(device)
    arithmetic = honour(arithmetic, dev, "engine.train") if arithmetic else requested(dev)
    set_matmul(arithmetic)
    spec = input_spec(splits.train, members[0].config.input_norm)
    run = ModuleTraining(splits, members, schedule, dev, spec, arithmetic)
    if resume and state_path is not None and Path(state_path).is_file():
        run.load(Path(state_path))
    test_loss, test_acc, blocks = run_schedule(
        run, dev, lambda: run.on_device(splits.test), state_path=state_path,
        on_record=on_record, on_log=on_log)
    diverged = run.diverged()
    test = [{"loss": math.nan, "accuracy": math.nan} if d else {"loss": lo, "accuracy": acc}
            for d, lo, acc in zip(diverged, test_loss, test_acc, strict=True)]
    return ModuleResult(run.rows, test, diverged, run.monitor.stopped, run.monitor.restored(),
                        run.seconds, str(dev), members, spec, run.stack.weights(),
                        joined_predictions(blocks), arithmetic)
