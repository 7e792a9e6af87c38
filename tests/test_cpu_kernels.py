"""The fused CPU kernels (engine/backends/cpu_kernels.py) against the PyTorch operators they
replace.

Bit for bit where the arithmetic is PyTorch's (Adam, except one-cycle's models; the loss
gradient; a whole run of models without LayerNorm and dropout), to float32 rounding where it is
not (LayerNorm, one-cycle), a recipe run to `assert_mostly_close`; and a model's bits must not
depend on its stack, the thread count or an interruption. Dropout masks come from another
stream than the PyTorch backend's, so comparisons across backends feed both the same masks or
use none.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import replace

import pytest
import torch
from agreement import assert_backends_agree, assert_same
from test_engine import GELU, MIXED_LAYERNORM
from test_recipe import RECIPE

from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.data.idx import read_array
from mnistlab.engine import Interrupted, Member, augment, backends, requested, train
from mnistlab.engine.backends import CpuKernels, TorchOps, cpu_kernels, cross_entropy
from mnistlab.engine.stack import MLPStack

CPU = torch.device("cpu")


@pytest.fixture
def fused(monkeypatch):
    """Stacks on the CPU choose the fused kernels, whatever the default."""
    if cpu_kernels.library() is None:
        pytest.skip("the fused CPU kernels cannot be built here (no C++ compiler?)")
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1280 training images (10 full batches of 128), 300 validation, 200 test."""
    return Splits(make_dataset(1280, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


def small(member: Member, **changes) -> Member:
    """The member with 32-unit hidden layers (and any other `changes`): fast tests."""
    return Member(replace(member.config, hidden=(32, 32), **changes), member.seed)


def pair(configs: list[RunConfig], steps: int = 1) -> tuple[MLPStack, MLPStack]:
    """Two identical stacks, the first with the fused kernels, the second with PyTorch ops."""
    a, b = (MLPStack.initial(configs, list(range(len(configs))), 784, 10, CPU, steps)
            for _ in range(2))
    assert isinstance(a.backend, CpuKernels)
    b.backend = TorchOps(b)
    return a, b


def test_adam_gives_torch_ops_bits_row_by_row(fused):
    """Own lr/betas/eps, L2 and decoupled decay, a cosine schedule with warmup, a frozen row
    untouched, LayerNorm's parameters outside a model's span; one-cycle to float32 rounding."""
    configs = [
        RunConfig(name="adam", lr=1e-3, betas=(0.85, 0.995), eps=1e-7, layernorm=True),
        RunConfig(name="l2", lr=5e-4, weight_decay=0.01),
        RunConfig(name="adamw", lr=2e-3, decoupled_decay=0.05, weight_decay=0.02),
        RunConfig(name="cosine", lr=1e-2, lr_schedule="cosine", warmup=0.3, layernorm=True),
        RunConfig(name="frozen", lr=1e-3),
        RunConfig(name="cycle", lr=1e-3, lr_schedule="onecycle", warmup=0.3, decoupled_decay=0.1,
                  layernorm=True),
    ]
    configs = [replace(c, hidden=(64, 48)) for c in configs]
    a, b = pair(configs, steps=8)
    gen = torch.Generator().manual_seed(0)
    frozen = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 0.0])
    before = a.flat["param"].clone()
    for _ in range(8):
        grad = torch.randn(a.flat["grad"].shape, generator=gen)
        for stack in (a, b):
            stack.flat["grad"].copy_(grad)
            stack.adam(frozen)
    for kind in ("param", "exp_avg", "exp_avg_sq"):
        assert torch.equal(a.flat[kind][:5], b.flat[kind][:5]), kind
        torch.testing.assert_close(a.flat[kind][5], b.flat[kind][5], atol=1e-7, rtol=1e-5)
    assert torch.equal(a.flat["param"][4], before[4])
    assert torch.all(a.flat["exp_avg"][4] == 0)
    span = a.adam_span[1]  # no LayerNorm: its identity LayerNorm parameters never move
    assert span < a.flat["param"].shape[1]
    assert torch.equal(a.flat["param"][1, span:], before[1, span:])


