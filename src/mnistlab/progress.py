"""What a running experiment shows: a live bar on a terminal or in a notebook, plain lines in logs.

`Progress` receives an executor's reports (see experiment.executor.Watcher): notes, the start and
end of each engine stack, a few step reports a second (the engine's `on_step`), every record and
log line. One bar covers the whole command, across its stacks: steps done of all, iterations per
second, the ETA, the running training loss and the best validation accuracy so far. Where the
output cannot be redrawn (CI logs, files) it prints one line per record instead; in a notebook
without ipywidgets, a text line that is replaced in place. `Progress(quiet=True)` shows nothing.
"""

from __future__ import annotations

import importlib.util
import math
import sys
import time
from collections.abc import Sequence
from typing import Any, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as Bar
from rich.text import Text


def _can_redraw(console: Console) -> bool:
    """A live Rich bar needs a terminal, or a notebook with ipywidgets (Rich draws into a
    widget); a notebook without them gets the text bar (`_NotebookLine`)."""
    if console.is_jupyter:
        return importlib.util.find_spec("ipywidgets") is not None
    return console.is_terminal


def _in_notebook(console: Console) -> bool:
    return console.is_jupyter and importlib.util.find_spec("IPython") is not None


WIDE = 120  # columns from which the live bar shows everything (see `stack_started`)


