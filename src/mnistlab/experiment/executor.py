"""Executors run jobs and hand back what each produced. The only files they write are resume
states, where `state_path` says (the run directory's checkpoints/, in this process; none on a
Ray worker); the results in the run directory are the pipeline's to write.

`train_job` is the compute step: one engine call (one per part where a stack runs out of
memory and is trained in halves), then each model's checkpoint bytes, test predictions and
summary, in memory. An executor runs it for each job — in this process (`LocalExecutor`) or as
Ray tasks on a cluster (`experiment.ray.RayExecutor`) — and yields (job, result) as results
come. The pipeline records each result whole, its done file last, so a job retried on another
worker leaves neither half a result nor a duplicate behind.
"""

from __future__ import annotations

import contextlib
import gc
import glob
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mnistlab import engine
from mnistlab.data.dataset import Splits
from mnistlab.engine import (
    Arithmetic,
    Member,
    RecordEvent,
    TrainResult,
    free_bytes,
    out_of_memory,
    out_of_memory_reason,
    release_memory,
    steps_per_epoch,
)
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import Predictions
from mnistlab.experiment.plan import Job, auto_stack_size
from mnistlab.experiment.trials import Trial
from mnistlab.modules import checkpoint_bytes


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
    on_note: Callable[[str], None] | None = None,
    arithmetic: Arithmetic | None = None,
    on_step: Callable[[engine.StepEvent], None] | None = None,
) -> JobResult:
    """Train one job's stack (continuing from `state_path` when it holds a resume state); writes
    nothing but resume states, so it can run anywhere.

    A stack that runs out of memory is trained in halves, each half in turn (`_fitted`); their
    results are merged back in member order, so a split job's result has an unsplit one's shape
    and, on a CPU, its numbers (the engine's are independent of what else is in a stack). Each
    model of a split stack says so in its summary (`stack_split`), and `on_note` hears why.
    """

    def attempt(members: list[Member], path: Path | None) -> TrainResult:
        return engine.train(splits, members, job.schedule, device=device, state_path=path,
                            resume=True, on_record=on_record, on_log=on_log,
                            arithmetic=arithmetic, on_step=on_step)

    parts = _fitted(list(job.members), state_path, attempt, device, on_note or (lambda _: None))
    gc.collect()  # the last stack's gradients and moments (a reference cycle) before the copies
    runs, models, predictions = [], [], []
    for result in parts:
        runs += [_run_summary(m, result, k) for k, m in enumerate(result.members)]
        models += [checkpoint_bytes(result.checkpoint(k)) for k in range(len(result.members))]
        p = result.predictions
        predictions += [
            Predictions.of(p.predicted[k].numpy(), p.probability[k].numpy(),
                           p.true_probability[k].numpy(), splits.test).to_bytes()
            for k in range(len(result.members))
        ]
    if len(parts) > 1:
        sizes = [len(result.members) for result in parts for _ in result.members]
        for run, size in zip(runs, sizes, strict=True):
            run["stack_split"] = (f"{len(job.members)} models ran out of memory on {device}; "
                                  f"trained in a stack of {size}")
        for path in _split_states(state_path):
            path.unlink(missing_ok=True)
    rows = sorted((row for result in parts for row in result.rows), key=lambda r: r["step"])
    outcome = Outcome(rows, runs, sum(r.seconds for r in parts), parts[0].device)
    return JobResult(outcome, models, predictions)


def _fitted(
    members: list[Member], state_path: Path | None,
    attempt: Callable[[list[Member], Path | None], TrainResult], device: str,
    note: Callable[[str], None],
) -> list[TrainResult]:
    """`attempt(members, state_path)`'s result; where the members run out of memory, the first
    half's results and then the second's (recursively, down to one model), in member order.

    Each half keeps its own resume state beside the stack's (`state-<key>.0.safetensors`, ...),
    and a stack that has such states resumes in halves at once. A lone model that does not fit
    is a one-line MnistlabError.
    """
    if _split_states(state_path):
        why = "it was split before"
    else:
        gc.collect()  # the stack trained before this one (a reference cycle) goes first
        try:
            return [attempt(members, state_path)]
        except Exception as exc:  # re-raised below unless an allocation failed
            if not out_of_memory(exc):
                raise
            why = out_of_memory_reason(exc)
        release_memory(device)  # outside the handler: the traceback no longer holds the attempt
    if len(members) == 1:
        free = free_bytes(device) / 2**30
        m = members[0]
        raise MnistlabError(
            f"{m.config.name} seed {m.seed}: one model does not fit in the memory of {device} "
            f"({free:.1f} GiB free; {why}); free memory there, or use a smaller batch_size or "
            "smaller hidden layers" + ("" if device == "cpu" else ", or --device cpu"))
    half = (len(members) + 1) // 2
    note(f"{len(members)} models on {device}: {why}; training them as stacks of {half} and "
         f"{len(members) - half}")
    paths = (None, None) if state_path is None else tuple(
        state_path.with_name(f"{state_path.stem}.{i}{state_path.suffix}") for i in (0, 1))
    return [result for part, path in zip((members[:half], members[half:]), paths, strict=True)
            for result in _fitted(part, path, attempt, device, note)]


def _split_states(state_path: Path | None) -> list[Path]:
    """The resume states of a stack's halves (and theirs), where it was split."""
    if state_path is None:
        return []
    pattern = f"{glob.escape(state_path.stem)}.[01]*{glob.escape(state_path.suffix)}"
    return sorted(state_path.parent.glob(pattern))


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

    def run(self, jobs: Sequence[Job], splits: Splits, device: str, arithmetic: Arithmetic,
            watch: Watcher, state_path: Callable[[str], Path]
            ) -> Iterator[tuple[Job, JobResult]]:
        for i, job in enumerate(jobs):
            steps = steps_per_epoch(len(splits.train), job.schedule) * job.schedule.epochs
            watch.stack_started(i, len(jobs), job.configurations, len(job.members), steps)
            try:
                result = train_job(job, splits, device, state_path=state_path(job.key),
                                   on_record=watch.record, on_log=watch.log, on_note=watch.note,
                                   arithmetic=arithmetic, on_step=getattr(watch, "step", None))
            finally:
                watch.stack_finished()
            yield job, result