def test_loss_matches_cross_entropy_and_keeps_the_books(fused):
    """Label smoothing per model, a diverging model marked once, a frozen one not again."""
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 70, 10, generator=gen) * 3
    logits[2, 5] = float("nan")  # model 2 diverges at this step
    labels = torch.randint(0, 10, (4, 70), generator=gen)
    smoothing = torch.tensor([0.0, 0.1, 0.0, 0.3])
    books = {k: torch.zeros(4) for k in ("loss_sum", "acc_sum", "last_loss", "frozen")}
    books["diverged_at"] = torch.zeros(4, dtype=torch.int64)
    books["loss_sum"] += 1.0
    books["frozen"][1] = 1.0
    grad = cpu_kernels.cross_entropy_step(logits, labels, books, torch.tensor(6.0), smoothing)
    loss, accuracy, expected = cross_entropy(logits, labels, smoothing.view(-1, 1, 1))
    ok = [0, 1, 3]
    assert torch.equal(grad[ok], expected[ok])  # PyTorch's log_softmax and exp, then the same
    torch.testing.assert_close(books["last_loss"][ok], loss[ok])
    torch.testing.assert_close(books["loss_sum"][ok], loss[ok] + 1)
    assert torch.equal(books["acc_sum"], accuracy)
    assert books["last_loss"][2].isnan()
    assert books["diverged_at"].tolist() == [0, 0, 7, 0]
    assert books["frozen"].tolist() == [0.0, 1.0, 1.0, 0.0]
    for k, eps in enumerate(smoothing.tolist()):  # against autograd through torch's own loss
        leaf = logits[k].clone().requires_grad_()
        if k != 2:
            torch.nn.functional.cross_entropy(leaf, labels[k], label_smoothing=eps).backward()
            torch.testing.assert_close(grad[k], leaf.grad, atol=1e-7, rtol=1e-5)
    shared = cpu_kernels.cross_entropy_step(  # one seed's labels, expanded: stride 0
        logits, labels[0].expand(4, -1), {k: torch.zeros_like(v) for k, v in books.items()},
        torch.tensor(0.0))
    expected = cross_entropy(logits, labels[0].expand(4, -1).contiguous())[2]
    assert torch.equal(shared[ok], expected[ok])


@pytest.mark.parametrize("act", ["relu", "gelu"])
@pytest.mark.parametrize("layernorm", [(True, False, True), (True, True, True), (False,) * 3],
                         ids=["mixed-layernorm", "all-layernorm", "no-layernorm"])
