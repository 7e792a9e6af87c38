"""The CUDA path's Triton kernels, run on the CPU through Triton's interpreter (see conftest).

On a machine with CUDA the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from agreement import DEVICE, assert_backends_agree, assert_mostly_close, assert_rows_agree
from reference_loop import reference_run
from test_engine import GELU, LN, MIXED_LAYERNORM

from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, requested, train
from mnistlab.engine import backends as backend_module
from mnistlab.engine.backends import cross_entropy
from mnistlab.engine.stack import MLPStack

kernels = pytest.importorskip("mnistlab.engine.backends.triton_kernels",
                              reason="Triton is not installed")


def test_adam_matches_torch_fused_adam_row_by_row():
    """Own lr/betas/eps/weight decay per row, a span per row, a frozen row left untouched; a
    row's lr and beta1 read from its rates at each step; AdamW's decoupled decay."""
    gen = torch.Generator().manual_seed(0)
    n, size, steps = 4, 3000, 5
    flat = {k: torch.randn(n, size, generator=gen) for k in ("param", "exp_avg")}
    flat["exp_avg_sq"] = torch.rand(n, size, generator=gen)
    hyper = torch.tensor([[0.999, 1e-8, 0.0, 0.0], [0.99, 1e-6, 0.01, 0.0],
                          [0.999, 1e-8, 0.0, 0.0], [0.999, 1e-8, 0.0, 0.05]])
    rates = torch.tensor([[1e-3, 0.9], [5e-4, 0.8], [1e-2, 0.9], [1e-3, 0.9]])
    rates = rates[:, None].repeat(1, steps, 1)
    rates[3, :, 0] = torch.linspace(1e-3, 2e-2, steps)  # a scheduled lr and beta1
    rates[3, :, 1] = torch.linspace(0.95, 0.85, steps)
    span = torch.tensor([3000, 2000, 3000, 1000], dtype=torch.int32)
    frozen = torch.tensor([0.0, 0.0, 1.0, 0.0])
    ours = {k: v.to(DEVICE) for k, v in flat.items()}
    for t in range(1, steps + 1):
        flat["grad"] = torch.randn(n, size, generator=gen)
        ours["grad"] = flat["grad"].to(DEVICE)
        step = torch.tensor(float(t))
        kernels.adam_(ours, hyper.to(DEVICE), rates.to(DEVICE), span.to(DEVICE),
                      frozen.to(DEVICE), step.to(DEVICE))
        for k in (0, 1, 3):
            beta2, eps, decay, decoupled = hyper[k].tolist()
            lr, beta1 = rates[k, t - 1].tolist()
            fused = torch._fused_adamw_ if decoupled else torch._fused_adam_
            fused(
                *([flat[kind][k, : span[k]]] for kind in ("param", "grad", "exp_avg",
                                                           "exp_avg_sq")),
                [], [step.clone()], lr=lr, beta1=beta1, beta2=beta2,
                weight_decay=decoupled or decay, eps=eps, amsgrad=False, maximize=False,
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


def test_each_hidden_layer_draws_its_own_dropout_mask():
    """The key holds the layer: two dropout layers of one model at one step used to share a
    mask (the same seed and step gave the same Philox key). Layer 0 keeps its old key."""
    a = torch.ones(2, 256, 64, device=DEVICE)
    seeds = torch.tensor([5, 6], dtype=torch.int64, device=DEVICE)
    p = torch.tensor([0.5, 0.5], device=DEVICE)
    step = torch.tensor(7.0, device=DEVICE)
    first, second = (kernels.dropout(a, seeds, p, step, layer)[1] for layer in (0, 1))
    assert (first != second).float().mean().item() == pytest.approx(0.5, abs=0.03)
    assert torch.equal(kernels.dropout(a, seeds, p, step)[1], first)  # layer 0 by default
    for layer, expected in ((0, first), (1, second)):  # the fused layer draws the same masks
        fused = kernels.hidden_forward(a, None, (seeds, p, step, layer), 1e-5)[1]
        assert torch.equal(fused, expected)


def small(member: Member) -> Member:
    """The member with 32-unit hidden layers: the interpreter runs each kernel program in Python."""
    return Member(replace(member.config, hidden=(32, 32)), member.seed)


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1280 training images (10 full batches of 128), 300 validation, 200 test."""
    return Splits(make_dataset(1280, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


def test_loss_kernel_matches_cross_entropy_and_keeps_the_books():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 70, 10, generator=gen) * 3
    logits[2, 5] = float("nan")  # model 2 diverges at this step
    labels = torch.randint(0, 10, (3, 70), generator=gen)
    books = {k: torch.zeros(3) for k in ("loss_sum", "acc_sum", "last_loss", "frozen")}
    books["diverged_at"] = torch.tensor([0, 0, 0])
    books["loss_sum"] += 1.0
    books["frozen"][1] = 1.0  # frozen before: not marked again
    on = {k: v.to(DEVICE) for k, v in books.items()}
    grad = kernels.cross_entropy_step(logits.to(DEVICE), labels.to(DEVICE), on,
                                      torch.tensor(6.0, device=DEVICE))
    loss, accuracy, expected = cross_entropy(logits, labels)
    torch.testing.assert_close(grad[:2].cpu(), expected[:2], atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(on["last_loss"][:2].cpu(), loss[:2])
    torch.testing.assert_close(on["loss_sum"][:2].cpu(), loss[:2] + 1)
    torch.testing.assert_close(on["acc_sum"].cpu(), accuracy)
    assert on["diverged_at"].tolist() == [0, 0, 7]
    assert on["frozen"].tolist() == [0.0, 1.0, 1.0]
    shared = kernels.cross_entropy_step(logits.to(DEVICE), labels[0].to(DEVICE).expand(3, -1),
                                        {k: torch.zeros_like(v) for k, v in on.items()},
                                        torch.tensor(6.0, device=DEVICE))
    expected = cross_entropy(logits, labels[0].expand(3, -1).contiguous())[2]
    torch.testing.assert_close(shared[:2].cpu(), expected[:2], atol=1e-7, rtol=1e-5)


def test_backend_is_chosen_by_device_environment_and_activation(monkeypatch):
    """Triton for CUDA stacks only, unless MNISTLAB_TRITON=0; fused hidden layers for ReLU only;
    steps run plainly off CUDA, whichever backend."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.delenv("MNISTLAB_TRITON", raising=False)
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")  # the CPU's own fused step aside
    assert backend_module.triton_kernels_for(requested(cuda)) is kernels
    assert backend_module.triton_kernels_for(requested(cpu)) is None
    monkeypatch.setenv("MNISTLAB_TRITON", "0")
    assert backend_module.triton_kernels_for(requested(cuda)) is None
    relu, gelu = RunConfig(name="relu"), RunConfig(name="gelu", activation="gelu")
    assert type(MLPStack.initial([relu], [0], 784, 10, cpu).backend) is backend_module.TorchOps
    monkeypatch.setattr(backend_module, "triton_kernels_for", lambda device: kernels)
    monkeypatch.setenv("MNISTLAB_CUDA_GRAPHS", "1")
    for config, chosen in ((relu, backend_module.TritonLayers),
                           (gelu, backend_module.TritonKernels)):
        stack = MLPStack.initial([config], [0], 784, 10, cpu)
        assert type(stack.backend) is chosen
        step = lambda index: None  # noqa: E731
        assert stack.backend.step_runner(step) is step


@pytest.mark.parametrize("layernorm", [(True, False, True), (True, True, True), (False,) * 3],
                         ids=["mixed-layernorm", "all-layernorm", "no-layernorm"])
def test_fused_layers_match_torch_ops(monkeypatch, layernorm):
    """Forward (ReLU, dropout, LayerNorm) and backward of the fused path against the PyTorch
    path fed the same dropout masks; the masks are the dropout kernel's."""
    monkeypatch.setattr(backend_module, "triton_kernels_for", lambda device: kernels)
    configs = [RunConfig(name=f"m{k}", layernorm=layernorm[k], dropout=p, dropout_after=(1, 2),
                         hidden=(40, 30)) for k, p in enumerate((0.3, 0.0, 0.5))]
    stack = MLPStack.initial(configs, [0, 1, 2], 784, 10, DEVICE)
    assert isinstance(stack.backend, backend_module.TritonLayers)
    for key in [key for key in stack.params if key.startswith("norm")]:
        stack.params[key].add_(torch.randn_like(stack.params[key]) * 0.1)
    x, y = torch.rand(3, 50, 784, device=DEVICE), torch.randint(0, 10, (3, 50), device=DEVICE)
    logits, hidden = stack.forward(x, train=True)
    stack.backward(cross_entropy(logits, y)[2], hidden)
    fused = {k: v.clone() for k, v in stack.grads.items()}
    masks = iter([layer.mask for layer in hidden[:-1] if layer.mask is not None])
    relu = torch.relu(hidden[0].z)  # layer 0's activation: the dropout kernel draws masks alike
    fused_ops = stack.backend
    drawn = kernels.dropout(relu, fused_ops.seeds, fused_ops.drop_p.view(-1), stack.adam_step,
                            0)[1]
    assert torch.equal(drawn, hidden[0].mask)
    evaluated = stack.forward(x)[0]  # evaluation: no dropout, no statistics kept
    stack.backend = backend_module.TorchOps(stack)
    torch.testing.assert_close(evaluated, stack.forward(x)[0], atol=2e-6, rtol=1e-5)
    monkeypatch.setattr(stack.backend, "dropout",
                        lambda a, layer: (lambda m: (a * m, m))(next(masks)))
    expected, hidden = stack.forward(x, train=True)
    torch.testing.assert_close(logits, expected, atol=2e-6, rtol=1e-5)
    stack.backward(cross_entropy(expected, y)[2], hidden)
    for key, value in stack.grads.items():
        torch.testing.assert_close(fused[key], value, atol=2e-7, rtol=1e-5, msg=key)
        if key.startswith("norm"):  # exact zeros for models without LayerNorm
            assert all(torch.all(fused[key][k] == 0) != layernorm[k] for k in range(3)), key


@pytest.fixture
def fused(monkeypatch):
    """Stacks choose the CUDA backend (the Triton kernels) on this device."""
    monkeypatch.setattr(backend_module, "triton_kernels_for", lambda device: kernels)


@pytest.mark.parametrize("members", [MIXED_LAYERNORM[:3], GELU[:3]], ids=["relu", "gelu"])
def test_fused_stack_member_equals_it_trained_alone(splits, fused, members):
    """Bit for bit (CPU), with dropout, mixed seeds and LayerNorm on/off per member; GELU takes
    the fused Adam, dropout and loss kernels with PyTorch's layer ops."""
    schedule = Schedule(epochs=1, record_every=4)
    members = [small(m) for m in members]
    stacked = train(splits, members, schedule, device=str(DEVICE))
    for k, member in enumerate(members):
        alone = train(splits, [member], schedule, device=str(DEVICE))
        key = (member.config.name, member.seed)
        assert_rows_agree([r for r in stacked.rows if (r["run"], r["seed"]) == key], alone.rows)
        for name, value in alone.weights.items():
            if DEVICE.type == "cpu":
                assert torch.equal(stacked.weights[name][k], value[0]), name
            else:
                assert_mostly_close(stacked.weights[name][k], value[0], 10 * member.config.lr)


def test_fused_stack_matches_sequential_and_torch_adam(make_dataset, fused):
    """Five steps against the reference (on the CPU), compared as `assert_mostly_close` says."""
    splits = Splits(make_dataset(640, seed=1), make_dataset(300, seed=2), make_dataset(20, seed=3))
    configs = [RunConfig(name="a", lr=1e-3), replace(LN, name="b", dropout=0.0, weight_decay=0.01)]
    result = train(splits, [Member(c, 0) for c in configs], Schedule(epochs=1), device=str(DEVICE))
    for k, config in enumerate(configs):
        model, _ = reference_run(splits, config, seed=0, steps=5)
        ours = result.checkpoint(k).model.state_dict()
        for key, value in model.state_dict().items():
            assert_mostly_close(ours[key], value, max_move=4 * 5 * config.lr)


def test_fused_stack_freezes_a_diverged_member(splits, fused):
    big = small(Member(RunConfig(name="big", lr=1e20), 0))
    ok = small(Member(PRESETS["lr1e-3-p0.2"], 0))
    schedule = Schedule(epochs=2, record_every=5)
    result = train(splits, [big, ok], schedule, device=str(DEVICE))
    alone = train(splits, [ok], schedule, device=str(DEVICE))
    assert result.diverged[0] is not None and result.diverged[1] is None
    assert_rows_agree([r for r in result.rows if r["run"] == ok.config.name], alone.rows)
    assert all(torch.isfinite(v[0]).all() for v in result.weights.values())


def test_loss_kernel_smooths_labels_per_model():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 40, 10, generator=gen) * 2
    labels = torch.randint(0, 10, (3, 40), generator=gen)
    smoothing = torch.tensor([0.0, 0.1, 0.3])
    books = {k: torch.zeros(3, device=DEVICE) for k in ("loss_sum", "acc_sum", "last_loss",
                                                          "frozen")}
    books["diverged_at"] = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    grad = kernels.cross_entropy_step(logits.to(DEVICE), labels.to(DEVICE), books,
                                      torch.tensor(0.0, device=DEVICE), smoothing.to(DEVICE))
    loss, _, expected = cross_entropy(logits, labels, smoothing.view(-1, 1, 1))
    torch.testing.assert_close(grad.cpu(), expected, atol=1e-7, rtol=1e-5)
    torch.testing.assert_close(books["last_loss"].cpu(), loss)  # the plain cross-entropy
    for k, eps in enumerate(smoothing.tolist()):  # against autograd through torch's own loss
        leaf = logits[k].clone().requires_grad_()
        torch.nn.functional.cross_entropy(leaf, labels[k], label_smoothing=eps).backward()
        torch.testing.assert_close(grad[k].cpu(), leaf.grad, atol=1e-7, rtol=1e-5)


def test_fused_recipe_stack_matches_torch_ops(splits, fused, monkeypatch):
    """Scheduled rates and beta1 read on the device, AdamW, smoothing, augmentation, best
    weights: the Triton backend against the PyTorch one, member by member (without dropout,
    whose masks the two draw from different streams)."""
    from test_recipe import RECIPE

    schedule = Schedule(epochs=1, record_every=3)
    members = [small(Member(replace(m.config, dropout=0.0), m.seed)) for m in RECIPE[:5]]
    result = train(splits, members, schedule, device=str(DEVICE))
    monkeypatch.setattr(backend_module, "triton_kernels_for", lambda device: None)
    reference = train(splits, members, schedule, device=str(DEVICE))
    assert_backends_agree(result, reference)
