"""Best weights and early stopping: what each model makes of its validation records.

`Monitor` follows every model's validation accuracy from record to record. Its best is the
highest (the earliest of ties, as Keras's EarlyStopping keeps it); a model with
`RunConfig.restore_best` keeps a copy of its weights from each new best and ends with them
(Keras's restore_best_weights). A model with `patience` > 0 stops at the record that makes
`patience` records without a better accuracy: the engine freezes it there, as it freezes a
diverged model, and the rest of the stack goes on. No model stops at the last record (training
ends there anyway), and a diverged model (its accuracy NaN) neither improves nor stops.

The monitor's state is a function of the records alone: a resumed run rebuilds it by replaying
the records it saved, so only the best weights need saving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from mnistlab.config import RunConfig


class Monitor:
    """Each model's best validation record and, with patience, when it stopped."""

    def __init__(self, configs: Sequence[RunConfig]):
        self.patience = [c.patience for c in configs]
        self.restore = [c.restore_best for c in configs]
        self.best = [-math.inf] * len(configs)
        self.best_step: list[int | None] = [None] * len(configs)
        self.waited = [0] * len(configs)  # records since the best
        self.stopped: list[int | None] = [None] * len(configs)

    def update(self, step: int, accuracy: Sequence[float], last: bool) -> tuple[list[int],
                                                                                  list[int]]:
        """Take the record at `step` (`accuracy` per model, NaN where diverged; `last`: the
        run's final record). Returns the models whose weights to keep now (a new best, with
        restore_best) and the models that stop now."""
        keep, stop = [], []
        for k, value in enumerate(accuracy):
            if self.stopped[k] is not None or math.isnan(value):
                continue
            if value > self.best[k]:
                self.best[k], self.best_step[k], self.waited[k] = value, step, 0
                keep += [k] if self.restore[k] else []
                continue
            self.waited[k] += 1
            if 0 < self.patience[k] <= self.waited[k] and not last:
                self.stopped[k] = step
                stop.append(k)
        return keep, stop

    def restored(self) -> list[int | None]:
        """Per model, the step of the record whose weights it ends with where it restores its
        best, else None (it ends with its last weights)."""
        return [s if keep else None for s, keep in zip(self.best_step, self.restore, strict=True)]
