"""Sweeps at scale: stack sizing against measured memory, stacks split where they run out of
memory (with the numbers of smaller stacks), the TF32 switch, and the GPU benchmark's smoke run.

What the CPU can check of the sizing estimate: the tensors a stack allocates through PyTorch's
dispatcher on the training thread (`LiveBytes`), not allocator overhead, a kernel's internal
workspace, or the copies the resume-state writer makes on its own thread. The CUDA tests (run
by benchmarks/gpu_check.sh on a lent GPU) check it against the CUDA allocator's own peak.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import mnistlab as ml
from mnistlab import engine
from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.data.npz import write_npz
from mnistlab.engine import Member, member_bytes, out_of_memory, requested, resolve_device
from mnistlab.engine.stack import MLPStack
from mnistlab.environment import environment
from mnistlab.errors import MnistlabError
from mnistlab.experiment.executor import train_job
from mnistlab.experiment.plan import Job, auto_stack_size
from mnistlab.experiment.trials import Trial
from mnistlab.progress import Progress

ROOT = Path(__file__).resolve().parents[1]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """One thread: the engine's numbers and bytes do not depend on it, and on a busy CPU (CI, a
    shared machine) small stacks train many times faster without threads waiting on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def images(n: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset(rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n) % 10,
                   origin="synthetic")


# --- the estimate against what a stack allocates ---------------------------------------------


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage alive, and their peak, as every PyTorch operator sees them.

    Storages are told apart by identity, so views and in-place results count once; a storage
    counts until its last tensor is gone (seen at the next operator).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.now -= size
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, t.untyped_storage().nbytes())
                    self.now += t.untyped_storage().nbytes()
        self.peak = max(self.peak, self.now)
        return out


def training_peak(monkeypatch: pytest.MonkeyPatch, splits: Splits, members: list[Member],
                  schedule: Schedule) -> int:
    """Peak tensor bytes of `engine.train` beyond the data already on the device when the
    stack is built."""
    live, build = LiveBytes(), MLPStack.initial

    def initial(*args: Any, **kwargs: Any) -> MLPStack:
        live.base = live.peak = live.now  # from here on: the stack, its steps and evaluations
        return build(*args, **kwargs)

    monkeypatch.setattr(MLPStack, "initial", initial)
    with live:
        engine.train(splits, members, schedule, device="cpu")
    return live.peak - live.base


SIZING_CASES = {
    "layernorm, dropout": (RunConfig(hidden=(96, 96), layernorm=True, dropout=0.2), 32),
    "plain, large batch": (RunConfig(hidden=(64, 32), layernorm=False, dropout=0.0), 256),
    "augmenting, best weights": (RunConfig(hidden=(64, 64), layernorm=True, dropout=0.1,
                                           translate=2, restore_best=True), 32),
}


@pytest.mark.parametrize("fused", ["0", "1"], ids=["torch-ops", "fused-if-built"])
@pytest.mark.parametrize("case", SIZING_CASES)
def test_estimate_covers_what_a_stack_allocates(monkeypatch, case, fused):
    """Per member, the estimate is above what one more member really costs, and not far above:
    an estimate that wasted most of a GPU would be no use either. (Within 4×: it also counts
    the copies a resume state passes through, which this tracing cannot see, and the PyTorch
    operators' layer caches, which the fused kernels do not keep.) The validation set takes two
    evaluation blocks, so the evaluation peak is the real one."""
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", fused)
    config, batch = SIZING_CASES[case]
    splits = Splits(images(512, 1), images(1100, 2), images(300, 3))
    schedule = Schedule(batch_size=batch, epochs=1, record_every=10**6)
    members = lambda n: [Member(dataclasses.replace(config, name=f"c{k}", lr=1e-3 * (k + 1)),  # noqa: E731
                                k % 2) for k in range(n)]
    two, four = (training_peak(monkeypatch, splits, members(n), schedule) for n in (2, 4))
    estimate = member_bytes(config, schedule, splits)
    assert four <= 4 * estimate
    marginal = (four - two) / 2
    assert marginal <= estimate <= 4 * marginal, (marginal, estimate)


