"""The CUDA path's Triton kernels, run on the CPU through Triton's interpreter (see conftest).

On a machine with CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from test_engine import LN, MIXED_LAYERNORM, reference_run

from mnistlab import kernels
from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, train

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="Triton is not installed")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_adam_matches_torch_fused_adam_row_by_row():
    """Own lr/betas/eps/weight decay per row, a span per row, a frozen row left untouched."""
    gen = torch.Generator().manual_seed(0)
    n, size = 4, 3000
    flat = {k: torch.randn(n, size, generator=gen) for k in ("param", "exp_avg")}
    flat["exp_avg_sq"] = torch.rand(n, size, generator=gen)
    hyper = torch.tensor([[1e-3, 0.9, 0.999, 1e-8, 0.0], [5e-4, 0.8, 0.99, 1e-6, 0.01],
                          [1e-2, 0.9, 0.999, 1e-8, 0.0], [1e-3, 0.9, 0.999, 1e-8, 0.0]])
    span = torch.tensor([3000, 2000, 3000, 1000], dtype=torch.int32)
    frozen = torch.tensor([0.0, 0.0, 1.0, 0.0])
    ours = {k: v.to(DEVICE) for k, v in flat.items()}
    for t in range(1, 6):
        flat["grad"] = torch.randn(n, size, generator=gen)
        ours["grad"] = flat["grad"].to(DEVICE)
        step = torch.tensor(float(t))
        kernels.adam_(ours, hyper.to(DEVICE), span.to(DEVICE), frozen.to(DEVICE), step.to(DEVICE))
        for k in (0, 1, 3):
            lr, beta1, beta2, eps, decay = hyper[k].tolist()
            torch._fused_adam_(
                *([flat[kind][k, : span[k]]] for kind in ("param", "grad", "exp_avg",
                                                           "exp_avg_sq")),
                [], [step.clone()], lr=lr, beta1=beta1, beta2=beta2, weight_decay=decay, eps=eps,
                amsgrad=False, maximize=False,
            )
    before = torch.Generator().manual_seed(0)
    untouched = torch.randn(n, size, generator=before)
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(ours[kind].cpu(), flat[kind], atol=2e-7, rtol=1e-5, msg=kind)
    assert torch.equal(ours["param"][2].cpu(), untouched[2])  # frozen
    assert torch.equal(ours["param"][1, 2000:].cpu(), untouched[1, 2000:])  # beyond its span


def test_dropout_streams_are_per_model_and_per_step():
    a = torch.randn(4, 512, 100, device=DEVICE)
    seeds = torch.tensor([11, 22, 11, 33], dtype=torch.int64, device=DEVICE)
    p = torch.tensor([0.2, 0.6, 0.2, 0.0], device=DEVICE)
    step = torch.tensor(3.0, device=DEVICE)
    out, scale = kernels.dropout(a, seeds, p, step)
    kept = scale > 0
    assert kept[0].float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert kept[1].float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.all(scale[3] == 1.0)
    assert scale[0][kept[0]].unique().tolist() == [pytest.approx(1 / 0.8)]
    assert torch.equal(out, a * scale)
    assert torch.equal(scale[0], scale[2])  # same seed and step: same mask, whatever the row
    both_dropped = (~kept[0] & ~kept[1]).float().mean().item()
    assert both_dropped == pytest.approx(0.2 * 0.6, abs=0.01)  # independent streams
    alone, _ = kernels.dropout(a[1:2], seeds[1:2], p[1:2], step)
    assert torch.equal(alone[0], out[1])  # a model's mask does not depend on the stack
    _, later = kernels.dropout(a, seeds, p, step + 1)
    assert (later[0] != scale[0]).float().mean().item() > 0.2  # a new mask every step
    again = kernels.dropout(a, seeds, p, step)
    assert torch.equal(again[1], scale)  # deterministic


def small(member: Member) -> Member:
    """The member with 32-unit hidden layers: the interpreter runs each kernel program in Python."""
    return Member(replace(member.config, hidden=(32, 32)), member.seed)


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1280 training images (10 full batches of 128), 300 validation, 200 test."""
    return Splits(make_dataset(1280, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


@pytest.fixture
def fused(monkeypatch):
    """The stack takes its CUDA path (the Triton kernels) on this device."""
    monkeypatch.setattr(kernels, "usable", lambda device: True)


def test_fused_stack_member_equals_it_trained_alone(splits, fused):
    """Bit for bit, with dropout, mixed seeds and LayerNorm on/off per member."""
    schedule = Schedule(epochs=1, record_every=4)
    members = [small(m) for m in MIXED_LAYERNORM[:3]]
    stacked = train(splits, members, schedule, device=str(DEVICE))
    for k, member in enumerate(members):
        alone = train(splits, [member], schedule, device=str(DEVICE))
        key = (member.config.name, member.seed)
        assert [r for r in stacked.rows if (r["run"], r["seed"]) == key] == alone.rows
        for name, value in alone.weights.items():
            assert torch.equal(stacked.weights[name][k], value[0]), name


def test_fused_stack_matches_sequential_and_torch_adam(make_dataset, fused):
    """Five steps: Adam amplifies any rounding difference on coordinates whose second moment
    is below eps², so later steps compare chaos, not the update rule (seen here from step 8)."""
    splits = Splits(make_dataset(640, seed=1), make_dataset(300, seed=2), make_dataset(20, seed=3))
    configs = [RunConfig(name="a", lr=1e-3), replace(LN, name="b", dropout=0.0, weight_decay=0.01)]
    result = train(splits, [Member(c, 0) for c in configs], Schedule(epochs=1), device=str(DEVICE))
    for k, config in enumerate(configs):
        model, _ = reference_run(splits, config, seed=0, steps=5)
        ours = result.checkpoint(k).model.state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-4, msg=key)


def test_fused_stack_freezes_a_diverged_member(splits, fused):
    big = small(Member(RunConfig(name="big", lr=1e20), 0))
    ok = small(Member(PRESETS["lr1e-3-p0.2"], 0))
    schedule = Schedule(epochs=2, record_every=5)
    result = train(splits, [big, ok], schedule, device=str(DEVICE))
    alone = train(splits, [ok], schedule, device=str(DEVICE))
    assert result.diverged[0] is not None and result.diverged[1] is None
    assert [r for r in result.rows if r["run"] == ok.config.name] == alone.rows
    assert all(torch.isfinite(v[0]).all() for v in result.weights.values())
