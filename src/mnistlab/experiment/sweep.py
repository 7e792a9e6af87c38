"""A sweep file: a base configuration, `[grid]` lists and `[random]` ranges over any RunConfig or
Schedule field, and the configurations it names.

The file is validated like a study file (mnistlab.config): every grid or random value as strictly
as the field it sets, every mistake one ConfigError naming the file and key. A configuration is
named by the values that vary (`lr3e-4_p0.2_ln`), so names read as what they are and stay unique.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import tomli_w
from annotated_types import Gt, MinLen
from pydantic import AfterValidator, BeforeValidator
from pydantic_core import PydanticCustomError

from mnistlab.config import (
    CONFIG_FIELDS,
    SCHEDULE_FIELDS,
    DataName,
    Device,
    RunConfig,
    Schedule,
    ScheduleTable,
    Seeds,
    StackSize,
    ValFraction,
    check_size,
    preset,
    read_toml,
    to_dict,
    with_overrides,
)
from mnistlab.errors import ConfigError
from mnistlab.validation import (
    Name,
    NonNegative,
    Real,
    Seed,
    Switch,
    hints,
    typed_table,
    validate,
    validated,
)

DEFAULTS = {**to_dict(RunConfig()), **to_dict(Schedule())}

# How each field shows in a configuration's name, in name order: prefix, or (if true, if false).
NAME_PARTS: dict[str, str | tuple[str, str]] = {
    "lr": "lr",
    "dropout": "p",
    "hidden": "h",
    "layernorm": ("ln", "noln"),
    "activation": "",
    "dropout_after": "da",
    "weight_decay": "wd",
    "betas": "b",
    "eps": "eps",
    "input_norm": "",
    "batch_size": "bs",
    "epochs": "e",
    "record_every": "rec",
    "log_every": "log",
    "drop_last": ("dl", "nodl"),
    "lr_schedule": "",
    "warmup": "wu",
    "decoupled_decay": "dwd",
    "label_smoothing": "ls",
    "translate": "tr",
    "rotate": "rot",
    "zoom": "zm",
    "restore_best": ("best", "last"),
    "patience": "pat",
}
FIELD_TYPES = {key: {**hints(RunConfig), **hints(Schedule)}[key] for key in NAME_PARTS}
VALUES = "must be a non-empty list of values"


def _base(value: Any) -> Any:
    """The base configuration: a preset's name or a table of RunConfig fields without a name
    (each configuration is named by the values it varies)."""
    if isinstance(value, str):
        return dataclasses.replace(preset(value), name="base")
    if isinstance(value, dict):
        if "name" in value:
            raise ValueError("name is not set here: each configuration is named by the values "
                             "it varies; remove it")
        return {**value, "name": "base"}
    return value


def _increasing(bounds: tuple[float, float]) -> tuple[float, float]:
    if not bounds[0] < bounds[1]:
        raise PydanticCustomError("bounds", "not increasing")
    return bounds


def _one_kind(value: Any) -> Any:
    """A range is one table of one kind: {log_uniform = [lo, hi]}, {uniform = ...}, {choice}."""
    if not isinstance(value, dict) or len(value) != 1:
        raise ValueError("a range is one table: {log_uniform = [lo, hi]}, {uniform = [lo, hi]} "
                         "or {choice = [...]}")
    return value


def _distribution(key: str) -> Any:
    """The ranges field `key` may be drawn from: a choice of its values, and for real-valued
    fields a uniform or log-uniform interval."""
    kinds = {"choice": Annotated[tuple[FIELD_TYPES[key], ...], MinLen(1), VALUES]}
    if isinstance(DEFAULTS[key], float):
        kinds["uniform"] = Annotated[tuple[Real, Real], AfterValidator(_increasing),
                                     "must be [lo, hi] with lo < hi"]
        kinds["log_uniform"] = Annotated[tuple[Annotated[Real, Gt(0)], Real],
                                         AfterValidator(_increasing),
                                         "must be [lo, hi] with 0 < lo < hi"]
    return Annotated[typed_table(f"{key}_range", kinds), BeforeValidator(_one_kind)]


Grid = typed_table("Grid", {key: Annotated[tuple[kind, ...], MinLen(1), VALUES]
                            for key, kind in FIELD_TYPES.items()})
Random = typed_table("Random", {key: _distribution(key) for key in FIELD_TYPES})


@validated
class SweepSpec:
    """A sweep file's content. `samples` > 0 draws that many random configurations instead of
    the grid; `stack_size` 0 means "from free memory" (the run directory records the size used,
    so a resumed sweep cuts the same stacks)."""

    name: Name = "sweep"
    data: DataName = "mnist"
    seeds: Seeds = (0, 1, 2)
    val_fraction: ValFraction = 0.2
    split_seed: Seed = 0
    device: Device = "auto"
    samples: Annotated[NonNegative, "must be an integer >= 0 (0: the grid)"] = 0
    sample_seed: Seed = 0
    halving: Switch = False
    stack_size: StackSize = 0
    base: Annotated[RunConfig, BeforeValidator(_base),
                    "must be a preset name or a table of run fields"] = field(
        default_factory=lambda: RunConfig(name="base"))
    schedule: ScheduleTable = field(default_factory=Schedule)
    grid: Annotated[Grid, "must be a table of field = [values]"] = field(default_factory=dict)
    random: Annotated[Random, "must be a table of field = {uniform = [lo, hi]}"] = field(
        default_factory=dict)

    def __post_init__(self) -> None:
        both = sorted(set(self.grid) & set(self.random))
        if both:
            raise ValueError(f"{', '.join(both)} in both [grid] and [random]; keep each in one")
        count = self.samples or math.prod(len(values) for values in self.grid.values())
        check_size(count, len(self.seeds))


# --- the sweep file -------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep TOML; every mistake is one ConfigError naming the file and key.

    `overrides` are the command line's (flags override files): top-level keys and schedule
    fields; they are validated with the file, as if written in it.
    """
    path = Path(path)
    return sweep_from_dict(with_overrides(read_toml(path, "sweep"), overrides or {}), str(path))


