"""A study end to end: data → splits → engine stacks → run directory → summary → report.

Configurations that share an architecture are trained together as one stack (all their seeds
too); each finished stack is recorded in `checkpoints/stack-<i>.json`, so `--resume` skips it and
continues an unfinished one from the engine's last epoch-end state.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab import engine, stats
from mnistlab.config import Schedule, StudyConfig, load_study, study_to_toml, to_dict
from mnistlab.data import load, make_splits
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member
from mnistlab.errors import MnistlabError
from mnistlab.model import checkpoint_bytes
from mnistlab.progress import StudyProgress
from mnistlab.runs import (
    RunDir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    environment,
)


@dataclass
class StackOutcome:
    """What one engine stack produced, in plain JSON-able form."""

    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]]
    seconds: float
    device: str


def plan_stacks(study: StudyConfig) -> list[list[Member]]:
    """Every (configuration, seed) as a member, grouped by architecture, in study order."""
    groups: dict[tuple, list[Member]] = {}
    for config in study.runs:
        members = groups.setdefault(config.architecture, [])
        members.extend(Member(config, seed) for seed in study.seeds)
    return list(groups.values())


def _run_summary(member: Member, rows: list[dict], test: dict, diverged: int | None) -> dict:
    """Per (run, seed): final and best validation metrics, final training metrics, test metrics."""
    mine = [r for r in rows if r["run"] == member.config.name and r["seed"] == member.seed]
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
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "diverged_at": diverged,
    }


@dataclass
class StackResult:
    """A stack's outcome plus each member's checkpoint file bytes: all a worker sends back."""

    outcome: StackOutcome
    models: list[bytes]


def compute_stack(
    splits: Splits,
    members: Sequence[Member],
    schedule: Schedule,
    device: str,
    *,
    state_path: Path | None = None,
    resume: bool = False,
    on_record: Callable[[engine.RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> StackResult:
    """Train one stack; writes nothing but the engine's resume state, so it can run anywhere."""
    result = engine.train(
        splits,
        members,
        schedule,
        device=device,
        state_path=state_path,
        resume=resume,
        on_record=on_record,
        on_log=on_log,
    )
    runs = [
        {
            **_run_summary(m, result.rows, result.test[k], result.diverged[k]),
            "seconds": result.seconds / len(members),
        }
        for k, m in enumerate(members)
    ]
    models = [checkpoint_bytes(result.checkpoint(k)) for k in range(len(members))]
    return StackResult(StackOutcome(result.rows, runs, result.seconds, result.device), models)


def _done_path(run_dir: RunDir, key: int | str) -> Path:
    return run_dir.checkpoints / f"stack-{key}.json"


def _state_path(run_dir: RunDir, key: int | str) -> Path:
    return run_dir.checkpoints / f"state-{key}.safetensors"


def finished_stack(run_dir: RunDir, key: int | str) -> StackOutcome | None:
    """The recorded outcome of stack `key`, or None when it has not finished."""
    path = _done_path(run_dir, key)
    if not path.is_file():
        return None
    return StackOutcome(**json.loads(path.read_text(encoding="utf-8")))


def record_stack(
    run_dir: RunDir, key: int | str, members: Sequence[Member], result: StackResult
) -> StackOutcome:
    """Write each member's model, then the done file that marks the stack finished; the stack's
    resume state is no longer needed."""
    for member, model in zip(members, result.models, strict=True):
        atomic_write_bytes(run_dir.model_path(member.config.name, member.seed), model)
    atomic_write_json(_done_path(run_dir, key), result.outcome.__dict__)
    _state_path(run_dir, key).unlink(missing_ok=True)
    return result.outcome


