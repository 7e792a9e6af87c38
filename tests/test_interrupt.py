"""Ctrl-C on the command line says only what is true: a saved state and the run directory to
resume where they exist, nothing of the sort before one exists (issue 12, cause 13)."""

from __future__ import annotations

import os
import signal

from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.experiment import pipeline
from mnistlab.progress import Progress


def train_args(idx_dir, out) -> list[str]:
    return ["train", "--data", str(idx_dir), "--hidden", "16", "--dropout-after", "",
            "--batch-size", "8", "--epochs", "2", "--record-every", "1", "--device", "cpu",
            "--out", str(out), "--quiet"]


def test_ctrl_c_while_the_data_load_claims_no_saved_state(idx_dir, tmp_path, monkeypatch):
    """The old message ("state saved ...; rerun with --resume RUN_DIR") was printed when
    nothing had been saved and no run directory existed."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "load_splits", interrupted)
    result = CliRunner().invoke(app, train_args(idx_dir, tmp_path / "runs"))
    assert result.exit_code == 130
    assert result.stderr == "interrupted\n"
    assert not (tmp_path / "runs").exists()


def test_ctrl_c_while_training_names_the_saved_state_and_the_run_directory(
        idx_dir, tmp_path, monkeypatch):
    def ctrl_c_at_step_3(self, event):
        if event.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # the engine saves at the end of the step

    monkeypatch.setattr(Progress, "record", ctrl_c_at_step_3)
    result = CliRunner().invoke(app, train_args(idx_dir, tmp_path / "runs"))
    assert result.exit_code == 130, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    (state,) = (run_dir / "checkpoints").glob("state-*.safetensors")
    assert result.stderr == (f"interrupted; training state saved in {state}; continue with "
                             f"`mnistlab train --resume {run_dir}`\n")
    monkeypatch.undo()
    resumed = CliRunner().invoke(app, ["train", "--resume", str(run_dir), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert (run_dir / "summary.json").is_file()
