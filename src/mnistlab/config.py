"""Plain configuration values: one model (RunConfig), the training schedule, a whole study.

Everything here round-trips through TOML exactly, so a run directory's `study.toml` re-runs the
study that wrote it. Every value is checked strictly on the way in (mnistlab.validation): the
string in a field's annotation is its rule, and a mistake is one line naming file, place, rule.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import tomli_w
from annotated_types import Ge, Gt, Le, Lt, MinLen
from pydantic import AfterValidator, BeforeValidator, with_config
from pydantic_core import PydanticCustomError
from typing_extensions import TypedDict

from mnistlab.errors import ConfigError, DataError
from mnistlab.inputs import open_input
from mnistlab.validation import (
    FORBID_EXTRA,
    Count,
    Int,
    Name,
    NonNegative,
    Number,
    Real,
    Seed,
    SeedValue,
    Switch,
    Text,
    Unit,
    hints,
    typed_table,
    validate,
    validated,
)

MAX_MODELS = 10_000  # configurations × seeds in one experiment: a bound on what a file may ask


Activation = Literal["relu", "gelu", "tanh"]
InputNorm = Literal["scale", "standardize"]
LrSchedule = Literal["constant", "cosine", "onecycle"]
ACTIVATIONS, INPUT_NORMS = get_args(Activation), get_args(InputNorm)
LR_SCHEDULES = get_args(LrSchedule)
# Models mnistlab builds itself; any other is a factory's import path (mnistlab.engine).
BUILT_IN_MODELS = ("mlp", "lenet5")
MLP_FIELDS = ("hidden", "activation", "dropout_after", "layernorm", "dropout")


def _model_name(value: str) -> str:
    """A built-in model's name, or a `module:function` path (imported only when it trains or
    loads, so a run directory's files read without the user's code)."""
    module, colon, function = value.partition(":")
    dotted = lambda text: all(part.isidentifier() for part in text.split("."))  # noqa: E731
    if value in BUILT_IN_MODELS or (colon and dotted(module) and dotted(function)):
        return value
    raise PydanticCustomError("model", "no model name or import path")


@validated
class RunConfig:
    """One MLP, its optimiser and its training recipe. Defaults are the seed study's baseline.

    `dropout_after` lists the hidden layers (1-based) whose activation is followed by Dropout;
    with `layernorm` the dropout sits before that layer's LayerNorm, as in the seed study.
    `input_norm`: "scale" maps pixels to [0, 1]; "standardize" also subtracts the training
    mean and divides by the training std (both recorded in the checkpoint).

    The recipe (every default leaves training as it was; engine.schedules, .augment, .stopping):
    - `lr_schedule`: "constant"; "cosine", decay to 0 as torch's CosineAnnealingLR; "onecycle",
      torch's OneCycleLR with max_lr = `lr` and its other defaults (div_factor 25,
      final_div_factor 1e4, cosine annealing, beta1 cycled 0.95 → 0.85 → 0.95 in place of
      `betas[0]`). `warmup` is the fraction of the run's steps spent rising: a linear warmup
      before the constant or cosine rate, OneCycleLR's `pct_start` (its default is 0.3).
    - `weight_decay` is L2 added to the gradient (torch.optim.Adam's); `decoupled_decay` is
      decoupled decay of the weights (torch.optim.AdamW's `weight_decay`). Both may be set:
      the L2 term goes through Adam's moments, the decoupled one does not.
    - `label_smoothing`: torch.nn.CrossEntropyLoss's; the recorded losses stay the plain
      cross-entropy, so curves of any smoothing compare.
    - Augmentation of each training image: a shift of up to `translate` pixels (integers, each
      axis), a rotation of up to `rotate` degrees and a zoom by a factor in [1 - `zoom`,
      1 + `zoom`] about the centre, drawn per image from a stream keyed by the seed.
    - `restore_best`: the model keeps its weights of its best validation record (highest
      accuracy, the earliest of ties), as Keras's restore_best_weights; `patience` > 0 stops
      training a model after that many records without a better validation accuracy.

    `model`: "mlp" (the network above, trained by mnistlab.engine), or any other network,
    trained by the general engine: "lenet5", or a factory's import path "package.module:function"
    whose call returns a fresh torch.nn.Module. Such a model's layers are its own, so the MLP's
    fields (MLP_FIELDS) must keep their defaults; the optimiser and the recipe apply to it.
    """

    name: Name = "baseline"
    lr: Annotated[Real, Gt(0), "must be > 0 and finite"] = 0.01
    dropout: Annotated[Unit, "must be in [0, 1)"] = 0.0
    layernorm: Switch = False
    hidden: Annotated[
        tuple[Count, ...], MinLen(1), "sizes must be a list of one or more positive integers",
    ] = (150, 150)
    activation: Annotated[Activation, f"must be one of {', '.join(ACTIVATIONS)}"] = "relu"
    dropout_after: Annotated[
        tuple[Count, ...], "must list hidden layers by number (1-based)"] = (2,)
    betas: Annotated[tuple[Unit, Unit], "must be two numbers in [0, 1)"] = (0.9, 0.999)
    eps: Annotated[Real, Gt(0), "must be > 0 and finite"] = 1e-8
    weight_decay: Annotated[Real, Ge(0), "must be >= 0 and finite"] = 0.0
    input_norm: Annotated[InputNorm, f"must be one of {', '.join(INPUT_NORMS)}"] = "scale"
    lr_schedule: Annotated[LrSchedule, f"must be one of {', '.join(LR_SCHEDULES)}"] = "constant"
    warmup: Annotated[Unit, "must be in [0, 1) (a fraction of the training steps)"] = 0.0
    decoupled_decay: Annotated[Real, Ge(0), "must be >= 0 and finite"] = 0.0
    label_smoothing: Annotated[Unit, "must be in [0, 1)"] = 0.0
    translate: Annotated[NonNegative, "must be an integer >= 0 (pixels)"] = 0
    rotate: Annotated[Real, Ge(0), Le(180), "must be in [0, 180] (degrees)"] = 0.0
    zoom: Annotated[Unit, "must be in [0, 1)"] = 0.0
    restore_best: Switch = False
    patience: Annotated[NonNegative, "must be an integer >= 0 (records; 0: never stop)"] = 0
    model: Annotated[
        Text, AfterValidator(_model_name),
        f"must be {' or '.join(BUILT_IN_MODELS)} or a factory's import path 'module:function'",
    ] = "mlp"

    def __post_init__(self) -> None:
        if self.model != "mlp":
            mlp = RunConfig()
            changed = [k for k in MLP_FIELDS if getattr(self, k) != getattr(mlp, k)]
            if changed:
                raise ValueError(
                    f"run '{self.name}': {', '.join(changed)} shape the MLP only, and this run's "
                    f"model is {self.model}; drop them (its layers, dropout included, are the "
                    "model's own)")
        if any(i > len(self.hidden) for i in self.dropout_after):
            raise ValueError(f"run '{self.name}': dropout_after must name hidden layers "
                             f"1..{len(self.hidden)}, got {list(self.dropout_after)}")

    @property
    def architecture(self) -> tuple:
        """What must match for two configurations to share one engine stack.

        Learning rate, Adam settings, dropout p, LayerNorm on/off and the whole recipe may
        differ within a stack (LayerNorm is selected per model), so the whole seed study is one
        stack. Any other model shares a stack with copies of itself only.
        """
        if self.model != "mlp":
            return (self.model, self.input_norm)
        return ("mlp", self.hidden, self.activation, self.dropout_after, self.input_norm)


# The training recipe's fields: each changes how a model trains, never its shape.
RECIPE = ("lr_schedule", "warmup", "decoupled_decay", "label_smoothing", "translate", "rotate",
          "zoom", "restore_best", "patience")
StepCount = Annotated[Count, "must be an integer >= 1"]


@validated
class Schedule:
    """How long and how often. The last partial batch of an epoch is used unless `drop_last`."""

    batch_size: StepCount = 128
    epochs: StepCount = 10
    record_every: StepCount = 75
    log_every: StepCount = 250
    drop_last: Switch = False


def _seed_count(value: Any) -> Any:
    """A count n of seeds stands for the seeds 0..n-1."""
    if isinstance(value, int) and not isinstance(value, bool):
        if not 1 <= value <= MAX_MODELS:
            raise PydanticCustomError("seeds", "no usable count")
        return tuple(range(value))
    return value


def _distinct(seeds: tuple[int, ...]) -> tuple[int, ...]:
    if not seeds or len(set(seeds)) != len(seeds):
        raise PydanticCustomError("seeds", "not distinct")
    return seeds


Seeds = Annotated[
    tuple[SeedValue, ...], BeforeValidator(_seed_count), AfterValidator(_distinct),
    f"must be a count or a list of distinct integers >= 0 (a count is 1..{MAX_MODELS})",
]


# Fields a study shares with a sweep file.
DataName = Annotated[Text, MinLen(1), "must be a dataset name or a path"]
ScheduleTable = Annotated[Schedule, "must be a table of schedule fields"]
ValFraction = Annotated[Real, Gt(0), Lt(1), "must be in (0, 1)"]
Device = Annotated[Text, MinLen(1), "must be auto, cpu, cuda or mps (or cuda:1, ...)"]
StackSize = Annotated[NonNegative, "must be an integer >= 0 (0: from free memory)"]


def preset(value: Any) -> Any:
    """A preset's name stands for its configuration; anything else is left to validation."""
    if not isinstance(value, str):
        return value
    if value not in PRESETS:
        from mnistlab.suggest import did_you_mean

        raise ValueError(f"unknown preset {value!r}{did_you_mean(value, PRESETS)}; known: "
                         f"{', '.join(PRESETS)}")
    return PRESETS[value]


@validated
class StudyConfig:
    """A list of configurations, each trained with every seed, on one data split.

    `stack_size`: models per engine stack; 0 sizes stacks from free memory, and the run
    directory records the size used, so a resumed run cuts the same stacks.
    """

    name: Name = "study"
    data: DataName = "mnist"
    runs: Annotated[
        tuple[Annotated[RunConfig, BeforeValidator(preset)], ...],
        "must be a list of preset names or tables of run fields",
    ] = ()
    seeds: Seeds = (0, 1, 2)
    schedule: ScheduleTable = field(default_factory=Schedule)
    val_fraction: ValFraction = 0.2
    split_seed: Seed = 0
    device: Device = "auto"
    stack_size: StackSize = 0

    def __post_init__(self) -> None:
        names = [r.name for r in self.runs]
        if not names:
            raise ValueError(f"study '{self.name}': needs at least one configuration in runs")
        if len(set(names)) != len(names):
            raise ValueError(f"study '{self.name}': run names must be unique, got {names}")
        check_size(len(self.runs), len(self.seeds))


def check_size(configurations: int, seeds: int) -> None:
    """Refuse an experiment of more than MAX_MODELS models (ValueError: a validation error)."""
    if configurations * seeds > MAX_MODELS:
        raise ValueError(f"{configurations} configurations × {seeds} seeds are more than the "
                         f"{MAX_MODELS} models mnistlab trains in one run; ask for fewer")


@with_config(FORBID_EXTRA)
class MetricRow(TypedDict):
    """One record of one model: a metrics.csv row. NaN loss/accuracy mark a diverged model."""

    run: Text
    seed: Int
    step: NonNegative
    epoch: Number
    split: Literal["train", "val"]
    loss: Number
    accuracy: Number


def _lr_dropout(name: str, lr: float, dropout: float) -> RunConfig:
    return RunConfig(name=name, lr=lr, dropout=dropout, layernorm=True)


PRESETS: dict[str, RunConfig] = {
    "baseline": RunConfig(name="baseline", lr=0.01),
    "layernorm-dropout": _lr_dropout("layernorm-dropout", 0.01, 0.5),
    "lr1e-3-p0.2": _lr_dropout("lr1e-3-p0.2", 0.001, 0.2),
    "lr5e-4-p0.4": _lr_dropout("lr5e-4-p0.4", 0.0005, 0.4),
    "lr1e-4-p0.6": _lr_dropout("lr1e-4-p0.6", 0.0001, 0.6),
    # The seed study's network and schedule with the recipe a two-stage search chose on
    # validation accuracy (Fashion-MNIST, 2 seeds): 81 random recipes under successive halving
    # (sweeps/recipe.toml), then a grid around the winner (sweeps/recipe-refine.toml). RESULTS.md
    # has its 5-seed test figures and what each of its techniques is worth.
    "tuned": RunConfig(name="tuned", lr=0.003, dropout=0.2, layernorm=True,
                       input_norm="standardize", lr_schedule="onecycle", warmup=0.05,
                       decoupled_decay=0.05, label_smoothing=0.1),
    # LeNet-5 with ReLU and max-pooling (mnistlab.modules.lenet5 says how it differs from the
    # 1998 paper's). Its recipe won a 1-epoch comparison on MNIST's validation split (seed 0:
    # 97.9 % against 95.8 % for a constant lr 1e-3, 96.6 % for a cosine decay from 3e-3).
    "lenet5": RunConfig(name="lenet5", model="lenet5", lr=0.003, lr_schedule="onecycle",
                        warmup=0.2, input_norm="standardize"),
}


SEED_STUDY = ("baseline", "layernorm-dropout", "lr1e-3-p0.2", "lr5e-4-p0.4", "lr1e-4-p0.6")


def seed_study(**overrides: Any) -> StudyConfig:
    """The seed study: its five presets, batch 128, 10 epochs, 80/20 split, 3 seeds."""
    runs = tuple(PRESETS[name] for name in SEED_STUDY)
    return StudyConfig(**{"name": "seed-study", "runs": runs, **overrides})


# --- TOML -----------------------------------------------------------------------------------


# The field lists the API, the CLI's checks and sweeps use, read off the classes themselves.
CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig))
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


