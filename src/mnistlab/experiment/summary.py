"""summary.json: per model, per configuration with intervals, the comparisons, and a sweep's own
figures, built from the outcomes of an experiment's jobs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from mnistlab import claims, stats
from mnistlab.config import SCHEDULE_FIELDS, to_dict
from mnistlab.data.dataset import Splits
from mnistlab.data.identity import is_dataset
from mnistlab.engine import steps_per_epoch
from mnistlab.evaluation import Predictions
from mnistlab.experiment.executor import Outcome
from mnistlab.experiment.halving import ETA, rank_by_validation
from mnistlab.experiment.trials import Experiment
from mnistlab.runs import RunDir


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


def summarize(experiment: Experiment, run_dir: RunDir, splits: Splits,
              outcomes: Sequence[Outcome], rungs: list[dict] | None,
              backend: str) -> dict[str, Any]:
    """The whole summary. The statistics read each model's stored test predictions (the
    bootstrap and McNemar's test pair the models on the same images). A sweep adds its own
    section (axes, rungs, halving savings); a run of the five seed presets, the seed's claims."""
    study = experiment.study
    rows, runs = latest(outcomes)
    order = {c.name: i for i, c in enumerate(study.runs)}
    runs.sort(key=lambda r: (order[r["run"]], r["seed"]))
    configs = {c.name: to_dict(c) for c in study.runs}
    if experiment.sweep is not None:
        rungs = rungs or [_single_rung(experiment, outcomes)]
        _schedule_fields(experiment, configs)
    reached = {name: (i, e) for i, rung in enumerate(rungs or [])
               for name, e in zip(rung["configs"], rung["epochs"], strict=True)}
    comparer = stats.Comparer(runs, _correct(run_dir, runs))
    statistics = stats.statistics(configs, comparer, reached)
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
        **statistics,
        "claims": _claims(configs, statistics["configs"], rows, comparer, study.data),
    }
    if experiment.sweep is not None:
        summary["sweep"] = _sweep_section(experiment, summary, len(outcomes), rungs, backend)
    return summary


def _correct(run_dir: RunDir, runs: Sequence[dict]) -> dict[str, np.ndarray]:
    """Per configuration, (seeds, test images) booleans: which images each finished model got
    right, from its stored predictions."""
    correct: dict[str, list[np.ndarray]] = {}
    for r in runs:
        if math.isfinite(r["test_accuracy"]):
            p = Predictions.load(run_dir.predictions_path(r["run"], r["seed"]))
            correct.setdefault(r["run"], []).append(p.predicted == p.labels)
    return {name: np.stack(rows) for name, rows in correct.items()}


def _claims(configs: dict[str, dict], entries: list[dict], rows: list[dict],
            comparer: stats.Comparer, data: str) -> list[dict[str, Any]] | None:
    """The seed study's claims with verdicts, when its five presets are in the run, each saying
    which data judged it and whether that is MNIST (by name, or a folder of its published
    files: mnistlab.data.identity), the data the seed made them on."""
    if not claims.applies(configs):
        return None
    convergence = {}
    for name in configs:
        steps, mean, _, _ = stats.seed_band(rows, name, "val", "accuracy")
        convergence[name] = stats.convergence_step(steps, mean)
    return claims.check(entries, comparer.pair, convergence, data,
                        is_dataset(data, claims.SEED_DATA))


def _single_rung(experiment: Experiment, outcomes: Sequence[Outcome]) -> dict[str, Any]:
    names = [c.name for c in experiment.study.runs]
    epochs = [experiment.schedule(n).epochs for n in names]
    return {"epochs": epochs, "configs": names, "kept": rank_by_validation(names, outcomes)}


def _schedule_fields(experiment: Experiment, configs: dict[str, dict]) -> None:
    """A sweep's configurations carry the schedule fields that vary between them."""
    schedules = {name: experiment.schedule(name) for name in configs}
    varying = [k for k in SCHEDULE_FIELDS if len({getattr(s, k) for s in schedules.values()}) > 1]
    for name, config in configs.items():
        config |= {k: getattr(schedules[name], k) for k in varying}


def _sweep_section(experiment: Experiment, summary: dict[str, Any], stacks: int,
                   rungs: list[dict], backend: str) -> dict[str, Any]:
    spec, study = experiment.sweep, experiment.study
    full = sum(experiment.schedule(c.name).epochs for c in study.runs) * len(study.seeds)
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
        "winner": summary["selection"]["winner"],
        "halving": halving if experiment.halving else None,
    }


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value