def test_layers_match_torch_ops_fed_the_same_masks(fused, monkeypatch, act, layernorm):
    """Forward (activation, dropout, LayerNorm), evaluation, and backward with the bias and
    LayerNorm gradients (exact zeros for models without LayerNorm) against PyTorch ops."""
    configs = [RunConfig(name=f"m{k}", layernorm=layernorm[k], dropout=p, dropout_after=(1, 2),
                         hidden=(40, 30), activation=act) for k, p in enumerate((0.3, 0.0, 0.5))]
    a, b = pair(configs)
    for key in [key for key in a.params if key.startswith("norm")]:
        noise = torch.randn_like(a.params[key]) * 0.1
        a.params[key].add_(noise)
        b.params[key].add_(noise)
    x, y = torch.rand(3, 50, 784), torch.randint(0, 10, (3, 50))
    logits, hidden = a.forward(x, train=True)
    a.backward(cross_entropy(logits, y)[2], hidden)
    masks = iter([layer.mask for layer in hidden[:-1]])
    monkeypatch.setattr(b.backend, "dropout", lambda u, layer: (lambda m: (u * m, m))(next(masks)))
    expected, reference = b.forward(x, train=True)
    torch.testing.assert_close(logits, expected, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(a.forward(x)[0], b.forward(x)[0], atol=2e-6, rtol=1e-5)
    b.backward(cross_entropy(expected, y)[2], reference)
    for key, value in b.grads.items():
        torch.testing.assert_close(a.grads[key], value, atol=2e-6, rtol=1e-4, msg=key)
        if key.startswith("norm"):
            assert all(torch.all(a.grads[key][k] == 0) != layernorm[k] for k in range(3)), key


def test_dropout_stream_is_per_model_step_and_layer(fused):
    """Keep rates, scales and independence as the PyTorch backend's test asks; a mask is a
    function of the model's dropout seed, the step and the layer alone."""
    configs = [replace(PRESETS["lr1e-3-p0.2"], name=n, dropout=p)
               for n, p in (("a", 0.2), ("b", 0.6), ("c", 0.0))]
    stack = MLPStack.initial(configs, [0, 0, 0], 784, 10, CPU)
    ones = torch.ones(3, 4096, 150)
    _, masks = stack.backend.dropout(ones, 0)
    kept = masks > 0
    assert kept[0].float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert kept[1].float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.all(masks[2] == 1.0)
    assert masks[0][kept[0]].unique().tolist() == [pytest.approx(1 / 0.8)]
    both_dropped = (~kept[0] & ~kept[1]).float().mean().item()
    assert both_dropped == pytest.approx(0.2 * 0.6, abs=0.01)
    assert torch.equal(stack.backend.dropout(ones, 0)[1], masks)  # deterministic
    alone = MLPStack.initial(configs[1:2], [0], 784, 10, CPU)
    assert torch.equal(alone.backend.dropout(ones[1:2], 0)[1][0], masks[1])
    layer = stack.backend.dropout(ones, layer=1)[1]
    stack.adam_step += 1
    later = stack.backend.dropout(ones, 0)[1]
    for other in (layer, later):  # other layer, other step: another mask
        assert (other[0] != masks[0]).float().mean().item() == pytest.approx(0.32, abs=0.02)


@pytest.mark.parametrize("members", [MIXED_LAYERNORM[:3], GELU[:3]], ids=["relu", "gelu"])
def test_member_equals_it_trained_alone_at_any_thread_count(splits, fused, members):
    """Bit for bit: dropout after both layers, mixed seeds and LayerNorm on/off; the stack on
    this machine's threads (its layers large enough to be split), each model alone on one."""
    members = [Member(replace(m.config, hidden=(96, 96), dropout_after=(1, 2)), m.seed)
               for m in members]
    schedule = Schedule(epochs=1, record_every=4)
    stacked = train(splits, members, schedule, device="cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = [train(splits, [m], schedule, device="cpu") for m in members]
    finally:
        torch.set_num_threads(threads)
    for k, (member, single) in enumerate(zip(members, alone, strict=True)):
        key = (member.config.name, member.seed)
        assert [r for r in stacked.rows if (r["run"], r["seed"]) == key] == single.rows
        assert stacked.test[k] == single.test[0]
        for name, value in single.weights.items():
            assert torch.equal(stacked.weights[name][k], value[0]), (key, name)


def test_without_layernorm_and_dropout_a_run_has_torch_ops_bits(splits, fused, monkeypatch):
    """Where the kernels' arithmetic is PyTorch's (ReLU, its gate, the loss gradient, Adam;
    only LayerNorm's and the one-cycle update's rounding differ), so are the weights."""
    members = [small(Member(c, 0)) for c in (
        RunConfig(name="l2", lr=1e-3, weight_decay=0.05, betas=(0.85, 0.995), eps=1e-7),
        RunConfig(name="adamw", lr=2e-3, decoupled_decay=0.05, label_smoothing=0.1),
        RunConfig(name="cosine", lr=5e-3, lr_schedule="cosine", warmup=0.2))]
    schedule = Schedule(epochs=2, record_every=5)
    result = train(splits, members, schedule, device="cpu")
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    reference = train(splits, members, schedule, device="cpu")
    for name, value in reference.weights.items():
        assert torch.equal(result.weights[name], value), name
    assert [r for r in result.rows if r["split"] == "val"] == [
        r for r in reference.rows if r["split"] == "val"]
    assert result.test == reference.test


def test_recipe_run_matches_torch_ops(splits, fused, monkeypatch):
    """Schedules, one-cycle, AdamW, label smoothing, augmentation, best weights: member by
    member against the PyTorch backend (without dropout, whose streams differ)."""
    schedule = Schedule(epochs=1, record_every=3)
    members = [small(m, dropout=0.0) for m in RECIPE[:5]]
    result = train(splits, members, schedule, device="cpu")
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    reference = train(splits, members, schedule, device="cpu")
    assert_backends_agree(result, reference)


def test_diverged_member_is_frozen_and_the_others_unaffected(splits, fused):
    big = small(Member(RunConfig(name="big", lr=1e20), 0))
    ok = small(Member(PRESETS["lr1e-3-p0.2"], 0))
    schedule = Schedule(epochs=1, record_every=5)
    result = train(splits, [big, ok], schedule, device="cpu")
    alone = train(splits, [ok], schedule, device="cpu")
    assert result.diverged[0] is not None and result.diverged[1] is None
    assert [r for r in result.rows if r["run"] == ok.config.name] == alone.rows
    assert all(torch.isfinite(v[0]).all() for v in result.weights.values())


def test_resume_mid_epoch_is_bit_identical(splits, fused, tmp_path):
    """Counter-based dropout needs no generator state: a resumed run ends as the whole one."""
    members = [small(m) for m in RECIPE]
    schedule = Schedule(epochs=2, record_every=3, log_every=100)
    whole = train(splits, members, schedule, device="cpu")
    state = tmp_path / "state.safetensors"

    def interrupt(event):
        if event.step == 15:  # mid-epoch 2
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(splits, members, schedule, device="cpu", state_path=state, on_record=interrupt)
    assert_same(train(splits, members, schedule, device="cpu", state_path=state, resume=True),
                whole)


def test_on_by_default_and_switched_off_by_the_environment(fused, monkeypatch):
    """The fused step is the default CPU arithmetic; MNISTLAB_CPU_FUSED=0 asks for PyTorch's
    operators (other dropout masks, so other numbers: the run records which)."""
    monkeypatch.delenv("MNISTLAB_CPU_FUSED")
    assert backends.cpu_kernels_for(requested(CPU)) is cpu_kernels
    assert type(MLPStack.initial([RunConfig()], [0], 784, 10, CPU).backend) is CpuKernels
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    assert backends.cpu_kernels_for(requested(CPU)) is None
    assert type(MLPStack.initial([RunConfig()], [0], 784, 10, CPU).backend) is TorchOps
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "1")
    assert backends.cpu_kernels_for(requested(CPU)) is cpu_kernels
    assert backends.cpu_kernels_for(requested(torch.device("meta"))) is None  # CPU stacks only


def test_without_a_compiler_one_line_says_so_and_torch_ops_train(splits, fused, monkeypatch,
                                                                 capfd):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(cpu_kernels.shutil, "which", lambda name: None)
    cpu_kernels.library.cache_clear()
    try:
        first = train(splits, [small(Member(PRESETS["baseline"], 0))], Schedule(epochs=1),
                      device="cpu")
        assert type(MLPStack.initial([RunConfig()], [0], 784, 10, CPU).backend) is TorchOps
        err = capfd.readouterr().err
    finally:
        cpu_kernels.library.cache_clear()
    assert err.count("\n") == 1 and "no C++ compiler found" in err, err
    assert "MNISTLAB_CPU_FUSED=0" in err
    monkeypatch.setenv("MNISTLAB_CPU_FUSED", "0")
    assert first.rows == train(splits, [small(Member(PRESETS["baseline"], 0))],
                               Schedule(epochs=1), device="cpu").rows


def test_a_failed_build_is_one_line_and_a_build_is_cached(monkeypatch, tmp_path, capfd):
    """The compiler's first error line; a built library is reused, keyed by its source."""
    monkeypatch.setattr(cpu_kernels, "cache_dir", lambda: tmp_path)
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(cpu_kernels, "SOURCE", broken)
    with pytest.raises(cpu_kernels.BuildError, match="error"):
        cpu_kernels._build()
    assert list(tmp_path.glob("*.so*")) == []  # no half-written library left behind
    monkeypatch.undo()
    if cpu_kernels.library() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setattr(cpu_kernels, "cache_dir", lambda: tmp_path)
    path = cpu_kernels._build()
    assert path.parent == tmp_path and path.is_file()
    stamp = path.stat().st_mtime_ns
    assert cpu_kernels._build() == path and path.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# --- augmentation --------------------------------------------------------------------------


def _augmenters(streams, shape, fill, steps, batch):
    """The same Augmenter twice: with the fused CPU step's sampling, and as PyTorch operators."""
    fused_one = augment.Augmenter(streams, shape, fill, steps, batch, CPU, requested(CPU))
    operators = augment.Augmenter(streams, shape, fill, steps, batch, CPU)
    assert fused_one.kernels is not None and operators.kernels is None
    return fused_one, operators


@pytest.mark.parametrize("threads", [1, 2])
def test_fused_augmentation_gives_the_operators_bits_on_real_images(fused, fashion_dir, threads):
    """A whole epoch's draws of two streams (shifts, turns, zooms at once) on Fashion-MNIST's
    training images, normalised as training normalises them: every pixel the same bits."""
    images = read_array(fashion_dir / "train-images-idx3-ubyte.gz", 3)[:2 * 128]
    x = torch.from_numpy((images.reshape(2, 128, -1) / 255.0 - 0.2860) / 0.3530).float()
    streams = [(0, (3, 20.0, 0.15)), (7, (2, 0.0, 0.0))]
    fused_one, operators = _augmenters(streams, (28, 28), (0 - 0.2860) / 0.3530, 30, 128)
    maps = fused_one.epoch(0)
    with _threads(threads):
        for step in range(maps.shape[1]):
            mine, theirs = fused_one.apply(x, maps[:, step]), operators.apply(x, maps[:, step])
            assert torch.equal(mine, theirs), f"step {step}"
    assert not torch.equal(mine, x)


@pytest.mark.parametrize("shape, batch", [((20, 24), 7), ((28, 28), 1)])
def test_fused_augmentation_matches_on_other_shapes_and_batches(fused, shape, batch):
    x = torch.randn(1, batch, shape[0] * shape[1])
    fused_one, operators = _augmenters([(3, (4, 45.0, 0.5))], shape, -1.0, 8, batch)
    maps = fused_one.epoch(2)
    for step in range(8):
        assert torch.equal(fused_one.apply(x, maps[:, step]), operators.apply(x, maps[:, step]))


def test_an_augmented_recipe_run_has_the_same_bits_with_either_sampling(splits, fused,
                                                                      monkeypatch):
    members = [small(Member(replace(PRESETS["lr1e-3-p0.2"], translate=2, rotate=10.0,
                                    zoom=0.1), 0))]
    schedule = Schedule(epochs=1, batch_size=128, record_every=5, log_every=100)
    fused_calls = []
    kernel = cpu_kernels.affine_images
    monkeypatch.setattr(cpu_kernels, "affine_images",
                        lambda *a: fused_calls.append(1) or kernel(*a))
    fused_run = train(splits, members, schedule, device="cpu")
    assert len(fused_calls) == 10  # one call a step: 1280 images in batches of 128
    operator_calls = []
    monkeypatch.setattr(cpu_kernels, "affine_images",
                        lambda *a: operator_calls.append(1) or _operators_instead(*a))
    assert_same(fused_run, train(splits, members, schedule, device="cpu"))
    assert len(operator_calls) == 10


def _operators_instead(x, xs, ys, shape, fill):
    """cpu_kernels.affine_images done as the PyTorch operators do it."""
    sampler = augment.Augmenter([], shape, fill, 1, 1, CPU)
    return sampler._sample(x, xs[0].unsqueeze(2) + xs[1][..., None],
                           ys[0].unsqueeze(2) + ys[1][..., None])


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
