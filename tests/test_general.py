"""The general engine: any nn.Module trained as a stack with torch.func (engine.general)."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch
from agreement import assert_same
from torch import nn

from mnistlab import engine, modules
from mnistlab.config import PRESETS, RunConfig, Schedule, study_from_dict, to_dict
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, input_spec
from mnistlab.engine.seeds import derived_seed
from mnistlab.errors import ConfigError, MnistlabError
from mnistlab.modules import checkpoint_bytes, load_checkpoint, save_checkpoint


def small_cnn() -> nn.Module:
    """A convolution, max-pooling and a dense layer: small enough for many steps in a test."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10))


def noisy_cnn() -> nn.Module:
    """With BatchNorm (buffers updated in the forward pass) and both kinds of dropout."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Dropout2d(0.25), nn.Flatten(), nn.Dropout(0.3), nn.Linear(256, 10))


class SecretDropout(nn.Module):
    """Random numbers outside nn.Dropout: vmap would draw them for all models from one stream."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(784, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(nn.functional.dropout(x.flatten(1), 0.5, self.training))


SMALL = modules.factory_path(small_cnn)
NOISY = modules.factory_path(noisy_cnn)


@pytest.fixture
def splits(make_dataset) -> Splits:
    return Splits(make_dataset(300, seed=1), make_dataset(60, seed=2), make_dataset(40, seed=3))


def _member(name: str, seed: int, model: str = SMALL, **fields) -> Member:
    return Member(RunConfig(name=name, model=model, **fields), seed)


def test_stack_matches_separate_modules_with_torch_adam_step_for_step(splits):
    """Each model of the stack against its own nn.Module, torch.optim.Adam/AdamW and torch's
    schedulers, on the same batches: every step's loss and the final weights to ~1e-5."""
    members = [
        _member("a", 0, lr=1e-3),
        _member("b", 1, lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=1e-3,
                lr_schedule="cosine", label_smoothing=0.1),
        _member("c", 0, lr=2e-3, decoupled_decay=0.05, lr_schedule="onecycle", warmup=0.3),
    ]
    schedule = Schedule(batch_size=64, epochs=2, record_every=1, log_every=100)
    result = engine.train(splits, members, schedule, device="cpu")
    spec = input_spec(splits.train, "scale")
    x, y = spec.prepare(splits.train.images).view(-1, 1, 28, 28), torch.as_tensor(
        splits.train.labels)
    steps = 2 * math.ceil(len(x) / 64)
    for k, m in enumerate(members):
        c = m.config
        torch.manual_seed(m.seed)
        model = small_cnn()
        kind = torch.optim.AdamW if c.decoupled_decay else torch.optim.Adam
        opt = kind(model.parameters(), lr=c.lr, betas=c.betas, eps=c.eps,
                   weight_decay=c.decoupled_decay or c.weight_decay)
        scheduler = None  # a scheduler sets its optimiser's rates when it is built
        if c.lr_schedule == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        elif c.lr_schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, c.lr, total_steps=steps,
                                                            pct_start=c.warmup)
        order = torch.Generator().manual_seed(derived_seed("order", m.seed))
        losses = []
        for _ in range(2):
            perm = torch.randperm(len(x), generator=order)
            for i in range(0, len(x), 64):
                xb, yb = x[perm[i : i + 64]], y[perm[i : i + 64]]
                logits = model(xb)
                loss = nn.functional.cross_entropy(logits, yb, label_smoothing=c.label_smoothing)
                losses.append(nn.functional.cross_entropy(logits, yb).item())
                opt.zero_grad()
                loss.backward()
                opt.step()
                if scheduler is not None:
                    scheduler.step()
        mine = [r["loss"] for r in result.rows if r["run"] == c.name and r["split"] == "train"]
        torch.testing.assert_close(torch.tensor(mine), torch.tensor(losses), atol=1e-5, rtol=0)
        for name, value in model.state_dict().items():
            torch.testing.assert_close(result.weights[name][k], value, atol=1e-5, rtol=1e-4,
                                       msg=f"{c.name} {name}")


def test_a_model_does_not_depend_on_its_stack_neighbours(splits):
    """Dropout masks from each model's own generator, BatchNorm buffers of its own: a model
    gives the same bits whatever else is in its stack (of two or more)."""
    me = _member("me", 0, NOISY, lr=2e-3, translate=1)
    schedule = Schedule(batch_size=50, epochs=2, record_every=3, log_every=100)
    small = engine.train(splits, [me, _member("x", 1, NOISY)], schedule, device="cpu")
    large = engine.train(splits, [_member("y", 2, NOISY, lr=1e-2, label_smoothing=0.2),
                                   _member("z", 0, NOISY, rotate=5.0), me], schedule,
                          device="cpu")
    assert [r for r in small.rows if r["run"] == "me"] == [r for r in large.rows
                                                          if r["run"] == "me"]
    assert small.test[0] == large.test[2]
    for name, value in small.weights.items():
        assert torch.equal(value[0], large.weights[name][2]), name
    alone = engine.train(splits, [me], schedule, device="cpu")  # beside its twin
    assert alone.rows == [r for r in small.rows if r["run"] == "me"]
    for name, value in alone.weights.items():
        assert torch.equal(value[0], small.weights[name][0]), name


