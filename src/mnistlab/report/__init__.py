"""Plots, TensorBoard files and report.html, re-rendered from a run directory alone."""

from __future__ import annotations

from pathlib import Path

from mnistlab.config import load_study
from mnistlab.errors import MnistlabError
from mnistlab.evaluate import best_checkpoint, evaluate, finished_summary, study_test_set
from mnistlab.model import load_checkpoint
from mnistlab.report import plots
from mnistlab.report.html import render_html
from mnistlab.report.sweep import sweep_section
from mnistlab.report.tensorboard import write_tensorboard
from mnistlab.runs import RunDir, atomic_write_text


def render(run_dir: RunDir | Path, *, best_eval: bool = True) -> Path:
    """Rewrite plots/, tb/ and report.html from study.toml, metrics.csv, summary.json, checkpoints.

    `best_eval` adds the best model's confusion matrix and worst errors, which need the test
    images: when the data cannot be loaded here, those two plots are skipped and the report says
    why instead of failing. Returns the report's path.
    """
    run = run_dir if isinstance(run_dir, RunDir) else RunDir.existing(run_dir)
    summary = finished_summary(run)
    study = load_study(run.config_path)
    rows = run.read_metrics()
    figures = _curve_figures(run, summary, rows)
    notes, extra = [], []
    if "sweep" in summary:
        top_table, sweep_figures = sweep_section(summary, run.plots)
        figures.insert(0, ("Sweep", sweep_figures))
        extra.append(top_table)
    if best_eval:
        try:
            evaluation = _evaluation_figures(run, summary)
            figures.append(("Best configuration on the test set", evaluation))
        except (MnistlabError, OSError) as exc:
            notes.append(f"Confusion matrix and misclassified grid skipped: {exc}")
    write_tensorboard(rows, run.tensorboard)
    page = render_html(summary, rows, figures, study=study, notes=notes, extra=extra)
    atomic_write_text(run.report_path, page)
    return run.report_path


def _curve_figures(run: RunDir, summary: dict, rows: list[dict]) -> list[tuple[str, list]]:
    """Comparison plots first, then each configuration's loss and accuracy curves."""
    names = [c["run"] for c in summary["configs"]]
    per_epoch = summary.get("steps_per_epoch")
    best = summary["comparisons"].get("best")
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
    path = best_checkpoint(run, summary)
    ckpt = load_checkpoint(path)
    dataset, _ = study_test_set(run)
    ev = evaluate(ckpt, dataset)
    name = summary["comparisons"]["best"]
    confusion, grid = plots.evaluation_plots(ev, dataset, ckpt.inputs.classes, run.plots, name)
    seed = f"seed {ckpt.seed}" if ckpt.seed is not None else path.stem
    return [(f"{name} ({seed}): confusion matrix on the test set", confusion),
            (f"{name} ({seed}): most confident test errors", grid)]
