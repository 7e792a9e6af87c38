"""Plots, TensorBoard files and report.html, rendered from a run directory alone.

Nothing here loads a data set or runs a model: the curves come from metrics.csv, the tables from
summary.json, the confusion matrix and the worst errors from the stored test predictions. So a
report re-renders anywhere, offline, with the data gone.

The figures are drawn as one batch of calls of mnistlab.report.plots: by the worker processes a
command started for them (mnistlab.report.workers), else in this process. This package imports
neither matplotlib nor PyTorch itself, so that a worker importing plots starts fast.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Hashable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mnistlab import stats
from mnistlab.atomic import atomic_write_text
from mnistlab.evaluation import Evaluation, Predictions, pool
from mnistlab.report.html import Figures, render_html

if TYPE_CHECKING:
    from mnistlab.experiment.trials import Experiment
    from mnistlab.report.workers import Call
    from mnistlab.runs import RunDir

TB_IMAGES = 20


class Pooled(NamedTuple):
    """A configuration over its finished seeds, as its confusion matrix shows it."""

    ev: Evaluation  # mean_pool's: mean counts per model, the shown seed's worst errors
    classes: tuple[str, ...]
    seeds: int
    shown: int  # the seed that stands for the configuration (stats.shown_seed)
    images: int  # test images each seed was scored on


def render(run: RunDir) -> Path:
    """Rewrite plots/, tb/ and report.html from the run directory's files; returns the report's
    path. The run directory is claimed first (RunDir.claim): no two processes write it."""
    from mnistlab.experiment.trials import Experiment
    from mnistlab.report.workers import draw

    run.claim()
    summary = run.read_summary()
    experiment = Experiment.from_run_dir(run)
    rows = run.read_metrics()
    notes, extra, sweep = [], [], []
    if "sweep" in summary:
        from mnistlab.report.sweep import sweep_section

        top_table, sweep = sweep_section(summary, run.plots)
        extra.append(top_table)
    pooled = _pooled(run, summary)
    drawn = draw(_calls(run, summary, rows, pooled))
    winner, per_class = _winner(summary, pooled, drawn)
    if not winner:
        notes.append("No finished model to show a confusion matrix for: every model diverged.")
    ranking = summary["selection"]["ranking"]
    figures = Figures(main=_main_figure(ranking, drawn),
                      comparison=_comparison_figures(drawn), sweep=sweep,
                      curves=[(name, drawn["curve", name, "loss"], drawn["curve", name, "accuracy"])
                              for name in ranking],
                      winner=winner, per_class=per_class)
    _tensorboard(run, summary, experiment, rows, pooled, drawn)
    page = render_html(summary, rows, figures, study=experiment.study, notes=notes, extra=extra,
                       env=_env(run), reproduce=_reproduce(run, summary))
    atomic_write_text(run.report_path, page)
    return run.report_path


def _calls(run: RunDir, summary: dict, rows: list[dict],
           pooled: dict[str, Pooled]) -> dict[Hashable, Call]:
    """Every figure, slowest first: the winner's confusion matrix and errors; with several
    configurations, their comparisons (one configuration is not compared with itself); the
    other configurations' confusion matrices, as PNG bytes for TensorBoard (the winner's is its
    file's); each configuration's training and validation curves."""
    ranking, per_epoch, folder = (summary["selection"]["ranking"], summary.get("steps_per_epoch"),
                                  run.plots)
    winner = stats.winner(summary)
    calls: dict[Hashable, Call] = {}
    if winner in pooled:
        p = pooled[winner]
        calls["winner",] = ("evaluation_plots", (p.ev, p.classes, folder, winner, p.seeds))
    if len(ranking) > 1:
        calls["compare", "accuracy"] = ("compare_curves",
                                        (rows, ranking, "accuracy", folder, per_epoch))
        calls["compare", "test"] = ("compare_test_accuracy",
                                    (summary["configs"], summary["runs"], ranking, folder))
        calls["compare", "loss"] = ("compare_curves", (rows, ranking, "loss", folder, per_epoch))
    for name, p in pooled.items():
        if name != winner:
            calls["tb", name] = ("confusion_png",
                                 (p.ev, p.classes, f"{name}: confusion matrix", p.seeds))
    by_run: dict[str, list[dict]] = {}
    for row in rows:
        by_run.setdefault(row["run"], []).append(row)
    for name in ranking:
        for metric in ("loss", "accuracy"):
            calls["curve", name, metric] = ("run_curves", (by_run.get(name, []), name, metric,
                                                           folder, per_epoch))
    return calls


def _main_figure(ranking: list[str], drawn: dict[Hashable, Any]) -> tuple[str, Path]:
    if len(ranking) == 1:  # its own curves: a comparison would compare it with itself
        return (f"{ranking[0]}: training and validation accuracy (mean over seeds, band = "
                "min–max)", drawn["curve", ranking[0], "accuracy"])
    return ("Validation accuracy of every configuration (mean over seeds, band = min–max)",
            drawn["compare", "accuracy"])


def _comparison_figures(drawn: dict[Hashable, Any]) -> list[tuple[str, Path]]:
    if ("compare", "test") not in drawn:
        return []
    return [("Test accuracy per configuration, 95% interval over seeds and test images",
             drawn["compare", "test"]),
            ("Validation loss of every configuration", drawn["compare", "loss"])]


def _tensorboard(run: RunDir, summary: dict, experiment: Experiment, rows: list[dict],
                 pooled: dict[str, Pooled], drawn: dict[Hashable, Any]) -> None:
    """Each configuration's confusion matrix (mean counts per model over its seeds) as an image
    beside its shown model's curves; the curves themselves only where training wrote none (a
    run directory from before live logging, or whose tb/ was deleted). Up to TB_IMAGES
    configurations, best first: a large sweep would spend minutes drawing matrices nobody
    opens. Each model's hparams carry its own schedule (a sweep's may differ from the base)."""
    from mnistlab.board import Board, has_curves, write_images

    if not has_curves(run.tensorboard):
        board = Board(run.tensorboard, experiment.scheduled())
        board.add_rows(rows)
        board.finish(summary["runs"])
    last = max((r["step"] for r in rows), default=0)
    for name, p in pooled.items():
        png = drawn["tb", name] if ("tb", name) in drawn else drawn["winner",][0].read_bytes()
        write_images(run.tensorboard, name, p.shown, {"confusion_matrix": png}, last)


def _env(run: RunDir) -> dict:
    return run.read_env()


def _reproduce(run: RunDir, summary: dict) -> str:
    """The command that runs the experiment again from the run directory's own file."""
    if run.sweep_path.is_file():
        return f"mnistlab sweep --config {shlex.quote(str(run.sweep_path))}"
    command = f"mnistlab study --config {shlex.quote(str(run.config_path))}"
    if str(summary.get("data", "")).startswith("in-memory arrays"):
        command += " (and the same arrays as data=, from Python)"
    return command


