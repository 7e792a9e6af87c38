"""The summary table printed at the end of a study."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console
from rich.table import Table


def _ci(stat: dict[str, Any]) -> str:
    half = (stat["ci_high"] - stat["ci_low"]) / 2
    return f"{stat['mean']:.4f} ± {half:.4f}" if stat["n"] > 1 else f"{stat['mean']:.4f}"


def format_summary(summary: dict[str, Any], width: int = 100) -> str:
    """Configuration, validation and test accuracy (mean ± 95% CI half-width), time per model."""
    seeds = len(summary["seeds"])
    table = Table(title=f"{summary['study']} on {summary['data']} — {seeds} seed(s), 95% CI (t)")
    for column in (
        "configuration",
        "final val acc",
        "best val acc",
        "test acc",
        "s / model",
        "diverged",
    ):
        table.add_column(column, justify="left" if column == "configuration" else "right")
    seconds = {}
    for run in summary["runs"]:
        seconds.setdefault(run["run"], []).append(run["seconds"])
    best = summary["comparisons"].get("best")
    for config in summary["configs"]:
        name = config["run"]
        table.add_row(
            f"{name} *" if name == best else name,
            _ci(config["final_val_accuracy"]),
            _ci(config["best_val_accuracy"]),
            _ci(config["test_accuracy"]),
            f"{sum(seconds[name]) / len(seconds[name]):.1f}",
            str(config["diverged"]),
        )
    buffer = io.StringIO()
    Console(file=buffer, width=width, force_terminal=False).print(table)
    footer = f"* best by mean test accuracy; {summary['comparisons'].get('test', '')}"
    return buffer.getvalue().rstrip() + "\n" + footer
