"""The Python API and the one pipeline under it: results objects, flags over files, resume checks,
in-memory data, and every command through the same planner and executor."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab.cli import app
from mnistlab.config import RunConfig, Schedule, StudyConfig, load_study
from mnistlab.data import load
from mnistlab.errors import ConfigError, MnistlabError
from mnistlab.experiment import executor, pipeline
from mnistlab.runs import METRIC_COLUMNS

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = Schedule(batch_size=64, epochs=1, record_every=5)
RUNS = (RunConfig(name="plain", lr=3e-3, hidden=(32, 32)),
        RunConfig(name="ln", lr=1e-3, layernorm=True, dropout=0.2, hidden=(32, 32)))


@pytest.fixture(scope="module")
def digits(mnist_t10k_dir) -> tuple[np.ndarray, np.ndarray]:
    """1,200 real MNIST digits as plain arrays, as a notebook user would hold them."""
    part = load(str(mnist_t10k_dir), progress=False).train
    return part.images[:1200], part.labels[:1200]


@pytest.fixture(scope="module")
def results(digits, tmp_path_factory) -> ml.Results:
    study = StudyConfig(name="api", runs=RUNS, seeds=(0, 1), schedule=TINY, device="cpu")
    return ml.study(study, data=digits, out=tmp_path_factory.mktemp("runs"), progress=False)


def test_results_hold_tables_models_and_plots(results):
    assert list(results.metrics.columns) == list(METRIC_COLUMNS)
    assert len(results.metrics) == len(results.run_dir.read_metrics())
    assert list(results.summary.index) == ["plain", "ln"]
    row = results.summary.loc[results.winner]
    assert row["test_accuracy_low"] <= row["test_accuracy"] <= row["test_accuracy_high"]
    assert set(zip(results.runs["run"], results.runs["seed"], strict=True)) == {
        (n, s) for n in ("plain", "ln") for s in (0, 1)}
    models = results.models()
    assert set(models) == {(n, s) for n in ("plain", "ln") for s in (0, 1)}
    assert all(isinstance(m, nn.Sequential) and not m.training for m in models.values())
    assert isinstance(results.plot(), Figure)
    page = results._repr_html_()
    assert "<table" in page and "data:image/png;base64," in page and results.winner in page
    assert results.report_path.is_file()
    again = ml.load_run(results.path)
    assert again.raw == results.raw and again.winner == results.winner


def test_in_memory_data_is_recorded_by_content(results, digits, tmp_path):
    recorded = load_study(results.run_dir.config_path).data
    assert re.fullmatch(r"in-memory arrays \(1200 images, sha256 [0-9a-f]{16}\)", recorded)
    images, labels = digits
    with pytest.raises(MnistlabError, match=r"in-memory arrays: images are float64.*astype"):
        ml.train(data=(images / 255.0, labels), out=tmp_path, progress=False)
    with pytest.raises(MnistlabError, match=r"in-memory arrays:labels\[3\]: 'labels' holds 10"):
        ml.train(data=(images, np.where(np.arange(len(labels)) == 3, 10, labels)), out=tmp_path,
                 progress=False)
    flat = ml.train(data=(images.reshape(len(images), -1), labels), hidden=(16,),
                    dropout_after=(), epochs=1, device="cpu", out=tmp_path, progress=False,
                    report=False)
    assert load_study(flat.run_dir.config_path).data == recorded  # same pixels, same name


def test_predict_takes_paths_pil_images_and_arrays(results, digits, tmp_path):
    images, labels = digits
    path = tmp_path / "digit.png"
    Image.fromarray(255 - images[0]).save(path)  # a dark digit on white paper, as photographed
    ckpt = results.checkpoint()
    batch = ml.predict(ckpt, images[:50])
    assert [p.path for p in batch[:2]] == ["[0]", "[1]"]
    assert np.mean([p.label == str(y) for p, y in zip(batch, labels[:50], strict=True)]) > 0.5
    mixed = ml.predict(results.run_dir.model_path(results.winner, 0),
                       [path, Image.open(path), images[0], tmp_path / "missing.png"])
    assert mixed[0].path == str(path) and mixed[0].label == mixed[1].label
    assert mixed[2].label == batch[0].label
    assert "no such file" in mixed[3].error


def test_train_flags_override_the_run_file(tmp_path, digits):
    """`train --config r.toml --epochs 2 --lr 0.1`: the flags win (they used to be ignored)."""
    run = tmp_path / "r.toml"
    run.write_text('name = "mine"\nlr = 0.003\nhidden = [16]\ndropout_after = []\n'
                   'data = "nowhere"\n[schedule]\nepochs = 5\nrecord_every = 7\n')
    npz = tmp_path / "d.npz"
    from mnistlab.data.dataset import Dataset
    from mnistlab.data.npz import write_npz

    write_npz(npz, Dataset(*digits))
    result = CliRunner().invoke(app, ["train", "--config", str(run), "--epochs", "2", "--lr",
                                      "0.1", "--data", str(npz), "--device", "cpu", "--out",
                                      str(tmp_path / "runs"), "--quiet"])
    assert result.exit_code == 0, result.output
    (root,) = (tmp_path / "runs").iterdir()
    study = load_study(root / "study.toml")
    assert (study.runs[0].name, study.runs[0].lr, study.schedule.epochs) == ("mine", 0.1, 2)
    assert study.schedule.record_every == 7 and study.data == str(npz)


def test_train_names_a_run_by_what_it_changes(tmp_path, digits):
    results = ml.train(data=digits, lr=1e-3, dropout=0.2, layernorm=True, hidden=(16, 16),
                       epochs=1, device="cpu", out=tmp_path, progress=False, report=False)
    assert results.winner == "lr1e-3_p0.2_h16x16_ln"


def test_resume_refuses_changed_options_and_accepts_same_ones(results, digits, tmp_path):
    import shutil

    copy = tmp_path / results.path.name
    shutil.copytree(results.path, copy)
    for option, value in (("epochs", 3), ("seeds", 5), ("device", "cuda")):
        with pytest.raises(ConfigError, match=rf"resumed with {option} = .*run was made with"):
            ml.study(resume=copy, data=digits, progress=False, **{option: value})
    with pytest.raises(MnistlabError, match=r"in-memory arrays.*pass the same arrays"):
        ml.study(resume=copy, progress=False)
    with pytest.raises(ConfigError, match="either a configuration file or --resume"):
        ml.study(copy / "study.toml", resume=copy, data=digits, progress=False)
    (copy / "summary.json").unlink()
    again = ml.study(resume=copy, data=digits, seeds=2, epochs=1, progress=False, report=False)
    assert again.raw["runs"] == results.raw["runs"]


def test_resume_with_a_changed_option_is_one_line_on_the_command_line(results, tmp_path):
    result = subprocess.run([sys.executable, "-m", "mnistlab.cli", "study", "--resume",
                             str(results.path), "--epochs", "7"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "resumed with epochs = 7" in line


@pytest.mark.parametrize("kind", ["study", "sweep", "halving", "train"])
def test_every_command_goes_through_the_one_planner_and_executor(kind, digits, tmp_path,
                                                                monkeypatch):
    planned, executed = [], []
    real_plan, real_run = pipeline.plan, executor.LocalExecutor.run
    monkeypatch.setattr(pipeline, "plan", lambda *a, **k: planned.append(a) or real_plan(*a, **k))

    def run(self, jobs, *args):
        executed.extend(jobs)
        yield from real_run(self, jobs, *args)

    monkeypatch.setattr(executor.LocalExecutor, "run", run)
    common = {"data": digits, "out": tmp_path, "progress": False, "report": False}
    if kind == "study":
        ml.study(StudyConfig(runs=RUNS, seeds=(0,), schedule=TINY, device="cpu"), **common)
    elif kind == "train":
        ml.train(hidden=(16,), dropout_after=(), epochs=1, device="cpu", **common)
    else:
        grid = {"seeds": 1, "device": "cpu", "base": {"hidden": [16, 16]},
                "halving": kind == "halving", "grid": {"lr": [1e-2, 1e-3, 1e-4]},
                "schedule": {"epochs": 3, "batch_size": 64, "record_every": 5}}
        ml.sweep(grid, **common)
    rungs = 2 if kind == "halving" else 1
    assert len(planned) == rungs and len(executed) >= rungs


def test_readme_python_example_runs_as_written(tmp_path, monkeypatch, fashion_dir):
    """The README's "From Python" block, exactly as printed there."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, str(README), "exec"), {})
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "report.html").is_file()


