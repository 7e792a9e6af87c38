"""Atomic writes: a failure leaves the previous file intact and no temp files behind."""

import errno
import os

import pytest

from mnistlab.errors import MnistlabError
from mnistlab.runs import RunDir, atomic_path, atomic_write_text


def test_atomic_write_replaces_the_file(tmp_path):
    target = tmp_path / "a" / "summary.json"
    atomic_write_text(target, "one")
    atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert os.listdir(target.parent) == ["summary.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "kept")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "kept"
    assert os.listdir(tmp_path) == ["metrics.csv"]


def test_full_disk_is_one_clear_error_and_loses_nothing(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_text(target, "kept")

    def no_space(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", no_space)
    with pytest.raises(MnistlabError, match=r"disk full while writing.*--resume"):
        atomic_write_text(target, "new")
    assert target.read_text() == "kept"
    assert os.listdir(tmp_path) == ["summary.json"]


def test_metrics_round_trip(tmp_path):
    run = RunDir.create(tmp_path, "s")
    common = {"run": "a", "seed": 0, "step": 75, "epoch": 0.2}
    rows = [
        {**common, "split": "train", "loss": 0.5, "accuracy": 0.9},
        {**common, "split": "val", "loss": 0.4, "accuracy": 0.91},
    ]
    run.write_metrics(rows)
    assert run.read_metrics() == rows
    assert run.metrics_path.read_text().splitlines()[0] == "run,seed,step,epoch,split,loss,accuracy"


def test_existing_requires_a_run_directory(tmp_path):
    with pytest.raises(MnistlabError, match="not a run directory"):
        RunDir.existing(tmp_path)
