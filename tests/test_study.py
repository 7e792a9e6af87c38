"""The study end to end on real data: run directory, determinism, resume after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mnistlab as ml
from mnistlab.config import RunConfig, Schedule, StudyConfig, load_study
from mnistlab.experiment.plan import plan
from mnistlab.experiment.trials import Experiment

FASHION = Path("/usr/share/datasets/fashion-mnist")


def small_study(data: str, **changes) -> StudyConfig:
    runs = (
        RunConfig(name="baseline", lr=0.01),
        RunConfig(name="lr1e-3-p0.2", lr=0.001, dropout=0.2, layernorm=True),
        RunConfig(name="lr1e-4-p0.6", lr=0.0001, dropout=0.6, layernorm=True),
    )
    schedule = Schedule(batch_size=128, epochs=2, record_every=20, log_every=40)
    values = {"name": "small", "data": data, "runs": runs, "seeds": (0, 1), "schedule": schedule}
    return StudyConfig(**{**values, **changes, "device": "cpu"})


def comparable(summary: dict) -> dict:
    """The summary without wall-clock figures."""
    drop = {"seconds"}
    runs = [{k: v for k, v in r.items() if k not in drop} for r in summary["runs"]]
    return {**{k: v for k, v in summary.items() if k not in drop}, "runs": runs}


@pytest.fixture(scope="module")
def mnist_run(mnist_t10k_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    results = ml.study(small_study(str(mnist_t10k_dir)), out=out, progress=False)
    return results.run_dir, results.raw


def test_study_writes_the_whole_run_directory(mnist_run):
    run_dir, _ = mnist_run
    root = run_dir.root
    for name in ("study.toml", "env.json", "metrics.csv", "summary.json", "report.html"):
        assert (root / name).is_file(), name
    for run in ("baseline", "lr1e-3-p0.2", "lr1e-4-p0.6"):
        for seed in (0, 1):
            assert run_dir.model_path(run, seed).is_file()
            assert run_dir.predictions_path(run, seed).is_file()
        assert (root / "plots" / f"{run}_loss.png").is_file()
        assert (root / "plots" / f"{run}_accuracy.png").is_file()
    assert any((root / "tb").iterdir())
    assert not list(run_dir.checkpoints.glob("state-*"))  # resume state gone once a stack is done


def test_mnist_test_set_alone_is_split_and_said_so(mnist_run):
    _, summary = mnist_run
    assert "held out" in summary["split_note"]
    sizes = summary["sizes"]
    assert sizes["train"] + sizes["val"] + sizes["test"] == 10_000
    assert abs(sizes["test"] - 10_000 / 6) < 10  # 1/6 of each class, rounded per class
    assert summary["steps_per_epoch"] == -(-sizes["train"] // 128)


def test_metrics_have_every_record_for_every_run_and_seed(mnist_run):
    run_dir, summary = mnist_run
    rows = run_dir.read_metrics()
    steps = summary["steps_per_epoch"] * 2
    records = len(range(20, steps + 1, 20)) + (steps % 20 != 0)
    for run in ("baseline", "lr1e-3-p0.2", "lr1e-4-p0.6"):
        for seed in (0, 1):
            for split in ("train", "val"):
                mine = [r for r in rows if (r["run"], r["seed"], r["split"]) == (run, seed, split)]
                assert len(mine) == records
                assert [r["step"] for r in mine] == sorted(r["step"] for r in mine)
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_summary_statistics_are_sane(mnist_run):
    _, summary = mnist_run
    configs = {c["run"]: c for c in summary["configs"]}
    assert set(configs) == {"baseline", "lr1e-3-p0.2", "lr1e-4-p0.6"}
    for config in configs.values():
        stat = config["test_accuracy"]
        assert stat["n"] == 2 and stat["ci_low"] <= stat["mean"] <= stat["ci_high"]
        assert stat["mean"] > 0.5  # two epochs on real digits learn something
    # With lr 1e-4 and two epochs the smallest-lr model lags: the study must say so by numbers.
    accuracy = {name: c["test_accuracy"]["mean"] for name, c in configs.items()}
    assert accuracy["lr1e-3-p0.2"] > accuracy["lr1e-4-p0.6"]
    assert summary["selection"]["winner"] in configs


def test_rerunning_study_toml_reproduces_the_numbers(mnist_run, tmp_path):
    run_dir, summary = mnist_run
    again = ml.study(run_dir.config_path, out=tmp_path, progress=False, report=False)
    assert comparable(again.raw) == comparable(summary)
    assert again.run_dir.metrics_path.read_text() == run_dir.metrics_path.read_text()
    assert load_study(again.run_dir.config_path) == load_study(run_dir.config_path)


def test_stacks_group_configurations_by_architecture():
    wide = RunConfig(name="wide", hidden=(300, 300))
    study = small_study("unused")
    study = StudyConfig(**{**study.__dict__, "runs": (*study.runs, wide)})
    jobs = plan(Experiment(study).trials(), size=100)
    names = [[(m.config.name, m.seed) for m in job.members] for job in jobs]
    assert sorted(n for job in names for n in job) == sorted(
        (r.name, s) for r in study.runs for s in study.seeds
    )
    assert len(jobs) == 2  # LayerNorm and dropout differ within a stack; hidden sizes do not
    for job in jobs:
        assert len({m.config.architecture for m in job.members}) == 1


def _study_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnistlab.cli", "study", *args]


@pytest.mark.skipif(
    not FASHION.is_dir(), reason="Fashion-MNIST not installed (apt dataset-fashion-mnist)"
)
def test_sigkill_mid_study_then_resume_gives_the_same_summary(tmp_path):
    """Full Fashion-MNIST, 3 epochs: kill -9 after the first epoch-end state, resume, compare."""
    study = small_study("fashion-mnist", seeds=(0,), schedule=Schedule(epochs=3, record_every=75))
    config = tmp_path / "study.toml"
    from mnistlab.config import study_to_toml

    config.write_text(study_to_toml(study))
    out_killed, out_whole = tmp_path / "killed", tmp_path / "whole"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(_study_cmd("--config", str(config), "--out", str(out_killed)), env=env)
    deadline = time.monotonic() + 300
    while not list(out_killed.glob("*/checkpoints/state-*.safetensors")):
        assert proc.poll() is None, "study ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch, so the kill lands mid-epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (run_dir,) = out_killed.iterdir()
    assert not (run_dir / "summary.json").exists()
    resumed = subprocess.run(_study_cmd("--resume", str(run_dir)), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    whole = subprocess.run(
        _study_cmd("--config", str(config), "--out", str(out_whole)), env=env, capture_output=True
    )
    assert whole.returncode == 0, whole.stderr.decode()[-2000:]
    (whole_dir,) = out_whole.iterdir()
    read = lambda d: comparable(json.loads((d / "summary.json").read_text()))  # noqa: E731
    assert read(run_dir) == read(whole_dir)
    assert (run_dir / "metrics.csv").read_text() == (whole_dir / "metrics.csv").read_text()
