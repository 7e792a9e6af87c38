"""Plain configuration values: one model (RunConfig), the training schedule, a whole study.

Everything here round-trips through TOML exactly, so a run directory's `study.toml` re-runs the
study that wrote it.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from mnistlab.errors import ConfigError

ACTIVATIONS = ("relu", "gelu", "tanh")
INPUT_NORMS = ("scale", "standardize")


@dataclass(frozen=True)
class RunConfig:
    """One MLP and its optimiser. Defaults are the seed study's baseline shape.

    `dropout_after` lists the hidden layers (1-based) whose activation is followed by Dropout;
    with `layernorm` the dropout sits before that layer's LayerNorm, as in the seed study.
    `input_norm`: "scale" maps pixels to [0, 1]; "standardize" also subtracts the training
    mean and divides by the training std (both recorded in the checkpoint).
    """

    name: str = "baseline"
    lr: float = 0.01
    dropout: float = 0.0
    layernorm: bool = False
    hidden: tuple[int, ...] = (150, 150)
    activation: str = "relu"
    dropout_after: tuple[int, ...] = (2,)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    input_norm: str = "scale"

    def __post_init__(self) -> None:
        def fail(what: str) -> None:
            raise ConfigError(f"run '{self.name}': {what}")

        if not self.name or any(c in self.name for c in "/\\ ,"):
            fail("name must be non-empty without spaces, commas or slashes")
        if not self.lr > 0:
            fail(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.hidden or any(int(h) < 1 for h in self.hidden):
            fail(f"hidden sizes must be positive integers, got {list(self.hidden)}")
        if self.activation not in ACTIVATIONS:
            fail(f"activation must be one of {', '.join(ACTIVATIONS)}, got '{self.activation}'")
        if any(not 1 <= i <= len(self.hidden) for i in self.dropout_after):
            fail(f"dropout_after must name hidden layers 1..{len(self.hidden)}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            fail(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if not self.eps > 0 or self.weight_decay < 0:
            fail("eps must be > 0 and weight_decay >= 0")
        if self.input_norm not in INPUT_NORMS:
            fail(f"input_norm must be one of {', '.join(INPUT_NORMS)}, got '{self.input_norm}'")

    @property
    def architecture(self) -> tuple:
        """What must match for two configurations to share one engine stack.

        Learning rate, Adam settings, dropout p and LayerNorm on/off may differ within a stack
        (LayerNorm is selected per model), so the whole seed study is one stack.
        """
        return (self.hidden, self.activation, self.dropout_after, self.input_norm)


@dataclass(frozen=True)
class Schedule:
    """How long and how often. The last partial batch of an epoch is used unless `drop_last`."""

    batch_size: int = 128
    epochs: int = 10
    record_every: int = 75
    log_every: int = 250
    drop_last: bool = False

    def __post_init__(self) -> None:
        for name in ("batch_size", "epochs", "record_every", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"schedule.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StudyConfig:
    """A list of configurations, each trained with every seed, on one data split.

    `stack_size`: models per engine stack; 0 sizes stacks from free memory, and the run
    directory records the size used, so a resumed run cuts the same stacks.
    """

    name: str = "study"
    data: str = "mnist"
    runs: tuple[RunConfig, ...] = ()
    seeds: tuple[int, ...] = (0, 1, 2)
    schedule: Schedule = field(default_factory=Schedule)
    val_fraction: float = 0.2
    split_seed: int = 0
    device: str = "auto"
    stack_size: int = 0

    def __post_init__(self) -> None:
        if not self.runs:
            raise ConfigError(f"study '{self.name}': needs at least one run")
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise ConfigError(f"study '{self.name}': run names must be unique, got {names}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"study '{self.name}': seeds must be distinct, got {self.seeds}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.stack_size < 0:
            raise ConfigError(f"stack_size must be >= 0 (0: from memory), got {self.stack_size}")


def _lr_dropout(name: str, lr: float, dropout: float) -> RunConfig:
    return RunConfig(name=name, lr=lr, dropout=dropout, layernorm=True)


PRESETS: dict[str, RunConfig] = {
    "baseline": RunConfig(name="baseline", lr=0.01),
    "layernorm-dropout": _lr_dropout("layernorm-dropout", 0.01, 0.5),
    "lr1e-3-p0.2": _lr_dropout("lr1e-3-p0.2", 0.001, 0.2),
    "lr5e-4-p0.4": _lr_dropout("lr5e-4-p0.4", 0.0005, 0.4),
    "lr1e-4-p0.6": _lr_dropout("lr1e-4-p0.6", 0.0001, 0.6),
}


def seed_study(**overrides: Any) -> StudyConfig:
    """The seed study: the five presets, batch 128, 10 epochs, 80/20 split, 3 seeds."""
    return StudyConfig(**{"name": "seed-study", "runs": tuple(PRESETS.values()), **overrides})


# --- TOML -----------------------------------------------------------------------------------


def _tupled(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    clean = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**clean)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def run_config_from_dict(values: dict[str, Any], where: str = "run") -> RunConfig:
    return _tupled(RunConfig, values, where)


SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(Schedule))


def with_overrides(values: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A TOML file's values with the command line's on top (flags override files).

    Schedule fields (epochs, batch_size, ...) go into the `[schedule]` table; the rest are
    top-level keys. The result is validated as if the file held it.
    """
    values = dict(values)
    for key, value in overrides.items():
        schedule = values.get("schedule", {})
        if key in SCHEDULE_FIELDS and isinstance(schedule, dict):
            values["schedule"] = {**schedule, key: value}
        else:
            values[key] = value
    return values


