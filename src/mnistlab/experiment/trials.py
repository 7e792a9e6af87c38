"""An experiment: trials (configuration × seed, each with its schedule) on one data split.

A study is an experiment built from presets or a study TOML; a sweep is one built from a grid or
random spec (`experiment.sweep`); successive halving is a policy that runs rungs of its trials
(`experiment.halving`). The pipeline runs any of them the same way, and
`Experiment.from_run_dir` rebuilds any of them from the run directory it wrote.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnistlab.config import (
    CONFIG_FIELDS,
    RunConfig,
    Schedule,
    StudyConfig,
    read_toml,
    study_from_dict,
    with_overrides,
)
from mnistlab.experiment.sweep import SweepSpec, expand, sweep_from_dict
from mnistlab.runs import RunDir


@dataclass(frozen=True)
class Trial:
    """One model to train: a configuration, the schedule it trains with, and a seed."""

    config: RunConfig
    schedule: Schedule
    seed: int


@dataclass(frozen=True)
class Experiment:
    """`study` holds the configurations, seeds, base schedule, data, split and device (it is what
    study.toml records); `schedules` the configurations whose schedule differs from the base (a
    sweep over batch size, say); `sweep` the sweep file that made it, if one did."""

    study: StudyConfig
    schedules: Mapping[str, Schedule] = field(default_factory=dict)
    sweep: SweepSpec | None = None

    @classmethod
    def from_run_dir(cls, run_dir: RunDir,
                     options: Mapping[str, Any] | None = None) -> Experiment:
        """The experiment a run directory records, rebuilt from its own files: a sweep's from
        its sweep.toml (so each configuration keeps its own schedule), any other's from its
        study.toml. `options` (keyword arguments of ml.study/train/sweep, as a resume checks
        them) are set on the stored values first. Every rebuild of a run from disk (resuming,
        re-rendering the report and its TensorBoard hparams, comparing runs) goes through here.
        """
        values = recorded_values(run_dir)
        for key, value in (options or {}).items():
            values = _with_option(values, key, value)
        where = str(run_dir.root)
        if run_dir.sweep_path.is_file():
            return from_sweep(sweep_from_dict(values, where))
        return cls(study_from_dict(values, where))

    @property
    def kind(self) -> str:
        return "sweep" if self.sweep is not None else "study"

    @property
    def halving(self) -> bool:
        return self.sweep is not None and self.sweep.halving

    def schedule(self, name: str) -> Schedule:
        return self.schedules.get(name, self.study.schedule)

    def scheduled(self) -> dict[str, tuple[RunConfig, Schedule]]:
        """Each configuration by name, with the schedule it trains with (TensorBoard's hparams)."""
        return {c.name: (c, self.schedule(c.name)) for c in self.study.runs}

    def trials(self, names: Sequence[str] | None = None) -> list[Trial]:
        """Every (configuration, seed), configuration-major: in study order, or only the
        configurations `names` in that order."""
        configs = {c.name: c for c in self.study.runs}
        return [
            Trial(configs[name], self.schedule(name), seed)
            for name in (configs if names is None else names)
            for seed in self.study.seeds
        ]

    def with_stack_size(self, size: int) -> Experiment:
        """The same experiment with its stack size fixed (what the run directory records)."""
        study = dataclasses.replace(self.study, stack_size=size)
        sweep = self.sweep and dataclasses.replace(self.sweep, stack_size=size)
        return dataclasses.replace(self, study=study, sweep=sweep)


def from_sweep(spec: SweepSpec) -> Experiment:
    """A sweep's configurations × seeds as an experiment; its study.toml lists them."""
    configs, schedules = expand(spec)
    study = StudyConfig(
        name=spec.name,
        data=spec.data,
        runs=configs,
        seeds=spec.seeds,
        schedule=spec.schedule,
        val_fraction=spec.val_fraction,
        split_seed=spec.split_seed,
        device=spec.device,
        stack_size=spec.stack_size,
    )
    differ = {name: s for name, s in schedules.items() if s != spec.schedule}
    return Experiment(study, differ, spec)


def recorded_values(run_dir: RunDir) -> dict[str, Any]:
    """The values of the file a run directory re-runs from: its sweep.toml where a sweep made
    it, else its study.toml."""
    if run_dir.sweep_path.is_file():
        return read_toml(run_dir.sweep_path, "sweep")
    return read_toml(run_dir.config_path, "study")


def _with_option(values: Mapping[str, Any], key: str, value: Any) -> dict[str, Any]:
    """`values` with one option set: a configuration's field goes into a one-configuration
    study's configuration, `seed` is its seeds, anything else as a flag over a file."""
    runs = values.get("runs")
    if key in CONFIG_FIELDS and isinstance(runs, list) and len(runs) == 1:
        return {**values, "runs": [{**runs[0], key: value}]}
    if key == "seed":
        return {**values, "seeds": [value]}
    return with_overrides(values, {key: value})
