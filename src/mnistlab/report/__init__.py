"""Plots, TensorBoard files and report.html, rendered from a run directory alone.

Nothing here loads a data set or runs a model: the curves come from metrics.csv, the tables from
summary.json, the confusion matrix and the worst errors from the stored test predictions. So a
report re-renders anywhere, offline, with the data gone.
"""

from __future__ import annotations

from pathlib import Path

from mnistlab import stats
from mnistlab.atomic import atomic_write_text
from mnistlab.config import load_study
from mnistlab.evaluation import Predictions, evaluation
from mnistlab.report import plots
from mnistlab.report.html import render_html
from mnistlab.report.sweep import sweep_section
from mnistlab.report.tensorboard import write_tensorboard
from mnistlab.runs import RunDir


def render(run: RunDir) -> Path:
    """Rewrite plots/, tb/ and report.html from the run directory's files; returns the report's
    path."""
    summary = run.read_summary()
    study = load_study(run.config_path)
    rows = run.read_metrics()
    figures = _curve_figures(run, summary, rows)
    notes, extra = [], []
    if "sweep" in summary:
        top_table, sweep_figures = sweep_section(summary, run.plots)
        figures.insert(0, ("Sweep", sweep_figures))
        extra.append(top_table)
    evaluation_figures = _evaluation_figures(run, summary)
    if evaluation_figures:
        figures.append(("Best configuration on the test set", evaluation_figures))
    else:
        notes.append("No finished model to show a confusion matrix for: every run diverged.")
    write_tensorboard(rows, run.tensorboard)
    page = render_html(summary, rows, figures, study=study, notes=notes, extra=extra)
    atomic_write_text(run.report_path, page)
    return run.report_path


def _curve_figures(run: RunDir, summary: dict, rows: list[dict]) -> list[tuple[str, list]]:
    """Comparison plots first, then each configuration's loss and accuracy curves."""
    names = [c["run"] for c in summary["configs"]]
    per_epoch = summary.get("steps_per_epoch")
    best = stats.winner(summary)
    comparison = [
        ("Test accuracy per configuration, 95% CI over seeds",
         plots.compare_test_accuracy(summary["configs"], summary["runs"], best, run.plots)),
        ("Validation accuracy, all configurations",
         plots.compare_curves(rows, names, "accuracy", run.plots, per_epoch)),
        ("Validation loss, all configurations",
         plots.compare_curves(rows, names, "loss", run.plots, per_epoch)),
    ]
    curves = [
        (f"{name}: training and validation {metric}",
         plots.run_curves(rows, name, metric, run.plots, per_epoch))
        for name in names for metric in ("loss", "accuracy")
    ]
    return [("Comparison", comparison), ("Learning curves per configuration", curves)]


def _evaluation_figures(run: RunDir, summary: dict) -> list[tuple[str, Path]]:
    """The winner's confusion matrix and most confident errors, from its stored predictions."""
    name, seed = stats.winner(summary), stats.winner_seed(summary)
    if seed is None:
        return []
    predictions = Predictions.load(run.predictions_path(name, seed))
    ev = evaluation(predictions)
    confusion, grid = plots.evaluation_plots(ev, predictions.classes, run.plots, name)
    return [(f"{name} (seed {seed}): confusion matrix on the test set", confusion),
            (f"{name} (seed {seed}): most confident test errors", grid)]
