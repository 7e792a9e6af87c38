"""One pipeline under every command: data → splits → run directory → jobs → executor → summary.

A study, a sweep, a halving sweep and a single `train` all run here; so do Ray runs, through
another executor. Each finished job is recorded in the run directory (models, test predictions,
a done file), so a resumed run skips it; an unfinished one continues from the engine's last
epoch-end state in this process (a Ray task keeps none: it trains its job again from the start).
Either way an interrupted run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import shlex
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from mnistlab.board import Board
from mnistlab.config import study_to_toml
from mnistlab.data import Source, load, make_splits
from mnistlab.data.dataset import Splits
from mnistlab.engine import Arithmetic, check_bounds, honour, overridden, requested
from mnistlab.environment import environment
from mnistlab.errors import MnistlabError
from mnistlab.experiment.executor import JobResult, LocalExecutor, Outcome, Watcher
from mnistlab.experiment.halving import successive_halving
from mnistlab.experiment.plan import Job, plan
from mnistlab.experiment.summary import latest, summarize
from mnistlab.experiment.sweep import sweep_to_toml
from mnistlab.experiment.trials import Experiment, Trial
from mnistlab.runs import RunDir


class Executor(Protocol):
    """Runs jobs somewhere (this process, a Ray cluster) and yields (job, result) as each
    finishes. `name` says where, for env.json and the summary."""

    name: str

    def session(self) -> contextlib.AbstractContextManager: ...  # around the whole experiment

    def device(self, requested: str) -> str: ...

    def stack_size(self, trials: Sequence[Trial], splits: Splits, device: str) -> int: ...

    def run(self, jobs: Sequence[Job], splits: Splits, device: str, arithmetic: Arithmetic,
            watch: Watcher, state_path: Callable[[str], Path]
            ) -> Iterator[tuple[Job, JobResult]]: ...


def load_splits(experiment: Experiment, source: Source | None = None) -> Splits:
    """The experiment's train/validation/test parts, from `source` or its data name/path."""
    study = experiment.study
    source = source or load(study.data)
    if source.train.labels is None:
        raise MnistlabError(
            f"{study.data}: the training part has no labels; training needs labelled data"
        )
    return make_splits(source, study.val_fraction, study.split_seed)


def run(
    experiment: Experiment,
    watch: Watcher,
    *,
    out: Path = Path("runs"),
    resume: RunDir | None = None,
    source: Source | None = None,
    executor: Executor | None = None,
) -> RunDir:
    """Run `experiment` into a new run directory under `out`, or finish the one in `resume`.

    Data and device come first, so a bad `--data` or `--device` leaves no half-made run
    directory behind. The arithmetic (engine.Arithmetic) is resolved once, recorded in
    env.json, and a resumed run trains with the one it recorded.
    """
    splits = load_splits(experiment, source)
    _check_bounds(experiment, splits)
    executor = executor or LocalExecutor()
    with executor.session():
        recorded = resume.recorded_arithmetic() if resume is not None else None
        asked = experiment.study.device
        if recorded is not None and asked == "auto":
            asked = recorded.device  # a run resumes where it trained, unless told otherwise
        device = executor.device(asked)
        arithmetic = _arithmetic(recorded, device, resume, watch)
        if not experiment.study.stack_size:
            size = executor.stack_size(experiment.trials(), splits, device)
            experiment = experiment.with_stack_size(size)
        run_dir = _open(experiment, out, resume)
        if resume is not None and _complete(resume):  # checked like any resume, then said so
            watch.note(f"{resume.root} is complete: nothing to resume (its results as they are)")
            return resume
        board = Board(run_dir.tensorboard, experiment.scheduled())
        watch = _AlsoLogged(watch, board)
        _notes(watch, experiment, run_dir, splits)
        run_dir.write_env(environment({"seeds": list(experiment.study.seeds),
                                       "backend": executor.name, "command": _command()}, device,
                                      arithmetic))
        train_rung = _rung_trainer(run_dir, splits, experiment, executor, device, arithmetic,
                                   watch, board)
        try:
            if experiment.halving:
                outcomes, rungs = successive_halving(experiment, train_rung)
            else:
                outcomes, rungs = train_rung("", experiment.trials()), None
        except KeyboardInterrupt as exc:
            exc.run_dir = run_dir.root  # where to resume: the command line says so
            raise
    run_dir.write_metrics(latest(outcomes)[0])
    summary = summarize(experiment, run_dir, splits, outcomes, rungs, executor.name)
    run_dir.write_summary(summary)
    board.finish(summary["runs"])
    return run_dir


def _complete(run_dir: RunDir) -> bool:
    """Whether a run directory holds its summary (written last): a finished run. A damaged
    summary is not: resuming rewrites it."""
    try:
        run_dir.read_summary()
    except MnistlabError:
        return False
    return True


