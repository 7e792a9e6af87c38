"""TensorBoard, live: events as training runs, read back with TensorBoard's own readers."""

from __future__ import annotations

import io
import shutil
import stat

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2

import mnistlab as ml
from mnistlab.config import RunConfig, Schedule, StudyConfig
from mnistlab.data import load
from mnistlab.progress import Progress

RUNS = (RunConfig(name="plain", lr=3e-3, hidden=(32, 32)),
        RunConfig(name="ln", lr=1e-3, layernorm=True, dropout=0.2, hidden=(32, 32)))
STUDY = StudyConfig(name="tb", runs=RUNS, seeds=(0, 1), device="cpu",
                    schedule=Schedule(batch_size=64, epochs=3, record_every=5))


@pytest.fixture(scope="module")
def digits(mnist_t10k_dir) -> tuple[np.ndarray, np.ndarray]:
    part = load(str(mnist_t10k_dir), progress=False).train
    return part.images[:1200], part.labels[:1200]


def scalars(folder) -> dict[str, list]:
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: events.Scalars(tag) for tag in events.Tags()["scalars"]}


class Peek(Progress):
    """Reads the event files while training goes on, at the third record."""

    def __init__(self):
        super().__init__(io.StringIO(), quiet=True)
        self.seen: dict | None = None
        self.records = 0

    def record(self, event):
        self.records += 1
        if self.records == 3:
            (root,) = [p for p in self.tb.iterdir()]
            self.seen = scalars(root / "tb" / "ln" / "seed1" / "validation")


@pytest.fixture(scope="module")
def finished(digits, tmp_path_factory):
    peek = Peek()
    out = tmp_path_factory.mktemp("runs")
    peek.tb = out
    results = ml.study(STUDY, data=digits, out=out, progress=peek, report=False)
    return results, peek


def test_events_appear_while_training_runs(finished):
    results, peek = finished
    total = sum(1 for r in results.run_dir.read_metrics() if r["run"] == "ln" and r["seed"] == 1
                and r["split"] == "val")
    assert peek.seen is not None and 1 <= len(peek.seen["accuracy"]) < total


def test_every_model_has_train_validation_and_test_under_the_same_tags(finished):
    results, _ = finished
    tb = results.run_dir.tensorboard
    # A configuration's seeds are grouped in its folder (issue 23).
    assert sorted(p.relative_to(tb).as_posix() for p in tb.glob("*/seed*")) == [
        "ln/seed0", "ln/seed1", "plain/seed0", "plain/seed1"]
    rows = results.run_dir.read_metrics()
    for run, seed in (("ln", 0), ("plain", 1)):
        for split, sub in (("train", "train"), ("val", "validation")):
            got = scalars(tb / run / f"seed{seed}" / sub)
            # train/ also holds the learning rate at each record (issue 23)
            assert set(got) == {"loss", "accuracy", *(["learning_rate"] * (split == "train"))}
            expected = [r for r in rows if (r["run"], r["seed"], r["split"]) == (run, seed, split)]
            assert [e.step for e in got["accuracy"]] == [r["step"] for r in expected]
            assert [e.value for e in got["loss"]] == pytest.approx([r["loss"] for r in expected])
            times = [e.wall_time for e in got["accuracy"]]
            assert times == sorted(times) and times[-1] > times[0]  # real times, as they came
        (test,) = scalars(tb / run / f"seed{seed}" / "test")["accuracy"]
        summary = next(r for r in results.raw["runs"] if (r["run"], r["seed"]) == (run, seed))
        assert test.value == pytest.approx(summary["test_accuracy"])


def test_hyperparameters_for_the_hparams_plugin(finished):
    results, _ = finished
    events = EventAccumulator(str(results.run_dir.tensorboard / "ln" / "seed1"))
    events.Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    info = plugin_data_pb2.HParamsPluginData.FromString(
        content[hparams_metadata.SESSION_START_INFO_TAG]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
              for k, v in info.hparams.items()}
    assert values["lr"] == pytest.approx(1e-3) and values["dropout"] == pytest.approx(0.2)
    assert values["layernorm"] is True and values["hidden"] == "32x32"
    assert values["seed"] == 1 and values["configuration"] == "ln" and values["epochs"] == 3
    root = EventAccumulator(str(results.run_dir.tensorboard))
    root.Reload()
    config = plugin_data_pb2.HParamsPluginData.FromString(root.PluginTagToContent(
        hparams_metadata.PLUGIN_NAME)[hparams_metadata.EXPERIMENT_TAG]).experiment
    metrics = {(m.name.group, m.name.tag) for m in config.metric_infos}
    assert {("validation", "accuracy"), ("test", "accuracy")} <= metrics
    assert {"lr", "dropout", "layernorm", "seed"} <= {h.name for h in config.hparam_infos}
    # The hyperparameters that differ between the configurations come first (issue 23).
    names = [h.name for h in config.hparam_infos]
    assert names[:4] == ["configuration", "dropout", "layernorm", "lr"], names


def test_the_learning_rate_is_logged_at_every_record(finished):
    results, _ = finished
    tb = results.run_dir.tensorboard
    rates = scalars(tb / "ln" / "seed0" / "train")["learning_rate"]
    steps = [r["step"] for r in results.run_dir.read_metrics()
             if (r["run"], r["seed"], r["split"]) == ("ln", 0, "train")]
    assert [e.step for e in rates] == steps
    assert [e.value for e in rates] == pytest.approx([1e-3] * len(steps))


