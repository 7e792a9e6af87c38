"""Executors run jobs and hand back what each produced; they never write the run directory.

`train_job` is the pure compute step: one engine call, then each model's checkpoint bytes,
test predictions and summary. An executor runs it for each job — in this process
(`LocalExecutor`) or as Ray tasks on a cluster (`experiment.ray.RayExecutor`) — and yields
(job, result) as results come. The pipeline records them, so a job retried on another worker can
never leave half a result or a duplicate behind.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mnistlab import engine
from mnistlab.config import Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, RecordEvent, TrainResult
from mnistlab.evaluation import Predictions
from mnistlab.experiment.plan import Job, auto_stack_size
from mnistlab.experiment.trials import Trial
from mnistlab.model import checkpoint_bytes


class Watcher(Protocol):
    """What an executor reports while it works (progress on a terminal, in a notebook, ...)."""

    def note(self, text: str) -> None: ...

    def stack_started(self, index: int, count: int, configurations: Sequence[str], models: int,
                      steps: int) -> None: ...

    def record(self, event: RecordEvent) -> None: ...

    def log(self, line: str) -> None: ...

    def stack_finished(self) -> None: ...


@dataclass
class Outcome:
    """What one job produced, in plain JSON-able form: its stack's done file."""

    rows: list[dict[str, Any]]  # the metric records (metrics.csv rows)
    runs: list[dict[str, Any]]  # per model: final/best validation, test metrics, divergence
    seconds: float
    device: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class JobResult:
    """An outcome plus each member's checkpoint and predictions file: all a worker sends back."""

    outcome: Outcome
    models: list[bytes]
    predictions: list[bytes]


def steps_per_epoch(n_train: int, schedule: Schedule) -> int:
    batch = schedule.batch_size
    return n_train // batch if schedule.drop_last else math.ceil(n_train / batch)


def _run_summary(member: Member, result: TrainResult, k: int) -> dict[str, Any]:
    """Per model: final and best validation metrics, final training metrics, test metrics.

    "Final" is the record whose weights the model ends with: its last, or with restore_best
    its best (the weights that were tested and saved).
    """
    mine = [r for r in result.rows if r["run"] == member.config.name and r["seed"] == member.seed]
    restored = result.restored[k]
    if restored is not None:
        mine = [r for r in mine if r["step"] <= restored]
    val = [r for r in mine if r["split"] == "val"]
    train = [r for r in mine if r["split"] == "train"]
    best = max(val, key=lambda r: r["accuracy"]) if val else None
    last = lambda rs, key: rs[-1][key] if rs else float("nan")  # noqa: E731
    return {
        "run": member.config.name,
        "seed": member.seed,
        "final_val_accuracy": last(val, "accuracy"),
        "final_val_loss": last(val, "loss"),
        "best_val_accuracy": best["accuracy"] if best else float("nan"),
        "best_val_step": best["step"] if best else None,
        "final_train_accuracy": last(train, "accuracy"),
        "final_train_loss": last(train, "loss"),
        "test_accuracy": result.test[k]["accuracy"],
        "test_loss": result.test[k]["loss"],
        "diverged_at": result.diverged[k],
        "stopped_at": result.stopped[k],
        "restored_from": restored,
        "seconds": result.seconds / len(result.members),
    }


def train_job(
    job: Job,
    splits: Splits,
    device: str,
    *,
    state_path: Path | None = None,
    on_record: Callable[[RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> JobResult:
    """Train one job's stack (continuing from `state_path` when it holds a resume state); writes
    nothing but that state, so it can run anywhere."""
    result = engine.train(splits, job.members, job.schedule, device=device, state_path=state_path,
                          resume=True, on_record=on_record, on_log=on_log)
    runs = [_run_summary(m, result, k) for k, m in enumerate(job.members)]
    models = [checkpoint_bytes(result.checkpoint(k)) for k in range(len(job.members))]
    p = result.predictions
    predictions = [
        Predictions.of(p.predicted[k].numpy(), p.probability[k].numpy(),
                       p.true_probability[k].numpy(), splits.test).to_bytes()
        for k in range(len(job.members))
    ]
    outcome = Outcome(result.rows, runs, result.seconds, result.device)
    return JobResult(outcome, models, predictions)


class LocalExecutor:
    """Trains jobs one after another in this process, with live progress. An interrupted job
    continues from its resume state, kept where `state_path(key)` says."""

    name = "in-process"

    def session(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def device(self, requested: str) -> str:
        return str(engine.resolve_device(requested))

    def stack_size(self, trials: Sequence[Trial], splits: Splits, device: str) -> int:
        return auto_stack_size(trials, splits, device)

    def run(self, jobs: Sequence[Job], splits: Splits, device: str, watch: Watcher,
            state_path: Callable[[str], Path]) -> Iterator[tuple[Job, JobResult]]:
        for i, job in enumerate(jobs):
            steps = steps_per_epoch(len(splits.train), job.schedule) * job.schedule.epochs
            watch.stack_started(i, len(jobs), job.configurations, len(job.members), steps)
            try:
                result = train_job(job, splits, device, state_path=state_path(job.key),
                                   on_record=watch.record, on_log=watch.log)
            finally:
                watch.stack_finished()
            yield job, result
