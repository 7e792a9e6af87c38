"""The engine against plain PyTorch: same math, same numbers in any stack, faults contained."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from reference_loop import reference_run
from torch import nn

from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, input_spec, resolve_device, train
from mnistlab.engine.backends import cross_entropy
from mnistlab.engine.stack import MLPStack
from mnistlab.errors import MnistlabError
from mnistlab.model import build_mlp

LN = PRESETS["lr1e-3-p0.2"]


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1280 training images (10 full batches of 128), 300 validation, 200 test."""
    return Splits(make_dataset(1280, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


@pytest.fixture(scope="module")
def fashion_splits(fashion_dir) -> Splits:
    """1280 real training images (10 full batches of 128), 300 validation, 200 test.

    Real images, because on random pixels a LayerNorm model has nothing to learn and its path is
    chaotic: a last-bit difference (the order of a sum) grows past any tolerance in 30 steps.
    """
    from mnistlab.data import load

    source = load(str(fashion_dir), progress=False)
    train = source.train
    return Splits(train.subset(np.arange(1280)), train.subset(np.arange(1280, 1580)),
                  source.test.subset(np.arange(200)))


@pytest.mark.parametrize(
    "configs",
    [
        [RunConfig(lr=1e-3)],
        [replace(LN, dropout=0.0)],
        [RunConfig(lr=1e-3, weight_decay=0.05, betas=(0.85, 0.995), eps=1e-7)],
        [RunConfig(name="a", lr=1e-3), RunConfig(name="b", lr=5e-4)],  # one seed: same batches
        [RunConfig(name="a", lr=1e-3), replace(LN, name="b", dropout=0.0)],
    ],
    ids=["plain", "layernorm", "weight-decay", "two-lrs", "mixed-layernorm"],
)
def test_matches_sequential_and_torch_adam_for_100_steps(fashion_splits, configs):
    splits, schedule = fashion_splits, Schedule(epochs=10, record_every=25)
    result = train(splits, [Member(c, 0) for c in configs], schedule, device="cpu")
    for k, config in enumerate(configs):
        model, losses = reference_run(splits, config, seed=0, steps=100)
        ours = result.checkpoint(k).model.state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ours[key], value, atol=1e-5, rtol=1e-4, msg=key)
        train_rows = [r for r in result.rows if r["run"] == config.name and r["split"] == "train"]
        expected = [np.mean(losses[i : i + 25]) for i in range(0, 100, 25)]
        assert [r["step"] for r in train_rows] == [25, 50, 75, 100]
        np.testing.assert_allclose([r["loss"] for r in train_rows], expected, rtol=1e-4)


ALL_LAYERNORM = [
    Member(LN, 0), Member(PRESETS["lr5e-4-p0.4"], 1), Member(PRESETS["lr1e-4-p0.6"], 0),
    Member(replace(LN, name="wd", weight_decay=0.1), 1), Member(replace(LN, dropout=0.0), 2),
]
MIXED_LAYERNORM = [  # the seed study's baseline beside LayerNorm + dropout members
    Member(PRESETS["baseline"], 0), Member(PRESETS["layernorm-dropout"], 1), Member(LN, 0),
    Member(replace(PRESETS["baseline"], name="drop-wd", dropout=0.3, weight_decay=0.1), 1),
    Member(replace(LN, name="wd", weight_decay=0.1), 1),
]
# GELU rounds differently on non-contiguous input: this stack would catch a strided fast path.
GELU = [
    Member(replace(m.config, name=f"gelu-{m.config.name}", activation="gelu"), m.seed)
    for m in MIXED_LAYERNORM
]


@pytest.mark.parametrize("members", [ALL_LAYERNORM, MIXED_LAYERNORM, GELU],
                         ids=["all-layernorm", "mixed-layernorm", "gelu"])
def test_member_of_a_stack_equals_it_trained_alone(splits, members):
    """Bit for bit, with dropout, mixed seeds and LayerNorm on/off per member, on the CPU."""
    schedule = Schedule(epochs=2, record_every=4)
    stacked = train(splits, members, schedule, device="cpu")
    assert train(splits, members, schedule, device="cpu").rows == stacked.rows
    for k, member in enumerate(members):
        alone = train(splits, [member], schedule, device="cpu")
        key = (member.config.name, member.seed)
        mine = [r for r in stacked.rows if (r["run"], r["seed"]) == key]
        assert mine == alone.rows
        assert stacked.test[k] == alone.test[0]
        exported = stacked.checkpoint(k).model.state_dict()
        expected = alone.checkpoint(0).model.state_dict()
        assert list(exported) == list(expected)
        for key, value in expected.items():
            assert torch.equal(exported[key], value), key
        if not member.config.layernorm:  # its unused LayerNorm parameters never moved
            assert torch.all(stacked.weights["norm1.weight"][k] == 1)
            assert torch.all(stacked.weights["norm1.bias"][k] == 0)


def test_a_left_over_model_s_products_keep_the_bits_it_has_alone(monkeypatch):
    """Five models on two threads: the fifth's large products run apart from the batch of
    four (stack.product); every model's products are still the ones it computes alone."""
    from mnistlab.engine import stack

    apart = []
    alone = stack._alone
    monkeypatch.setattr(stack, "_alone", lambda *args: apart.append(1) or alone(*args))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        x, w, bias = torch.randn(128, 784), torch.randn(5, 784, 150), torch.randn(5, 1, 150)
        d = torch.randn(5, 128, 150)
        forward = stack.product(x.expand(5, -1, -1), w, bias)
        gradient = stack.product(x.expand(5, -1, -1).transpose(1, 2), d, out=torch.empty_like(w))
        assert len(apart) == 2
        for k in range(5):
            one = slice(k, k + 1)
            assert torch.equal(forward[one], stack.product(x[None], w[one], bias[one]))
            assert torch.equal(gradient[one], stack.product(x[None].transpose(1, 2), d[one]))
    finally:
        torch.set_num_threads(threads)


def test_initial_weights_are_build_mlp_under_manual_seed():
    configs = [LN, RunConfig(name="x")]  # with and without LayerNorm
    stack = MLPStack.initial(configs, [7, 7], 784, 10, torch.device("cpu"))
    x = torch.rand(5, 784)
    logits, _ = stack.forward(x.expand(2, -1, -1))
    for k, config in enumerate(configs):
        torch.manual_seed(7)
        plain = build_mlp(config).eval()
        torch.testing.assert_close(logits[k], plain(x), atol=1e-6, rtol=1e-5)
    assert all(torch.equal(v[0], v[1]) for v in stack.params.values())  # same seed, same init


def test_dropout_masks_are_per_model_and_independent():
    configs = [replace(LN, name="a", dropout=0.2), replace(LN, name="b", dropout=0.6),
               replace(LN, name="c", dropout=0.0)]
    stack = MLPStack.initial(configs, [0, 0, 0], 784, 10, torch.device("cpu"))
    _, masks = stack.backend.dropout(torch.ones(3, 4096, 150), 0)
    kept = masks > 0
    assert kept[0].float().mean().item() == pytest.approx(0.8, abs=0.01)
    assert kept[1].float().mean().item() == pytest.approx(0.4, abs=0.01)
    assert torch.all(masks[2] == 1.0)
    assert masks[0][kept[0]].unique().tolist() == [pytest.approx(1 / 0.8)]
    both_dropped = (~kept[0] & ~kept[1]).float().mean().item()
    assert both_dropped == pytest.approx(0.2 * 0.6, abs=0.01)  # independent, not nested


@pytest.mark.parametrize("act, layernorm", [("relu", (True, True)), ("gelu", (False, True)),
                                            ("tanh", (False, False))],
                         ids=["relu-all-layernorm", "gelu-mixed-layernorm", "tanh-no-layernorm"])
def test_hand_written_backward_equals_autograd(act, layernorm):
    """Every activation, LayerNorm in all/some/no models, dropout: gradients against autograd."""
    configs = [RunConfig(name=f"m{k}", activation=act, layernorm=layernorm[k], dropout=p,
                         dropout_after=(1, 2)) for k, p in enumerate((0.3, 0.0))]
    stack = MLPStack.initial(configs, [0, 1], 784, 10, torch.device("cpu"))
    x, y = torch.rand(2, 64, 784), torch.randint(0, 10, (2, 64))
    logits, hidden = stack.forward(x, train=True)
    loss, _, dlogits = cross_entropy(logits, y)
    stack.backward(dlogits, hidden)
    params = {k: v.clone().requires_grad_() for k, v in stack.params.items()}
    ref = []
    for k, config in enumerate(configs):  # each model on its own, as nn.functional computes it
        h = x[k]
        for i, layer in enumerate(hidden[:-1]):
            h = h @ params[f"linear{i}.weight"][k] + params[f"linear{i}.bias"][k]
            h = {"relu": torch.relu, "gelu": nn.functional.gelu, "tanh": torch.tanh}[act](h)
            h = h * layer.mask[k] if layer.mask is not None else h
            if config.layernorm:
                h = nn.functional.layer_norm(h, [150], params[f"norm{i}.weight"][k, 0],
                                             params[f"norm{i}.bias"][k, 0])
        out = h @ params["linear2.weight"][k] + params["linear2.bias"][k]
        ref.append(nn.functional.cross_entropy(out, y[k]))
    torch.stack(ref).sum().backward()
    torch.testing.assert_close(loss, torch.stack(ref).detach())
    for key, p in params.items():
        torch.testing.assert_close(stack.grads[key], p.grad, atol=1e-6, rtol=1e-4, msg=key)
    for k, config in enumerate(configs):  # a model without LayerNorm: exactly zero norm grads
        for key in [key for key in stack.grads if key.startswith("norm")]:
            assert torch.any(stack.grads[key][k] != 0) == config.layernorm, (k, key)


def test_diverged_member_is_frozen_and_others_unaffected(splits):
    big = Member(RunConfig(name="big", lr=1e20), 0)
    ok = Member(RunConfig(lr=1e-3), 0)
    results = {e: train(splits, [big, ok], Schedule(epochs=e, record_every=5), device="cpu")
               for e in (1, 3)}
    alone = train(splits, [ok], Schedule(epochs=3, record_every=5), device="cpu")
    result = results[3]
    assert result.diverged[1] is None and result.diverged[0] == results[1].diverged[0]
    step = result.diverged[0]
    assert 1 <= step <= 10
    big_rows = [r for r in result.rows if r["run"] == "big"]
    assert all(math.isnan(r["loss"]) for r in big_rows if r["step"] >= step)
    assert math.isnan(result.test[0]["accuracy"])
    assert [r for r in result.rows if r["run"] == "baseline"] == alone.rows
    assert result.test[1] == alone.test[0]
    for key, value in results[1].weights.items():  # no change between epoch 1 and epoch 3
        assert torch.equal(result.weights[key][0], value[0]), key
        assert torch.isfinite(value[0]).all()


def test_checkpoint_model_equals_stacked_forward(splits):
    members = [Member(LN, 0), Member(PRESETS["baseline"], 3)]
    result = train(splits, members, Schedule(epochs=1), device="cpu")
    stack = MLPStack([m.config for m in members], [0, 3], result.weights, torch.device("cpu"))
    x = result.inputs.prepare(splits.test.images)
    logits, _ = stack.forward(x.expand(2, -1, -1))
    for k in range(2):
        ckpt = result.checkpoint(k)
        assert (ckpt.config, ckpt.seed) == (members[k].config, members[k].seed)
        torch.testing.assert_close(ckpt.model(x), logits[k], atol=1e-5, rtol=1e-5)
        acc = (ckpt.model(x).argmax(1).numpy() == splits.test.labels).mean()
        assert result.test[k]["accuracy"] == pytest.approx(acc)


def test_schedule_partial_batches_records_and_log_lines(make_dataset):
    splits = Splits(make_dataset(300), make_dataset(50, seed=4), make_dataset(20, seed=5))
    lines, events = [], []
    schedule = Schedule(batch_size=128, epochs=2, record_every=4, log_every=2)
    result = train(splits, [Member(LN, 5)], schedule, device="cpu", on_log=lines.append,
                   on_record=events.append)
    # 300 = 128 + 128 + 44: three steps per epoch, six in all; records at 4 and at the end
    assert [e.step for e in events] == [4, 6] and events[-1].total_steps == 6
    assert [(r["step"], r["split"]) for r in result.rows] == [(4, "train"), (4, "val"),
                                                               (6, "train"), (6, "val")]
    assert result.rows[0]["epoch"] == pytest.approx(4 / 3)
    assert lines[0].startswith("lr1e-3-p0.2 seed5 | epoch 1/2 | step 2/3 | loss ")
    assert len(lines) == 2 and float(lines[0].rsplit(" ", 1)[1]) > 0


def test_standardize_records_training_mean_and_std(make_dataset):
    train_set = make_dataset(200, seed=9)
    spec = input_spec(train_set, "standardize")
    pixels = train_set.images.astype(np.float64) / 255
    assert spec.mean == pytest.approx(pixels.mean()) and spec.std == pytest.approx(pixels.std())
    assert input_spec(train_set, "scale").mean == 0.0
    x = spec.prepare(train_set.images)
    assert x.mean().item() == pytest.approx(0.0, abs=1e-5)


def test_mixed_architectures_and_duplicates_are_refused(splits):
    with pytest.raises(MnistlabError, match="differ in architecture"):
        train(splits, [Member(LN, 0), Member(RunConfig(hidden=(64,), dropout_after=()), 0)],
              Schedule(), device="cpu")
    with pytest.raises(MnistlabError, match="once in a stack"):
        train(splits, [Member(LN, 0), Member(LN, 0)], Schedule(), device="cpu")


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(MnistlabError, match="unknown device 'tpu7'"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(MnistlabError, match="not available"):
            resolve_device("cuda")