def study_from_dict(values: Any, where: str = "study") -> StudyConfig:
    """A study from a study TOML's values (runs may name presets; seeds may be a count)."""
    return validate(StudyConfig, values, where)


def _plain(value: Any) -> Any:
    if isinstance(value, RunConfig) and value.model == "mlp":
        # An MLP's files (study.toml, checkpoints, resume fingerprints) and its dropout stream
        # (stack.dropout_seed) stay as they were before `model` existed.
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.name != "model"}
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict/list/scalar form (for TOML, JSON, checkpoint metadata)."""
    return _plain(config)


def study_to_toml(study: StudyConfig) -> str:
    return tomli_w.dumps(to_dict(study))


def read_toml(path: Path, kind: str) -> dict[str, Any]:
    """A TOML file's values; missing or malformed is a one-line ConfigError naming the file."""
    try:
        with open_input(path, f"a {kind} TOML file") as f:  # a FIFO: refused, never waited on
            return tomllib.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such file; pass an existing {kind} TOML") from None
    except DataError as exc:  # a folder, FIFO or device (open_input)
        raise ConfigError(str(exc)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror}); check its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML (nested too deeply); fix the file") from None


def load_study(path: str | Path, overrides: Mapping[str, Any] | None = None) -> StudyConfig:
    """Read a study TOML, with `overrides` on top; a mistake is a one-line ConfigError."""
    path = Path(path)
    values = with_overrides(read_toml(path, "study"), overrides or {})
    return study_from_dict(values, where=str(path))


STUDY_KEYS = ("data", "val_fraction", "split_seed", "device", "stack_size")
RunFile = typed_table("RunFile", {
    **hints(RunConfig), **{k: hints(StudyConfig)[k] for k in STUDY_KEYS},
    "seed": Seed, "schedule": ScheduleTable,
})


def run_study_from_dict(values: Any, where: str = "run") -> StudyConfig:
    """A one-run study from a run's values: RunConfig fields, `[schedule]`, `seed` and the
    study's data/split/device keys. Values holding `runs` are read as a whole study instead."""
    if isinstance(values, Mapping) and "runs" in values:
        return study_from_dict(values, where)
    run = dict(validate(RunFile, values, where))
    study = {k: run.pop(k) for k in (*STUDY_KEYS, "schedule") if k in run}
    seed = run.pop("seed", 0)
    config = validate(RunConfig, run, where)
    values = {"name": config.name, "runs": (config,), "seeds": (seed,), **study}
    return validate(StudyConfig, values, where)
