"""A sweep file: a base configuration, `[grid]` lists and `[random]` ranges over any RunConfig or
Schedule field, and the configurations it names.

Every mistake in the file is one ConfigError naming the file and key. A configuration is named by
the values that vary (`lr3e-4_p0.2_ln`), so names read as what they are and stay unique.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from mnistlab.config import (
    PRESETS,
    SCHEDULE_FIELDS,
    RunConfig,
    Schedule,
    read_toml,
    seed_list,
    to_dict,
    with_overrides,
)
from mnistlab.errors import ConfigError

RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "name")
DEFAULTS = {**to_dict(RunConfig()), **to_dict(Schedule())}
RANGES = ("log_uniform", "uniform")

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
}


@dataclass(frozen=True)
class SweepSpec:
    """A sweep file's content. `samples` > 0 draws that many random configurations instead of
    the grid; `stack_size` 0 means "from free memory" (the run directory records the size used,
    so a resumed sweep cuts the same stacks)."""

    name: str = "sweep"
    data: str = "mnist"
    seeds: tuple[int, ...] = (0, 1, 2)
    val_fraction: float = 0.2
    split_seed: int = 0
    device: str = "auto"
    samples: int = 0
    sample_seed: int = 0
    halving: bool = False
    stack_size: int = 0
    base: RunConfig = field(default_factory=lambda: RunConfig(name="base"))
    schedule: Schedule = field(default_factory=Schedule)
    grid: Mapping[str, tuple] = field(default_factory=dict)
    random: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


# --- the sweep file -------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep TOML; every mistake is one ConfigError naming the file and key.

    `overrides` are the command line's (flags override files): top-level keys and schedule
    fields; they are validated with the file, as if written in it.
    """
    path = Path(path)
    return sweep_from_dict(with_overrides(read_toml(path, "sweep"), overrides or {}), str(path))


def sweep_from_dict(values: Mapping[str, Any], where: str = "sweep") -> SweepSpec:
    values = dict(values)
    known = [f.name for f in dataclasses.fields(SweepSpec)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    base = values.get("base", {})
    if isinstance(base, str):
        if base not in PRESETS:
            raise ConfigError(
                f"{where}: base = '{base}' is no preset; use one of {', '.join(PRESETS)}"
            )
        base = {k: v for k, v in to_dict(PRESETS[base]).items() if k != "name"}
    values["base"] = _fields(
        base, RUN_FIELDS, where, "base", lambda kw: RunConfig(name="base", **kw)
    )
    values["schedule"] = _fields(
        values.get("schedule", {}), SCHEDULE_FIELDS, where, "schedule", lambda kw: Schedule(**kw)
    )
    values["grid"] = _grid(values.get("grid", {}), where)
    values["random"] = _random(values.get("random", {}), where)
    both = sorted(set(values["grid"]) & set(values["random"]))
    if both:
        raise ConfigError(
            f"{where}: {', '.join(both)} in both [grid] and [random]; keep each in one"
        )
    values["seeds"] = seed_list(values.get("seeds", SweepSpec.seeds), where)
    for key in ("samples", "sample_seed", "split_seed", "stack_size"):
        if not isinstance(values.get(key, 0), int) or values.get(key, 0) < 0:
            raise ConfigError(f"{where}: {key} must be a non-negative integer, got {values[key]!r}")
    spec = SweepSpec(**values)
    expand(spec, where)  # fails here, at the file, rather than after the data have loaded
    return spec


def _fields(values: Any, allowed: Sequence[str], where: str, section: str, build: Callable) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: [{section}] must be a table of field = value")
    for key in values:
        if key not in allowed:
            raise ConfigError(
                f"{where}: [{section}] {key}: unknown field; known: {', '.join(allowed)}"
            )
    try:
        return build({k: _value(v, k, where, section) for k, v in values.items()})
    except ConfigError as exc:
        raise ConfigError(f"{where}: [{section}] {exc}") from None


def _value(value: Any, key: str, where: str, section: str) -> Any:
    """`value` in the type of the field's default (lists → tuples); else a one-line error."""
    default = DEFAULTS[key]
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok, value = number, float(value) if number else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, int | float) for v in value)
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ConfigError(
            f"{where}: [{section}] {key} = {value!r}: expected a value like {default!r}"
        )
    return value


def _grid(grid: Any, where: str) -> dict[str, tuple]:
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}: [grid] must be a table of field = [values]")
    out = {}
    for key, values in grid.items():
        _known(key, where, "grid")
        if not isinstance(values, list) or not values:
            raise ConfigError(
                f"{where}: [grid] {key}: expected a non-empty list, e.g. {key} = "
                f"[{DEFAULTS[key]!r}]"
            )
        out[key] = tuple(_value(v, key, where, "grid") for v in values)
    return out


def _random(ranges: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(ranges, dict):
        raise ConfigError(f"{where}: [random] must be a table of field = {{uniform = [lo, hi]}}")
    out = {}
    for key, dist in ranges.items():
        _known(key, where, "random")
        fix = "use {log_uniform = [lo, hi]}, {uniform = [lo, hi]} or {choice = [...]}"
        if (
            not isinstance(dist, dict)
            or len(dist) != 1
            or next(iter(dist)) not in (*RANGES, "choice")
        ):
            raise ConfigError(f"{where}: [random] {key} = {dist!r}: {fix}")
        ((kind, arg),) = dist.items()
        if kind == "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: [random] {key}: choice needs a non-empty list")
            out[key] = {kind: tuple(_value(v, key, where, "random") for v in arg)}
            continue
        if not isinstance(DEFAULTS[key], float):
            raise ConfigError(
                f"{where}: [random] {key}: {kind} is for real-valued fields; use choice"
            )
        ok = (
            isinstance(arg, list)
            and len(arg) == 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in arg)
        )
        if not ok or not arg[0] < arg[1] or (kind == "log_uniform" and arg[0] <= 0):
            low = "0 < lo < hi" if kind == "log_uniform" else "lo < hi"
            raise ConfigError(
                f"{where}: [random] {key}: {kind} needs [lo, hi] with {low}, got {arg!r}"
            )
        out[key] = {kind: (float(arg[0]), float(arg[1]))}
    return out


def _known(key: str, where: str, section: str) -> None:
    if key not in NAME_PARTS:
        raise ConfigError(
            f"{where}: [{section}] {key}: unknown field; known: {', '.join(NAME_PARTS)}"
        )


def sweep_to_toml(spec: SweepSpec) -> str:
    """The sweep file that re-runs `spec` (with `mnistlab sweep --grid FILE`)."""
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
    run = {k: v for k, v in point.items() if k in RUN_FIELDS}
    schedule = {k: v for k, v in point.items() if k in SCHEDULE_FIELDS}
    try:
        return (
            dataclasses.replace(spec.base, name=name, **run),
            dataclasses.replace(spec.schedule, **schedule),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}; fix the [grid]/[random] values") from None


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