def test_a_model_s_default_seed_is_decided_once(tmp_path, monkeypatch):
    """Results.checkpoint and checkpoint_path (evaluate, predict, export) take the same model of
    a configuration when no seed is asked: the winner's shown seed, else the first finished
    seed (mnistlab.stats.shown_seed), never a seed that diverged."""
    from mnistlab import api, results

    runs = [{"run": "a", "seed": s, "diverged_at": None} for s in (0, 1, 2)]
    runs += [{"run": "b", "seed": 0, "diverged_at": 40}, {"run": "b", "seed": 1,
             "diverged_at": None}]
    summary = {"selection": {"winner": "a", "seed": 2}, "seeds": [0, 1, 2], "runs": runs,
               "configs": [{"run": "a"}, {"run": "b"}]}

    class Stored:
        root = tmp_path
        checkpoints = tmp_path

        def read_summary(self):
            return summary

        def model_path(self, name, seed):
            return tmp_path / f"{name}-seed{seed}.safetensors"

    monkeypatch.setattr(api.RunDir, "existing", lambda path: Stored())
    monkeypatch.setattr(results, "load_checkpoint", lambda path: path)
    loaded = ml.Results(Stored())
    for name, seed in (("a", 2), ("b", 1)):
        assert api.checkpoint_path(tmp_path, name) == Stored().model_path(name, seed)
        assert loaded.checkpoint(name) == Stored().model_path(name, seed)


