"""Issue 26 (hardening, round two): writes, special files, decompression, run-directory trust,
absurd values, inputs the model cannot mean, and the Python API's arguments. Each test pins one
cause at its mechanism: the one output helper (mnistlab.atomic), the one input helper
(mnistlab.inputs), the run directory's schema, links and lock (mnistlab.runs), the boundary
checks, the model's finite outputs."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import synthetic
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab import model as model_module
from mnistlab.atomic import atomic_write_text
from mnistlab.cli import app
from mnistlab.config import RunConfig, Schedule, StudyConfig
from mnistlab.data import idx
from mnistlab.data.csv import read_csv
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.data.npz import read_npz, write_npz
from mnistlab.engine import Member, train
from mnistlab.errors import CheckpointError, ConfigError, DataError, MnistlabError
from mnistlab.modules import load_checkpoint, save_checkpoint
from mnistlab.runs import RunDir

pytestmark = pytest.mark.timeout(300)  # a hang (a FIFO read) fails instead of stalling


def cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(result, *parts: str) -> str:
    """The result is exit 2 with exactly one `error:` line holding `parts`; returns it."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    for prefix, n, seed in (("train", 200, 1), ("t10k", 60, 2)):
        idx.write_idx(folder / f"{prefix}-images-idx3-ubyte.gz",
                      folder / f"{prefix}-labels-idx1-ubyte.gz", synthetic(n, seed=seed))
    return folder


@pytest.fixture(scope="module")
def run_dir(data_dir, tmp_path_factory) -> Path:
    """A finished one-run directory (kept pristine: tests copy it before damaging it)."""
    out = tmp_path_factory.mktemp("runs")
    results = ml.train(data=str(data_dir), epochs=1, hidden=(16,), dropout_after=(),
                       device="cpu", out=out, progress=False)
    return Path(results.path)


@pytest.fixture
def copy(run_dir, tmp_path) -> Path:
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def checkpoint(run: Path) -> Path:
    return next((run / "checkpoints").glob("*-seed0.safetensors"))


# --- one output helper ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_special_output_is_refused_and_left_as_it_is(tmp_path, kind):
    target = Path("/dev/null") if kind == "device" else tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(target)
    before = target.stat()
    with pytest.raises(MnistlabError, match="not a regular file") as info:
        atomic_write_text(target, "x")
    assert str(info.value).startswith(str(target)) and "\n" not in str(info.value)
    after = target.stat()
    assert (after.st_mode, after.st_ino, after.st_rdev) == (before.st_mode, before.st_ino,
                                                            before.st_rdev)


def test_every_refused_write_is_one_line_naming_the_path_and_errno(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    with pytest.raises(MnistlabError, match=r"\(Not a directory\); a file stands where a folder"):
        atomic_write_text(tmp_path / "file" / "out.txt", "x")
    with pytest.raises(MnistlabError, match=r"\(File name too long\); pass a shorter name"):
        atomic_write_text(tmp_path / ("x" * 300), "x")

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(MnistlabError) as info:
        atomic_write_text(tmp_path / "out.txt", "x")
    assert str(info.value).startswith(f"{tmp_path / 'out.txt'}: cannot write (Permission denied)")
    assert list(tmp_path.iterdir()) == [tmp_path / "file"]  # the temp file went too


def test_the_file_size_limit_is_one_line(tmp_path):
    """EFBIG under `ulimit -f` (Python ignores SIGXFSZ, so the write fails with the errno)."""
    code = ("from mnistlab.atomic import atomic_write_bytes\n"
            "from mnistlab.errors import MnistlabError\n"
            f"try: atomic_write_bytes({str(tmp_path / 'big.bin')!r}, bytes(1 << 16))\n"
            "except MnistlabError as e: print(e)\n")
    limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # noqa: E731
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          preexec_fn=limit, timeout=60)
    assert done.stdout.startswith(f"{tmp_path / 'big.bin'}: cannot write (File too large)")
    assert not (tmp_path / "big.bin").exists()


def test_evaluate_out_onto_a_file_and_predict_out_onto_a_device(run_dir, tmp_path):
    (tmp_path / "file").write_text("keep")
    one_error(cli("evaluate", run_dir, "--out", tmp_path / "file"), "Not a directory")
    assert (tmp_path / "file").read_text() == "keep"
    image = tmp_path / "d.png"
    from PIL import Image

    Image.fromarray(synthetic(1).images[0]).save(image)
    one_error(cli("predict", checkpoint(run_dir), image, "--out", "/dev/null"),
              "/dev/null: is a character device")
    assert Path("/dev/null").is_char_device()


# --- one input helper -------------------------------------------------------------------------