def sweep_from_dict(values: Any, where: str = "sweep") -> SweepSpec:
    spec = validate(SweepSpec, values, where)
    expand(spec, where)  # fails here, at the file, rather than after the data have loaded
    return spec


def sweep_to_toml(spec: SweepSpec) -> str:
    """The sweep file that re-runs `spec` (with `mnistlab sweep --config FILE`)."""
    values = {f.name: getattr(spec, f.name) for f in dataclasses.fields(SweepSpec)}
    values["base"] = {k: v for k, v in to_dict(spec.base).items() if k != "name"}
    values["schedule"] = to_dict(spec.schedule)
    plain = lambda v: [plain(x) for x in v] if isinstance(v, tuple | list) else v  # noqa: E731
    values["grid"] = {k: plain(v) for k, v in spec.grid.items()}
    values["random"] = {
        k: {kind: plain(a) for kind, a in d.items()} for k, d in spec.random.items()
    }
    values["seeds"] = list(spec.seeds)
    return tomli_w.dumps(values)


# --- configurations -------------------------------------------------------------------------


def expand(
    spec: SweepSpec, where: str = "sweep"
) -> tuple[tuple[RunConfig, ...], dict[str, Schedule]]:
    """The sweep's configurations, each named by the values that vary (`lr3e-4_p0.2_ln`), and
    the schedule each trains with."""
    if spec.samples:
        if not spec.grid and not spec.random:
            raise ConfigError(f"{where}: --random needs [random] ranges or [grid] lists to sample")
        rng = np.random.default_rng(spec.sample_seed)
        points = [_sample(spec, rng) for _ in range(spec.samples)]
    elif spec.grid:
        points = [
            dict(zip(spec.grid, combo, strict=True))
            for combo in itertools.product(*spec.grid.values())
        ]
    elif spec.random:
        raise ConfigError(f"{where}: [random] ranges need --random N (samples = N) to draw from")
    else:
        points = [{}]
    points = list({tuple(sorted(p.items())): p for p in points}.values())  # drop repeated draws
    varying = [k for k in NAME_PARTS if len({p.get(k) for p in points}) > 1]
    tiny = {k for k in varying if any(_tiny(p[k]) for p in points)}
    named = [_configuration(spec, p, varying, tiny, where) for p in points]
    names = [config.name for config, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two configurations share a name ({names}); make values differ")
    return tuple(c for c, _ in named), {c.name: schedule for c, schedule in named}


def _sample(spec: SweepSpec, rng: np.random.Generator) -> dict[str, Any]:
    """One random configuration: grid lists act as choices; reals keep 3 significant digits."""
    point = {key: values[rng.integers(len(values))] for key, values in spec.grid.items()}
    for key, dist in spec.random.items():
        ((kind, arg),) = dist.items()
        if kind == "choice":
            point[key] = arg[rng.integers(len(arg))]
        else:
            low, high = (math.log(a) for a in arg) if kind == "log_uniform" else arg
            x = rng.uniform(low, high)
            point[key] = float(f"{math.exp(x) if kind == 'log_uniform' else x:.3g}")
    return point


def _configuration(
    spec: SweepSpec, point: Mapping[str, Any], varying: Sequence[str], tiny: set[str], where: str
) -> tuple[RunConfig, Schedule]:
    name = "_".join(_name_part(k, point[k], k in tiny) for k in varying) or spec.name
    run = {k: v for k, v in point.items() if k in CONFIG_FIELDS}
    schedule = {k: v for k, v in point.items() if k in SCHEDULE_FIELDS}
    config = validate(RunConfig, {**to_dict(spec.base), **run, "name": name}, where)
    return config, dataclasses.replace(spec.schedule, **schedule)


def name_of(changes: Mapping[str, Any]) -> str:
    """A configuration's name from the fields it sets, in sweep naming (`lr1e-3_p0.2_ln`)."""
    return "_".join(_name_part(k, changes[k], _tiny(changes[k])) for k in NAME_PARTS
                    if k in changes)


def _name_part(key: str, value: Any, scientific: bool) -> str:
    part = NAME_PARTS[key]
    if isinstance(part, tuple):
        return part[0] if value else part[1]
    if isinstance(value, tuple | list):
        return part + "x".join(_num(v, scientific) for v in value)
    return part + (_num(value, scientific) if isinstance(value, int | float) else str(value))


def _tiny(value: Any) -> bool:
    """A value best written 3e-4: all of a field's values then are (lr1e-2, lr3e-4)."""
    return isinstance(value, float) and 0 < abs(value) < 0.01


def _num(value: float, scientific: bool) -> str:
    """Short and exact: 150, 0.2, or with `scientific` 3e-4, 1.5e-3, 1e-2."""
    if value == 0 or (value == int(value) and not scientific):
        return str(int(value))
    if not scientific:
        return f"{value:.6g}"
    exponent = math.floor(math.log10(abs(value)))
    return f"{value / 10**exponent:.6g}e{exponent}"


