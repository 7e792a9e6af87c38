"""What a running study shows: a live bar on a terminal, one plain line per record otherwise."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class StudyProgress:
    """Receives the engine's record and log events for each stack of a study.

    On a terminal: one bar per stack, with the epoch and the best validation accuracy so far.
    Not on a terminal (CI logs, files): one line per record, no bar redraws. `verbose` adds the
    seed-style log line every `log_every` iterations.
    """

    def __init__(
        self, stream: TextIO | None = None, *, verbose: bool = False, live: bool | None = None
    ):
        self.stream = stream or sys.stderr
        self.console = Console(file=self.stream, highlight=False)
        self.verbose = verbose
        self.live = self.stream.isatty() if live is None else live
        self._bar: Progress | None = None
        self._task: Any = None
        self._label = ""
        self._best: dict[str, float] = {}

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, soft_wrap=True)

    def start_stack(
        self, index: int, count: int, names: list[str], models: int, total_steps: int
    ) -> None:
        """`names`: the configurations in the stack; `models`: configurations × seeds."""
        self._label = f"stack {index + 1}/{count}"
        self._best = {}
        configs = f"{len(names)} configurations ({', '.join(names)})"
        self.note(f"{self._label}: {models} models, {configs}")
        if self.live:
            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self._bar.start()
            self._task = self._bar.add_task(self._label, total=total_steps)

    def on_record(self, event: Any) -> None:
        for row in event.rows:
            if row["split"] == "val":
                key = f"{row['run']} seed{row['seed']}"
                self._best[key] = max(self._best.get(key, 0.0), row["accuracy"])
        best_key = max(self._best, key=self._best.get, default="")
        best = f"best val acc {self._best[best_key]:.4f} ({best_key})" if best_key else ""
        text = f"{self._label} epoch {event.epoch:.2f} step {event.step}/{event.total_steps} {best}"
        if self._bar is not None:
            self._bar.update(self._task, completed=event.step, description=text)
        else:
            self.note(text)

    def on_log(self, line: str) -> None:
        if self.verbose:
            self.note(line)

    def end_stack(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