class _Speed(ProgressColumn):
    """Iterations per second over the last half minute (Rich's estimate)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.1f} it/s")


class _NotebookLine:
    """One text line in a notebook's output, replaced in place (IPython's display handles, no
    ipywidgets); updates at most twice a second."""

    def __init__(self) -> None:
        from IPython.display import display

        self.handle = display({"text/plain": ""}, raw=True, display_id=True)
        self.shown_at = 0.0

    def show(self, text: str, force: bool = False) -> None:
        now = time.monotonic()
        if force or now - self.shown_at >= 0.5:
            self.shown_at = now
            self.handle.update({"text/plain": text}, raw=True)


class Progress:
    """The live bar (or one line per record where nothing can be redrawn), with the epoch and
    the best validation accuracy so far. `verbose` adds Keras' line at the end of each epoch and
    the seed study's log line every `log_every` iterations; `quiet` shows nothing at all."""

    def __init__(self, stream: TextIO | None = None, *, verbose: bool = False,
                 quiet: bool = False, live: bool | None = None):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False)
        self.verbose, self.quiet = verbose, quiet
        self.live = _can_redraw(self.console) if live is None else live
        self.notebook = live is None and not self.live and _in_notebook(self.console)
        self._bar: Bar | None = None
        self._wide = True
        self._task: Any = None
        self._line: _NotebookLine | None = None
        self._label = ""
        self._best: dict[str, float] = {}
        self._last_epoch: float | None = None
        # Steps of the whole command: done in finished stacks, expected in all, this stack's.
        self._done, self._total, self._steps, self._skipped = 0, 0, 0, 0
        self._first = True  # no step report yet from this stack (a resumed one starts late)
        self._loss = ""
        self._started = time.monotonic()
        self._timed = (self._started, 0)  # (when, steps done then): the text bar's speed

    def note(self, text: str) -> None:
        if not self.quiet:
            self.console.print(text, markup=False, soft_wrap=True)

    def stack_started(self, index: int, count: int, configurations: Sequence[str], models: int,
                      steps: int) -> None:
        self._label = f"stack {index + 1}/{count}" if count > 1 else "training"
        self._best, self._last_epoch, self._first, self._loss = {}, None, True, ""
        self._steps, self._skipped = steps, 0
        # The whole command's steps: what is done, and this stack's size for each one left.
        self._total = self._done + steps * (count - index)
        seeds = models // len(configurations)
        shape = (f"{len(configurations)} configuration{'s' * (len(configurations) != 1)} × "
                 f"{seeds} seed{'s' * (seeds != 1)}")
        self.note(f"{self._label}: {models} model{'s' * (models != 1)} ({shape}): "
                  + ", ".join(configurations))
        if self.quiet:
            return
        if self.live:
            if self._bar is None:
                # A narrow terminal (under WIDE columns) gets a shorter bar, no elapsed time and
                # the best accuracy without its model's name, so the bar stays on one line.
                self._wide = self.console.width >= WIDE
                elapsed = [TimeElapsedColumn()] if self._wide else []
                self._bar = Bar(TextColumn("{task.description}"),
                                BarColumn(bar_width=20 if self._wide else 10),
                                MofNCompleteColumn(), _Speed(), *elapsed,
                                TextColumn("ETA"), TimeRemainingColumn(),
                                TextColumn("{task.fields[loss]}"),
                                TextColumn("{task.fields[best]}"),
                                console=self.console, transient=True)
                self._task = self._bar.add_task(self._label, total=self._total, loss="",
                                                best="")
            self._bar.update(self._task, description=self._label, total=self._total)
            self._bar.start()
        elif self.notebook and self._line is None:
            self._line = _NotebookLine()

    def step(self, event: Any) -> None:
        """A step report (engine.StepEvent): the bar moves, with the running training loss."""
        if self._first:  # a resumed stack starts at its saved step: those steps are not run
            self._first, self._skipped = False, event.step - 1
            self._total -= self._skipped
            self._last_epoch = self._skipped / event.steps_per_epoch  # where this session began
        if self.quiet or not (self.live or self.notebook):
            return
        losses = [v for v in event.loss() if math.isfinite(v)]
        if losses:
            mean = sum(losses) / len(losses)
            self._loss = f"loss {mean:.4f}" if len(losses) == 1 else f"mean loss {mean:.4f}"
        self._show(event.step)

    def record(self, event: Any) -> None:
        for row in event.rows:
            if row["split"] == "val":
                key = f"{row['run']} s{row['seed']}"
                self._best[key] = max(self._best.get(key, 0.0), row["accuracy"])
        if self._first:  # no step reports (a general model's engine): count from the records
            self._first = False
        if self.live or self.notebook:
            self._show(event.step)
        else:
            self.note(f"{self._label} epoch {event.epoch:.2f} step {event.step}/"
                      f"{event.total_steps} {self._best_text()}")
        if self.verbose:
            for line in self._epoch_lines(event):
                self.note(line)

    def _epoch_lines(self, event: Any) -> list[str]:
        """Keras' line for the epoch this record ends: the first record past an epoch's end
        since where this session began (a resumed stack begins at its saved step, so its first
        record, mid-epoch, ends no epoch). With no step report to say where the session began
        (another engine), a first record ends an epoch only when it falls on its end."""
        last, self._last_epoch = self._last_epoch, event.epoch
        ended = math.floor(event.epoch + 1e-9)
        whole = abs(event.epoch - round(event.epoch)) < 1e-6
        if last is None:
            return epoch_lines(event.rows, ended) if whole and ended >= 1 else []
        if ended <= math.floor(last + 1e-9):
            return []
        lines = epoch_lines(event.rows, ended)
        if not whole:  # records do not fall on epoch ends: say where these values are from
            lines = [f"{line} (at epoch {event.epoch:.2f})" for line in lines]
        return lines

    def _best_text(self, short: bool = False) -> str:
        best_key = max(self._best, key=self._best.get, default="")
        if not best_key:
            return ""
        return (f"best {self._best[best_key]:.4f}" if short else
                f"best val acc {self._best[best_key]:.4f} ({best_key})")

    def _show(self, step: int) -> None:
        done = self._done + step - self._skipped
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=self._total, loss=self._loss,
                             best=self._best_text(short=not self._wide))
        elif self._line is not None:
            self._line.show(self._text_bar(done))

    def _text_bar(self, done: int) -> str:
        """`stack 1/2 [#####---------------] 120/400 steps  85.0 it/s  ETA 0:03  loss 0.41`."""
        when, then = self._timed
        now = time.monotonic()
        speed = (done - then) / (now - when) if now > when and done > then else 0.0
        filled = round(20 * done / max(self._total, 1))
        eta = (self._total - done) / speed if speed else math.nan
        clock = "?" if not math.isfinite(eta) else f"{int(eta) // 60}:{int(eta) % 60:02d}"
        parts = [f"{self._label} [{'#' * filled}{'-' * (20 - filled)}] {done}/{self._total} "
                 f"steps", f"{speed:,.1f} it/s", f"ETA {clock}", self._loss, self._best_text()]
        return "  ".join(p for p in parts if p)

    def log(self, line: str) -> None:
        if self.verbose:
            self.note(line)

    def stack_finished(self) -> None:
        """The stack's steps count as done; the terminal bar steps aside (for the notes between
        stacks, or an error) and comes back, with the same totals and speed, at the next."""
        self._done += self._steps - self._skipped
        if self._bar is not None:
            self._bar.update(self._task, completed=self._done)
            self._bar.stop()
            # The erased bar takes no lines now: else its next start moves the cursor up over
            # them and erases the note printed between the stacks.
            self._bar.live._live_render._shape = None
        if self._line is not None:
            self._line.show(self._text_bar(self._done), force=True)


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