def test_estimate_grows_with_widths_depth_batch_and_evaluation_rows():
    splits = Splits(images(512, 1), images(1100, 2), images(300, 3))
    base, schedule = RunConfig(hidden=(64, 64)), Schedule(batch_size=32)
    size = lambda c=base, s=schedule, sp=splits, d="cpu": member_bytes(c, s, sp, d)  # noqa: E731
    assert size(dataclasses.replace(base, hidden=(128, 64))) > size()
    assert size(dataclasses.replace(base, hidden=(64, 64, 64))) > size()
    assert size(s=Schedule(batch_size=4096)) > size(s=Schedule(batch_size=2048)) > size()
    assert size(dataclasses.replace(base, layernorm=True)) > size()
    smaller = Splits(images(512, 1), images(500, 2), images(300, 3))
    assert size(sp=smaller) < size()  # one evaluation block, not two
    # On a GPU a CUDA graph keeps the step's buffers while evaluation runs: both count, and
    # its evaluation blocks are EVAL_CHUNK rows, not the CPU's 1,024.
    larger = Splits(images(512, 1), images(9000, 2), images(300, 3))
    assert size(sp=larger, d="cuda") > size(sp=larger)


def test_a_stack_is_sized_by_what_its_members_cost_together(monkeypatch):
    """A stack computes LayerNorm and dropout masks for all its members where one has them, so
    a grid over both is sized as if every member had both (on a GPU, where the training step's
    memory adds to the evaluation's)."""
    splits = Splits(images(512, 1), images(1100, 2), images(300, 3))
    trials = [Trial(RunConfig(name=f"ln{k}", layernorm=True, dropout=0.0), Schedule(), 0)
              for k in range(6)]
    trials += [Trial(RunConfig(name=f"p{k}", layernorm=False, dropout=0.3), Schedule(), 0)
               for k in range(6)]
    both = member_bytes(RunConfig(layernorm=True, dropout=0.3), Schedule(), splits, "cuda")
    assert both > max(member_bytes(t.config, t.schedule, splits, "cuda") for t in trials)
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    monkeypatch.setattr("mnistlab.experiment.plan.free_bytes", lambda device: 2 * (data + 5 * both))
    assert auto_stack_size(trials, splits, "cuda") == 5


# --- stacks split where they run out of memory -----------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    write_npz(path, images(240, 4))
    return path


def sweep_values(data: Path, stack_size: int) -> dict[str, Any]:
    """4 configurations × 2 seeds, small enough to train in a second."""
    return {"name": "split", "data": str(data), "device": "cpu", "seeds": 2,
            "stack_size": stack_size,
            "base": {"hidden": [16], "layernorm": True, "dropout_after": [1]},
            "schedule": {"epochs": 2, "batch_size": 16, "record_every": 5},
            "grid": {"lr": [1e-2, 1e-3], "dropout": [0.0, 0.3]}}


class OutOfMemoryAbove:
    """engine.train, failing as CUDA's allocator does for a stack of more than `fits` models;
    records the stack sizes it was asked for."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, fits: int):
        self.fits, self.sizes, self.train = fits, [], engine.train
        monkeypatch.setattr(engine, "train", self)

    def __call__(self, splits: Splits, members: list[Member], *args: Any, **kwargs: Any) -> Any:
        self.sizes.append(len(members))
        if len(members) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 "
                                         "has a total capacity of 79.19 GiB of which 1.5 GiB is "
                                         "free.")
        return self.train(splits, members, *args, **kwargs)


def without_timing(summary: dict) -> dict:
    """A summary without wall-clock figures, the split records and the stack layout."""
    drop = {"seconds", "stack_split"}
    return {**{k: v for k, v in summary.items() if k not in ("seconds", "sweep")},
            "runs": [{k: v for k, v in r.items() if k not in drop} for r in summary["runs"]],
            "configs": [{k: v for k, v in c.items() if k != "seconds"}
                        for c in summary["configs"]]}


def files(run_dir: Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """Every model and prediction file of a run directory, by name: its metadata and each
    tensor's bytes (safetensors writes the metadata in no fixed order)."""
    def contents(path: Path) -> tuple[dict, dict[str, bytes]]:
        raw = path.read_bytes()
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = {k: v.numpy().tobytes() for k, v in load(raw).items()}
        return metadata, tensors

    return {f"{folder}/{p.name}": contents(p) for folder in ("checkpoints", "predictions")
            for p in sorted((run_dir / folder).glob("*-seed*.safetensors"))}


