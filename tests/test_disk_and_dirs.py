"""The run directory on a real disk: a full disk is one line on every write path, run directories
are claimed safely under concurrency, debris of killed runs is removed on resume, and files get
the usual permissions (issue 12, causes 11 and 12, and the notes on .tmp files and modes)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import mnistlab as ml
from mnistlab.board import Board
from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, train
from mnistlab.errors import MnistlabError
from mnistlab.runs import RunDir


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 256 KiB tmpfs: a disk that really fills up (needs the right to mount, e.g. root)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(reason=f"cannot mount a small tmpfs here ({mounted.stderr.strip()}); "
                    "run the tests as root to check full-disk handling on a real disk")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_during_a_resume_state_write_is_one_line(small_disk, make_dataset):
    """Cause 11: safetensors' own writer raised its own error (a traceback); the state (about
    1.7 MB here) is now written by atomic_path, which says "disk full" and leaves nothing."""
    splits = Splits(make_dataset(100, seed=1), make_dataset(20, seed=2), make_dataset(20, seed=3))
    members = [Member(PRESETS["baseline"], 0)]
    with pytest.raises(MnistlabError, match=r"state\.safetensors: disk full while writing") as info:
        train(splits, members, Schedule(batch_size=50, epochs=1), device="cpu",
              state_path=small_disk / "state.safetensors")
    assert "\n" not in str(info.value)
    assert list(small_disk.iterdir()) == []


def board(folder: Path, runs: int = 10) -> Board:
    return Board(folder, {f"r{r}": (RunConfig(name=f"r{r}"), Schedule()) for r in range(runs)})


def rows(first: int, records: int, runs: int = 10) -> list[dict]:
    return [{"run": f"r{r}", "seed": 0, "step": s, "epoch": 0.0, "split": split, "loss": 0.5,
             "accuracy": 0.9}
            for r in range(runs) for s in range(first, first + records)
            for split in ("train", "val")]


def test_a_full_disk_during_tensorboard_writing_is_one_line(small_disk):
    """Cause 11: TensorBoard's writer thread raised a raw OSError (ENOSPC). Now a full disk is
    one line, and the events written before stay whole: the failed append is cut back."""
    tb = small_disk / "tb"
    live = board(tb)
    live.add_rows(rows(1, 2))
    before = {p: p.read_bytes() for p in tb.rglob("*") if p.is_file()}
    with pytest.raises(MnistlabError, match="disk full while writing") as info:
        live.add_rows(rows(3, 3000))  # several MB of events
    assert "\n" not in str(info.value)
    after = {p: p.read_bytes() for p in tb.rglob("*") if p.is_file()}
    assert all(after[p] == before[p] for p in before)  # appended files cut back exactly
    assert [p.name for p in small_disk.iterdir()] == ["tb"]


def test_state_files_and_tensorboard_folders_get_the_usual_permissions(tmp_path, make_dataset):
    """State files were created 0600 and tb/ 0700; a user's files follow the umask."""
    splits = Splits(make_dataset(100, seed=1), make_dataset(20, seed=2), make_dataset(20, seed=3))
    state = tmp_path / "state.safetensors"
    train(splits, [Member(PRESETS["baseline"], 0)], Schedule(batch_size=50, epochs=1),
          device="cpu", state_path=state)
    assert state.stat().st_mode & 0o777 == 0o666 & ~umask()
    board(tmp_path / "tb", runs=1).add_rows(rows(1, 1, runs=1))
    for path in [tmp_path / "tb", *(p for p in (tmp_path / "tb").rglob("*") if p.is_dir())]:
        assert path.stat().st_mode & 0o777 == 0o777 & ~umask()
    events = [p for p in (tmp_path / "tb").rglob("events.out.tfevents.*")]
    assert len(events) == 4  # in tb/ (the experiment), the model, train/ and validation/
    assert all(e.stat().st_mode & 0o777 == 0o666 & ~umask() for e in events)


def test_run_directories_claimed_at_once_by_threads_and_processes_are_distinct(tmp_path):
    """Cause 12: check-then-mkdir lost 42 of 80 synchronised creations; the name is claimed
    by mkdir itself. 40 threads released by one barrier, and 6 processes started together."""
    barrier, roots, errors = threading.Barrier(40), [], []

    def claim() -> None:
        barrier.wait()
        try:
            roots.append(RunDir.create(tmp_path / "threads", "s").root)
        except Exception as exc:  # any failure at all is the bug
            errors.append(exc)

    threads = [threading.Thread(target=claim) for _ in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(roots)) == 40

    go = tmp_path / "go"
    child = (f"import pathlib, time\nfrom mnistlab.runs import RunDir\n"
             f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.001)\n"
             f"print(RunDir.create({str(tmp_path / 'processes')!r}, 's').root)")
    procs = [subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
             for _ in range(6)]
    go.touch()
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0] * 6
    assert len(set(outs)) == 6 and sorted(outs) == sorted(
        str(p) for p in (tmp_path / "processes").iterdir())


def test_resuming_removes_what_killed_writes_left(idx_dir, tmp_path):
    """kill -9 during an atomic write leaves `.<name>.<random>.tmp` (and a TensorBoard re-render
    its `.tb.<random>` folder); a resumed run, which owns its directory, removes them."""
    options = {"data": str(idx_dir), "hidden": (16,), "dropout_after": (), "epochs": 1,
               "batch_size": 8, "device": "cpu", "out": tmp_path / "runs", "progress": False,
               "report": False}
    run = ml.train(**options).run_dir
    debris = [run.root / ".metrics.csv.x1y2z3.tmp", run.checkpoints / ".state-0.safetensors.a.tmp",
              run.root / ".tb.k3j4"]
    for path in debris[:2]:
        path.write_bytes(b"half")
    debris[2].mkdir()
    kept = sorted(p for p in run.root.rglob("*"))
    ml.train(resume=run.root, progress=False, report=False)
    assert not any(p.exists() for p in debris)
    assert sorted(p for p in run.root.rglob("*")) == [p for p in kept if p not in debris]



def test_folders_that_cannot_be_written_are_one_line(tmp_path):
    """Not only a full disk: any OS refusal to create the run directory or the TensorBoard
    tree (here a file where a folder should be) is one line naming the folder."""
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(MnistlabError, match=rf"^{blocker}: cannot create a run directory there"):
        RunDir.create(blocker, "s")
    with pytest.raises(MnistlabError, match=rf"^{blocker / 'tb'}: cannot write TensorBoard"):
        board(blocker / "tb")
