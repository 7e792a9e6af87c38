"""The Python API: what a notebook user types, and what the command line's study, train, sweep,
evaluate, report and compare call.

    import mnistlab as ml
    results = ml.study(data="fashion-mnist", seeds=3, epochs=2)
    results.summary            # pandas DataFrame, one row per configuration
    results.model("lr1e-3-p0.2", seed=0)

`study`, `sweep` and `train` take the command line's options as keyword arguments (explicit ones
override the file's values; defaults live in mnistlab.config) and return `Results`; `load_run`
returns the same object for a finished run directory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab import stats
from mnistlab.config import (
    CONFIG_FIELDS,
    PRESETS,
    SCHEDULE_FIELDS,
    STUDY_KEYS,
    RunConfig,
    StudyConfig,
    read_toml,
    run_study_from_dict,
    seed_study,
    study_from_dict,
    to_dict,
    with_overrides,
)
from mnistlab.data import Source, load
from mnistlab.data.npz import arrays_source
from mnistlab.errors import ConfigError, MnistlabError
from mnistlab.evaluation import Predictions, evaluation, pool, predictions
from mnistlab.experiment import pipeline
from mnistlab.experiment.sweep import SweepSpec, name_of, sweep_from_dict
from mnistlab.experiment.trials import Experiment, from_sweep, recorded_values
from mnistlab.inference import ImagePrediction, predict_images
from mnistlab.model import Checkpoint
from mnistlab.modules import load_checkpoint
from mnistlab.progress import Progress
from mnistlab.results import Results
from mnistlab.runs import RunDir, claims
from mnistlab.scored import Scored
from mnistlab.suggest import did_you_mean
from mnistlab.validation import Seed, arguments

# A name, a path, or in-memory (images, labels[, class names]): digits unless named.
Data = str | Path | tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, Sequence[str]]


@arguments
def study(
    config: str | Path | StudyConfig | None = None,
    *,
    runs: Sequence[str | RunConfig] | None = None,
    data: Data | None = None,
    seeds: int | Sequence[int] | None = None,
    epochs: int | None = None,
    device: str | None = None,
    stack_size: int | None = None,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    progress: bool | Progress = True,
    report: bool = True,
) -> Results:
    """Run a study: the seed study's five configurations, or a study TOML's, × seeds.

    `data` is a dataset name (mnist, fashion-mnist), a path (IDX folder, CSV, NPZ) or in-memory
    arrays `(images, labels)`, or `(images, labels, class_names)` for classes other than the ten
    digits; `seeds` a count or a list. `runs` replaces the configurations: preset names and
    RunConfigs, among them `ml.Model("mine", factory, lr=1e-3)` for any network. With
    `resume=RUN_DIR` the run directory's own configuration is used, and any option given must
    agree with it.
    """
    name, source = _data(data)
    flags = _given(data=name, seeds=seeds, epochs=epochs, device=device, stack_size=stack_size,
                   runs=None if runs is None else [r if isinstance(r, str) else to_dict(r)
                                                   for r in runs])
    if resume is not None:
        return _resume(resume, flags, source, progress, report, config=config)
    if isinstance(config, StudyConfig):
        values = to_dict(config)
    else:
        values = read_toml(Path(config), "study") if config else to_dict(seed_study())
    where = str(config) if isinstance(config, str | Path) else "study"
    experiment = Experiment(study_from_dict(with_overrides(values, flags), where))
    return _run(experiment, out, source, progress, report)


@arguments
def sweep(
    grid: str | Path | SweepSpec | Mapping[str, Any] | None = None,
    *,
    random: int | None = None,
    seeds: int | Sequence[int] | None = None,
    stack_size: int | None = None,
    halving: bool | None = None,
    ray_address: str | None = None,
    data: Data | None = None,
    epochs: int | None = None,
    device: str | None = None,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    progress: bool | Progress = True,
    report: bool = True,
) -> Results:
    """Sweep a grid (or `random` samples of ranges) of configurations × seeds, in this process or
    on the Ray cluster at `ray_address`; `halving` runs successive halving.

    `grid` is a sweep TOML path, a SweepSpec or the TOML's values as a dict.
    """
    name, source = _data(data)
    flags = _given(samples=random, seeds=seeds, stack_size=stack_size, halving=halving,
                   data=name, epochs=epochs, device=device)
    if resume is not None:
        return _resume(resume, flags, source, progress, report, ray_address, grid)
    if grid is None:
        raise MnistlabError("sweep: pass a sweep TOML (--config SWEEP.toml) or --resume RUN_DIR")
    if isinstance(grid, SweepSpec):
        grid = _sweep_values(grid)
    values = read_toml(Path(grid), "sweep") if isinstance(grid, str | Path) else dict(grid)
    where = str(grid) if isinstance(grid, str | Path) else "sweep"
    experiment = from_sweep(sweep_from_dict(with_overrides(values, flags), where))
    return _run(experiment, out, source, progress, report, ray_address)


@arguments
def train(
    config: str | Path | RunConfig | None = None,
    *,
    preset: str | None = None,
    data: Data | None = None,
    seed: int | None = None,
    out: str | Path = "runs",
    resume: str | Path | None = None,
    progress: bool | Progress = True,
    report: bool = True,
    **options: Any,
) -> Results:
    """Train one configuration with one seed.

    `options` are RunConfig fields (name, lr, dropout, layernorm, hidden, ...), Schedule fields
    (epochs, batch_size, ...) and val_fraction, split_seed, device; they override `config` (a
    run TOML or a RunConfig) or `preset` (a preset's name, e.g. "tuned"). Without a name, the
    run is named by what it changes (`lr1e-3_p0.2_ln`).
    """
    if preset is not None:
        if config is not None:
            raise ConfigError("train: pass a config or a preset, not both")
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}{did_you_mean(preset, PRESETS)}; "
                              f"known: {', '.join(PRESETS)}")
        config = PRESETS[preset]
    name, source = _data(data)
    unknown = sorted(set(options) - set(CONFIG_FIELDS) - set(SCHEDULE_FIELDS) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"train: unknown option(s) {', '.join(unknown)}")
    flags = _given(data=name, seed=seed, **options)
    if resume is not None:
        return _resume(resume, flags, source, progress, report, config=config)
    if isinstance(config, RunConfig):
        values = to_dict(config)
    else:
        values = read_toml(Path(config), "run") if config else {}
    where = "train" if config is None or isinstance(config, RunConfig) else str(config)
    study = run_study_from_dict(with_overrides(values, flags), where)  # checked before named
    if "name" not in values and "name" not in flags and "runs" not in values:
        named = name_of({k: v for k, v in flags.items() if k in CONFIG_FIELDS})
        model = study.runs[0].model.rpartition(":")[2]  # a factory's function name
        flags["name"] = "_".join(n for n in (model if model != "mlp" else "", named) if n) \
            or "baseline"
        study = run_study_from_dict(with_overrides(values, flags), where)
    return _run(Experiment(study), out, source, progress, report)


@arguments
def load_run(path: str | Path) -> Results:
    """The results of a finished run directory (no data set or network needed)."""
    return Results(RunDir.existing(path))


def checkpoint_path(target: str | Path, run: str | None = None,
                    seed: int | None = None) -> Path:
    """The checkpoint file `target` names: itself, or for a run directory the model of
    configuration `run` (by default the winner) with `seed` (by default its shown seed:
    mnistlab.stats.shown_seed)."""
    target = Path(target)
    if not target.is_dir():
        if run is not None or seed is not None:
            raise MnistlabError(f"{target}: --run and --seed choose a model of a run directory; "
                                "pass the run directory, or the checkpoint alone")
        if not target.is_file():
            raise MnistlabError(f"{target}: no such file or run directory; pass a run "
                                "directory or a .safetensors checkpoint")
        return target
    run_dir = RunDir.existing(target)
    summary = run_dir.read_summary()
    name = run or stats.winner(summary)
    if name is None:
        raise MnistlabError(f"{target}: every model diverged, so there is no winner; pass --run "
                            "NAME --seed K to choose a model")
    seed = stats.shown_seed(summary, name) if seed is None else seed
    return run_dir.model_path(name, _finished_seeds(run_dir, summary, name, seed)[0])


@arguments
def load_model(path: str | Path) -> Checkpoint:
    """A checkpoint file's model (`.model`, a plain nn.Sequential) with its configuration, input
    normalisation, class names and seed."""
    return load_checkpoint(path)


@arguments
def evaluate(target: str | Path, *, data: Data | None = None, run: str | None = None,
             seed: Seed | None = None, plots: str | Path | None = None) -> Scored:
    """Test accuracy, per-class scores, confusion matrix and worst errors.

    `target` is a run directory or a checkpoint file. A run directory gives its winner (chosen
    on validation) over all its seeds — mean accuracy, each seed's, the confusion matrix summed
    — or the single model `run`/`seed` when asked, read from the stored test predictions (no
    data needed); with `data`, the checkpoints are scored on that source's test part instead. A
    checkpoint needs `data`. The confusion and misclassified plots go to `plots`, by default the
    run directory's plots/ or the checkpoint's folder.
    """
    target = Path(target)
    if target.is_dir():
        run_dir = RunDir.existing(target)
        summary = run_dir.read_summary()
        name = run or stats.winner(summary)
        seeds = _finished_seeds(run_dir, summary, name, seed)
        shown = seed if seed is not None else stats.shown_seed(summary, name)
        paths = {s: run_dir.model_path(name, s) for s in seeds}
        if data is None:
            answers = {s: Predictions.load(run_dir.predictions_path(name, s)) for s in seeds}
            where = (f"test part of {summary['data']} ({len(answers[shown].labels)} images, "
                     "stored predictions)")
            note = summary.get("split_note", "")
        else:
            answers, where, note = _answers(paths, data)
        stem = name if seed is None else f"{name}-seed{seed}"
        model = f"{stem} (seed{'s' * (len(seeds) > 1)} {', '.join(map(str, seeds))}: " \
                f"{run_dir.checkpoints})"
        folder = Path(plots or run_dir.plots)
    elif target.is_file():
        shown, stem, model, folder = 0, target.stem, str(target), Path(plots or target.parent)
        answers, where, note = _answers({0: target}, data)
    else:
        raise MnistlabError(f"{target}: no such file or run directory; pass a run directory or "
                            "a .safetensors checkpoint")
    ev = pool(answers, shown)
    per_seed = {s: evaluation(a).accuracy for s, a in answers.items()} if target.is_dir() else {}
    from mnistlab.report.plots import evaluation_plots  # matplotlib: only where it draws

    written = evaluation_plots(ev, answers[shown].classes, folder, stem)
    return Scored(model, where, note, ev, answers[shown].classes, per_seed, written)


def _finished_seeds(run_dir: RunDir, summary: Mapping[str, Any], name: str,
                    seed: int | None) -> list[int]:
    finished = stats.finished_seeds(summary, name)
    seeds = finished if seed is None else [s for s in finished if s == seed]
    if not seeds:
        raise MnistlabError(
            f"{run_dir.root}: no finished model {name}"
            f"{'' if seed is None else f' seed {seed}'}; its configurations are "
            f"{', '.join(c['run'] for c in summary['configs'])}, with seeds "
            f"{', '.join(map(str, summary['seeds']))}")
    return seeds


def _answers(paths: Mapping[int, Path],
             data: Data | None) -> tuple[dict[int, Predictions], str, str]:
    """Checkpoints' answers on a source's test part, or on its training part (said so in the
    note) when it has none; and what that part is."""
    if data is None:
        raise MnistlabError(f"{next(iter(paths.values()))}: a checkpoint alone has no data to "
                            "score; pass --data mnist|fashion-mnist|PATH (or a RUN_DIR instead)")
    name, source = _data(data)
    source = source or load(name, progress=False)
    part, note = source.test, ""
    if part is None or part.labels is None:
        part = source.train
        note = (f"{name} has no labelled test part: scored on its training part, which the "
                "model may have seen")
    models = {s: load_checkpoint(p) for s, p in paths.items()}
    answers = {s: predictions(ckpt, part) for s, ckpt in models.items()}
    theirs = tuple(next(iter(models.values())).inputs.classes)
    if tuple(part.classes) != theirs[: len(part.classes)]:
        shown = lambda names: ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")  # noqa: E731
        warning = (f"warning: the data name their classes {shown(part.classes)}, the model "
                   f"{shown(theirs)}: scored under the model's names; pass data of the classes "
                   "the model was trained on")
        note = f"{note}; {warning}" if note else warning
    return answers, f"{part.origin} ({len(part)} images)", note


@arguments
def predict(model: str | Path | Checkpoint, images: Any) -> list[ImagePrediction]:
    """Classes and top-3 probabilities for images, by a checkpoint (or a run directory's
    winner): file paths, folders (every image file in
    them, sorted), glob patterns (`"scans/*.png"`), PIL images, uint8 arrays of the model's input
    shape (already in MNIST form: light digit on black) or of any picture, or a list of them; an
    (N, H, W) array is N images. A file that cannot be read gets its error in its result; the
    others go on."""
    ckpt = model if isinstance(model, Checkpoint) else load_checkpoint(checkpoint_path(model))
    if isinstance(images, np.ndarray) and images.ndim == 3 and images.shape[2] not in (3, 4):
        images = list(images)
    elif not isinstance(images, list | tuple):
        images = [images]
    return predict_images(ckpt, images)


def compare(*run_dirs: str | Path) -> Any:
    """Configurations of several run directories side by side (a `Comparison`: `.table` and
    `.pairs` DataFrames, `.write(folder)` for its HTML page, shown inline in a notebook), with
    paired statistics wherever runs share their test images."""
    from mnistlab.report.compare import Comparison

    return Comparison(run_dirs)


@arguments
def render(run_dir: str | Path) -> Path:
    """Re-render a run directory's plots, TensorBoard files and report.html from its files."""
    from mnistlab.report import render

    with claims():
        return render(RunDir.existing(run_dir))


# --- running ---------------------------------------------------------------------------------

def _given(**options: Any) -> dict[str, Any]:
    """The options the caller gave (None means "not given"), as TOML values."""
    plain = lambda v: list(v) if isinstance(v, tuple) else v  # noqa: E731
    return {k: plain(v) for k, v in options.items() if v is not None}


def _data(data: Data | None) -> tuple[str | None, Source | None]:
    """(what study.toml records as the data, the in-memory source if arrays were given)."""
    if data is None or isinstance(data, str | Path):
        return (None if data is None else str(data)), None
    source = arrays_source(*data)
    return source.name, source


def _run(experiment: Experiment, out: str | Path, source: Source | None,
         progress: bool | Progress, report: bool, ray_address: str | None = None,
         resume: RunDir | None = None) -> Results:
    watch = progress if isinstance(progress, Progress) else Progress(quiet=not progress)
    executor = None
    if ray_address is not None:
        from mnistlab.experiment.ray import RayExecutor

        executor = RayExecutor(ray_address)
    _check_source(experiment.study, source)
    with claims():  # the run directory is this call's until it returns (RunDir.claim)
        run_dir = pipeline.run(experiment, watch, out=Path(out), resume=resume, source=source,
                               executor=executor)
        if report:
            from mnistlab.report import render

            render(run_dir)
    return Results(run_dir)


def _check_source(study: StudyConfig, source: Source | None) -> None:
    if source is None and study.data.startswith("in-memory arrays"):
        raise MnistlabError(f"{study.name}: trained on {study.data}; pass the same arrays "
                            "again as data=(images, labels)")


# --- resuming --------------------------------------------------------------------------------


def _resume(path: str | Path, flags: Mapping[str, Any], source: Source | None,
            progress: bool | Progress, report: bool, ray_address: str | None = None,
            config: Any = None) -> Results:
    """Finish an interrupted run directory with its own configuration; an option that would
    change it is a one-line error naming the option."""
    if config is not None:
        raise ConfigError(f"{path}: a resumed run keeps its own configuration; pass either a "
                          "configuration file or --resume, not both")
    run_dir = RunDir.existing(path)
    stored = Experiment.from_run_dir(run_dir)
    for key, value in flags.items():
        if Experiment.from_run_dir(run_dir, {key: value}) != stored:
            raise ConfigError(
                f"{run_dir.root}: resumed with {key} = {value!r}, but the run was made with "
                f"{_stored(recorded_values(run_dir), key)!r}; a resumed run keeps its "
                "configuration: drop the option, or start a new run without --resume"
            )
    return _run(stored, run_dir.root.parent, source, progress, report, ray_address, run_dir)


def _stored(values: Mapping[str, Any], key: str) -> Any:
    """What a run directory's file says for an option (for the error message)."""
    runs = values.get("runs") or [{}]
    for table in (values, values.get("schedule", {}), runs[0] if isinstance(runs[0], dict) else {}):
        if key in table:
            return table[key]
    if key == "seed":
        return values.get("seeds")
    return "its default"


def _sweep_values(spec: SweepSpec) -> dict[str, Any]:
    import tomllib

    from mnistlab.experiment.sweep import sweep_to_toml

    return tomllib.loads(sweep_to_toml(spec))

