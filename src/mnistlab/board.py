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

Events are appended (and flushed) as records come, with their real wall time, in TensorBoard's
own record format, synchronously: no writer threads, no open file per model between records (a
sweep of a thousand models stays within any file-handle limit). The protocol buffers are
TensorBoard's; their framing and checksums are written here, since TensorBoard's writer modules
import its TensorFlow stand-in (and boto3, fsspec, absl) for these few lines. A process that
writes to a run again (a resumed study) first logs a session restart at its first step, which
TensorBoard's reader takes as "drop what an earlier process wrote from this step on": the
records a killed run had written after its last saved state are replaced, never shown twice.
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

from tensorboard.compat.proto import (
    event_pb2,
    summary_pb2,
    tensor_pb2,
    tensor_shape_pb2,
    types_pb2,
)
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

from mnistlab.config import RunConfig, Schedule
from mnistlab.engine import constant, rates
from mnistlab.errors import MnistlabError

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
            append(model, [_event(0, session_start(values, model.name))])
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
        metrics = [api_pb2.MetricInfo(name=api_pb2.MetricName(group=g, tag=m))
                   for g in ("validation", "test", "train") for m in METRICS]
        experiment = api_pb2.Experiment(hparam_infos=[api_pb2.HParamInfo(name=n) for n in names],
                                        metric_infos=metrics)
        append(self.folder, [_event(0, _hparams_summary(
            "_hparams_/experiment", plugin_data_pb2.HParamsPluginData(experiment=experiment)))])


def session_start(values: Mapping[str, bool | float | str], trial: str) -> summary_pb2.Summary:
    """One model's hyperparameter values for the HParams plugin: what TensorBoard's
    `hparams_pb(values, trial_id=trial)` makes."""
    info = plugin_data_pb2.SessionStartInfo(group_name=trial, start_time_secs=time.time())
    for name in sorted(values):
        value, field = values[name], info.hparams[name]
        if isinstance(value, bool):
            field.bool_value = value
        elif isinstance(value, int | float):
            field.number_value = value
        elif isinstance(value, str):
            field.string_value = value
        else:
            raise TypeError(f"hparams[{name!r}] = {value!r}, of unsupported type {type(value)!r}")
    return _hparams_summary("_hparams_/session_start_info",
                            plugin_data_pb2.HParamsPluginData(session_start_info=info))


# The HParams plugin's summaries carry an empty tensor (a float vector of length 0).
_NO_TENSOR = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=(
    tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=0)])))


def _hparams_summary(tag: str, data: plugin_data_pb2.HParamsPluginData) -> summary_pb2.Summary:
    data.version = 0  # the plugin's data format
    # Deterministic: protobuf's upb runtime seeds its map hashing per process, so a plain
    # SerializeToString orders the hparams map differently from one run to the next.
    content = data.SerializeToString(deterministic=True)
    plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="hparams", content=content)
    metadata = summary_pb2.SummaryMetadata(plugin_data=plugin)
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata,
                                                                tensor=_NO_TENSOR)])


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
    files = sorted(folder.glob("events.out.tfevents.*")) if folder.is_dir() else []
    if not files:
        buffer.write(record(event_pb2.Event(wall_time=time.time(),
                                            file_version="brain.Event:2").SerializeToString()))
    for event in events:
        buffer.write(record(event.SerializeToString()))
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


def record(data: bytes) -> bytes:
    """`data` as one TFRecord: its length, the length's masked CRC-32C, the data, its masked
    CRC-32C (little-endian), as TensorBoard's reader expects."""
    length = struct.pack("<Q", len(data))
    return (length + struct.pack("<I", masked_crc32c(length)) + data
            + struct.pack("<I", masked_crc32c(data)))


def _crc32c_table() -> tuple[int, ...]:
    """The byte table of CRC-32C (Castagnoli, reflected polynomial 0x82F63B78)."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum: CRC-32C of `data`, rotated right by 15 bits plus a constant."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    crc ^= 0xFFFFFFFF
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


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
