"""Tables for the terminal: a run's summary, an evaluation. Plain text, no escape codes.

Every table is drawn at the console's real width (Rich measures it: the terminal, or $COLUMNS
where the output is not one), so a narrow terminal folds a cell's interval under its mean or
drops a column rather than breaking the box drawing or splitting rows.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from mnistlab import stats
from mnistlab.evaluation import Evaluation


def console_width() -> int:
    """The width tables are drawn at: the terminal's, $COLUMNS, or 80 (Rich's rules)."""
    return Console().width


def plain_text(*parts: Any, width: int | None = None) -> str:
    """Rich tables and strings printed to plain text (no colour, no markup), wrapped at word
    boundaries to `width` (default: the console's)."""
    buffer = io.StringIO()
    console = Console(file=buffer, width=width or console_width(), color_system=None,
                      highlight=False)
    for part in parts:
        console.print(part, markup=False)
    return "\n".join(line.rstrip() for line in buffer.getvalue().rstrip().splitlines())


def new_table(title: str, left: Sequence[str], right: Sequence[str]) -> Table:
    """A table whose label columns are left-aligned and number columns right-aligned."""
    table = Table(*left, title=title)
    for name in right:
        table.add_column(name, justify="right")
    return table


def fits(table: Table, width: int) -> bool:
    """Whether `table` draws within `width` columns without wrapping any cell."""
    console = Console(file=io.StringIO(), width=10_000)  # measured unbounded, then compared
    return Measurement.get(console, console.options, table).maximum <= width


def fitted(width: int, *variants: Callable[[], Table]) -> Table:
    """The first of `variants` (widest first) that fits `width`; else the last, whose cells
    Rich then wraps at their spaces."""
    for make in variants[:-1]:
        table = make()
        if fits(table, width):
            return table
    return variants[-1]()


def folded(text: str) -> str:
    """'0.8712 [0.8650, 0.8770]' as the mean over its interval (two lines in one cell)."""
    return text.replace(" [", "\n[", 1).replace(" n/a", "\nn/a", 1)


def _ci(stat: dict[str, Any]) -> str:
    """'0.8712 [0.8650, 0.8770]', or the mean and why there is no interval."""
    if not stat["n"]:
        return "–"
    if stat["n"] < 2:
        return f"{stat['mean']:.4f} {stat.get('interval', '')}".rstrip()
    return f"{stat['mean']:.4f} [{stat['ci_low']:.4f}, {stat['ci_high']:.4f}]"


def format_summary(summary: dict[str, Any], width: int | None = None) -> str:
    """Configurations in the order of selection (mean final validation accuracy), with their
    validation and test accuracy (mean [95% interval]) and time per model; the warnings. Drawn
    at `width` (default: the console's): narrower, each interval folds under its mean, and the
    diverged column is dropped where nothing diverged."""
    width = width or console_width()
    seeds = len(summary["seeds"])
    seconds: dict[str, list[float]] = {}
    for run in summary["runs"]:
        seconds.setdefault(run["run"], []).append(run["seconds"])
    by_name = {c["run"]: c for c in summary["configs"]}
    best = stats.winner(summary)
    any_diverged = any(c["diverged"] for c in summary["configs"])

    def make(fold: bool, diverged: bool) -> Table:
        shown = folded if fold else str
        table = new_table(f"{summary['study']} on {summary['data']} — {seeds} seed(s)",
                          ("configuration",),
                          ("final val acc [95%]", "test acc [95%]", "s / model",
                           *(("diverged",) if diverged else ())))
        for name in summary["selection"]["ranking"]:
            config = by_name[name]
            table.add_row(
                f"{name} *" if name == best else name,
                shown(_ci(config["final_val_accuracy"])),
                shown(_ci(config["test_accuracy"])),
                f"{sum(seconds[name]) / len(seconds[name]):.1f}",
                *((str(config["diverged"]),) if diverged else ()),
            )
        return table

    table = fitted(width, lambda: make(False, True), lambda: make(True, True),
                   lambda: make(True, any_diverged))
    footer = ("* the winner: highest mean final validation accuracy (the test set never "
              f"chooses). Test intervals: {summary['comparisons']['method']}.")
    warnings = [f"warning: {w}" for w in summary.get("warnings", [])]
    return plain_text(table, footer, *warnings, width=width)


MATRIX_UP_TO = 12  # classes whose confusion matrix fits a terminal; beyond, the top confusions
TOP_CONFUSIONS = 20


def format_evaluation(ev: Evaluation, classes: Sequence[str], worst: int = 10,
                      width: int | None = None) -> str:
    """Totals, per-class scores with their macro average, the confusion matrix (with more than
    MATRIX_UP_TO classes, too wide for a terminal: its largest off-diagonal cells instead) and
    the most confident errors, drawn at `width` (default: the console's)."""
    width = width or console_width()
    per_class = new_table("per class", ("class",), ("precision", "recall", "F1", "support"))
    for name, p, r, f, s in zip(classes, ev.precision, ev.recall, ev.f1, ev.support, strict=True):
        per_class.add_row(name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", str(s))
    per_class.add_section()
    per_class.add_row("macro avg", *(f"{v:.4f}" for v in ev.macro.values()),
                      str(int(ev.support.sum())))
    confusion = (_matrix(ev, classes, width) if len(classes) <= MATRIX_UP_TO
                 else _top_confusions(ev, classes))
    mistakes = new_table("most confident errors", ("true", "predicted"), ("confidence", "index"))
    for m in ev.worst[:worst]:
        mistakes.add_row(classes[m.true], classes[m.predicted], f"{m.confidence:.1%}", str(m.index))
    totals = (f"accuracy {ev.accuracy:.4f}   loss {ev.loss:.4f}   "
              f"({int(ev.support.sum())} images)")
    return plain_text(totals, per_class, confusion, mistakes, width=width)


def _matrix(ev: Evaluation, classes: Sequence[str], width: int) -> Table:
    """The confusion matrix, one line per true class: boxed with the class names as column
    headers where that fits `width`; else without vertical rules, and the columns headed by
    the classes' indices (each row's label says which index is which class)."""

    def make(boxed: bool) -> Table:
        if boxed:
            table = new_table("confusion matrix (rows: true class)", ("true \\ pred",), classes)
            labels = list(classes)
        else:
            table = Table("true \\ pred", *(str(i) for i in range(len(classes))),
                          title="confusion matrix (rows: true class) — columns: predicted, "
                          "by index", box=box.SIMPLE_HEAD, padding=(0, 0))
            for column in table.columns[1:]:
                column.justify = "right"
            labels = [f"{i} {name}" for i, name in enumerate(classes)]
        for column in table.columns:
            column.no_wrap = True
        for label, row in zip(labels, ev.confusion, strict=True):
            table.add_row(label, *(str(c) for c in row))
        return table

    return fitted(width, lambda: make(True), lambda: make(False))


def _top_confusions(ev: Evaluation, classes: Sequence[str]) -> Table:
    """The confusion matrix's largest off-diagonal cells: which class is taken for which."""
    off = ev.confusion * (1 - np.eye(len(classes), dtype=ev.confusion.dtype))
    cells = np.argsort(-off, axis=None, kind="stable")[:TOP_CONFUSIONS]
    table = new_table(f"most frequent confusions (confusion matrix: {len(classes)} classes, "
                      "see the plot or --json)", ("true", "predicted"), ("images", "of the true"))
    for true, predicted in zip(*np.unravel_index(cells, off.shape), strict=True):
        if off[true, predicted]:
            table.add_row(classes[true], classes[predicted], str(off[true, predicted]),
                          f"{off[true, predicted] / max(ev.support[true], 1):.1%}")
    return table


def format_fit(summary: dict[str, Any], checkpoint: Any, width: int | None = None) -> str:
    """How one trained model ends, as Keras' `fit` then `evaluate` would: its final training,
    validation and test loss and accuracy, and where its checkpoint is."""
    (run,) = summary["runs"]
    head = (f"{run['run']} (seed {run['seed']}) on {summary['data']}: {run['seconds']:.1f} s "
            f"on {summary.get('device', '?')}")
    table = Table("", "loss", "accuracy", "", title=head, box=box.SIMPLE_HEAD,
                  title_justify="left")
    for column in table.columns[1:3]:
        column.justify = "right"
    sizes = summary.get("sizes", {})
    where = {"train": "last record, train mode", "val": f"{sizes.get('val', '?')} images",
             "test": f"{sizes.get('test', '?')} images, scored once"}
    for split, key in (("train", "final_train"), ("val", "final_val"), ("test", "test")):
        table.add_row(split, f"{run[f'{key}_loss']:.4f}", f"{run[f'{key}_accuracy']:.4f}",
                      where[split])
    lines: list[Any] = [table]
    if run.get("diverged_at") is not None:
        lines.append(f"warning: diverged at iteration {run['diverged_at']} (loss NaN/inf); the "
                     "model was frozen there")
    # The path on a line of its own, unwrapped: a terminal can then select it whole.
    return f"{plain_text(*lines, width=width)}\ncheckpoint: {checkpoint}"
