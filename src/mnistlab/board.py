"""TensorBoard event files, written while training runs: `tensorboard --logdir RUN_DIR/tb`.

One TensorBoard run per model (configuration × seed), Keras' layout, the seeds of a
configuration grouped in its folder (TensorBoard's run list and filters show them together):

    tb/<run>/seed<k>/             its hyperparameters, for the HParams plugin (table and parallel
                                  coordinates over a sweep; the hyperparameters that differ
                                  between configurations first), with validation and test metrics
    tb/<run>/seed<k>/train/       loss, accuracy and learning_rate at every record (train mode,
                                  mean since the last; the rate of the record's step)
    tb/<run>/seed<k>/validation/  loss, accuracy at every record: the same tags as train/, so the
                                  two curves overlay
    tb/<run>/seed<k>/test/        loss, accuracy once, at the last step
    tb/<run>/seed<k>/images/      the configuration's confusion matrix (the report adds it)

Events are appended (and flushed) as records come, with their real wall time, through
TensorBoard's own record format, synchronously: no writer threads, no open file per model
between records (a sweep of a thousand models stays within any file-handle limit). A process
that writes to a run again (a resumed study) first logs a session restart at its first step,
which TensorBoard's reader takes as "drop what an earlier process wrote from this step on": the
records a killed run had written
after its last saved state are replaced, never shown twice.
"""

from __future__ import annotations

import errno
import io
import math
import socket
import struct
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.plugins.hparams import summary_v2 as hparams
from tensorboard.summary.writer.record_writer import RecordWriter

from mnistlab.config import RunConfig, Schedule
from mnistlab.errors import MnistlabError
from mnistlab.schedules import constant, rates

SPLITS = {"train": "train", "val": "validation", "test": "test"}
METRICS = ("loss", "accuracy")


def model_name(run: str, seed: int) -> str:
    """A model's TensorBoard run: its configuration's folder (a file-name-safe form), then its
    seed's."""
    safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in run).lstrip(".") or "_"
    return f"{safe}/seed{seed}"


def has_curves(folder: Path) -> bool:
    """Whether `folder` (a run's tb/) holds training curves, in this layout or the earlier
    `<run>-seed<k>/` one."""
    pattern = "events.out.tfevents.*"
    return any(folder.glob(f"*/*/train/{pattern}")) or any(folder.glob(f"*/train/{pattern}"))


class Board:
    """Appends each model's records to its event files as they come (an executor's `record`
    reports) and, at the end, its test metrics."""

    def __init__(self, folder: Path, configs: Mapping[str, tuple[RunConfig, Schedule]]):
        self.folder, self.configs = Path(folder), configs
        self.written: dict[tuple[str, int, str], int] = {}  # (run, seed, sub-run) → last step
        self._rates: dict[tuple[str, int], list[float]] = {}  # (run, steps) → lr per step
        self._write_experiment()

    def record(self, event: Any) -> None:
        self.add_rows(event.rows)

    def add_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Scalars of metric rows this process has not written yet: live records, or the rows of
        a stack that trained elsewhere (a Ray task) when its result arrives."""
        by_run: dict[tuple[str, int, str], list[event_pb2.Event]] = {}
        for row in rows:
            key = (row["run"], row["seed"], SPLITS[row["split"]])
            if row["step"] > self.written.get(key, 0):
                values = {m: row[m] for m in METRICS}
                if row["split"] == "train" and row["run"] in self.configs:
                    values["learning_rate"] = self._rate(row)
                by_run.setdefault(key, []).append(_scalars(row["step"], values))
        for (run, seed, sub), events in by_run.items():
            self._append(run, seed, sub, events)

    def _rate(self, row: Mapping[str, Any]) -> float:
        """The learning rate of a record's step (its configuration's schedule over the run)."""
        config, schedule = self.configs[row["run"]]
        if constant(config):
            return config.lr
        per_epoch = round(row["step"] / row["epoch"]) if row["epoch"] else 1
        steps = per_epoch * schedule.epochs
        if (row["run"], steps) not in self._rates:
            self._rates[row["run"], steps] = [lr for lr, _ in rates(config, steps)]
        table = self._rates[row["run"], steps]
        return table[min(row["step"], len(table)) - 1]

    def finish(self, runs: Sequence[Mapping[str, Any]]) -> None:
        """Each model's test loss and accuracy at its last step (summary.json's `runs`)."""
        for r in runs:
            step = max((s for (run, seed, _), s in self.written.items()
                        if (run, seed) == (r["run"], r["seed"])), default=0)
            metrics = {m: r[f"test_{m}"] for m in METRICS}
            self._append(r["run"], r["seed"], "test", [_scalars(step, metrics)])

    def _append(self, run: str, seed: int, sub: str, events: list[event_pb2.Event]) -> None:
        """Append to one model's sub-run; this process's first append to it logs a restart at
        its first step, so what an earlier (killed) process wrote from there on is dropped."""
        model = self.folder / model_name(run, seed)
        if not any(model.glob("events.out.tfevents.*")):
            values = _hparams(*self.configs[run], seed)
            append(model, [_event(0, hparams.hparams_pb(values, trial_id=model.name))])
        if (run, seed, sub) not in self.written:
            events = [_restart(events[0].step), *events]
        append(model / sub, events)
        self.written[run, seed, sub] = events[-1].step

    def _write_experiment(self) -> None:
        """The HParams plugin's table: which hyperparameters and which metrics (once)."""
        if any(self.folder.glob("events.out.tfevents.*")):
            return
        values = [_hparams(config, schedule, 0) for config, schedule in self.configs.values()]
        names = sorted({k for v in values for k in v})
        varied = [n for n in names if n != "configuration"
                  and len({repr(v.get(n)) for v in values}) > 1]
        names = ["configuration", *varied, *(n for n in names
                                             if n not in varied and n != "configuration")]
        metrics = [hparams.Metric(m, group=g) for g in ("validation", "test", "train")
                   for m in METRICS]
        summary = hparams.hparams_config_pb([hparams.HParam(n) for n in names], metrics)
        append(self.folder, [_event(0, summary)])