def train_stack(
    run_dir: RunDir,
    key: int | str,
    splits: Splits,
    members: Sequence[Member],
    schedule: Schedule,
    device: str,
    *,
    resume: bool = False,
    on_record: Callable[[engine.RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> StackOutcome:
    """Train one stack in this process (or reuse its recorded outcome on resume) and record it.

    An unfinished stack continues from the engine's last epoch-end state on resume.
    """
    if resume and (done := finished_stack(run_dir, key)) is not None:
        return done
    state_path = _state_path(run_dir, key)
    result = compute_stack(
        splits,
        members,
        schedule,
        device,
        state_path=state_path,
        resume=resume and state_path.is_file(),
        on_record=on_record,
        on_log=on_log,
    )
    return record_stack(run_dir, key, members, result)


def train_stacks(
    run_dir: RunDir,
    splits: Splits,
    stacks: Sequence[tuple[int | str, Sequence[Member], Schedule]],
    device: str,
    *,
    resume: bool,
    display: StudyProgress,
    on_done: Callable[[list[StackOutcome]], None],
) -> list[StackOutcome]:
    """Train (key, members, schedule) stacks one after another in this process, with progress.

    `on_done` gets the outcomes so far after each stack (to rewrite metrics.csv as results come).
    """
    outcomes = []
    for i, (key, members, schedule) in enumerate(stacks):
        steps = _steps_per_epoch(len(splits.train), schedule) * schedule.epochs
        names = list(dict.fromkeys(m.config.name for m in members))
        display.start_stack(i, len(stacks), names, len(members), steps)
        try:
            outcome = train_stack(
                run_dir,
                key,
                splits,
                members,
                schedule,
                device,
                resume=resume,
                on_record=display.on_record,
                on_log=display.on_log,
            )
        finally:
            display.end_stack()
        outcomes.append(outcome)
        on_done(outcomes)
    return outcomes


def latest(outcomes: Sequence[StackOutcome]) -> tuple[list[dict], list[dict]]:
    """(metric rows, per-run summaries), each (run, seed) from the last outcome that holds it.

    A study trains every (run, seed) once; a successive-halving sweep retrains survivors for
    longer, and only their longest training counts.
    """
    rows: dict[tuple, list[dict]] = {}
    runs: dict[tuple, dict] = {}
    for outcome in outcomes:
        mine: dict[tuple, list[dict]] = {}
        for row in outcome.rows:
            mine.setdefault((row["run"], row["seed"]), []).append(row)
        rows |= mine
        runs |= {(r["run"], r["seed"]): r for r in outcome.runs}
    return [r for rs in rows.values() for r in rs], list(runs.values())


def summarize(study: StudyConfig, splits: Splits, outcomes: Sequence[StackOutcome]) -> dict:
    """summary.json: per run and seed, per configuration with CIs, and the comparisons."""
    runs = latest(outcomes)[1]
    order = {c.name: i for i, c in enumerate(study.runs)}
    runs.sort(key=lambda r: (order[r["run"]], r["seed"]))
    configs, comparisons = stats.summarize(runs, {c.name: to_dict(c) for c in study.runs})
    return {
        "study": study.name,
        "data": study.data,
        "split_note": splits.note,
        "classes": list(splits.train.classes),
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "device": outcomes[0].device if outcomes else "",
        "seeds": list(study.seeds),
        "seconds": sum(o.seconds for o in outcomes),
        "steps_per_epoch": _steps_per_epoch(len(splits.train), study.schedule),
        "runs": runs,
        "configs": configs,
        "comparisons": comparisons,
    }


def _steps_per_epoch(n_train: int, schedule: Schedule) -> int:
    batch = schedule.batch_size
    return n_train // batch if schedule.drop_last else -(-n_train // batch)


def prepare(study: StudyConfig, *, out: Path, resume: Path | None) -> tuple[StudyConfig, RunDir]:
    """A new run directory holding study.toml, or the existing one (and its study) on resume."""
    if resume is not None:
        run_dir = RunDir.existing(resume)
        return load_study(run_dir.config_path), run_dir
    run_dir = RunDir.create(out, study.name)
    atomic_write_text(run_dir.config_path, study_to_toml(study))
    return study, run_dir


def load_splits(study: StudyConfig, *, progress: bool = True) -> Splits:
    source = load(study.data, progress=progress)
    if source.train.labels is None:
        raise MnistlabError(
            f"{study.data}: the training part has no labels; a study needs labelled data"
        )
    return make_splits(source, study.val_fraction, study.split_seed)


def run_study(
    study: StudyConfig,
    *,
    out: Path = Path("runs"),
    resume: Path | None = None,
    display: StudyProgress | None = None,
    render: bool = True,
) -> tuple[RunDir, dict]:
    """Run (or resume) a whole study; returns its run directory and summary.

    On Ctrl-C the engine saves its state first; `--resume RUN_DIR` then ends with the same numbers.
    """
    display = display or StudyProgress(live=False)
    if resume is not None:
        study = load_study(RunDir.existing(resume).config_path)
    # Data and device first: a bad --data or --device leaves no half-made run directory behind.
    splits = load_splits(study)
    device = str(engine.resolve_device(study.device))
    study, run_dir = prepare(study, out=out, resume=resume)
    display.note(f"run directory: {run_dir.root}")
    if splits.note:
        display.note(splits.note)
    atomic_write_json(run_dir.env_path, environment({"seeds": list(study.seeds)}, device))
    stacks = [(i, members, study.schedule) for i, members in enumerate(plan_stacks(study))]
    outcomes = train_stacks(
        run_dir,
        splits,
        stacks,
        study.device,
        resume=resume is not None,
        display=display,
        on_done=lambda done: run_dir.write_metrics(latest(done)[0]),
    )
    summary = summarize(study, splits, outcomes)
    run_dir.write_summary(summary)
    if render:
        from mnistlab.report import render as render_report

        render_report(run_dir)
    return run_dir, summary
