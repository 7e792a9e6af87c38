"""An experiment: trials (configuration × seed, each with its schedule) on one data split.

A study is an experiment built from presets or a study TOML; a sweep is one built from a grid or
random spec (`experiment.sweep`); successive halving is a policy that runs rungs of its trials
(`experiment.halving`). The pipeline runs any of them the same way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mnistlab.config import RunConfig, Schedule, StudyConfig
from mnistlab.experiment.sweep import SweepSpec, expand


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

    @property
    def kind(self) -> str:
        return "sweep" if self.sweep is not None else "study"

    @property
    def halving(self) -> bool:
        return self.sweep is not None and self.sweep.halving

    def schedule(self, name: str) -> Schedule:
        return self.schedules.get(name, self.study.schedule)

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