def seed_list(seeds: Any, where: str) -> tuple[int, ...]:
    """`seeds` as a count (3 → 0, 1, 2) or a list of distinct integers."""
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(seeds))
    if (
        not isinstance(seeds, list | tuple)
        or not seeds
        or len(set(seeds)) != len(seeds)
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ConfigError(
            f"{where}: seeds must be a count or a list of distinct integers, got {seeds!r}"
        )
    return tuple(seeds)


def study_from_dict(values: Mapping[str, Any], where: str = "study") -> StudyConfig:
    values = dict(values)
    runs = values.pop("runs", [])
    schedule = _tupled(Schedule, values.pop("schedule", {}), f"{where} [schedule]")
    runs = tuple(
        PRESETS[r]
        if isinstance(r, str) and r in PRESETS
        else run_config_from_dict(r, f"{where} run")
        for r in runs
    )
    if "seeds" in values:
        values["seeds"] = seed_list(values["seeds"], where)
    return _tupled(StudyConfig, {**values, "runs": runs, "schedule": schedule}, where)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def to_dict(config: RunConfig | Schedule | StudyConfig) -> dict[str, Any]:
    """Plain nested dict/list/scalar form (for TOML, JSON, checkpoint metadata)."""
    return _plain(config)


def study_to_toml(study: StudyConfig) -> str:
    return tomli_w.dumps(to_dict(study))


def read_toml(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file's values; missing or malformed is a one-line ConfigError naming the file."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such file; pass an existing {kind} TOML") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from None


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Read a study TOML, with `overrides` on top; a mistake is a one-line ConfigError."""
    path = Path(path)
    values = with_overrides(read_toml(path, "study"), overrides or {})
    return study_from_dict(values, where=str(path))


STUDY_KEYS = ("data", "val_fraction", "split_seed", "device", "stack_size")


def run_study_from_dict(values: Mapping[str, Any], where: str = "run") -> StudyConfig:
    """A one-run study from a run's values: RunConfig fields, `[schedule]`, `seed` and the
    study's data/split/device keys. Values holding `runs` are read as a whole study instead."""
    if "runs" in values:
        return study_from_dict(values, where)
    values = dict(values)
    schedule = _tupled(Schedule, values.pop("schedule", {}), f"{where} [schedule]")
    study = {k: values.pop(k) for k in STUDY_KEYS if k in values}
    seeds = seed_list([values.pop("seed", 0)], where)
    run = run_config_from_dict(values, where)
    values = {"name": run.name, "runs": (run,), "seeds": seeds, "schedule": schedule, **study}
    return _tupled(StudyConfig, values, where)