def _pooled(run: RunDir, summary: dict) -> dict[str, Pooled]:
    """The configurations whose confusion matrix is drawn, from their stored predictions: the
    winner and the best TB_IMAGES, where a seed of them finished."""
    pooled = {}
    best = summary["selection"]["ranking"][:TB_IMAGES]
    for name in dict.fromkeys([stats.winner(summary), *best]):
        seed = stats.shown_seed(summary, name)
        if name is None or seed is None:
            continue
        answers = _predictions(run, summary, name)
        pooled[name] = Pooled(mean_pool(answers, seed), answers[seed].classes, len(answers), seed,
                              len(answers[seed].labels))
    return pooled


def _winner(
    summary: dict, pooled: dict[str, Pooled], drawn: dict[Hashable, Any]
) -> tuple[list[tuple[str, Path]], list[tuple[str, float, float, float, int]]]:
    """The winner's confusion matrix as mean counts per model over its seeds (each seed scored
    the same test images once) and the most confident errors of its shown seed (its best
    validation accuracy); and its per-class scores."""
    name = stats.winner(summary)
    if name not in pooled:
        return [], []
    p, (confusion, grid) = pooled[name], drawn["winner",]
    per_class = list(zip(p.classes, p.ev.precision.tolist(), p.ev.recall.tolist(),
                         p.ev.f1.tolist(), [round(v) for v in p.ev.support.tolist()], strict=True))
    over = f"{p.images:,} test images × {p.seeds} seeds, mean count per model" if p.seeds > 1 \
        else f"{p.images:,} test images"
    return [(f"{name}: confusion matrix on the test set ({over})", confusion),
            (f"{name} (seed {p.shown}): most confident test errors", grid)], per_class


def mean_pool(by_seed: dict[int, Predictions], shown: int) -> Evaluation:
    """A configuration over its seeds as one model's figures: mean accuracy and loss, the
    confusion matrix as mean counts per model (so its rows sum to the test set's class sizes,
    not seeds × them), and the worst errors of the `shown` seed."""
    ev = pool(by_seed, shown)
    return dataclasses.replace(ev, confusion=ev.confusion / len(by_seed))


def _predictions(run: RunDir, summary: dict, name: str) -> dict[int, Predictions]:
    """The stored test predictions of each finished seed of a configuration."""
    return {seed: Predictions.load(run.predictions_path(name, seed))
            for seed in stats.finished_seeds(summary, name)}
