"""Plots, TensorBoard files and report.html, rendered from a run directory alone.

Nothing here loads a data set or runs a model: the curves come from metrics.csv, the tables from
summary.json, the confusion matrix and the worst errors from the stored test predictions. So a
report re-renders anywhere, offline, with the data gone.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path

from mnistlab import stats
from mnistlab.atomic import atomic_write_text
from mnistlab.board import Board, has_curves, write_images
from mnistlab.config import StudyConfig, load_study
from mnistlab.evaluation import Evaluation, Predictions, pool
from mnistlab.report import plots
from mnistlab.report.html import Figures, render_html
from mnistlab.report.sweep import sweep_section
from mnistlab.runs import RunDir

TB_IMAGES = 20


def render(run: RunDir) -> Path:
    """Rewrite plots/, tb/ and report.html from the run directory's files; returns the report's
    path. The run directory is claimed first (RunDir.claim): no two processes write it."""
    run.claim()
    summary = run.read_summary()
    study = load_study(run.config_path)
    rows = run.read_metrics()
    notes, extra, sweep = [], [], []
    if "sweep" in summary:
        top_table, sweep = sweep_section(summary, run.plots)
        extra.append(top_table)
    winner, per_class = _evaluation_figures(run, summary)
    if not winner:
        notes.append("No finished model to show a confusion matrix for: every run diverged.")
    figures = Figures(main=_main_figure(run, summary, rows),
                      comparison=_comparison_figures(run, summary, rows), sweep=sweep,
                      curves=_curves(run, summary, rows), winner=winner, per_class=per_class)
    _tensorboard(run, summary, study, rows)
    page = render_html(summary, rows, figures, study=study, notes=notes, extra=extra,
                       env=_env(run), reproduce=_reproduce(run, summary))
    atomic_write_text(run.report_path, page)
    return run.report_path


def _main_figure(run: RunDir, summary: dict, rows: list[dict]) -> tuple[str, Path]:
    names = summary["selection"]["ranking"]
    path = plots.compare_curves(rows, names, "accuracy", run.plots, summary.get("steps_per_epoch"))
    return "Validation accuracy of every configuration (mean over seeds, band = min–max)", path


def _comparison_figures(run: RunDir, summary: dict, rows: list[dict]) -> list[tuple[str, Path]]:
    names = summary["selection"]["ranking"]
    return [
        ("Test accuracy per configuration, 95% interval over seeds and test images",
         plots.compare_test_accuracy(summary["configs"], summary["runs"], names, run.plots)),
        ("Validation loss of every configuration",
         plots.compare_curves(rows, names, "loss", run.plots, summary.get("steps_per_epoch"))),
    ]


def _curves(run: RunDir, summary: dict, rows: list[dict]) -> list[tuple[str, Path, Path]]:
    """Each configuration's training and validation loss and accuracy, in selection order."""
    per_epoch = summary.get("steps_per_epoch")
    return [(name, *(plots.run_curves(rows, name, metric, run.plots, per_epoch)
                     for metric in ("loss", "accuracy")))
            for name in summary["selection"]["ranking"]]


def _tensorboard(run: RunDir, summary: dict, study: StudyConfig, rows: list[dict]) -> None:
    """Each configuration's confusion matrix (mean counts per model over its seeds) as an image
    beside its shown model's curves; the curves themselves only where training wrote none (a
    run directory from before live logging, or whose tb/ was deleted). Up to TB_IMAGES
    configurations, best first: a large sweep would spend minutes drawing matrices nobody
    opens."""
    configs = {c.name: (c, study.schedule) for c in study.runs}
    if not has_curves(run.tensorboard):
        board = Board(run.tensorboard, configs)
        board.add_rows(rows)
        board.finish(summary["runs"])
    last = max((r["step"] for r in rows), default=0)
    for name in summary["selection"]["ranking"][:TB_IMAGES]:
        answers = _predictions(run, summary, name)
        if answers:
            seed = next(iter(answers))
            figure = plots.confusion_figure(mean_pool(answers, seed), answers[seed].classes,
                                            f"{name}: confusion matrix", len(answers))
            write_images(run.tensorboard, name, seed, {"confusion_matrix": plots.png_bytes(
                figure)}, last)


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


def _evaluation_figures(
    run: RunDir, summary: dict
) -> tuple[list[tuple[str, Path]], list[tuple[str, float, float, float, int]]]:
    """The winner's confusion matrix as mean counts per model over its seeds (each seed scored
    the same test images once) and the most confident errors of its shown seed (its best
    validation accuracy), from the stored predictions; and its per-class scores."""
    name, seed = stats.winner(summary), stats.winner_seed(summary)
    if seed is None:
        return [], []
    predictions = _predictions(run, summary, name)
    ev = mean_pool(predictions, seed)
    classes = predictions[seed].classes
    n, images = len(predictions), len(predictions[seed].labels)
    stem = plots.safe_name(name)
    confusion = plots.confusion(ev, classes, run.plots / f"confusion_{stem}.png",
                                f"{name}: confusion matrix", seeds=n)
    grid = plots.misclassified(ev, classes, run.plots / f"misclassified_{stem}.png", name)
    per_class = list(zip(classes, ev.precision.tolist(), ev.recall.tolist(), ev.f1.tolist(),
                         [round(v) for v in ev.support.tolist()], strict=True))
    over = f"{images:,} test images × {n} seeds, mean count per model" if n > 1 else \
        f"{images:,} test images"
    return [(f"{name}: confusion matrix on the test set ({over})", confusion),
            (f"{name} (seed {seed}): most confident test errors", grid)], per_class


def mean_pool(by_seed: dict[int, Predictions], shown: int) -> Evaluation:
    """A configuration over its seeds as one model's figures: mean accuracy and loss, the
    confusion matrix as mean counts per model (so its rows sum to the test set's class sizes,
    not seeds × them), and the worst errors of the `shown` seed."""
    ev = pool(by_seed, shown)
    return dataclasses.replace(ev, confusion=ev.confusion / len(by_seed))


def _predictions(run: RunDir, summary: dict, name: str) -> dict[int, Predictions]:
    """The stored test predictions of each finished seed of a configuration."""
    seeds = [r["seed"] for r in summary["runs"]
             if r["run"] == name and r.get("diverged_at") is None]
    return {seed: Predictions.load(run.predictions_path(name, seed)) for seed in seeds}
