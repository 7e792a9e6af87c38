"""Both engines' loop over a training state: steps, records, log lines, resume states, Ctrl-C.

The schedule (mnistlab.config.Schedule):
- A step is one minibatch; steps are numbered 1.. globally. The last partial batch of an epoch is
  used unless `drop_last`. A batch is an index slice of the epoch's permutation (one permutation
  per seed, so models of one seed see the same batches).
- A record at every `record_every`-th step and also after the last step, so the final weights are
  always recorded. A record holds per model a "train" row (mean over the steps since the previous
  record of the per-step mean loss/accuracy, train mode) and a "val" row (the whole validation set,
  eval mode).
- A log line per model when the step within the epoch is a multiple of `log_every`, with that
  step's batch loss: `baseline seed0 | epoch 1/10 | step 250/375 | loss 0.2345`.
- Divergence: a model whose batch loss is NaN/inf at step s is `diverged` at s and frozen from
  then on (that step's update is skipped; weights and Adam moments never change again); its rows
  from that record on and its test metrics carry NaN. The other models are unaffected.
- Early stopping and best weights (engine.stopping): after each record, a model with
  `patience` may stop, frozen from then on like a diverged one (its rows go on, recording the
  stopped model); a model with `restore_best` ends with its weights of its best validation
  record, which the test pass and the checkpoint then use.
- Augmentation (engine.augment): a model that augments sees its seed's batch transformed by
  its stream (seed and settings), shared with the models of its seed that augment alike.
- Resume state (engine.resume): at every epoch end, written on a background thread, and on
  Ctrl-C (taken between steps, then `Interrupted`).
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save
from torch import Tensor

from mnistlab.atomic import atomic_write_bytes
from mnistlab.engine.device import sync
from mnistlab.engine.records import RecordBooks, RecordEvent, evaluate

STEP_EVERY = 0.2  # seconds between on_step calls: a live bar's refresh, not a per-step cost


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, after the resume state was saved at `state_path`."""

    def __init__(self, state_path: Path):
        super().__init__(str(state_path))
        self.state_path = state_path


class StepEvent:
    """Passed to `on_step` every STEP_EVERY seconds at most (and after a session's first step):
    where training is. `loss()` is the mean training loss of each model since the last record;
    it reads the device, so it costs a host sync, paid only by a caller that asks."""

    def __init__(self, step: int, total_steps: int, steps_per_epoch: int,
                 loss_sum: Tensor, since: int):
        self.step, self.total_steps, self.steps_per_epoch = step, total_steps, steps_per_epoch
        self._loss_sum, self._since = loss_sum, since

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch

    def loss(self) -> list[float]:
        if not self._since:
            return [math.nan] * len(self._loss_sum)
        return (self._loss_sum / self._since).tolist()


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[Callable[[], bool]]:
    """Ctrl-C sets a flag the loop checks between steps, so a saved state is never half a step."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    hits: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hits.append(1))
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def write_state(path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
    """Write a resume state atomically. Serialised in memory and written by atomic_path (not by
    safetensors' own file writer), so a full disk is the one-line disk-full error and the file
    gets the usual permissions."""
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=meta))


class _StateWriter:
    """Writes epoch-end resume states on a background thread, one at a time and in order.

    Why: writing and syncing a state file takes tens of milliseconds, as long as dozens of GPU
    steps. The copy to host memory is taken before training goes on; a failed write (a full
    disk) is raised at the next save or at the end. Each file is still written atomically.
    """

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def submit(self, path: Path, tensors: dict[str, Tensor], meta: dict[str, str]) -> None:
        self.wait()

        def write() -> None:
            try:
                write_state(path, tensors, meta)
            except BaseException as exc:  # handed to the training thread by wait()
                self.error = exc

        self.thread = threading.Thread(target=write, name="mnistlab-state", daemon=True)
        self.thread.start()

    def wait(self) -> None:
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            error, self.error = self.error, None
            raise error
def run_schedule(
    run: RecordBooks, dev: torch.device, test_part: Callable[[], tuple[Tensor, Tensor]], *,
    state_path: Path | None, on_record: Callable[[RecordEvent], None] | None,
    on_log: Callable[[str], None] | None, on_step: Callable[[StepEvent], None] | None = None,
) -> tuple[list[float], list[float], list[Tensor]]:
    """Both engines' loop over `run` (a training state: the MLP's mlp.MLPTraining, or
    general.ModuleTraining for other networks): steps, records, log lines, epoch-end resume
    states, Ctrl-C (the state saved, then Interrupted), best weights, and the test pass once at
    the end on `test_part()`. Returns the test losses, accuracies and prediction blocks."""
    schedule = run.schedule
    start = time.perf_counter() - run.seconds
    writer = _StateWriter()
    next_report = 0.0  # on_step: the first step reports at once, then every STEP_EVERY seconds
    with torch.no_grad(), _deferred_interrupt() as interrupted:
        try:
            while run.step < run.total:
                run.train_step()
                if on_step and (now := time.monotonic()) >= next_report:
                    next_report = now + STEP_EVERY
                    on_step(StepEvent(run.step, run.total, run.steps_per_epoch, run.loss_sum,
                                      run.since))
                if run.step % schedule.record_every == 0 or run.step == run.total:
                    rows = run.record()
                    if on_record:
                        epoch = run.step / run.steps_per_epoch
                        on_record(RecordEvent(run.step, run.total, epoch, rows))
                for line in run.log_lines() if on_log else ():
                    on_log(line)
                if interrupted():
                    raise KeyboardInterrupt
                if state_path is not None and run.step % run.steps_per_epoch == 0:
                    sync(dev)
                    run.seconds = time.perf_counter() - start
                    writer.submit(Path(state_path), *run.snapshot())
        except KeyboardInterrupt:
            writer.wait()
            if state_path is None:
                raise
            run.seconds = time.perf_counter() - start
            write_state(Path(state_path), *run.snapshot())
            raise Interrupted(Path(state_path)) from None
        writer.wait()
        sync(dev)
        run.seconds = time.perf_counter() - start
        run.restore_best()
        test_x, test_y = test_part()
        blocks: list[Tensor] = []
        test_loss, test_acc = evaluate(run.stack, test_x, test_y, blocks)
    return test_loss, test_acc, blocks
