"""The study's figures as PNG files: learning curves, comparisons, test accuracy, errors.

Seeds are drawn as their mean line with a min–max band, so the spread between seeds is visible
at a glance. Figures are built with matplotlib's object API (no pyplot state) and written
atomically.
"""

from __future__ import annotations

import io
import itertools
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from matplotlib.image import BboxImage
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter, PercentFormatter
from matplotlib.transforms import Bbox, ScaledTranslation, TransformedBbox

from mnistlab.atomic import atomic_path
from mnistlab.evaluation import Evaluation
from mnistlab.stats import seed_band

SPLIT_STYLE = {"train": ("tab:blue", "training"), "val": ("tab:orange", "validation")}
ZOOM_RECORDS = 20  # fewer records than this: no zoomed panel, every point marked
TOP_K = 12  # configurations a comparison figure draws, best first: 81 would be unreadable
DPI = 110


def safe_name(name: str) -> str:
    """A file-name-safe form of a run name: letters, digits, '.', '_', '-' only, no leading dot."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"


class InlineFigure(Figure):
    """A figure that shows itself in any notebook, with no `%matplotlib inline` and no pyplot:
    IPython displays an object through its `_repr_png_`."""

    def _repr_png_(self) -> bytes:
        return png_bytes(self)


def new_figure(width: float, height: float) -> Figure:
    """A figure whose layout engine keeps titles, labels and colour bars from overlapping (and
    that displays inline in a notebook: InlineFigure)."""
    return InlineFigure(figsize=(width, height), layout="constrained")


def save_figure(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        # No "Software" text chunk: the PNG carries no URL and is byte-stable across renders.
        fig.savefig(tmp, format="png", dpi=DPI, metadata={"Software": None})
    return path


def _draw_band(ax: Any, steps: np.ndarray, mean: np.ndarray, low: np.ndarray, high: np.ndarray,
               color: Any, label: str, style: str = "-") -> None:
    ax.fill_between(steps, low, high, color=color, alpha=0.2, linewidth=0)
    marker = "o" if len(steps) < ZOOM_RECORDS else None  # a short curve shows its points
    ax.plot(steps, mean, color=color, label=label, linewidth=1.6, marker=marker, markersize=3,
            linestyle=style)


def _positive_values(ax: Any) -> bool:
    """Whether the axes hold a finite positive value to put on a log scale (a run that diverged
    at its first step has only NaN and inf)."""
    values = [np.asarray(line.get_ydata(), dtype=float) for line in ax.get_lines()]
    return any(bool(np.any(np.isfinite(v) & (v > 0))) for v in values)


def _style_metric_axis(ax: Any, metric: str) -> None:
    if metric == "accuracy":
        ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    elif not _positive_values(ax):
        ax.text(0.5, 0.5, "no finite values: diverged", transform=ax.transAxes, ha="center",
                va="center", color="tab:red")
    else:
        ax.set_yscale("log")  # losses span two orders of magnitude over training
        # Labels 0.1, 0.2, 0.5, 1, ... rather than powers of ten.
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel(metric)
    ax.grid(True, alpha=0.3)


def _seed_count(rows: Sequence[Mapping[str, Any]], run: str) -> int:
    return len({r["seed"] for r in rows if r["run"] == run})


def run_curves(rows: Sequence[Mapping[str, Any]], run: str, metric: str, folder: Path,
               steps_per_epoch: int | None = None) -> Path:
    """`<run>_<metric>.png`: training and validation curves of one configuration over its seeds."""
    fig = new_figure(7, 4.2)
    ax = fig.add_subplot()
    for split, (color, label) in SPLIT_STYLE.items():
        steps, mean, low, high = seed_band(rows, run, split, metric)
        if len(steps):
            final = f"{mean[-1]:.2%}" if metric == "accuracy" else f"{mean[-1]:.4f}"
            _draw_band(ax, steps, mean, low, high, color, f"{label} (final {final})")
    n = _seed_count(rows, run)
    ax.set_title(f"{run}: {metric} (mean of {n} seeds, band = min–max)")
    ax.set_xlabel(_iteration_label(steps_per_epoch))
    _style_metric_axis(ax, metric)
    ax.legend(loc="best")
    return save_figure(fig, folder / f"{safe_name(run)}_{metric}.png")


def _iteration_label(steps_per_epoch: int | None) -> str:
    return f"iteration ({steps_per_epoch} per epoch)" if steps_per_epoch else "iteration"


def compare_curves(rows: Sequence[Mapping[str, Any]], runs: Sequence[str], metric: str,
                   folder: Path, steps_per_epoch: int | None = None) -> Path:
    """`compare_val_<metric>.png`: every configuration's validation curve, whole run and zoomed."""
    figure = comparison_figure(rows, runs, metric, steps_per_epoch)
    return save_figure(figure, folder / f"compare_val_{metric}.png")


