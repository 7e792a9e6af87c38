"""Atomic writes (a failure leaves the previous file intact, no temp files behind) and the run
directory's layout."""

import errno
import os

import pytest

from mnistlab.atomic import atomic_path, atomic_write_text
from mnistlab.errors import MnistlabError
from mnistlab.runs import RunDir


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


def test_run_directories_created_at_once_get_distinct_names(tmp_path):
    """The name is claimed by mkdir itself, so a second claim in the same second moves on."""
    roots = {RunDir.create(tmp_path, "s").root for _ in range(20)}
    assert len(roots) == 20 and all(r.is_dir() and r.parent == tmp_path for r in roots)


def test_a_stack_is_recorded_files_first_and_its_state_removed(tmp_path):
    run = RunDir.create(tmp_path, "s")
    run.state_path("0").parent.mkdir(parents=True)
    run.state_path("0").write_bytes(b"state")
    assert run.finished_stack("0") is None
    run.record_stack("0", {"rows": [], "runs": [], "seconds": 1.0, "device": "cpu"},
                     [("a", 0, b"model", b"predictions")])
    assert run.model_path("a", 0).read_bytes() == b"model"
    assert run.predictions_path("a", 0).read_bytes() == b"predictions"
    assert run.finished_stack("0")["seconds"] == 1.0
    assert not run.state_path("0").exists()


def test_an_unfinished_run_has_no_summary_and_says_how_to_finish(tmp_path):
    run = RunDir.create(tmp_path, "s")
    with pytest.raises(MnistlabError, match=r"summary.json: missing.*--resume"):
        run.read_summary()