@pytest.fixture(scope="module")
def small_stacks(tiny_data, tmp_path_factory) -> ml.Results:
    """The reference: the sweep in stacks of 2, with MNISTLAB_TF32=1 (nothing on a CPU)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MNISTLAB_TF32", "1")
        return ml.sweep(sweep_values(tiny_data, 2), out=tmp_path_factory.mktemp("small"),
                        progress=False, report=False)


def test_a_stack_out_of_memory_is_trained_in_halves_with_the_numbers_of_smaller_stacks(
        monkeypatch, tiny_data, tmp_path, small_stacks):
    oom = OutOfMemoryAbove(monkeypatch, fits=2)
    log = io.StringIO()
    split = ml.sweep(sweep_values(tiny_data, 8), out=tmp_path, progress=Progress(log, live=False),
                     report=False)
    assert oom.sizes == [8, 4, 2, 2, 4, 2, 2]
    notes = [line for line in log.getvalue().splitlines() if "training them as" in line]
    assert notes == ["8 models on cpu: out of memory allocating 2.00 GiB; training them as "
                     "stacks of 4 and 4"] + 2 * ["4 models on cpu: out of memory allocating "
                                                 "2.00 GiB; training them as stacks of 2 and 2"]
    assert without_timing(split.raw) == without_timing(small_stacks.raw)
    assert split.run_dir.metrics_path.read_text() == small_stacks.run_dir.metrics_path.read_text()
    assert files(split.run_dir.root) == files(small_stacks.run_dir.root)
    assert {r["stack_split"] for r in split.raw["runs"]} == {
        "8 models ran out of memory on cpu; trained in a stack of 2"}
    assert "stack_split" not in small_stacks.raw["runs"][0]
    # One stack, one done file of the usual shape; no half's resume state is left behind.
    assert [p.name for p in split.run_dir.checkpoints.glob("stack-*.json")] == ["stack-0.json"]
    assert not list(split.run_dir.checkpoints.glob("state-*"))
    for results in (split, small_stacks):  # MNISTLAB_TF32=1 changed nothing on the CPU
        assert json.loads(results.run_dir.env_path.read_text())["matmul"] == "fp32"


def test_a_split_stack_resumes_in_halves(monkeypatch, tiny_data, tmp_path, small_stacks):
    """Interrupted in its third quarter, the split stack resumes from each quarter's own state
    without trying the whole stack again, and ends with the uninterrupted numbers."""
    oom = OutOfMemoryAbove(monkeypatch, fits=2)
    real = oom.train

    def interrupted_third(splits: Splits, members: list[Member], *args: Any,
                          **kwargs: Any) -> Any:
        if [m.config.name for m in members] == ["lr1e-3_p0", "lr1e-3_p0"]:
            def stop(event: Any) -> None:
                if event.step >= 15:  # after the first epoch's state (10 steps an epoch)
                    raise KeyboardInterrupt
            kwargs["on_record"] = stop
        return real(splits, members, *args, **kwargs)

    oom.train = interrupted_third
    with pytest.raises(KeyboardInterrupt) as info:
        ml.sweep(sweep_values(tiny_data, 8), out=tmp_path, progress=False, report=False)
    run_dir = info.value.run_dir
    states = sorted(p.name for p in (run_dir / "checkpoints").glob("state-*"))
    assert states == ["state-0.0.0.safetensors", "state-0.0.1.safetensors",
                      "state-0.1.0.safetensors"]
    oom.train, oom.sizes = real, []
    again = ml.sweep(resume=run_dir, progress=False, report=False)
    assert oom.sizes == [2, 2, 2, 2]  # the quarters only: the whole and the halves not retried
    assert without_timing(again.raw) == without_timing(small_stacks.raw)
    assert {r["stack_split"] for r in again.raw["runs"]} == {
        "8 models ran out of memory on cpu; trained in a stack of 2"}
    assert files(run_dir) == files(small_stacks.run_dir.root)
    assert not list((run_dir / "checkpoints").glob("state-*"))


def test_a_lone_model_that_does_not_fit_is_one_line_naming_device_and_free_memory(
        monkeypatch):
    OutOfMemoryAbove(monkeypatch, fits=0)
    splits = Splits(images(64, 1), images(32, 2), images(32, 3))
    job = Job("0", (Member(RunConfig(name="wide"), 0), Member(RunConfig(name="wide"), 1)),
              Schedule(epochs=1))
    notes: list[str] = []
    with pytest.raises(MnistlabError) as info:
        train_job(job, splits, "cpu", on_note=notes.append)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("wide seed 0: one model does not fit in the memory of cpu (")
    assert "GiB free; out of memory allocating 2.00 GiB)" in message
    assert "smaller batch_size or smaller hidden layers" in message
    assert notes == ["2 models on cpu: out of memory allocating 2.00 GiB; training them as "
                     "stacks of 1 and 1"]


def test_what_counts_as_running_out_of_memory():
    with pytest.raises(RuntimeError) as cpu:
        torch.empty(2**50)  # the CPU allocator's own failure: a RuntimeError
    assert out_of_memory(cpu.value)
    assert out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
    assert out_of_memory(MemoryError())
    assert not out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert not out_of_memory(MnistlabError("bad data"))
    try:  # an error raised while handling one (a CUDA graph capture that failed) counts
        try:
            raise torch.OutOfMemoryError("CUDA out of memory.")
        except RuntimeError:
            raise RuntimeError("operation failed due to a previous error during capture")  # noqa: B904
    except RuntimeError as exc:
        assert out_of_memory(exc)


REAL_OOM = """
import json, resource, sys
from mnistlab.config import RunConfig, Schedule
from mnistlab.data import load, make_splits
from mnistlab.engine import Member
from mnistlab.experiment.executor import train_job
from mnistlab.experiment.plan import Job
from mnistlab.model import build_mlp