def comparison_figure(rows: Sequence[Mapping[str, Any]], runs: Sequence[str], metric: str,
                      steps_per_epoch: int | None = None) -> Figure:
    """Every configuration's validation curve (mean over seeds, min–max band), each with its own
    colour and line style so that identical curves stay distinguishable.

    With at least ZOOM_RECORDS records, a second panel zooms into the second half of training,
    where the configurations are close and the full-range axis would hide their differences;
    with fewer, one panel. `runs` come best first; beyond TOP_K only the best TOP_K are drawn,
    and the title says so.
    """
    runs, shown = runs[:TOP_K], _top(runs)
    records = max((len(seed_band(rows, run, "val", metric)[0]) for run in runs), default=0)
    zoomed = records >= ZOOM_RECORDS
    fig = new_figure(12 if zoomed else 8, 4.5)
    axes = fig.subplots(1, 2) if zoomed else [fig.add_subplot()]
    styles = itertools.cycle(["-", "--", "-.", ":"])
    for run, color, style in zip(runs, _colors(len(runs)), styles, strict=False):
        steps, mean, low, high = seed_band(rows, run, "val", metric)
        if not len(steps):
            continue
        final = f"{mean[-1]:.2%}" if metric == "accuracy" else f"{mean[-1]:.4f}"
        _draw_band(axes[0], steps, mean, low, high, color, f"{run} (final {final})", style)
        if zoomed:
            late = steps >= steps[-1] / 2
            _draw_band(axes[1], steps[late], mean[late], low[late], high[late], color, run, style)
    titles = ("all iterations", "second half (zoomed)") if zoomed else ("",)
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(f"validation {metric}{shown}" + (f": {title}" if title else ""))
        ax.set_xlabel(_iteration_label(steps_per_epoch))
        _style_metric_axis(ax, metric)
    axes[0].legend(loc="best", fontsize="small")
    return fig


def _top(names: Sequence[str]) -> str:
    """' (top 12 of 81 configurations, by validation)' where a figure leaves some out."""
    if len(names) <= TOP_K:
        return ""
    return f" (top {TOP_K} of {len(names)} configurations, by validation)"


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def compare_test_accuracy(configs: Sequence[Mapping[str, Any]],
                          run_rows: Sequence[Mapping[str, Any]], ranking: Sequence[str],
                          folder: Path) -> Path:
    """`compare_test_accuracy.png`: per configuration the mean test accuracy with its 95%
    interval (seeds and test images) and each seed as a tick, in the order of selection on
    validation, the winner on top."""
    by_name = {c["run"]: c for c in configs}
    shown = _top(ranking)
    order = [by_name[name] for name in reversed(ranking[:TOP_K])]
    fig = new_figure(8, 1.2 + 0.55 * len(order))
    ax = fig.add_subplot()
    for y, config in enumerate(order):
        d = config["test_accuracy"]
        color = "tab:green" if config["run"] == ranking[0] else "tab:blue"
        if np.isfinite(d["ci_low"]):
            err = [[d["mean"] - d["ci_low"]], [d["ci_high"] - d["mean"]]]
            ax.errorbar(d["mean"], y, xerr=err, fmt="o", color=color, capsize=4, markersize=7)
        else:  # one seed: no interval to draw
            ax.plot(d["mean"], y, "o", color=color, markersize=7)
        seeds = [r["test_accuracy"] for r in run_rows if r["run"] == config["run"]]
        ax.plot(seeds, [y] * len(seeds), "|", color="black", markersize=10, alpha=0.6)
    ax.set_yticks(range(len(order)), [c["run"] for c in order])
    ax.xaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_xlabel("test accuracy (dot = mean, bar = 95% interval, ticks = seeds)")
    ax.set_title(f"test accuracy per configuration{shown} (winner on validation: {ranking[0]})")
    ax.grid(True, axis="x", alpha=0.3)
    return save_figure(fig, folder / "compare_test_accuracy.png")


