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
from mnistlab.config import StudyConfig, load_study, study_to_toml, to_dict
from mnistlab.data import load, make_splits
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member
from mnistlab.errors import MnistlabError
from mnistlab.model import save_checkpoint
from mnistlab.progress import StudyProgress
from mnistlab.runs import RunDir, atomic_write_json, atomic_write_text, environment


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


def train_stack(
    run_dir: RunDir,
    index: int,
    splits: Splits,
    members: Sequence[Member],
    study: StudyConfig,
    *,
    resume: bool = False,
    on_record: Callable[[engine.RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
) -> StackOutcome:
    """Train one stack (or reuse its recorded outcome on resume) and save each member's model."""
    done_path = run_dir.checkpoints / f"stack-{index}.json"
    if resume and done_path.is_file():
        return StackOutcome(**json.loads(done_path.read_text(encoding="utf-8")))
    state_path = run_dir.checkpoints / f"state-{index}.safetensors"
    result = engine.train(
        splits,
        members,
        study.schedule,
        device=study.device,
        state_path=state_path,
        resume=resume and state_path.is_file(),
        on_record=on_record,
        on_log=on_log,
    )
    runs = []
    for k, member in enumerate(members):
        save_checkpoint(run_dir.model_path(member.config.name, member.seed), result.checkpoint(k))
        summary = _run_summary(member, result.rows, result.test[k], result.diverged[k])
        runs.append({**summary, "seconds": result.seconds / len(members)})
    outcome = StackOutcome(result.rows, runs, result.seconds, result.device)
    atomic_write_json(done_path, outcome.__dict__)
    state_path.unlink(missing_ok=True)
    return outcome


def summarize(study: StudyConfig, splits: Splits, outcomes: Sequence[StackOutcome]) -> dict:
    """summary.json: per run and seed, per configuration with CIs, and the comparisons."""
    runs = [r for o in outcomes for r in o.runs]
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
        "steps_per_epoch": _steps_per_epoch(len(splits.train), study),
        "runs": runs,
        "configs": configs,
        "comparisons": comparisons,
    }


def _steps_per_epoch(n_train: int, study: StudyConfig) -> int:
    batch = study.schedule.batch_size
    return n_train // batch if study.schedule.drop_last else -(-n_train // batch)


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
    study, run_dir = prepare(study, out=out, resume=resume)
    display.note(f"run directory: {run_dir.root}")
    splits = load_splits(study)
    if splits.note:
        display.note(splits.note)
    device = str(engine.resolve_device(study.device))
    atomic_write_json(run_dir.env_path, environment({"seeds": list(study.seeds)}, device))
    stacks = plan_stacks(study)
    steps = _steps_per_epoch(len(splits.train), study) * study.schedule.epochs
    outcomes: list[StackOutcome] = []
    for i, members in enumerate(stacks):
        display.start_stack(i, len(stacks), sorted({m.config.name for m in members}), steps)
        try:
            outcomes.append(
                train_stack(
                    run_dir,
                    i,
                    splits,
                    members,
                    study,
                    resume=resume is not None,
                    on_record=display.on_record,
                    on_log=display.on_log,
                )
            )
        finally:
            display.end_stack()
        run_dir.write_metrics(r for o in outcomes for r in o.rows)
    summary = summarize(study, splits, outcomes)
    run_dir.write_summary(summary)
    if render:
        from mnistlab.report import render as render_report

        render_report(run_dir)
    return run_dir, summary