splits = make_splits(load({data!r}, progress=False))
config = RunConfig(hidden=(512, 512), layernorm=True)
members = [Member(RunConfig(name=f"c{{k}}", hidden=(512, 512), layernorm=True,
                            lr=1e-3 * (k + 1)), k % 2) for k in range(8)]
schedule = Schedule(epochs=1, batch_size=16, record_every=5)

def runs(*jobs):
    results = [train_job(job, splits, "cpu", on_note=lambda line: print(line, file=sys.stderr))
               for job in jobs]
    return [dict(r, seconds=None) for result in results for r in result.outcome.runs]

runs(Job("warm-up", (Member(RunConfig(hidden=(8, 8)), 0),), schedule))  # load what training needs
# The cap: the address space used now, plus 30 models' weights. Building a stack takes 6 copies
# of its weights (models, stacked, 4 flat rows): 8 models cannot fit, 4 can; once trained, the
# job holds 2 (weights, checkpoint).
weights = 4 * sum(p.numel() for p in build_mlp(config, 784, 10).parameters())
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) for line in f if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + 30 * weights, resource.RLIM_INFINITY))
split = runs(Job("all", tuple(members), schedule))
small = runs(*(Job(str(k), tuple(members[2 * k : 2 * k + 2]), schedule) for k in range(4)))
print("RUNS", json.dumps([small, split]))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs Linux's /proc")
def test_a_real_allocation_failure_on_the_cpu_splits_the_stack(tiny_data):
    """In a process whose address space is capped, a stack of 8 wide models fails to allocate
    for real (the CPU allocator's RuntimeError) and trains in smaller stacks: the numbers of
    stacks of 2. (Without resume states: where their writer's copies fail, safetensors raises a
    PanicException that names no allocation.)"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "1"}
    done = subprocess.run([sys.executable, "-c", REAL_OOM.format(data=str(tiny_data))],
                          capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stderr.startswith("8 models on cpu: out of memory allocating ")
    small, split = json.loads(done.stdout.split("RUNS", 1)[1])
    notes = {r.pop("stack_split") for r in split}
    assert {note.rsplit(" ", 1)[0] for note in notes} == {
        "8 models ran out of memory on cpu; trained in a stack of"}
    assert split == small


# --- TF32 -------------------------------------------------------------------------------------


def test_tf32_is_opt_in_named_for_cuda_only_and_recorded(monkeypatch):
    monkeypatch.delenv("MNISTLAB_TF32", raising=False)
    assert requested(torch.device("cuda:0")).matmul == "fp32"
    monkeypatch.setenv("MNISTLAB_TF32", "1")
    assert requested(torch.device("cuda:0")).matmul == "tf32"
    assert requested(torch.device("cpu")).matmul == requested(torch.device("mps")).matmul == "fp32"
    before = torch.backends.cuda.matmul.allow_tf32
    assert resolve_device("cpu").type == "cpu"
    assert torch.backends.cuda.matmul.allow_tf32 == before  # a CPU run sets nothing
    assert environment(device="cuda:0")["matmul"] == "tf32"
    assert environment(device="cuda:0")["arithmetic"]["matmul"] == "tf32"
    assert environment(device="cpu")["matmul"] == "fp32"


@cuda
def test_tf32_switch_sets_cublas_on_cuda(monkeypatch, make_dataset):
    splits = Splits(make_dataset(64, seed=1), make_dataset(16, seed=2), make_dataset(16, seed=3))
    one = [Member(RunConfig(name="a", hidden=(8,)), 0)]
    monkeypatch.setenv("MNISTLAB_TF32", "1")
    engine.train(splits, one, Schedule(epochs=1, record_every=4), device="cuda")
    assert torch.backends.cuda.matmul.allow_tf32
    monkeypatch.setenv("MNISTLAB_TF32", "0")
    engine.train(splits, one, Schedule(epochs=1, record_every=4), device="cuda")
    assert not torch.backends.cuda.matmul.allow_tf32


# --- on a GPU ---------------------------------------------------------------------------------


@cuda
def test_estimate_covers_the_cuda_allocators_peak():
    splits = Splits(images(2048, 1), images(9000, 2), images(600, 3))
    config, schedule = RunConfig(hidden=(150, 150), layernorm=True, dropout=0.2), Schedule(
        epochs=1, record_every=8)
    members = [Member(dataclasses.replace(config, name=f"c{k}"), k % 3) for k in range(24)]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    engine.train(splits, members, schedule, device="cuda")
    peak = torch.cuda.max_memory_allocated() - base
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    assert peak <= 2 * data + len(members) * member_bytes(config, schedule, splits, "cuda")


@cuda
def test_a_real_cuda_out_of_memory_splits_the_stack(tiny_data, tmp_path):
    """With the allocator capped just above what 2 wide models need, a stack of 8 runs out of
    memory for real and trains in halves; numbers as stacks of 2 (to float32 rounding: cuBLAS
    picks kernels by shape)."""
    values = sweep_values(tiny_data, 8) | {"device": "cuda"}
    values["base"] = {"hidden": [2048, 2048], "layernorm": True, "dropout_after": [1, 2]}
    reference = ml.sweep(values | {"stack_size": 2}, out=tmp_path / "2", progress=False,
                         report=False)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    need = 2 * 4 * 5 * (785 * 2048 + 2049 * 2048 + 2049 * 10)  # two models' state, generously
    fraction = (torch.cuda.memory_allocated() + need + (256 << 20)) / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    try:
        split = ml.sweep(values, out=tmp_path / "8", progress=False, report=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert all("ran out of memory on cuda" in r["stack_split"] for r in split.raw["runs"])
    ours = {(r["run"], r["seed"]): r for r in split.raw["runs"]}
    for r in reference.raw["runs"]:
        assert ours[r["run"], r["seed"]]["final_val_loss"] == pytest.approx(r["final_val_loss"],
                                                                            abs=1e-3)


# --- the GPU benchmark, as a smoke run on the CPU -----------------------------------------------


def test_gpu_benchmark_smoke_runs_on_the_cpu(tmp_path):
    out = tmp_path / "smoke.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--smoke",
                           "--json", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["failures"] == {}
    assert [(r["models"], r["precision"]) for r in result["scaling"]] == [(3, "fp32"),
                                                                          (3, "tf32")]
    assert result["scaling"][1]["val_accuracy_change"] == 0.0  # TF32 is nothing on a CPU
    assert "| models | matmul | seconds | models/s | TFLOP/s |" in done.stdout