def test_numpy_numbers_and_arrays_are_taken_as_python_s(digits, tmp_path):
    """What a notebook holds (np.arange seeds, np.int64 epochs, np.float64 rates, arrays of
    sizes) is accepted wherever Python's numbers and lists are, and recorded as them."""
    study = StudyConfig(name="np", runs=RUNS[:1], schedule=TINY, device="cpu")
    done = ml.study(study, seeds=np.arange(2), epochs=np.int64(1), data=digits,
                    out=tmp_path, progress=False, report=False)
    assert done.raw["seeds"] == [0, 1] and load_study(done.run_dir.config_path).seeds == (0, 1)
    one = ml.train(lr=np.float64(3e-3), hidden=np.array([16, 16]), epochs=np.int64(1),
                   batch_size=np.int64(64), seed=np.int64(1), data=digits, device="cpu",
                   out=tmp_path, progress=False, report=False)
    (config,) = one.raw["configs"]
    assert config["config"]["lr"] == 3e-3 and config["config"]["hidden"] == [16, 16]
    assert one.raw["seeds"] == [1]
    grid = {"name": "np-sweep", "device": "cpu", "base": {"hidden": [16, 16]},
            "schedule": {"batch_size": 64, "epochs": 1, "record_every": 5},
            "grid": {"lr": np.array([1e-3, 3e-3])}}
    swept = ml.sweep(grid, seeds=np.arange(1), data=digits, out=tmp_path, progress=False,
                     report=False)
    assert len(swept.raw["configs"]) == 2 and swept.raw["seeds"] == [0]
    assert RunConfig(hidden=np.array([8, 8]), patience=np.int64(1)) == \
        RunConfig(hidden=(8, 8), patience=1)
    with pytest.raises(ConfigError, match=r"^study: seeds must be .*, got \[0\.5\]$"):
        ml.study(study, seeds=np.array([0.5]))