def test_special_files_as_inputs_are_one_line_and_never_waited_on(run_dir, copy, tmp_path):
    fifo = tmp_path / "fifo.csv"
    os.mkfifo(fifo)
    ck = checkpoint(run_dir)
    one_error(cli("data", "check", fifo), "is a FIFO")
    one_error(cli("train", "--config", fifo), "is a FIFO")
    one_error(cli("predict", ck, "--csv", fifo), "is a FIFO")
    one_error(cli("predict", ck, "--csv", "/dev/zero"), "is a character device")
    result = cli("predict", ck, fifo)  # an image: its own error line, exit 2
    assert result.exit_code == 2 and "is a FIFO" in result.stderr
    (copy / "metrics.csv").unlink()
    os.mkfifo(copy / "metrics.csv")
    one_error(cli("report", copy), "metrics.csv", "is a FIFO")


def gzip_of_zero_lines(path: Path, mib: int) -> Path:
    stream = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [stream.compress(b"0\n" * (1 << 19)) for _ in range(mib)]
    path.write_bytes(b"".join([*parts, stream.flush()]))
    return path


def peak(read, *args) -> tuple[object, float]:
    """(what `read(*args)` returned or raised, the peak of Python's memory meanwhile, MiB)."""
    tracemalloc.start()
    try:
        try:
            outcome = read(*args)
        except MnistlabError as exc:
            outcome = exc
        return outcome, tracemalloc.get_traced_memory()[1] / (1 << 20)
    finally:
        tracemalloc.stop()


def test_a_csv_gzip_bomb_is_refused_by_the_ratio_cap(tmp_path):
    """100 kB of gzip (100 MiB of `0` lines) took 5.8 GB: now refused at 64× its size (or
    16 MiB), within a few tens of MiB."""
    path = gzip_of_zero_lines(tmp_path / "zeros.csv.gz", 100)
    assert path.stat().st_size < 200_000
    error, mib = peak(read_csv, path)
    assert isinstance(error, DataError) and "compressed bytes may hold" in str(error)
    assert mib < 48


def test_a_file_of_many_short_rows_costs_its_bytes_not_a_list_of_lines(tmp_path):
    """An uncompressed CSV of 4 M one-pixel rows: the old list of lines cost ~150 bytes a row
    (600 MB); read a slice at a time it costs a few times the file's 8 MB."""
    path = tmp_path / "ones.csv"
    path.write_bytes(b"7\n" * (4 << 20))
    dataset, mib = peak(read_csv, path)
    assert isinstance(dataset, Dataset) and dataset.images.shape == (4 << 20, 1, 1)
    assert mib < 64


def test_an_npz_member_declaring_more_than_its_bytes_can_hold_is_refused(tmp_path):
    """A 730 kB .npz whose x_train inflates to 750 MB took 2.3 GB: refused from its header."""
    import zipfile

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("x_train.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": (1_000_000, 25, 30)})
            for _ in range(715):
                f.write(bytes(1 << 20))
        with archive.open("y_train.npy", "w") as f:
            np.lib.format.write_array(f, np.zeros(1_000_000, np.uint8))
    error, mib = peak(read_npz, path)
    assert isinstance(error, DataError) and "declares 750000000 bytes" in str(error)
    assert mib < 16
    write_npz(tmp_path / "real.npz", synthetic(50))  # a real archive still reads
    assert len(read_npz(tmp_path / "real.npz")[0]) == 50


# --- the run directory ------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "words"), [
    ("summary.json", "{}", "damaged summary: data"),
    ("summary.json", "[1, 2", "damaged summary ("),
    ("env.json", '{"arithmetic": 5', "damaged env.json ("),
    ("env.json", '{"arithmetic": [1]}', "damaged env.json: arithmetic"),
])
def test_damaged_run_files_are_one_line_naming_the_file(copy, name, text, words):
    (copy / name).write_text(text)
    for args in (("report", copy), ("evaluate", copy)):
        if name == "env.json" and args[0] == "evaluate":
            continue  # evaluate reads no env.json
        one_error(cli(*args), f"{copy / name}: {words}")
    if name == "summary.json":
        with pytest.raises(MnistlabError) as info:
            ml.load_run(copy)
        assert str(info.value).startswith(f"{copy / name}: {words}")


def test_a_summary_naming_an_unknown_configuration_is_damaged(copy):
    summary = json.loads((copy / "summary.json").read_text())
    summary["selection"]["ranking"] = ["nobody"]
    (copy / "summary.json").write_text(json.dumps(summary))
    one_error(cli("report", copy), "names 'nobody'")


