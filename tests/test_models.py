"""Networks other than the MLP through the whole pipeline: the lenet5 preset from the command
line, a factory from Python (`ml.Model`) and from a study TOML (`model = "module:function"`)."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab.cli import app
from mnistlab.config import RunConfig, load_study
from mnistlab.errors import CheckpointError, ConfigError
from mnistlab.experiment.plan import plan
from mnistlab.experiment.trials import Experiment
from mnistlab.modules import load_checkpoint

TINY_NETS = '''
from torch import nn


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 5, stride=3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(192, 10))
'''


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_lenet5_from_the_command_line_end_to_end(idx_dir, tmp_path):
    out = tmp_path / "runs"
    _invoke("train", "--preset", "lenet5", "--data", str(idx_dir), "--epochs", "1",
            "--out", str(out), "--quiet")
    (run_dir,) = out.iterdir()
    assert (run_dir / "report.html").is_file()
    assert 'model = "lenet5"' in (run_dir / "study.toml").read_text()
    checkpoint = run_dir / "checkpoints" / "lenet5-seed0.safetensors"
    ckpt = load_checkpoint(checkpoint)
    assert ckpt.config.model == "lenet5" and isinstance(ckpt.model[1][0], torch.nn.Conv2d)
    assert "accuracy" in _invoke("evaluate", str(run_dir))
    assert "accuracy" in _invoke("evaluate", str(checkpoint), "--data", str(idx_dir))
    image = tmp_path / "digit.png"
    pixels = np.zeros((28, 28), np.uint8)
    pixels[4:24, 12:16] = 255  # a "1"
    Image.fromarray(pixels).save(image)
    assert "digit.png" in _invoke("predict", str(checkpoint), str(image))
    pytest.importorskip("onnxruntime", reason="ONNX export needs mnistlab[onnx]")
    assert "onnxruntime matches PyTorch" in _invoke("export", str(checkpoint), "--onnx",
                                                    str(tmp_path / "lenet5.onnx"))


@pytest.fixture
def tiny_nets(tmp_path, monkeypatch) -> str:
    """A module of the user's own, importable as `tiny_nets`."""
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "tiny_nets.py").write_text(TINY_NETS)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setattr("mnistlab.modules._FACTORIES", {})  # none from an earlier test
    yield "tiny_nets:small_cnn"
    sys.modules.pop("tiny_nets", None)


def test_a_factory_from_python_trains_beside_an_mlp(tiny_nets, make_dataset, tmp_path):
    import tiny_nets as nets

    data = make_dataset(200, seed=4)
    results = ml.study(runs=[ml.Model("mine", nets.small_cnn, lr=3e-3), "lr1e-3-p0.2"],
                       data=(data.images, data.labels), seeds=2, epochs=1, out=tmp_path,
                       progress=False, report=False)
    summary = results.summary
    assert set(summary.index) == {"mine", "lr1e-3-p0.2"}
    ckpt = load_checkpoint(results.run_dir.model_path("mine", 1))
    assert ckpt.config.model == tiny_nets and ckpt.seed == 1
    assert load_checkpoint(results.run_dir.model_path("lr1e-3-p0.2", 0)).config.model == "mlp"


def test_a_factory_from_a_study_toml_and_mixed_stacks(tiny_nets, make_dataset, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(textwrap.dedent(f'''
        name = "cnns"
        runs = ["lenet5", "baseline", {{ name = "mine", model = "{tiny_nets}", lr = 0.002 }}]
        seeds = 2
        [schedule]
        epochs = 1
        batch_size = 32
    '''))
    config = load_study(study)
    jobs = plan(Experiment(config).trials(), size=10)
    assert [sorted({m.config.model for m in job.members}) for job in jobs] == [
        ["lenet5"], ["mlp"], [tiny_nets]]
    data = make_dataset(120, seed=5)
    results = ml.study(study, data=(data.images, data.labels), out=tmp_path / "runs",
                       progress=False)
    assert len(results.summary) == 3 and results.report_path.is_file()
    toml = (results.run_dir.root / "study.toml").read_text()
    assert f'model = "{tiny_nets}"' in toml and "lenet5" in toml


def test_unfindable_factories_are_one_line_errors(tiny_nets, make_dataset, tmp_path):
    def local():
        return torch.nn.Linear(784, 10)

    with pytest.raises(ConfigError, match="define it at the top level of an importable module"):
        ml.Model("mine", local)
    data = make_dataset(60, seed=6)
    with pytest.raises(ConfigError, match=r"model 'nowhere\.nets:cnn': cannot import it"):
        ml.study(runs=[RunConfig(name="x", model="nowhere.nets:cnn")],
                 data=(data.images, data.labels), seeds=1, epochs=1, out=tmp_path,
                 progress=False, report=False)


def test_a_checkpoint_whose_factory_is_gone_says_so(tiny_nets, make_dataset, tmp_path,
                                                    monkeypatch):
    data = make_dataset(60, seed=7)
    results = ml.study(runs=[ml.Model("mine", tiny_nets)], data=(data.images, data.labels),
                       seeds=1, epochs=1, out=tmp_path, progress=False, report=False)
    path = results.run_dir.model_path("mine", 0)
    (tmp_path / "code" / "tiny_nets.py").unlink()
    sys.modules.pop("tiny_nets")
    with pytest.raises(CheckpointError, match=r"cannot import it .*PYTHONPATH"):
        load_checkpoint(path)


def test_a_factory_from_the_command_line_names_the_run(tiny_nets, idx_dir, tmp_path):
    _invoke("train", "--model", tiny_nets, "--lr", "0.003", "--data", str(idx_dir), "--epochs",
            "1", "--out", str(tmp_path / "runs"), "--quiet")
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert (run_dir / "checkpoints" / "small_cnn_lr3e-3-seed0.safetensors").is_file()
    result = CliRunner().invoke(app, ["train", "--model", tiny_nets, "--hidden", "10",
                                      "--data", str(idx_dir)])
    assert result.exit_code == 2 and "hidden shape the MLP only" in result.output
