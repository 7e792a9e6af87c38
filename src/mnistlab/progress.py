"""What a running experiment shows: a live bar on a terminal or in a notebook, plain lines in logs.

`Progress` receives an executor's reports (see experiment.executor.Watcher): notes, the start and
end of each engine stack, every record and log line. `Progress(quiet=True)` shows nothing.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar


def _can_redraw(console: Console) -> bool:
    """A live bar needs a terminal, or a notebook with ipywidgets (Rich draws into a widget)."""
    if console.is_jupyter:
        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_terminal


class Progress:
    """One bar per stack, with the epoch and the best validation accuracy so far; where the
    output cannot be redrawn (CI logs, files), one line per record. `verbose` adds the seed
    study's log line every `log_every` iterations; `quiet` shows nothing at all."""

    def __init__(self, stream: TextIO | None = None, *, verbose: bool = False,
                 quiet: bool = False, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False)
        self.verbose, self.quiet = verbose, quiet
        self.live = _can_redraw(self.console) if live is None else live
        self._bar: Bar | None = None
        self._task: Any = None
        self._label = ""
        self._best: dict[str, float] = {}
        self._epoch = 0

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)

    def stack_started(self, index: int, count: int, configurations: Sequence[str], models: int,
                      steps: int) -> None:
        self._label = f"stack {index + 1}/{count}" if count > 1 else "training"
        self._best, self._epoch = {}, 0
        seeds = models // len(configurations)
        shape = (f"{len(configurations)} configuration{'s' * (len(configurations) != 1)} × "
                 f"{seeds} seed{'s' * (seeds != 1)}")
        self.note(f"{self._label}: {models} model{'s' * (models != 1)} ({shape}): "
                  + ", ".join(configurations))
        if self.live and not self.quiet:
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(bar_width=20),
                            MofNCompleteColumn(), TextColumn("epoch {task.fields[epoch]}"),
                            TimeRemainingColumn(), TextColumn("{task.fields[best]}"),
                            console=self.console)
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=steps, epoch="0.00", best="")

    def record(self, event: Any) -> None:
        for row in event.rows:
            if row["split"] == "val":
                key = f"{row['run']} s{row['seed']}"
                self._best[key] = max(self._best.get(key, 0.0), row["accuracy"])
        best_key = max(self._best, key=self._best.get, default="")
        best = f"best val acc {self._best[best_key]:.4f} ({best_key})" if best_key else ""
        if self._bar is not None:
            self._bar.update(self._task, completed=event.step, epoch=f"{event.epoch:.2f}",
                             best=best)
        else:
            self.note(f"{self._label} epoch {event.epoch:.2f} step {event.step}/"
                      f"{event.total_steps} {best}")
        if self.verbose and int(event.epoch) > self._epoch:
            self._epoch = int(event.epoch)
            for line in epoch_lines(event.rows, self._epoch):
                self.note(line)

    def log(self, line: str) -> None:
        if self.verbose:
            self.note(line)

    def stack_finished(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def epoch_lines(rows: Sequence[dict], epoch: int) -> list[str]:
    """Keras' end-of-epoch line per configuration, mean over its seeds at the record that ends
    the epoch: `epoch 3 lr1e-3-p0.2: loss 0.3412 - acc 0.8765 - val_loss 0.3567 - val_acc ...`."""
    by_run: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        prefix = "" if r["split"] == "train" else "val_"
        for metric, short in (("loss", "loss"), ("accuracy", "acc")):
            by_run.setdefault(r["run"], {}).setdefault(prefix + short, []).append(r[metric])
    return [f"epoch {epoch} {run}: " + " - ".join(
        f"{key} {sum(v) / len(v):.4f}" for key, v in values.items()) for run, values in
        by_run.items()]