def _check_bounds(experiment: Experiment, splits: Splits) -> None:
    """The settings that only the data can bound, checked before a run directory exists: each
    configuration's shift within its images, its schedule's length in steps."""
    for config in experiment.study.runs:
        check_bounds(config, experiment.schedule(config.name), splits.train)


def _open(experiment: Experiment, out: Path, resume: RunDir | None) -> RunDir:
    """The run directory: a new one, or the resumed one cleared of a killed run's unfinished
    writes (this run owns it now: claimed, so a second resume of it is refused in one line)."""
    if resume is None:
        return _new_run_dir(experiment, out)
    resume.claim().remove_temp_files()
    return resume


def _arithmetic(recorded: Arithmetic | None, device: str, resume: RunDir | None,
                watch: Watcher) -> Arithmetic:
    """What the environment asks for on `device`; for a resumed run, the arithmetic it recorded
    (a one-line error where that cannot be had here), with a note naming any environment
    variable that asks otherwise and is ignored. A run from before arithmetic was recorded
    resumes with the requested one; its unfinished stacks' states are then refused."""
    dev = torch.device(device)
    if recorded is None or resume is None:
        return requested(dev)
    ignored = overridden(recorded, dev)
    arithmetic = honour(recorded, dev, str(resume.root))
    if ignored:
        watch.note(f"resuming with the arithmetic the run recorded ({arithmetic.describe()}); "
                   f"{', '.join(ignored)} does not apply to it")
    return arithmetic


def _command() -> str | None:
    """The command line, when mnistlab's command ran this (for env.json and the report's
    footer); None from Python, where the run directory's own file is the record."""
    program = Path(sys.argv[0])
    ran = program.name == "mnistlab" or program.parts[-3:] == ("mnistlab", "cli", "__main__.py")
    return shlex.join(["mnistlab", *sys.argv[1:]]) if ran else None


class _AlsoLogged:
    """The caller's watcher, with every record also appended to TensorBoard's event files (and
    a stack trained elsewhere logged when its result comes back)."""

    def __init__(self, watch: Watcher, board: Board):
        self.watch, self.board = watch, board

    def __getattr__(self, name: str) -> Any:
        return getattr(self.watch, name)

    def record(self, event: Any) -> None:
        self.board.record(event)
        self.watch.record(event)


def _new_run_dir(experiment: Experiment, out: Path) -> RunDir:
    """study.toml lists the configurations (and re-runs a study); a sweep's sweep.toml re-runs
    the sweep."""
    run_dir = RunDir.create(out, experiment.study.name)
    run_dir.write_config(study_to_toml(experiment.study),
                         experiment.sweep and sweep_to_toml(experiment.sweep))
    return run_dir


def _notes(watch: Watcher, experiment: Experiment, run_dir: RunDir, splits: Splits) -> None:
    study = experiment.study
    watch.note(f"run directory: {run_dir.root}")
    if splits.note:
        watch.note(splits.note)
    models = len(study.runs) * len(study.seeds)
    configurations = f"{len(study.runs)} configuration{'s' * (len(study.runs) != 1)}"
    seeds = f"{len(study.seeds)} seed{'s' * (len(study.seeds) != 1)}"
    watch.note(f"{models} model{'s' * (models != 1)} ({configurations} × {seeds}), "
               f"stacks of up to {study.stack_size}"
               + (", successive halving" if experiment.halving else ""))


def _rung_trainer(
    run_dir: RunDir, splits: Splits, experiment: Experiment, executor: Executor, device: str,
    arithmetic: Arithmetic, watch: Watcher, board: Board,
) -> Callable[[str, Sequence[Trial]], list[Outcome]]:
    """A function that trains trials (one rung) and returns their outcomes in plan order.

    Finished jobs are read back from their done files; each job that finishes is recorded at
    once and metrics.csv rewritten, so results show up as they come.
    """
    earlier: list[Outcome] = []

    def train_rung(prefix: str, trials: Sequence[Trial]) -> list[Outcome]:
        jobs = plan(trials, experiment.study.stack_size, prefix)
        done = {job.key: Outcome(**d) for job in jobs if (d := run_dir.finished_stack(job.key))}
        todo = [job for job in jobs if job.key not in done]
        for job, result in executor.run(todo, splits, device, arithmetic, watch,
                                        run_dir.state_path):
            done[job.key] = _record(run_dir, job, result)
            board.add_rows(result.outcome.rows)
            run_dir.write_metrics(latest(earlier + [done[j.key] for j in jobs
                                                    if j.key in done])[0])
        outcomes = [done[job.key] for job in jobs]
        earlier.extend(outcomes)
        return outcomes

    return train_rung


def _record(run_dir: RunDir, job: Job, result: JobResult) -> Outcome:
    files = [(m.config.name, m.seed, model, predictions) for m, model, predictions
             in zip(job.members, result.models, result.predictions, strict=True)]
    run_dir.record_stack(job.key, result.outcome.as_dict(), files)
    return result.outcome
