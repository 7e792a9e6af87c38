"""Every switch that changes a number is part of the run's identity (issue 20): recorded in
env.json and each checkpoint, held in the resume fingerprint, and honoured by a resume."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from agreement import assert_same
from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.config import PRESETS, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Arithmetic, Member, requested, train
from mnistlab.engine.backends import arithmetic as arith
from mnistlab.errors import MnistlabError
from mnistlab.modules import load_checkpoint
from mnistlab.progress import Progress

CPU = torch.device("cpu")
MEMBERS = [Member(PRESETS["lr1e-3-p0.2"], 0), Member(PRESETS["lr5e-4-p0.4"], 1)]  # dropout
SCHEDULE = Schedule(epochs=3, record_every=3, log_every=100)


@pytest.fixture
def splits(make_dataset) -> Splits:
    return Splits(make_dataset(200, seed=1), make_dataset(60, seed=2), make_dataset(40, seed=3))


def _args(idx_dir, out) -> list[str]:
    return ["train", "--data", str(idx_dir), "--hidden", "16,16", "--dropout", "0.3",
            "--batch-size", "8", "--epochs", "2", "--record-every", "1", "--device", "cpu",
            "--out", str(out), "--quiet"]


def _run_dir(out):
    (run_dir,) = out.iterdir()
    return run_dir


def test_the_fused_cpu_step_is_the_default_and_the_variable_switches_it(monkeypatch):
    monkeypatch.delenv("MNISTLAB_CPU_FUSED", raising=False)
    assert requested(CPU).cpu_step == "fused"
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    assert requested(CPU).cpu_step == "torch"
    assert requested(CPU).triton is None and requested(CPU).cuda_graphs is None


def test_cuda_switches_are_read_for_cuda_only(monkeypatch):
    monkeypatch.setenv("MNISTLAB_TF32", "1")
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "0")
    cuda = requested(torch.device("cuda"))
    assert (cuda.matmul, cuda.cuda_graphs, cuda.cpu_step) == ("tf32", False, None)
    assert requested(CPU).matmul == "fp32"
    monkeypatch.setenv("MNISTLAB_TRITON", "0")
    assert requested(torch.device("cuda")).triton is False


def test_env_json_and_checkpoints_record_which_cpu_step_trained(idx_dir, tmp_path, monkeypatch):
    recorded = {}
    for fused in ("1", "0"):
        monkeypatch.setenv("MNISTLAB_CPU_FUSED", fused)
        out = tmp_path / fused
        result = CliRunner().invoke(app, _args(idx_dir, out))
        assert result.exit_code == 0, result.output
        run_dir = _run_dir(out)
        env = json.loads((run_dir / "env.json").read_text())
        (checkpoint,) = (run_dir / "checkpoints").glob("*-seed0.safetensors")
        assert load_checkpoint(checkpoint).arithmetic == env["arithmetic"]
        recorded[fused] = env["arithmetic"]
    assert recorded["1"]["cpu_step"] == "fused" and recorded["0"]["cpu_step"] == "torch"
    assert {k for k in recorded["1"] if recorded["1"][k] != recorded["0"][k]} == {"cpu_step"}
    assert recorded["1"]["torch"] == torch.__version__ and recorded["1"]["device"] == "cpu"


def test_env_json_and_the_report_name_the_cpu_whose_bits_these_are(idx_dir, tmp_path):
    """MKL and PyTorch pick kernels by the CPU and split work by threads: a run records which."""
    result = CliRunner().invoke(app, _args(idx_dir, tmp_path / "out"))
    assert result.exit_code == 0, result.output
    run_dir = _run_dir(tmp_path / "out")
    cpu = json.loads((run_dir / "env.json").read_text())["cpu"]
    assert cpu["isa"] == torch.backends.cpu.get_cpu_capability()
    assert cpu["threads"] == torch.get_num_threads()
    assert cpu["key"] == f"{cpu['vendor']}-{cpu['family']}-{cpu['model']}-{cpu['isa']}-" \
        f"{cpu['threads']}t".lower()
    report = (run_dir / "report.html").read_text()
    assert f"({cpu['isa']}, {cpu['threads']} threads)" in report


def test_each_cpu_step_gives_other_numbers_and_each_is_reproducible(splits, monkeypatch):
    runs = {}
    for fused in ("1", "0", "1"):
        monkeypatch.setenv("MNISTLAB_CPU_FUSED", fused)
        result = train(splits, MEMBERS, SCHEDULE, device="cpu")
        assert result.arithmetic.cpu_step == ("fused" if fused == "1" else "torch")
        if fused in runs:
            assert_same(result, runs[fused])
        runs[fused] = result
    assert runs["1"].rows != runs["0"].rows  # other dropout masks


def test_a_resume_state_of_other_arithmetic_is_refused_naming_the_switch(splits, tmp_path,
                                                                          monkeypatch):
    state = tmp_path / "state.safetensors"
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")

    def interrupt(event):
        if event.step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, on_record=interrupt)
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    with pytest.raises(MnistlabError) as error:
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True)
    message = str(error.value)
    assert "\n" not in message
    assert "cpu_step fused → torch" in message and "MNISTLAB_CPU_FUSED=1" in message
    # given the run's own arithmetic explicitly, the same environment resumes exactly
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")
    whole = train(splits, MEMBERS, SCHEDULE, device="cpu")
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    fused = Arithmetic(**{**requested(CPU).as_dict(), "cpu_step": "fused"})
    assert_same(train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True,
                      arithmetic=fused), whole)


def test_a_resumed_run_honours_the_arithmetic_it_recorded(idx_dir, tmp_path, monkeypatch):
    """Interrupted with the fused step, resumed with MNISTLAB_CPU_FUSED=0: the run says it keeps
    its own arithmetic and ends exactly as the uninterrupted fused run."""
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")
    whole_out = tmp_path / "whole"
    assert CliRunner().invoke(app, _args(idx_dir, whole_out)).exit_code == 0
    whole = _run_dir(whole_out)

    real_record = Progress.record

    def ctrl_c_at_step_5(self, event):
        real_record(self, event)
        if event.step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(Progress, "record", ctrl_c_at_step_5)
    out = tmp_path / "cut"
    assert CliRunner().invoke(app, _args(idx_dir, out)).exit_code == 130
    monkeypatch.setattr(Progress, "record", real_record)
    cut = _run_dir(out)
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    resumed = CliRunner().invoke(app, ["train", "--resume", str(cut)])
    assert resumed.exit_code == 0, resumed.output
    assert "MNISTLAB_CPU_FUSED=0 does not apply" in resumed.output
    assert (cut / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    assert json.loads((cut / "env.json").read_text())["arithmetic"]["cpu_step"] == "fused"
    for checkpoint in (whole / "checkpoints").glob("*-seed0.safetensors"):
        a, b = load_checkpoint(checkpoint), load_checkpoint(cut / "checkpoints" / checkpoint.name)
        assert a.arithmetic == b.arithmetic
        for key, value in a.model.state_dict().items():
            assert torch.equal(value, b.model.state_dict()[key]), key


def test_a_recorded_arithmetic_that_cannot_be_had_here_is_one_line(idx_dir, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")
    out = tmp_path / "runs"
    assert CliRunner().invoke(app, _args(idx_dir, out)).exit_code == 0
    run_dir = _run_dir(out)
    monkeypatch.setattr(arith, "fused_cpu_available", lambda: False)
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--quiet"])
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1
    assert "trained with the fused CPU step" in result.stderr and "g++" in result.stderr

    env = json.loads((run_dir / "env.json").read_text())
    env["arithmetic"]["torch"] = "1.0.0"
    (run_dir / "env.json").write_text(json.dumps(env))
    monkeypatch.undo()
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--quiet"])
    assert result.exit_code == 2 and "torch==1.0.0" in result.stderr

    env["arithmetic"] = {"device": "cpu"}
    (run_dir / "env.json").write_text(json.dumps(env))
    result = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--quiet"])
    assert result.exit_code == 2 and "damaged 'arithmetic' record" in result.stderr
