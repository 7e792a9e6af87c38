"""summary.json: per model, per configuration with intervals, the comparisons, and a sweep's own
figures, built from the outcomes of an experiment's jobs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mnistlab import stats
from mnistlab.config import SCHEDULE_FIELDS, to_dict
from mnistlab.data.dataset import Splits
from mnistlab.experiment.executor import Outcome, steps_per_epoch
from mnistlab.experiment.halving import ETA, rank
from mnistlab.experiment.trials import Experiment


def latest(outcomes: Sequence[Outcome]) -> tuple[list[dict], list[dict]]:
    """(metric rows, per-model summaries), each (run, seed) from the last outcome that holds it.

    An experiment trains every (run, seed) once; successive halving retrains survivors for
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


def summarize(experiment: Experiment, splits: Splits, outcomes: Sequence[Outcome],
              rungs: list[dict] | None, backend: str) -> dict[str, Any]:
    """The whole summary; a sweep adds each configuration's rung and schedule and a "sweep"
    section (axes, winner, halving savings)."""
    study = experiment.study
    runs = latest(outcomes)[1]
    order = {c.name: i for i, c in enumerate(study.runs)}
    runs.sort(key=lambda r: (order[r["run"]], r["seed"]))
    configs, comparisons = stats.summarize(runs, {c.name: to_dict(c) for c in study.runs})
    summary = {
        "kind": experiment.kind,
        "study": study.name,
        "data": study.data,
        "split_note": splits.note,
        "classes": list(splits.train.classes),
        "sizes": {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)},
        "device": outcomes[0].device if outcomes else "",
        "seeds": list(study.seeds),
        "seconds": sum(o.seconds for o in outcomes),
        "steps_per_epoch": steps_per_epoch(len(splits.train), study.schedule),
        "runs": runs,
        "configs": configs,
        "comparisons": comparisons,
    }
    if experiment.sweep is not None:
        rungs = rungs or [_single_rung(experiment, outcomes)]
        summary["sweep"] = _sweep_section(experiment, configs, len(outcomes), rungs, backend)
    return summary


def _single_rung(experiment: Experiment, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    names = [c.name for c in experiment.study.runs]
    epochs = [experiment.schedule(n).epochs for n in names]
    return {"epochs": epochs, "configs": names, "kept": rank(names, outcomes)}


def _sweep_section(experiment: Experiment, configs: list[dict], stacks: int,
                   rungs: list[dict], backend: str) -> dict[str, Any]:
    spec, study = experiment.sweep, experiment.study
    reached = {name: (i, e) for i, rung in enumerate(rungs)
               for name, e in zip(rung["configs"], rung["epochs"], strict=True)}
    schedules = {c.name: experiment.schedule(c.name) for c in study.runs}
    varying = [k for k in SCHEDULE_FIELDS if len({getattr(s, k) for s in schedules.values()}) > 1]
    for entry in configs:
        entry["config"] |= {k: getattr(schedules[entry["run"]], k) for k in varying}
        entry["rung"], entry["epochs"] = reached[entry["run"]]
    full = sum(s.epochs for s in schedules.values()) * len(study.seeds)
    used = sum(sum(r["epochs"]) for r in rungs) * len(study.seeds)
    halving = {"eta": ETA, "rungs": rungs, "model_epochs": used, "full_grid_model_epochs": full,
               "saved": 1 - used / full}
    return {
        "axes": {k: _plain(v) for k, v in spec.grid.items()}
        | {k: dict(v) for k, v in spec.random.items()},
        "samples": spec.samples,
        "backend": backend,
        "stack_size": study.stack_size,
        "stacks": stacks,
        "winner": rungs[-1]["kept"][0],
        "halving": halving if experiment.halving else None,
    }


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value
