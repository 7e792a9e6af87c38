"""A sweep's own views: mean test accuracy over lr × dropout, and the top-10 table with CIs.

Both read only summary.json, so `mnistlab report RUN_DIR` re-renders them from disk.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import PercentFormatter
from rich.table import Table

from mnistlab.report.html import table
from mnistlab.report.plots import new_figure, save_figure
from mnistlab.report.reading import mean_ci, pct
from mnistlab.report.table import console_width, fitted, folded, new_table, plain_text

HEATMAP = "sweep_heatmap.png"
TOP_HEADER = (
    "rank",
    "configuration",
    "epochs",
    "val accuracy [95% CI]",
    "test accuracy [95% CI]",
    "diverged",
)


def ranked(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Configurations in the order of selection: the furthest successive-halving rung reached,
    then mean final validation accuracy (the test set never chooses)."""
    by_name = {c["run"]: c for c in summary["configs"]}
    return [by_name[name] for name in summary["selection"]["ranking"]]


def _rows(summary: Mapping[str, Any], n: int) -> list[list[str]]:
    return [
        [
            str(i),
            c["run"],
            str(c.get("epochs", "")),
            mean_ci(c["final_val_accuracy"]),
            mean_ci(c["test_accuracy"]),
            str(c["diverged"]),
        ]
        for i, c in enumerate(ranked(summary)[:n], start=1)
    ]


def _footer(summary: Mapping[str, Any]) -> str:
    sweep = summary["sweep"]
    text = (
        f"{len(summary['configs'])} configurations × {len(summary['seeds'])} seeds, ranked by "
        f"mean validation accuracy; winner: {sweep['winner']}"
    )
    halving = sweep.get("halving")
    if halving:
        rungs = " → ".join(str(len(r["configs"])) for r in halving["rungs"])
        text += (
            f". Successive halving, configurations per rung {rungs}: "
            f"{halving['model_epochs']} model-epochs instead of "
            f"{halving['full_grid_model_epochs']} for the full grid ({halving['saved']:.0%} "
            "saved); configurations stopped early show the epochs they trained"
        )
    return text + "."


def top_text(summary: Mapping[str, Any], n: int = 10, width: int | None = None) -> str:
    """The top-n table for a terminal, at `width` (default: the console's); narrower, each
    interval folds under its mean."""
    width = width or console_width()

    def make(fold: bool) -> Table:
        grid = new_table(f"{summary['study']} on {summary['data']}: top {n}", (), TOP_HEADER)
        grid.columns[1].justify = "left"  # the configuration's name
        for row in _rows(summary, n):
            grid.add_row(*(folded(cell) if fold else cell for cell in row))
        return grid

    return plain_text(fitted(width, lambda: make(False), lambda: make(True)), _footer(summary),
                      width=width)


def top_html(summary: Mapping[str, Any], n: int = 10) -> str:
    """The top-n table as an HTML fragment, the winner highlighted."""
    return (
        f"<h3>Top {n}</h3>"
        + table(TOP_HEADER, _rows(summary, n), {0}, kind="ranked")
        + f"<p>{escape(_footer(summary))}</p>"
    )


def heatmap(summary: Mapping[str, Any], folder: Path) -> Path:
    """plots/sweep_heatmap.png: mean final validation accuracy (what selects) over lr × dropout.

    A grid gives a cell per (lr, dropout), the best configuration's value when other fields vary
    too; random samples give a scatter on a log-lr axis. A value from a configuration that
    successive halving stopped early is marked with its epochs.
    """
    points = [
        (
            c["config"]["lr"],
            c["config"]["dropout"],
            c["final_val_accuracy"]["mean"],
            c.get("epochs"),
            c.get("rung", 0),
        )
        for c in summary["configs"]
    ]
    last = max(p[4] for p in points)
    fig = new_figure(7.5, 5.5)
    ax = fig.add_subplot()
    if summary["sweep"].get("samples"):
        _scatter(fig, ax, points)
    else:
        _cells(fig, ax, points, last)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("dropout p")
    winner = summary["selection"]["winner"]
    ax.set_title(f"Mean final validation accuracy over seeds (winner: {winner})")
    return save_figure(fig, folder / HEATMAP)


def _cells(fig: Any, ax: Any, points: Sequence[tuple], last: int) -> None:
    lrs = sorted({p[0] for p in points})
    ps = sorted({p[1] for p in points})
    values = np.full((len(ps), len(lrs)), np.nan)
    labels: dict[tuple[int, int], str] = {}
    for lr, p, acc, epochs, rung in points:
        i, j = ps.index(p), lrs.index(lr)
        if math.isfinite(acc) and not values[i, j] >= acc:  # NaN (empty) compares False
            values[i, j] = acc
            labels[i, j] = pct(acc) + (f"\n{epochs} ep" if rung < last else "")
    image = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, format=PercentFormatter(1.0))
    ax.set_xticks(range(len(lrs)), [f"{v:g}" for v in lrs])
    ax.set_yticks(range(len(ps)), [f"{v:g}" for v in ps])
    middle = np.nanmean(values) if np.isfinite(values).any() else 0
    for (i, j), text in labels.items():
        color = "black" if values[i, j] > middle else "white"
        ax.text(j, i, text, ha="center", va="center", fontsize=8, color=color)


def _scatter(fig: Any, ax: Any, points: Sequence[tuple]) -> None:
    finite = [p for p in points if math.isfinite(p[2])]
    art = ax.scatter(
        [p[0] for p in finite],
        [p[1] for p in finite],
        c=[p[2] for p in finite],
        cmap="viridis",
        s=60,
        edgecolors="black",
        linewidths=0.5,
    )
    fig.colorbar(art, ax=ax, format=PercentFormatter(1.0))
    ax.set_xscale("log")


def sweep_section(summary: Mapping[str, Any], folder: Path) -> tuple[str, list[tuple[str, Path]]]:
    """What report.html shows for a sweep: the top-10 HTML and the heat map figure."""
    caption = ("Mean final validation accuracy over learning rate × dropout (winner: "
               f"{summary['selection']['winner']})")
    return top_html(summary), [(caption, heatmap(summary, folder))]
