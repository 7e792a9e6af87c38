"""Sweeps: a grid (or seeded random samples) of configurations × seeds, one run directory.

A sweep file holds a base configuration, `[grid]` lists and `[random]` ranges over any RunConfig
or Schedule field. The configurations are cut into engine stacks (same architecture and schedule,
sized to free memory), trained here or on a Ray cluster (`mnistlab.scaleout`), and summarised
like a study. With successive halving, every configuration trains a short rung, the best third
by validation accuracy goes on to a longer one, and so on up to the full schedule.

Survivors of a rung are retrained from scratch for the next one rather than continued: the
engine is deterministic, so a survivor's final numbers are exactly those of a direct run (the
halving winner is comparable number for number with a full grid), and every stack stays an
independent pure task that any Ray worker can run without shipping optimizer state. The price is
the survivors' earlier epochs, trained twice: with three rungs 1, 3, 9 and a third kept, 3 model-
epochs per configuration instead of 2.3 when continuing, against 9 for the full grid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from mnistlab import engine
from mnistlab.config import (
    PRESETS,
    RunConfig,
    Schedule,
    StudyConfig,
    read_toml,
    study_to_toml,
    to_dict,
)
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member
from mnistlab.errors import ConfigError, MnistlabError
from mnistlab.progress import StudyProgress
from mnistlab.runs import RunDir, atomic_write_json, atomic_write_text, environment
from mnistlab.study import StackOutcome, latest, load_splits, summarize, train_stacks

SWEEP_FILE = "sweep.toml"
ETA = 3  # successive halving keeps the best 1/ETA at each rung; rungs are ETA times longer
RUN_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig) if f.name != "name")
SCHEDULE_FIELDS = tuple(f.name for f in dataclasses.fields(Schedule))
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


@dataclass(frozen=True)
class Trial:
    """One configuration of the sweep and the schedule it trains with."""

    config: RunConfig
    schedule: Schedule


@dataclass(frozen=True)
class Stack:
    """Members the engine trains at once; `key` names its done file (`stack-<key>.json`)."""

    key: str
    members: tuple[Member, ...]
    schedule: Schedule


# --- the sweep file -------------------------------------------------------------------------


def load_sweep(path: str | Path, overrides: Mapping[str, Any] | None = None) -> SweepSpec:
    """Read and validate a sweep TOML; every mistake is one ConfigError naming the file and key.

    `overrides` are the command line's: top-level keys, and `epochs` for the schedule; they are
    validated with the file, as if written in it.
    """
    path = Path(path)
    values = read_toml(path, "sweep")
    for key, value in (overrides or {}).items():
        schedule = values.get("schedule", {})
        if key == "epochs" and isinstance(schedule, dict):
            values["schedule"] = {**schedule, "epochs": value}
        else:
            values[key] = value
    return sweep_from_dict(values, str(path))


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
    seeds = values.get("seeds", SweepSpec.seeds)
    values["seeds"] = tuple(range(seeds)) if isinstance(seeds, int) else tuple(seeds)
    if (
        not values["seeds"]
        or len(set(values["seeds"])) != len(values["seeds"])
        or not all(isinstance(s, int) for s in values["seeds"])
    ):
        raise ConfigError(
            f"{where}: seeds must be a count or a list of distinct integers, got {seeds!r}"
        )
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


def expand(spec: SweepSpec, where: str = "sweep") -> list[Trial]:
    """The sweep's configurations, each named by the values that vary (`lr3e-4_p0.2_ln`)."""
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
    trials = [_trial(spec, p, varying, tiny, where) for p in points]
    names = [t.config.name for t in trials]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: two configurations share a name ({names}); make values differ")
    return trials


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


def _trial(
    spec: SweepSpec, point: Mapping[str, Any], varying: Sequence[str], tiny: set[str], where: str
) -> Trial:
    name = "_".join(_name_part(k, point[k], k in tiny) for k in varying) or spec.name
    run = {k: v for k, v in point.items() if k in RUN_FIELDS}
    schedule = {k: v for k, v in point.items() if k in SCHEDULE_FIELDS}
    try:
        return Trial(
            dataclasses.replace(spec.base, name=name, **run),
            dataclasses.replace(spec.schedule, **schedule),
        )
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}; fix the [grid]/[random] values") from None