def confusion(ev: Evaluation, classes: Sequence[str], path: Path, title: str,
              seeds: int = 1) -> Path:
    """Confusion matrix: counts written in the cells, colour by row share (recall per class);
    mean counts per model over `seeds` seeds where more than one."""
    return save_figure(confusion_figure(ev, classes, title, seeds), path)


# Up to this many classes every cell shows its count, zeros too; beyond, cells shrink so the
# figure stays within CONFUSION_SIDE inches, and only non-zero counts that fit are written.
ALL_COUNTS_UP_TO = 20
CONFUSION_SIDE = 22.0
TICK_POINTS = (5.0, 8.0)  # the smallest and largest font size of a class name


def confusion_figure(ev: Evaluation, classes: Sequence[str], title: str,
                     seeds: int = 1) -> Figure:
    """The confusion matrix of `confusion`, readable at any number of classes: square cells of
    at most 0.62 inch, class names in a font that fits one cell (every k-th name when even the
    smallest font does not), counts in the cells when their digits fit. With `seeds` > 1, `ev`
    holds per-model mean counts over that many seeds, and the title says so."""
    n = len(classes)
    share = ev.confusion / np.maximum(ev.confusion.sum(axis=1, keepdims=True), 1)
    cell = min(0.62, CONFUSION_SIDE / n) * 72  # points per cell
    font = float(np.clip(0.55 * cell, *TICK_POINTS))
    step = max(1, int(np.ceil(1.3 * font / cell)))  # names per label: 1.3 fonts of height each
    longest = max(map(len, classes)) * 0.6 * font  # points a name needs written across
    rotation = 0 if longest <= 0.9 * cell * step else (45 if n <= ALL_COUNTS_UP_TO else 90)
    room = (longest + 40) / 72  # inches for the names beside and below the matrix
    side = cell * n / 72
    fig = new_figure(side + room + 1.6, side + room * (rotation != 0) + 1.4)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    _cell_counts(ax, ev.confusion, share, cell)
    shown = range(0, n, step)
    ax.set_xticks(shown, [classes[i] for i in shown], rotation=rotation, fontsize=font,
                  ha="right" if rotation == 45 else "center")
    ax.set_yticks(shown, [classes[i] for i in shown], fontsize=font)
    every = "" if step == 1 else f" (every {step}th class named)"
    ax.set_xlabel(f"predicted class{every}")
    ax.set_ylabel("true class")
    images = f"{round(float(ev.support.sum())):,} images"
    if seeds > 1:
        images += f" × {seeds} seeds (mean count per model)"
    ax.set_title(f"{title}\naccuracy {ev.accuracy:.2%} on {images}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    return fig


def _cell_counts(ax: Any, confusion: np.ndarray, share: np.ndarray, cell: float) -> None:
    """Each cell's count: all of them up to ALL_COUNTS_UP_TO classes, else the non-zero ones in
    a font that fits the largest count in a cell (none when that font would be under 4 points)."""
    n = len(confusion)
    if n <= ALL_COUNTS_UP_TO:
        cells, font = list(np.ndindex(n, n)), 8.0
    else:
        cells = list(zip(*np.nonzero(confusion), strict=True))
        font = min(7.0, 0.9 * cell / (0.6 * len(str(int(confusion.max())))))
        if font < 4:
            return
    whole = np.issubdtype(confusion.dtype, np.integer)
    for i, j in cells:
        count = str(confusion[i, j]) if whole else f"{confusion[i, j]:.1f}".removesuffix(".0")
        ax.text(j, i, count, ha="center", va="center", fontsize=font,
                color="white" if share[i, j] > 0.5 else "black")


def confusion_png(ev: Evaluation, classes: Sequence[str], title: str, seeds: int = 1) -> bytes:
    """`confusion`'s figure as PNG bytes, written nowhere (for TensorBoard)."""
    return png_bytes(confusion_figure(ev, classes, title, seeds))


def png_bytes(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def misclassified(ev: Evaluation, classes: Sequence[str], path: Path, title: str) -> Path:
    """Grid of the most confident errors, each titled with true class, prediction, confidence."""
    cols = 5
    rows = max(1, -(-len(ev.worst) // cols))
    height = 2.1 * rows + 0.5
    fig = Figure(figsize=(1.8 * cols, height))
    fig.suptitle(f"{title}: {len(ev.worst)} most confident errors", y=1 - 0.15 / height)
    # No axes: 25 of them (with their ticks, hidden or not) took a second to make and draw.
    # Each image fills the square an axes of this fixed grid would give it, its title 6 points
    # above, as the axes' title: the same pixels.
    grid = GridSpec(rows, cols, figure=fig, top=1 - 0.95 / height, bottom=0.1 / height,
                    left=0.02, right=0.98, hspace=0.55, wspace=0.15)
    bottoms, tops, lefts, rights = grid.get_grid_positions(fig)
    inches = fig.get_size_inches()
    above = fig.transFigure + ScaledTranslation(0, 6 / 72, fig.dpi_scale_trans)
    for k, m in enumerate(ev.worst):
        row, col = divmod(k, cols)
        cell = np.array([rights[col] - lefts[col], tops[row] - bottoms[row]])
        square = min(cell * inches) / inches  # the cell's largest square, in figure fractions
        left, bottom = np.array([lefts[col], bottoms[row]]) + (cell - square) / 2
        image = BboxImage(TransformedBbox(Bbox.from_bounds(left, bottom, *square),
                                          fig.transFigure), cmap="gray_r", norm=Normalize(0, 255))
        image.set_data(m.image)
        fig.add_artist(image)
        fig.text(left + square[0] / 2, bottom + square[1], f"true: {_short(classes[m.true])}\n"
                 f"pred: {_short(classes[m.predicted])}\n{m.confidence:.1%}  #{m.index}",
                 fontsize=8, ha="center", va="baseline", transform=above)
    if not ev.worst:
        fig.text(0.5, 0.5, "no errors", ha="center", va="center")
    return save_figure(fig, path)


def _short(name: str, width: int = 18) -> str:
    """A class name cut to what one 1.8-inch grid title holds at 8 points."""
    return name if len(name) <= width else name[: width - 1] + "…"


def evaluation_plots(ev: Evaluation, classes: Sequence[str], folder: Path, name: str,
                     seeds: int = 1) -> list[Path]:
    """`confusion_<name>.png` and `misclassified_<name>.png` for one evaluated model, or for a
    configuration over `seeds` seeds (see `confusion`)."""
    stem = safe_name(name)
    return [
        confusion(ev, classes, folder / f"confusion_{stem}.png", f"{name}: confusion matrix",
                  seeds),
        misclassified(ev, classes, folder / f"misclassified_{stem}.png", name),
    ]
