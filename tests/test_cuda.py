"""The CUDA path: graph replay, Triton kernels, determinism and resume on a GPU.

Skipped where there is no CUDA device (CI); run on a lent GPU by benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import importlib.util
from dataclasses import replace

import pytest
import torch
from agreement import assert_mostly_close, assert_rows_agree, assert_same

from mnistlab.config import PRESETS, SEED_STUDY, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, backends, train
from mnistlab.engine.backends.cuda_graphs import GraphedStep
from mnistlab.engine.stack import MLPStack

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

STUDY = [Member(PRESETS[n], s) for s in (0, 1) for n in SEED_STUDY]  # 10 models, LayerNorm mixed
SCHEDULE = Schedule(epochs=2, record_every=4, log_every=100)


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1,300 training images: 10 full batches and a partial one per epoch (not graphed)."""
    return Splits(make_dataset(1300, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


def test_backend_follows_mnistlab_triton_and_mnistlab_cuda_graphs(monkeypatch):
    """Triton unless MNISTLAB_TRITON=0, graphs unless MNISTLAB_CUDA_GRAPHS=0; a graph registers
    the generators PyTorch's dropout draws from, none for Triton's counter-based dropout."""
    configs, step = [m.config for m in STUDY], lambda index: None
    monkeypatch.setenv("MNISTLAB_TRITON", "0")
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "0")
    stack = MLPStack.initial(configs, [m.seed for m in STUDY], 784, 10, torch.device("cuda"))
    assert type(stack.backend) is backends.TorchOps
    assert stack.backend.step_runner(step) is step
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "1")
    graphed = stack.backend.step_runner(step)
    assert isinstance(graphed, GraphedStep) and graphed.generators == stack.generators
    if importlib.util.find_spec("triton") is not None:
        monkeypatch.setenv("MNISTLAB_TRITON", "1")
        stack = MLPStack.initial(configs, [m.seed for m in STUDY], 784, 10, torch.device("cuda"))
        assert type(stack.backend) is backends.TritonLayers
        assert stack.backend.step_runner(step).generators == []


@pytest.mark.parametrize("triton", ["1", "0"], ids=["triton-kernels", "torch-ops"])
def test_graph_replay_equals_eager_steps(splits, monkeypatch, triton):
    """Bit for bit; with torch ops the dropout generators are registered with the graph."""
    if triton == "1" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed")
    monkeypatch.setenv("MNISTLAB_TRITON", triton)
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "0")
    eager = train(splits, STUDY, SCHEDULE, device="cuda")
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "1")
    graphed = train(splits, STUDY, SCHEDULE, device="cuda")
    assert_same(graphed, eager)
    assert_same(train(splits, STUDY, SCHEDULE, device="cuda"), graphed)  # deterministic


def test_member_of_a_stack_agrees_with_it_trained_alone_on_cuda(splits):
    """To float32 rounding, not bit for bit: cuBLAS and PyTorch's reductions choose their
    kernels by shape, so a batch of 10 models rounds differently from a batch of one (seen on
    an H200: a validation loss 2e-7 apart after 12 steps)."""
    stacked = train(splits, STUDY, SCHEDULE, device="cuda")
    for k in (0, 2, 9):  # no LayerNorm, LayerNorm + dropout, another seed
        alone = train(splits, [STUDY[k]], SCHEDULE, device="cuda")
        key = (STUDY[k].config.name, STUDY[k].seed)
        assert_rows_agree([r for r in stacked.rows if (r["run"], r["seed"]) == key], alone.rows)
        for name, value in alone.weights.items():
            assert_mostly_close(stacked.weights[name][k], value[0], 10 * STUDY[k].config.lr)


def test_resume_after_ctrl_c_equals_one_run_on_cuda(splits, tmp_path):
    state = tmp_path / "state.safetensors"
    whole = train(splits, STUDY, SCHEDULE, device="cuda")

    def interrupt(event):
        if event.step == 16:  # mid-epoch 2 (11 steps per epoch)
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(splits, STUDY, SCHEDULE, device="cuda", state_path=state, on_record=interrupt)
    resumed = train(splits, STUDY, SCHEDULE, device="cuda", state_path=state, resume=True)
    assert_same(resumed, whole)


def test_diverged_member_is_frozen_on_cuda(splits):
    big = Member(replace(PRESETS["lr1e-3-p0.2"], name="big", lr=1e20), 0)
    members = [big, *STUDY[:3]]
    result = train(splits, members, SCHEDULE, device="cuda")
    alone = train(splits, STUDY[:3], SCHEDULE, device="cuda")
    assert result.diverged[0] is not None and result.diverged[1:] == [None] * 3
    assert_rows_agree([r for r in result.rows if r["run"] != "big"], alone.rows)
