"""A report's figures drawn by worker processes, side by side, while the command waits less.

Drawing is single-threaded Python (matplotlib), and a report's figures are independent of each
other. So a command that renders a report (`mnistlab train`, `study`, `sweep`, `report`) starts
its workers first: they import matplotlib while the command imports PyTorch and loads the data
(work for one core), wait on their input without using the CPU while it trains, and draw the
figures together when the report is rendered; the command itself never imports matplotlib.

A worker is `python -c "...serve()"` in a session of its own (Ctrl-C reaches the command alone,
which ends it), reading calls and writing answers as pickles on its own pipes; it ends when its
input closes, so also when the command is killed. A figure a worker did not draw (it failed, or
died) is drawn in the command's process, where an error is then raised as it would be anyway.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

Call = tuple[str, tuple[Any, ...]]  # a function of mnistlab.report.plots and its arguments
MOST = 4  # workers at most: a report has few figures, and each worker costs a start-up
_FAILED = object()
_STARTED: list[_Worker] = []  # the workers of the `started` blocks open now


class _Worker:
    """One worker process, called one figure at a time."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from mnistlab.report.workers import serve; serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True)

    def call(self, call: Call) -> Any:
        """The call's result, or _FAILED where the worker raised, or is gone."""
        try:
            pickle.dump(call, self.process.stdin)
            self.process.stdin.flush()
            ok, result = pickle.load(self.process.stdout)
        except (OSError, EOFError, pickle.PickleError):
            return _FAILED
        return result if ok else _FAILED

    def close(self) -> None:
        """End the worker: nothing is asked of it any more, so nothing of it is cut short."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        self.process.kill()
        self.process.wait()
        self.process.stdout.close()


@contextlib.contextmanager
def started(count: int | None = None) -> Iterator[None]:
    """Start `count` workers (by default one per core, at most MOST) for the reports rendered
    inside the block; where none can start, the figures are drawn in this process."""
    workers: list[_Worker] = []
    with contextlib.suppress(OSError):
        for _ in range(count or min(MOST, os.cpu_count() or 1)):
            workers.append(_Worker())
    _STARTED.extend(workers)
    try:
        yield
    finally:
        for worker in workers:
            _STARTED.remove(worker)
            worker.close()


def draw(calls: Mapping[Hashable, Call]) -> dict[Hashable, Any]:
    """Each call's result, by key: the calls shared out among the started workers as each
    becomes free (so put the slowest first), those they did not draw drawn here."""
    queue = list(calls.items())[::-1]
    results: dict[Hashable, Any] = {}

    def work(worker: _Worker) -> None:
        while queue and worker.process.poll() is None:  # a worker that died takes no more
            with contextlib.suppress(IndexError):  # another thread took the last one
                key, call = queue.pop()
                results[key] = worker.call(call)

    threads = [threading.Thread(target=work, args=(w,), daemon=True) for w in _STARTED]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {key: _here(call) if results.get(key, _FAILED) is _FAILED else results[key]
            for key, call in calls.items()}


def _here(call: Call) -> Any:
    from mnistlab.report import plots

    name, args = call
    return getattr(plots, name)(*args)


def serve() -> None:
    """A worker's loop: read a call, answer (True, result) or (False, the error's text); end
    when the input closes. Whatever else would print goes to stderr, not into the answers."""
    from mnistlab.report import plots

    calls, answers = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    while True:
        try:
            name, args = pickle.load(calls)
        except EOFError:
            return
        try:
            answer = (True, getattr(plots, name)(*args))
        except Exception as exc:  # redrawn by the caller, where it raises
            answer = (False, repr(exc))
        pickle.dump(answer, answers)
        answers.flush()
