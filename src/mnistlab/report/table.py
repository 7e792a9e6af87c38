"""Tables for the terminal: a run's summary, an evaluation. Plain text, no escape codes."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from mnistlab import stats
from mnistlab.evaluation import Evaluation


def plain_text(*parts: Any, width: int = 100) -> str:
    """Rich tables and strings printed to plain text (no colour, no markup)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, highlight=False)
    for part in parts:
        console.print(part, markup=False)
    return buffer.getvalue().rstrip()


def new_table(title: str, left: Sequence[str], right: Sequence[str]) -> Table:
    """A table whose label columns are left-aligned and number columns right-aligned."""
    table = Table(*left, title=title)
    for name in right:
        table.add_column(name, justify="right")
    return table


def _ci(stat: dict[str, Any]) -> str:
    """'0.8712 [0.8650, 0.8770]', or the mean and why there is no interval."""
    if not stat["n"]:
        return "–"
    if stat["n"] < 2:
        return f"{stat['mean']:.4f} {stat.get('interval', '')}".rstrip()
    return f"{stat['mean']:.4f} [{stat['ci_low']:.4f}, {stat['ci_high']:.4f}]"


def format_summary(summary: dict[str, Any], width: int = 110) -> str:
    """Configurations in the order of selection (mean final validation accuracy), with their
    validation and test accuracy (mean [95% interval]) and time per model; the warnings."""
    seeds = len(summary["seeds"])
    table = new_table(f"{summary['study']} on {summary['data']} — {seeds} seed(s)",
                      ("configuration",),
                      ("final val acc [95%]", "test acc [95%]", "s / model", "diverged"))
    seconds: dict[str, list[float]] = {}
    for run in summary["runs"]:
        seconds.setdefault(run["run"], []).append(run["seconds"])
    by_name = {c["run"]: c for c in summary["configs"]}
    best = stats.winner(summary)
    for name in summary["selection"]["ranking"]:
        config = by_name[name]
        table.add_row(
            f"{name} *" if name == best else name,
            _ci(config["final_val_accuracy"]),
            _ci(config["test_accuracy"]),
            f"{sum(seconds[name]) / len(seconds[name]):.1f}",
            str(config["diverged"]),
        )
    footer = ("* the winner: highest mean final validation accuracy (the test set never "
              f"chooses). Test intervals: {summary['comparisons']['method']}.")
    warnings = [f"warning: {w}" for w in summary.get("warnings", [])]
    return plain_text(table, footer, *warnings, width=width)


def format_evaluation(ev: Evaluation, classes: Sequence[str], worst: int = 10) -> str:
    """Totals, per-class scores with their macro average, confusion matrix and the most
    confident errors."""
    per_class = new_table("per class", ("class",), ("precision", "recall", "F1", "support"))
    for name, p, r, f, s in zip(classes, ev.precision, ev.recall, ev.f1, ev.support, strict=True):
        per_class.add_row(name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    per_class.add_section()
    per_class.add_row("macro avg", *(f"{v:.4f}" for v in ev.macro.values()),
                      str(int(ev.support.sum())))
    confusion = new_table("confusion matrix (rows: true class)", ("true \\ pred",), classes)
    for name, row in zip(classes, ev.confusion, strict=True):
        confusion.add_row(name, *(str(c) for c in row))
    mistakes = new_table("most confident errors", ("true", "predicted"), ("confidence", "index"))
    for m in ev.worst[:worst]:
        mistakes.add_row(classes[m.true], classes[m.predicted], f"{m.confidence:.1%}", str(m.index))
    totals = (f"accuracy {ev.accuracy:.4f}   loss {ev.loss:.4f}   "
              f"({int(ev.support.sum())} images)")
    return plain_text(totals, per_class, confusion, mistakes, width=120)