def write_images(folder: Path, run: str, seed: int, images: Mapping[str, bytes],
                 step: int) -> None:
    """PNG images in a model's images/ sub-run at `step`, replacing any written there before
    (a re-rendered report writes them again)."""
    values = [summary_pb2.Summary.Value(tag=tag, image=_image(png)) for tag, png in images.items()]
    events = [_restart(step), _event(step, summary_pb2.Summary(value=values))]
    append(Path(folder) / model_name(run, seed) / "images", events)


def _image(png: bytes) -> summary_pb2.Summary.Image:
    width, height = struct.unpack(">II", png[16:24])  # the PNG header's IHDR chunk
    return summary_pb2.Summary.Image(height=height, width=width, colorspace=4,
                                     encoded_image_string=png)


def append(folder: Path, events: Sequence[event_pb2.Event]) -> None:
    """Append events to `folder`'s event file (made with its version header if new).

    A failed append is cut back to where the file ended, so a reader never meets half a record
    before later ones; a full disk is the one-line disk-full error, any other refusal one line
    naming the folder.
    """
    buffer = io.BytesIO()
    records = RecordWriter(buffer)
    files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    if not files:
        records.write(event_pb2.Event(wall_time=time.time(),
                                      file_version="brain.Event:2").SerializeToString())
    for event in events:
        records.write(event.SerializeToString())
    path = files[-1] if files else folder / (
        f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.mnistlab")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as f:
            end = f.tell()
            try:
                f.write(buffer.getvalue())
                f.flush()
            except OSError:
                f.truncate(end)
                raise
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MnistlabError(f"{folder}: disk full while writing TensorBoard events; free "
                                "space and rerun with --resume RUN_DIR; nothing already "
                                "written was lost") from None
        raise MnistlabError(f"{folder}: cannot write TensorBoard files ({exc.strerror}); "
                            "check the free space and permissions there") from None


def _event(step: int, summary: summary_pb2.Summary) -> event_pb2.Event:
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary)


def _scalars(step: int, values: Mapping[str, float]) -> event_pb2.Event:
    """A diverged model's NaN is left out: a line stops there rather than plunging."""
    return _event(step, summary_pb2.Summary(value=[
        summary_pb2.Summary.Value(tag=tag, simple_value=float(v))
        for tag, v in values.items() if math.isfinite(v)]))


def _restart(step: int) -> event_pb2.Event:
    log = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    return event_pb2.Event(wall_time=time.time(), step=step, session_log=log)


def _hparams(config: RunConfig, schedule: Schedule, seed: int) -> dict[str, Any]:
    """A model's hyperparameters as the HParams plugin's bool/number/string values."""
    plain = lambda v: "x".join(map(str, v)) if isinstance(v, tuple) else v  # noqa: E731
    values = {k: plain(getattr(config, k)) for k in config.__dataclass_fields__ if k != "name"}
    values |= {"beta1": config.betas[0], "beta2": config.betas[1], "configuration": config.name,
               "batch_size": schedule.batch_size, "epochs": schedule.epochs, "seed": seed}
    values.pop("betas")
    return values