def _name_part(key: str, value: Any, scientific: bool) -> str:
    part = NAME_PARTS[key]
    if isinstance(part, tuple):
        return part[0] if value else part[1]
    if isinstance(value, tuple):
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


# --- stacks ---------------------------------------------------------------------------------


def member_bytes(config: RunConfig, schedule: Schedule, splits: Splits) -> int:
    """A generous estimate of one stack member's memory while training.

    fp32 weights, gradients and two Adam moments, plus the activations of a batch (pre- and
    post-activation, dropout mask, norm output and their gradients: ~8 copies of the hidden
    widths) and of a validation chunk.
    """
    widths = [
        int(np.prod(splits.train.images.shape[1:])),
        *config.hidden,
        len(splits.train.classes),
    ]
    params = sum((a + 1) * b for a, b in itertools.pairwise(widths)) + 2 * sum(config.hidden)
    rows = max(schedule.batch_size, min(len(splits.val), engine.EVAL_CHUNK))
    return 4 * (4 * params + 8 * rows * sum(widths[1:]))


def free_bytes(device: str) -> int:
    """Memory available for training now: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_stack_size(trials: Sequence[Trial], splits: Splits, device: str, seeds: int) -> int:
    """Members per stack so that half the free memory, less the data on the device, holds them.

    Capped at the largest group (one architecture and schedule), which is all a stack can hold.
    """
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    budget = free_bytes(device) // 2 - data
    need = max(member_bytes(t.config, t.schedule, splits) for t in trials)
    groups: dict[tuple, int] = {}
    for t in trials:
        key = (t.config.architecture, t.schedule)
        groups[key] = groups.get(key, 0) + seeds
    return max(1, min(budget // need, max(groups.values())))


def plan(trials: Sequence[Trial], seeds: Sequence[int], size: int, prefix: str = "") -> list[Stack]:
    """Every (configuration, seed) as a member; one architecture and schedule per stack, at most
    `size` members each, in sweep order."""
    groups: dict[tuple, list[Member]] = {}
    for t in trials:
        members = groups.setdefault((t.config.architecture, t.schedule), [])
        members.extend(Member(t.config, seed) for seed in seeds)
    stacks = []
    for (_, schedule), members in groups.items():
        for start in range(0, len(members), size):
            key = f"{prefix}{len(stacks)}"
            stacks.append(Stack(key, tuple(members[start : start + size]), schedule))
    return stacks


# --- successive halving ---------------------------------------------------------------------


def rung_count(epochs: int) -> int:
    """How many rungs fit: epochs, epochs/3, epochs/9, ... while at least one epoch."""
    return 1 + int(math.log(epochs, ETA) + 1e-9) if epochs >= 1 else 1


def rung_schedule(schedule: Schedule, rung: int, rungs: int) -> Schedule:
    """The schedule cut to rung `rung` of `rungs` (the last rung is the full schedule)."""
    epochs = max(1, round(schedule.epochs / ETA ** (rungs - 1 - rung)))
    return dataclasses.replace(schedule, epochs=epochs)


def rank(trials: Sequence[Trial], outcomes: Sequence[StackOutcome]) -> list[Trial]:
    """`trials` best first by final validation accuracy, mean over seeds, in `outcomes`.

    Ties keep sweep order; a configuration whose seeds all diverged ranks last.
    """
    val: dict[str, list[float]] = {}
    for outcome in outcomes:
        for run in outcome.runs:
            val.setdefault(run["run"], []).append(run["final_val_accuracy"])
    score = {name: float(np.mean(v)) for name, v in val.items()}
    score = {k: v if math.isfinite(v) else -math.inf for k, v in score.items()}
    return sorted(trials, key=lambda t: -score[t.config.name])


# --- running --------------------------------------------------------------------------------

Executor = Callable[[Sequence[Stack], Callable[[list[StackOutcome]], None]], list[StackOutcome]]


def run_sweep(
    spec: SweepSpec | None,
    *,
    out: Path = Path("runs"),
    resume: Path | None = None,
    ray_address: str | None = None,
    display: StudyProgress | None = None,
    render: bool = True,
) -> tuple[RunDir, dict]:
    """Run (or resume) a sweep here or on a Ray cluster; returns its run directory and summary.

    `spec` is None on resume: the run directory's own sweep.toml is used and finished stacks are
    skipped.
    """
    display = display or StudyProgress(live=False)
    run_dir = None
    if resume is not None:
        run_dir = RunDir.existing(resume)
        spec = load_sweep(run_dir.root / SWEEP_FILE)
    elif spec is None:
        raise MnistlabError("sweep: pass --grid SWEEP.toml (or --resume RUN_DIR)")
    trials = expand(spec)
    study = _as_study(spec, trials)
    splits = load_splits(study)
    # On Ray the workers pick the device; this machine need not have it.
    device = spec.device if ray_address else str(engine.resolve_device(spec.device))
    backend = f"ray ({ray_address})" if ray_address else "in-process"
    with _cluster(ray_address):
        if run_dir is None:
            size = spec.stack_size or _stack_size(spec, trials, splits, ray_address, device)
            spec = dataclasses.replace(spec, stack_size=size)
            run_dir = _new_run_dir(spec, study, out)
        display.note(f"run directory: {run_dir.root}")
        if splits.note:
            display.note(splits.note)
        display.note(
            f"{len(trials)} configurations × {len(spec.seeds)} seeds, stacks of up to "
            f"{spec.stack_size}" + (", successive halving" if spec.halving else "")
        )
        seed_info = {"seeds": list(spec.seeds), "backend": backend}
        atomic_write_json(run_dir.env_path, environment(seed_info, device))
        execute = _executor(run_dir, splits, spec, ray_address, resume is not None, display)
        outcomes, rungs = _train(
            spec, trials, execute, lambda done: run_dir.write_metrics(latest(done)[0])
        )
    run_dir.write_metrics(latest(outcomes)[0])
    summary = _summary(spec, study, trials, splits, outcomes, rungs, backend)
    run_dir.write_summary(summary)
    if render:
        from mnistlab.report import render as render_report

        render_report(run_dir)
    return run_dir, summary


def _new_run_dir(spec: SweepSpec, study: StudyConfig, out: Path) -> RunDir:
    """sweep.toml re-runs the sweep; study.toml lists its configurations for the report."""
    run_dir = RunDir.create(out, spec.name)
    atomic_write_text(run_dir.root / SWEEP_FILE, sweep_to_toml(spec))
    atomic_write_text(run_dir.config_path, study_to_toml(study))
    return run_dir


def _cluster(address: str | None) -> contextlib.AbstractContextManager:
    """One Ray connection for the whole sweep (sizing and every rung), or nothing in-process."""
    if address is None:
        return contextlib.nullcontext()
    from mnistlab.scaleout import connected

    return connected(address)


def _as_study(spec: SweepSpec, trials: Sequence[Trial]) -> StudyConfig:
    """The sweep as a study of its configurations (base schedule), for study.toml and the report."""
    return StudyConfig(
        name=spec.name,
        data=spec.data,
        runs=tuple(t.config for t in trials),
        seeds=spec.seeds,
        schedule=spec.schedule,
        val_fraction=spec.val_fraction,
        split_seed=spec.split_seed,
        device=spec.device,
    )


def _stack_size(
    spec: SweepSpec, trials: Sequence[Trial], splits: Splits, address: str | None, device: str
) -> int:
    """From free memory here (the host's when on Ray); on Ray also enough stacks for every slot."""
    size = auto_stack_size(trials, splits, "cpu" if address else device, len(spec.seeds))
    if address is None:
        return size
    from mnistlab.scaleout import parallel_slots

    # On a cluster, enough stacks to keep every slot busy beats the biggest stack that fits.
    members = len(trials) * len(spec.seeds)
    return max(1, min(size, math.ceil(members / parallel_slots(address, spec.device))))


def _executor(
    run_dir: RunDir,
    splits: Splits,
    spec: SweepSpec,
    address: str | None,
    resume: bool,
    display: StudyProgress,
) -> Executor:
    def local(stacks: Sequence[Stack], on_done: Callable) -> list[StackOutcome]:
        work = [(s.key, s.members, s.schedule) for s in stacks]
        return train_stacks(
            run_dir, splits, work, spec.device, resume=resume, display=display, on_done=on_done
        )

    def ray(stacks: Sequence[Stack], on_done: Callable) -> list[StackOutcome]:
        from mnistlab.scaleout import run_stacks

        return run_stacks(
            address,
            run_dir,
            splits,
            stacks,
            spec.device,
            resume=resume,
            display=display,
            on_done=on_done,
        )

    return local if address is None else ray


def _train(
    spec: SweepSpec,
    trials: Sequence[Trial],
    execute: Executor,
    on_done: Callable[[list[StackOutcome]], None],
) -> tuple[list[StackOutcome], list[dict]]:
    """Every rung in turn (one rung without halving); returns all outcomes and the rung log.

    At each rung but the last, the best 1/ETA of the configurations (at least one) go on; the last
    rung's `kept` lists all its configurations ranked, so its first is the sweep's winner.
    """
    rungs = rung_count(min(t.schedule.epochs for t in trials)) if spec.halving else 1
    alive, outcomes, log = list(trials), [], []
    for rung in range(rungs):
        cut = [
            dataclasses.replace(t, schedule=rung_schedule(t.schedule, rung, rungs)) for t in alive
        ]
        prefix = f"r{rung}-" if spec.halving else ""
        done = execute(
            plan(cut, spec.seeds, spec.stack_size, prefix),
            lambda new, before=list(outcomes): on_done(before + new),
        )
        outcomes += done
        ranked = rank(alive, done)
        kept = ranked[: max(1, math.ceil(len(alive) / ETA))] if rung < rungs - 1 else ranked
        log.append(
            {
                "epochs": [t.schedule.epochs for t in cut],
                "configs": [t.config.name for t in alive],
                "kept": [t.config.name for t in kept],
            }
        )
        alive = kept
    return outcomes, log


def _summary(
    spec: SweepSpec,
    study: StudyConfig,
    trials: Sequence[Trial],
    splits: Splits,
    outcomes: Sequence[StackOutcome],
    rungs: list[dict],
    backend: str,
) -> dict:
    """A study's summary plus each configuration's schedule and the sweep's own figures."""
    summary = summarize(study, splits, outcomes)
    reached = {
        name: (i, e)
        for i, rung in enumerate(rungs)
        for name, e in zip(rung["configs"], rung["epochs"], strict=True)
    }
    varying = [k for k in SCHEDULE_FIELDS if len({getattr(t.schedule, k) for t in trials}) > 1]
    schedules = {t.config.name: t.schedule for t in trials}
    for entry in summary["configs"]:
        entry["config"] |= {k: getattr(schedules[entry["run"]], k) for k in varying}
        entry["rung"], entry["epochs"] = reached[entry["run"]]
    full = sum(t.schedule.epochs for t in trials) * len(spec.seeds)
    used = sum(sum(r["epochs"]) for r in rungs) * len(spec.seeds)
    summary["sweep"] = {
        "axes": {k: _plain(v) for k, v in spec.grid.items()}
        | {k: dict(v) for k, v in spec.random.items()},
        "samples": spec.samples,
        "backend": backend,
        "stack_size": spec.stack_size,
        "stacks": len(outcomes),
        "winner": rungs[-1]["kept"][0],
        "halving": {
            "eta": ETA,
            "rungs": rungs,
            "model_epochs": used,
            "full_grid_model_epochs": full,
            "saved": 1 - used / full,
        }
        if spec.halving
        else None,
    }
    return summary


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, tuple | list) else value


def sweep_command(
    grid: Path | None,
    *,
    random: int | None = None,
    seeds: int | None = None,
    stack_size: int | None = None,
    halving: bool = False,
    ray_address: str | None = None,
    data: str | None = None,
    epochs: int | None = None,
    device: str | None = None,
    out: Path = Path("runs"),
    resume: Path | None = None,
    verbose: bool = False,
) -> str:
    """`mnistlab sweep`: the sweep file with the command line's changes; returns what to print."""
    from mnistlab.report.sweep import top_text

    options = {
        "samples": random,
        "seeds": seeds,
        "stack_size": stack_size,
        "data": data,
        "device": device,
        "epochs": epochs,
        "halving": halving or None,
    }
    overrides = {k: v for k, v in options.items() if v is not None}
    spec = None if resume is not None or grid is None else load_sweep(grid, overrides)
    run_dir, summary = run_sweep(
        spec,
        out=out,
        resume=resume,
        ray_address=ray_address,
        display=StudyProgress(verbose=verbose),
    )
    return f"{top_text(summary)}\nresults: {run_dir.root}  report: {run_dir.report_path}"
