"""Resume state: written at epoch ends and on Ctrl-C, and a resumed run ends exactly as one run."""

from __future__ import annotations

import errno
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from agreement import assert_same
from safetensors import safe_open

from mnistlab.config import PRESETS, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, train
from mnistlab.engine.mlp import STATE_FORMAT
from mnistlab.errors import CheckpointError, MnistlabError

MEMBERS = [Member(PRESETS["lr1e-3-p0.2"], 0), Member(PRESETS["lr5e-4-p0.4"], 1)]
SCHEDULE = Schedule(epochs=4, record_every=3, log_every=100)

# The subprocess builds the same data as the `splits` fixture (conftest.synthetic).
CHILD = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import synthetic
from mnistlab.data.dataset import Splits
from mnistlab.engine import train
from test_resume import MEMBERS
from mnistlab.config import Schedule
splits = Splits(synthetic(600, seed=1), synthetic(100, seed=2), synthetic(50, seed=3))
slow = lambda event: time.sleep(0.2)  # time for the parent to kill it mid-epoch
train(splits, MEMBERS, Schedule(epochs=12, record_every=2, log_every=100), device="cpu",
      state_path={state!r}, on_record=slow)
"""


@pytest.fixture
def splits(make_dataset) -> Splits:
    return Splits(make_dataset(600, seed=1), make_dataset(100, seed=2), make_dataset(50, seed=3))


def test_ctrl_c_mid_epoch_saves_and_resume_matches(splits, tmp_path):
    state = tmp_path / "state.safetensors"
    whole = train(splits, MEMBERS, SCHEDULE, device="cpu")

    def interrupt(event):
        if event.step == 6:  # mid-epoch 2 (5 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, on_record=interrupt)
    with safe_open(str(state), framework="pt") as f:
        assert f.metadata()["format"] == STATE_FORMAT
        assert '"step": 6' in f.metadata()["progress"]
    assert_same(train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True),
                whole)
    # a finished state resumes to the same result without training again
    assert_same(train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True),
                whole)


def test_sigkill_mid_epoch_then_resume_matches(splits, tmp_path):
    state = tmp_path / "state.safetensors"
    tests = str(Path(__file__).parent)
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(tests=tests, state=str(state))])
    try:
        deadline = time.monotonic() + 120
        while not state.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.exists(), "the child wrote no state file"
        time.sleep(0.3)  # now inside epoch 2 (records sleep 0.2 s, 3 per epoch)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    schedule = Schedule(epochs=12, record_every=2, log_every=100)
    short = Schedule(epochs=3, record_every=2, log_every=100)
    with safe_open(str(state), framework="pt") as f:
        assert f.metadata()["format"] == STATE_FORMAT
    resumed = train(splits, MEMBERS, schedule, device="cpu", state_path=state, resume=True)
    whole = train(splits, MEMBERS, schedule, device="cpu")
    assert_same(resumed, whole)
    assert len(train(splits, MEMBERS, short, device="cpu").rows) < len(whole.rows)


def test_state_for_other_members_schedule_or_data_is_refused(splits, tmp_path, make_dataset):
    state = tmp_path / "state.safetensors"
    train(splits, MEMBERS, Schedule(epochs=1), device="cpu", state_path=state)
    other_data = Splits(make_dataset(600, seed=7), splits.val, splits.test)
    cases = [
        (splits, MEMBERS[:1], Schedule(epochs=1), "members"),
        (splits, MEMBERS, Schedule(epochs=2), "schedule"),
        (other_data, MEMBERS, Schedule(epochs=1), "data"),
    ]
    for data, members, schedule, what in cases:
        with pytest.raises(MnistlabError, match=f"written for other {what}") as info:
            train(data, members, schedule, device="cpu", state_path=state, resume=True)
        assert "\n" not in str(info.value) and str(state) in str(info.value)


def test_damaged_state_file_is_a_one_line_error(splits, tmp_path):
    state = tmp_path / "state.safetensors"
    state.write_bytes(b"\x80\x04not safetensors at all")
    with pytest.raises(CheckpointError, match="not a readable resume state") as info:
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True)
    assert "\n" not in str(info.value)


def test_resume_never_unpickles(splits, tmp_path, monkeypatch):
    state = tmp_path / "state.safetensors"
    whole = train(splits, MEMBERS, Schedule(epochs=2), device="cpu", state_path=state)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling on the resume path")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    assert_same(train(splits, MEMBERS, Schedule(epochs=2), device="cpu", state_path=state,
                      resume=True), whole)


def test_full_disk_during_a_background_save_stops_training_with_one_error(splits, tmp_path,
                                                                          monkeypatch):
    """Epoch-end states are written on a thread; its failure still reaches the caller."""
    state = tmp_path / "state.safetensors"
    real_replace = os.replace
    saves = []

    def full_on_second_save(src, dst):
        saves.append(dst)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_on_second_save)
    with pytest.raises(MnistlabError, match=r"disk full while writing"):
        train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state)
    assert len(saves) == 2  # it stopped at the next save (or the end), not later
    monkeypatch.setattr(os, "replace", real_replace)
    resumed = train(splits, MEMBERS, SCHEDULE, device="cpu", state_path=state, resume=True)
    assert_same(resumed, train(splits, MEMBERS, SCHEDULE, device="cpu"))