def test_an_old_env_json_without_arithmetic_still_reports(copy):
    env = json.loads((copy / "env.json").read_text())
    del env["arithmetic"]
    (copy / "env.json").write_text(json.dumps(env))
    assert RunDir.existing(copy).recorded_arithmetic() is None
    assert ml.render(copy).is_file()


def test_a_symlink_inside_the_run_directory_is_refused_untouched(copy, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    events = next((copy / "tb").rglob("events.out.tfevents.*"))
    events.unlink()
    events.symlink_to(victim)
    one_error(cli("report", copy), f"{events}: a symbolic link inside the run directory")
    with pytest.raises(MnistlabError, match="symbolic link"):
        ml.load_run(copy)
    assert victim.read_text() == "mine"


def test_a_run_directory_in_use_is_refused_to_a_second_writer(copy):
    run = RunDir(copy).claim()
    try:
        done = subprocess.run(
            [sys.executable, "-c", "from mnistlab.cli import main; main()", "report", str(copy)],
            capture_output=True, text=True, timeout=120)
        assert done.returncode == 2, done.stderr
        assert done.stderr.strip() == (f"error: {copy}: in use by another mnistlab process (a "
                                       "run, resume or report of it); wait for it to finish, "
                                       "then run this again")
    finally:
        run.release()
    assert ml.render(copy).is_file()  # released: this process may write again


def test_a_resume_on_changed_test_data_is_refused(tmp_path):
    splits = Splits(synthetic(100, seed=1), synthetic(20, seed=2), synthetic(20, seed=3))
    members = [Member(RunConfig(name="a", hidden=(8,), dropout_after=()), 0)]
    schedule = Schedule(batch_size=50, epochs=1)
    state = tmp_path / "state.safetensors"
    train(splits, members, schedule, device="cpu", state_path=state)
    changed = Splits(splits.train, splits.val, synthetic(20, seed=9))
    with pytest.raises(MnistlabError, match="written for other test data than this run's"):
        train(changed, members, schedule, device="cpu", state_path=state, resume=True)
    # a state written before the test data were fingerprinted: said so, not "other test data"
    from safetensors import safe_open
    from safetensors.torch import load_file, save

    with safe_open(str(state), framework="pt") as f:
        meta = dict(f.metadata())
    fingerprint = json.loads(meta["fingerprint"])
    del fingerprint["test"]
    meta["fingerprint"] = json.dumps(fingerprint)
    state.write_bytes(save(load_file(str(state)), metadata=meta))
    with pytest.raises(MnistlabError, match=r"does not record its test data \(an older mnistlab"):
        train(splits, members, schedule, device="cpu", state_path=state, resume=True)


# --- values at the boundary -------------------------------------------------------------------


@pytest.mark.parametrize(("args", "words"), [
    (("--lr", "nan"), "train: lr must be > 0 and finite, got nan"),
    (("--lr", "inf"), "train: lr must be > 0 and finite, got inf"),
    (("--eps", "nan"), "train: eps must be > 0 and finite, got nan"),
    (("--weight-decay", "nan"), "train: weight_decay must be >= 0 and finite, got nan"),
    (("--label-smoothing", "nan"), "train: label_smoothing must be in [0, 1), got nan"),
    (("--seed", str(1 << 64)), "train: seed: must be below 2^63"),
    (("--translate", "1000000000"), "translate = 1000000000 can shift the 28x28 images"),
    (("--epochs", "2000000", "--lr-schedule", "cosine"), "longer than the 2,097,152"),
])
def test_absurd_values_are_refused_before_a_run_directory_exists(data_dir, tmp_path, args,
                                                                  words):
    one_error(cli("train", *args, "--data", data_dir, "--device", "cpu", "--out",
                  tmp_path / "runs", "-q"), words)
    assert not (tmp_path / "runs").exists()


def test_a_long_schedule_allocates_nothing_before_it_is_refused(data_dir, tmp_path):
    error, mib = peak(lambda: ml.train(data=str(data_dir), epochs=10 ** 7, lr_schedule="cosine",
                                       device="cpu", out=tmp_path, progress=False))
    assert isinstance(error, ConfigError) and "longer than the 2,097,152" in str(error)
    assert mib < 64


def test_a_diverged_configuration_leaves_the_study_report_whole(data_dir, tmp_path):
    """lr 1e30 diverges at its first step: its curves are all NaN ("Data cannot be log-scaled"
    killed the report); the other configuration and the report go on, and so does `report`."""
    study = StudyConfig(name="mixed", runs=(RunConfig(name="ok", hidden=(8,), dropout_after=()),
                                            RunConfig(name="boom", lr=1e30, hidden=(8,),
                                                      dropout_after=())),
                        seeds=(0,), schedule=Schedule(epochs=1), device="cpu")
    results = ml.study(study, data=str(data_dir), out=tmp_path, progress=False)
    assert results.raw["selection"]["winner"] == "ok"
    assert (results.path / "plots" / "boom_loss.png").is_file()
    assert ml.render(results.path).is_file()
    assert cli("report", results.path).exit_code == 0


# --- inputs the model cannot mean -------------------------------------------------------------


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that claims width × height pixels (its data never follow)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


@pytest.mark.filterwarnings("error")  # PIL's own DecompressionBombWarning is not printed raw
def test_a_huge_png_is_refused_from_its_header(run_dir, tmp_path):
    image = png_header(tmp_path / "bomb.png", 12000, 12000)
    result, mib = peak(ml.predict, checkpoint(run_dir), [str(image), synthetic(1).images[0]])
    assert "12000x12000 pixels, more than the 50,000,000" in result[0].error
    assert result[1].label is not None and mib < 64  # the other image goes on


def test_huge_finite_weights_are_one_line_not_nan_probabilities(run_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint(run_dir))
    with torch.no_grad():
        for p in ckpt.model.parameters():
            p.mul_(1e30)
    path = tmp_path / "huge.safetensors"
    save_checkpoint(path, ckpt)
    image = tmp_path / "d.png"
    from PIL import Image

    Image.fromarray(synthetic(1).images[0]).save(image)
    one_error(cli("predict", path, image), f"{path}: the model's outputs are not finite")
    with pytest.raises(CheckpointError, match="not finite"):
        ml.predict(path, [synthetic(1).images[0]])


def test_class_names_are_printed_safe_for_the_terminal(run_dir, tmp_path):
    ckpt = load_checkpoint(checkpoint(run_dir))
    names = tuple(f"c{i}\x1b[2J\x1b]0;owned\x07" for i in range(10))
    import dataclasses

    hostile = dataclasses.replace(ckpt, inputs=dataclasses.replace(ckpt.inputs, classes=names))
    path = tmp_path / "escape.safetensors"
    save_checkpoint(path, hostile)
    from PIL import Image

    Image.fromarray(synthetic(1).images[0]).save(tmp_path / "d.png")
    result = cli("predict", path, tmp_path / "d.png")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "\\x1b[2J" in result.stdout


def test_evaluate_warns_when_the_data_name_other_classes(run_dir, data_dir, tmp_path):
    clothes = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Boot")
    data = synthetic(40, seed=5)
    write_npz(tmp_path / "clothes.npz", Dataset(data.images, data.labels, clothes),
              Dataset(data.images, data.labels, clothes))
    scored = ml.evaluate(checkpoint(run_dir), data=str(tmp_path / "clothes.npz"),
                         plots=tmp_path / "plots")
    assert "warning: the data name their classes T-shirt, Trouser, Pullover, ..., the model 0, " \
           "1, 2, ...: scored under the model's names" in scored.note
    same = ml.evaluate(checkpoint(run_dir), data=str(data_dir), plots=tmp_path / "p")
    assert "warning" not in same.note


def test_a_safetensors_panic_is_one_line(run_dir, monkeypatch):
    """pyo3's PanicException derives from BaseException only: an `except Exception` misses it."""
    PanicException = type("PanicException", (BaseException,), {})

    def panic(*args, **kwargs):
        raise PanicException("memory allocation of 1099511627776 bytes failed")

    monkeypatch.setattr(model_module, "load_file", panic)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(checkpoint(run_dir))
    assert str(info.value).startswith(f"{checkpoint(run_dir)}: safetensors failed while loading")
    assert "memory allocation" in str(info.value)


# --- the Python API ---------------------------------------------------------------------------


def test_the_api_names_a_wrong_argument_in_one_line(run_dir):
    cases = [
        (lambda: ml.study(123), "study: config must be str, Path, StudyConfig or None, got 123"),
        (lambda: ml.study(out=None), "study: out must be str or Path, got None"),
        (lambda: ml.evaluate(123), "evaluate: target must be str or Path, got 123"),
        (lambda: ml.evaluate(run_dir, seed="0"),
         "evaluate: seed must be an integer >= 0, got '0'"),
        (lambda: ml.load_run(None), "load_run: path must be str or Path, got None"),
        (lambda: ml.predict(7, []), "predict: model must be str, Path or Checkpoint, got 7"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as info:
            call()
        assert str(info.value) == message


def test_a_bad_image_in_a_batch_loses_only_itself(run_dir):
    results = ml.predict(checkpoint(run_dir), [np.zeros((0, 0), np.uint8),
                                               synthetic(1).images[0], np.zeros((5, 0, 3),
                                                                                np.uint8)])
    assert "non-empty" in results[0].error and "non-empty" in results[2].error
    assert results[1].error is None and results[1].label is not None