def test_folders_are_readable_by_everyone_who_may_read_the_run(finished):
    results, _ = finished
    for folder in [results.run_dir.tensorboard, *results.run_dir.tensorboard.rglob("*")]:
        if folder.is_dir():
            assert stat.S_IMODE(folder.stat().st_mode) & 0o755 == 0o755, folder


def test_a_resumed_study_continues_the_streams_without_duplicates(digits, tmp_path):
    """A crash in the second epoch (like kill -9: no state saved at the crash): the resumed
    run starts again from the first epoch's end, writes the records since then a second time,
    and TensorBoard shows each step once."""

    class Crash(Progress):
        def __init__(self):
            super().__init__(io.StringIO(), quiet=True)

        def record(self, event):
            if event.step == 25:  # 13 steps per epoch: late in the second epoch
                raise RuntimeError("the machine went down")

    with pytest.raises(RuntimeError, match="went down"):
        ml.study(STUDY, data=digits, out=tmp_path, progress=Crash(), report=False)
    (run_dir,) = tmp_path.iterdir()
    before = scalars(run_dir / "tb" / "ln" / "seed1" / "validation")["accuracy"]
    assert [e.step for e in before][-1] == 25
    results = ml.study(resume=run_dir, data=digits, progress=False, report=False)
    rows = [r for r in results.run_dir.read_metrics()
            if (r["run"], r["seed"], r["split"]) == ("ln", 1, "val")]
    after = scalars(run_dir / "tb" / "ln" / "seed1" / "validation")["accuracy"]
    assert [e.step for e in after] == [r["step"] for r in rows]  # each step once, in order
    assert [e.value for e in after] == pytest.approx([r["accuracy"] for r in rows])
    fresh = ml.study(STUDY, data=digits, out=tmp_path / "fresh", progress=False, report=False)
    assert fresh.run_dir.metrics_path.read_text() == results.run_dir.metrics_path.read_text()
    shutil.rmtree(tmp_path / "fresh")


def hparams(model_folder) -> dict:
    """A model's hyperparameters as the HParams plugin reads them."""
    events = EventAccumulator(str(model_folder))
    events.Reload()
    content = events.PluginTagToContent(hparams_metadata.PLUGIN_NAME)
    info = plugin_data_pb2.HParamsPluginData.FromString(
        content[hparams_metadata.SESSION_START_INFO_TAG]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in info.hparams.items()}


def test_re_rendered_hparams_match_the_sweep_s_own_schedules(digits, tmp_path):
    """`mnistlab report` rebuilds the experiment from the run directory (Experiment.from_run_dir):
    a sweep over a schedule field keeps each configuration's own schedule in the re-rendered
    TensorBoard hparams, as training wrote them, not the base schedule."""
    sweep = {"name": "tb-sweep", "device": "cpu", "seeds": [0], "base": {"hidden": [32, 32]},
             "schedule": {"batch_size": 64, "epochs": 1, "record_every": 5},
             "grid": {"epochs": [1, 2], "batch_size": [64, 128]}}
    results = ml.sweep(sweep, data=digits, out=tmp_path, progress=False, report=False)
    tb = results.run_dir.tensorboard
    models = sorted(tb.glob("*/seed0"))
    written = {m.relative_to(tb).as_posix(): hparams(m) for m in models}
    assert len(written) == 4 and {h["epochs"] for h in written.values()} == {1, 2}
    shutil.rmtree(tb)  # the report writes the curves and hparams again where none are
    ml.render(results.path)
    assert {m.relative_to(tb).as_posix(): hparams(m) for m in sorted(tb.glob("*/seed0"))} \
        == written


def test_records_and_hparams_are_tensorboard_s_own_bytes(monkeypatch, tmp_path):
    """The framing, checksums and HParams summaries written here (not imported from
    TensorBoard's writer, issue 22) are byte for byte what TensorBoard's own code makes, but
    for the order of the hparams map: TensorBoard's follows a hash seeded per process, ours
    is sorted, so that the same run writes the same bytes."""
    import os

    from tensorboard.plugins.hparams import plugin_data_pb2, summary_v2
    from tensorboard.summary.writer.record_writer import RecordWriter

    from mnistlab import board

    for data in (b"", b"brain.Event:2", os.urandom(70_000)):
        buffer = io.BytesIO()
        RecordWriter(buffer).write(data)
        assert board.record(data) == buffer.getvalue()
    values = {"configuration": "ln", "layernorm": True, "lr": 1e-3, "epochs": 3, "hidden": "32x32"}
    monkeypatch.setattr(board.time, "time", lambda: 1234.5)
    theirs = summary_v2.hparams_pb(values, trial_id="ln/seed0", start_time_secs=1234.5)
    plugin = theirs.value[0].metadata.plugin_data
    plugin.content = plugin_data_pb2.HParamsPluginData.FromString(plugin.content) \
        .SerializeToString(deterministic=True)  # sorted by name
    assert board.session_start(values, "ln/seed0").SerializeToString() \
        == theirs.SerializeToString()
    board.Board(tmp_path, {c.name: (c, STUDY.schedule) for c in RUNS})  # the experiment's table
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    names = [h.name for h in hparams_metadata.parse_experiment_plugin_data(content).hparam_infos]
    assert names[:4] == ["configuration", "dropout", "layernorm", "lr"]  # what differs first
    metrics = [summary_v2.Metric(m, group=g) for g in ("validation", "test", "train")
               for m in board.METRICS]
    (value,) = summary_v2.hparams_config_pb([summary_v2.HParam(n) for n in names], metrics).value
    assert content == value.metadata.plugin_data.content