def test_a_diverging_member_is_frozen_and_the_others_unaffected(splits):
    schedule = Schedule(batch_size=50, epochs=2, record_every=2, log_every=100)
    ok = _member("ok", 0, lr=1e-3)
    bad = _member("bad", 1, lr=1e30)
    mixed = engine.train(splits, [ok, bad], schedule, device="cpu")
    healthy = engine.train(splits, [ok, _member("other", 1, lr=1e-3)], schedule, device="cpu")
    step = mixed.diverged[1]
    assert mixed.diverged[0] is None and step is not None and 1 <= step <= 12
    assert all(math.isnan(r["loss"]) for r in mixed.rows
               if r["run"] == "bad" and r["step"] >= step)
    assert math.isnan(mixed.test[1]["accuracy"]) and mixed.test[0] == healthy.test[0]
    assert [r for r in mixed.rows if r["run"] == "ok"] == [r for r in healthy.rows
                                                          if r["run"] == "ok"]
    early = engine.train(splits, [ok, bad], Schedule(batch_size=50, epochs=1, record_every=2,
                                                      log_every=100), device="cpu")
    for name, value in mixed.weights.items():  # frozen since it diverged in the first epoch
        assert torch.equal(value[1], early.weights[name][1]), name


def test_ctrl_c_mid_epoch_saves_and_resume_matches(splits, tmp_path):
    members = [_member("a", 0, NOISY, lr=2e-3, restore_best=True, translate=1),
               _member("b", 1, NOISY, lr=1e-3, lr_schedule="onecycle", patience=2)]
    schedule = Schedule(batch_size=64, epochs=3, record_every=2, log_every=100)
    state = tmp_path / "state.safetensors"
    whole = engine.train(splits, members, schedule, device="cpu")

    def interrupt(event):
        if event.step == 6:  # mid-epoch 2 (5 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(KeyboardInterrupt):
        engine.train(splits, members, schedule, device="cpu", state_path=state,
                      on_record=interrupt)
    resumed = engine.train(splits, members, schedule, device="cpu", state_path=state,
                            resume=True)
    assert_same(resumed, whole)
    assert resumed.restored == whole.restored and resumed.stopped == whole.stopped
    other = [_member("a", 0, NOISY, lr=5e-3), members[1]]
    with pytest.raises(MnistlabError, match="written for other members"):
        engine.train(splits, other, schedule, device="cpu", state_path=state, resume=True)


def test_checkpoint_round_trip_rebuilds_the_factory_module(splits, tmp_path):
    result = engine.train(splits, [_member("n", 3, NOISY)], Schedule(batch_size=64, epochs=1),
                           device="cpu")
    path = tmp_path / "n.safetensors"
    save_checkpoint(path, result.checkpoint(0))
    loaded = load_checkpoint(path)
    assert loaded.config.model == NOISY and loaded.seed == 3
    pixels = loaded.inputs.prepare(splits.test.images[:5])
    with torch.no_grad():
        assert torch.equal(loaded.model(pixels), result.checkpoint(0).model.eval()(pixels))
    again = tmp_path / "again.safetensors"
    again.write_bytes(checkpoint_bytes(loaded))
    for name, value in load_checkpoint(again).model.state_dict().items():
        assert torch.equal(value, loaded.model.state_dict()[name]), name


def test_factories_must_be_found_again(tmp_path):
    with pytest.raises(ConfigError, match="top level of an importable module"):
        modules.Model("mine", lambda: small_cnn())
    with pytest.raises(ConfigError, match="must be mlp or lenet5 or a factory's import path"):
        modules.Model("mine", "not a path")
    assert modules.Model("mine", small_cnn, lr=1e-3).model == SMALL
    spec = input_spec(_blank(), "scale")
    with pytest.raises(ConfigError, match=r"cannot import it .*ModuleNotFoundError"):
        modules.build("no_such_package.nets:cnn", spec)
    with pytest.raises(ConfigError, match=r"must return logits of shape \(batch, 10\)"):
        modules.probe(nn.Flatten(), "x:y", spec)


def _blank():
    from conftest import synthetic

    return synthetic(4)


def test_lenet5_preset_and_its_config():
    config = PRESETS["lenet5"]
    assert config.model == "lenet5" and config.architecture != PRESETS["baseline"].architecture
    assert "model" not in to_dict(PRESETS["baseline"])  # the MLP's files are as before
    assert to_dict(config)["model"] == "lenet5"
    with pytest.raises(ConfigError, match="hidden shape the MLP only"):
        RunConfig(model="lenet5", hidden=(10,))
    study = study_from_dict({"runs": ["lenet5", {"name": "mine", "model": SMALL}, "baseline"]})
    assert [r.model for r in study.runs] == ["lenet5", SMALL, "mlp"]
    net = modules.lenet5()
    assert sum(p.numel() for p in net.parameters()) == 61706  # LeNet-5's classic count
    with pytest.raises(ConfigError, match="too small"):
        modules.lenet5((8, 8))


def test_random_numbers_outside_dropout_layers_are_refused(splits):
    member = _member("secret", 0, modules.factory_path(SecretDropout))
    with pytest.raises(MnistlabError, match=r"outside nn\.Dropout layers"):
        engine.train(splits, [member], Schedule(batch_size=64, epochs=1), device="cpu")
