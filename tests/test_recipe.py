"""The training recipe (schedules, AdamW, label smoothing, augmentation, best weights, early
stopping): PyTorch's own classes as references, the same bits in any stack, resumable."""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace

import numpy as np
import pytest
import torch
from agreement import assert_same
from reference_loop import reference_run, torch_schedule
from test_engine import LN, fashion_splits  # noqa: F401
from torch import nn

from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Interrupted, Member, augment, schedules, train
from mnistlab.errors import MnistlabError
from mnistlab.experiment.sweep import expand, sweep_from_dict


@pytest.mark.parametrize("config", [
    RunConfig(lr_schedule="onecycle", warmup=0.3, lr=3e-3),
    RunConfig(lr_schedule="onecycle", warmup=0.25, lr=1e-2),
    RunConfig(lr_schedule="cosine", lr=1e-3),
    RunConfig(lr_schedule="cosine", warmup=0.1, lr=2e-3),
    RunConfig(lr_schedule="constant", warmup=0.05, lr=1e-3),
], ids=["onecycle", "onecycle-short-rise", "cosine", "cosine-warmup", "constant-warmup"])
def test_rates_are_torch_schedulers_values(config):
    steps = 375
    model = nn.Linear(2, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas)
    scheduler = torch_schedule(config, optimizer, steps)
    expected = []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        expected.append((group["lr"], group["betas"][0]))
        optimizer.step()
        scheduler.step()
    np.testing.assert_allclose(schedules.rates(config, steps), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("configs", [
    [RunConfig(lr=3e-3, lr_schedule="onecycle", warmup=0.3)],
    [replace(LN, dropout=0.0, lr=2e-3, lr_schedule="cosine", warmup=0.1)],
    [RunConfig(lr=1e-3, decoupled_decay=0.05)],
    [RunConfig(lr=1e-3, label_smoothing=0.1)],
    [RunConfig(name="a", lr=3e-3, lr_schedule="onecycle", warmup=0.25, decoupled_decay=0.01,
               label_smoothing=0.1),
     RunConfig(name="b", lr=1e-3)],
], ids=["onecycle", "cosine-warmup-layernorm", "adamw", "label-smoothing", "all-beside-plain"])
def test_matches_torch_optimizers_schedulers_and_loss_for_100_steps(fashion_splits, configs):  # noqa: F811
    splits, schedule = fashion_splits, Schedule(epochs=10, record_every=25)
    result = train(splits, [Member(c, 0) for c in configs], schedule, device="cpu")
    for k, config in enumerate(configs):
        model, losses = reference_run(splits, config, seed=0, steps=100)
        ours = result.checkpoint(k).model.state_dict()
        for key, value in model.state_dict().items():
            torch.testing.assert_close(ours[key], value, atol=2e-5, rtol=1e-4, msg=key)
        rows = [r for r in result.rows if r["run"] == config.name and r["split"] == "train"]
        expected = [np.mean(losses[i : i + 25]) for i in range(0, 100, 25)]
        np.testing.assert_allclose([r["loss"] for r in rows], expected, rtol=1e-4)


@pytest.fixture
def splits(make_dataset) -> Splits:
    """1280 training images (10 full batches of 128), 300 validation, 200 test."""
    return Splits(make_dataset(1280, seed=1), make_dataset(300, seed=2), make_dataset(200, seed=3))


AUGMENTED = replace(PRESETS["baseline"], name="aug", translate=2, rotate=10.0, zoom=0.1)
RECIPE = [
    Member(AUGMENTED, 0),
    Member(replace(LN, name="cycle", lr_schedule="onecycle", warmup=0.3, label_smoothing=0.1), 1),
    Member(replace(AUGMENTED, name="aug-cos", lr_schedule="cosine", warmup=0.1), 0),
    Member(replace(AUGMENTED, name="shift", rotate=0.0, zoom=0.0), 1),
    Member(replace(LN, name="adamw", decoupled_decay=0.05, restore_best=True, patience=2), 0),
    Member(PRESETS["baseline"], 1),
]


def test_member_of_a_recipe_stack_equals_it_trained_alone(splits):
    """Bit for bit: schedules, smoothing, augmentation streams and stopping never depend on
    what else is in the stack (an augmentation stream is a function of seed and settings)."""
    schedule = Schedule(epochs=3, record_every=4)
    stacked = train(splits, RECIPE, schedule, device="cpu")
    assert_same(train(splits, RECIPE, schedule, device="cpu"), stacked)  # deterministic
    for k, member in enumerate(RECIPE):
        alone = train(splits, [member], schedule, device="cpu")
        key = (member.config.name, member.seed)
        assert [r for r in stacked.rows if (r["run"], r["seed"]) == key] == alone.rows, key
        assert stacked.test[k] == alone.test[0]
        assert (stacked.stopped[k], stacked.restored[k]) == (alone.stopped[0], alone.restored[0])
        for name, value in alone.weights.items():
            assert torch.equal(stacked.weights[name][k], value[0]), (key, name)


def test_augmentation_changes_training_and_plain_members_do_not_see_it(splits):
    schedule = Schedule(epochs=1, record_every=5)
    plain = train(splits, [Member(PRESETS["baseline"], 0)], schedule, device="cpu")
    augmented = train(splits, [Member(replace(PRESETS["baseline"], translate=2), 0)], schedule,
                      device="cpu")
    assert plain.rows != augmented.rows
    both = train(splits, [Member(PRESETS["baseline"], 0), Member(AUGMENTED, 0)], schedule,
                 device="cpu")
    assert [r for r in both.rows if r["run"] == "baseline"] == plain.rows


def test_resume_mid_schedule_is_bit_identical(splits, tmp_path):
    """Interrupted mid-epoch, mid-warmup of a one-cycle schedule, with augmentation, best
    weights and patience: the resumed run ends as the uninterrupted one."""
    schedule = Schedule(epochs=4, record_every=3, log_every=100)
    whole = train(splits, RECIPE, schedule, device="cpu")
    state = tmp_path / "state.safetensors"

    def interrupt(event):
        if event.step == 15:  # mid-epoch 2 (10 steps per epoch)
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        train(splits, RECIPE, schedule, device="cpu", state_path=state, on_record=interrupt)
    resumed = train(splits, RECIPE, schedule, device="cpu", state_path=state, resume=True)
    assert_same(resumed, whole)
    assert (resumed.stopped, resumed.restored) == (whole.stopped, whole.restored)


def test_early_stopping_freezes_only_its_model(splits):
    """A model that stops at an epoch's end ends exactly as if trained for those epochs; the
    others in its stack are untouched by it."""
    schedule = Schedule(epochs=8, record_every=10)  # a record per epoch
    eager = replace(PRESETS["baseline"], name="eager", lr=1e-2, patience=1)
    other = Member(PRESETS["lr1e-3-p0.2"], 1)
    result = train(splits, [Member(eager, 0), other], schedule, device="cpu")
    stopped = result.stopped[0]
    assert stopped is not None and stopped % 10 == 0 and stopped < 80  # random pixels: no gain
    assert result.stopped[1] is None
    short = train(splits, [Member(eager, 0)], Schedule(epochs=stopped // 10, record_every=10),
                  device="cpu")
    for name, value in short.weights.items():
        assert torch.equal(result.weights[name][0], value[0]), name
    assert result.test[0] == short.test[0]
    eager_rows = [r for r in result.rows if r["run"] == "eager"]
    assert [r["step"] for r in eager_rows if r["split"] == "val"] == list(range(10, 81, 10))
    after = [r for r in eager_rows if r["step"] > stopped and r["split"] == "val"]
    assert len({r["accuracy"] for r in after}) == 1  # frozen: the same weights, the same score
    alone = train(splits, [other], schedule, device="cpu")
    assert [r for r in result.rows if r["run"] == other.config.name] == alone.rows


def test_restore_best_ends_with_its_best_records_weights(splits):
    schedule = Schedule(epochs=6, record_every=10)
    best = replace(PRESETS["baseline"], name="best", lr=1e-2, restore_best=True)
    result = train(splits, [Member(best, 0)], schedule, device="cpu")
    val = [r for r in result.rows if r["split"] == "val"]
    top = max(r["accuracy"] for r in val)
    first = next(r["step"] for r in val if r["accuracy"] == top)  # the earliest of ties
    assert result.restored == [first] and result.stopped == [None]
    short = train(splits, [Member(replace(best, restore_best=False), 0)],
                  Schedule(epochs=first // 10, record_every=10), device="cpu")
    for name, value in short.weights.items():
        assert torch.equal(result.weights[name][0], value[0]), name
    assert result.test[0] == short.test[0]


def test_monitor_rules():
    from mnistlab.engine.stopping import Monitor

    monitor = Monitor([RunConfig(patience=2, restore_best=True), RunConfig(patience=1)])
    assert monitor.update(1, [0.5, 0.5], False) == ([0], [])
    assert monitor.update(2, [0.5, math.nan], False) == ([], [])  # a tie is no improvement
    assert monitor.update(3, [0.6, 0.4], False) == ([0], [1])
    assert monitor.update(4, [0.6, 0.9], False) == ([], [])  # a stopped model is done
    assert monitor.update(5, [0.6, 0.9], True) == ([], [])  # never stops at the last record
    assert monitor.restored() == [3, None] and monitor.stopped == [None, 3]


# --- augmentation geometry ---------------------------------------------------------------------


def one_map(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, augment.PARAMS)


def augmenter(shape=(28, 28), fill=0.0) -> augment.Augmenter:
    return augment.Augmenter([], shape, fill, 1, 1, torch.device("cpu"))


def inverse_map(shape, dx=0, dy=0, theta=0.0, scale=1.0) -> list[float]:
    """The map `Augmenter._draw` writes for one image (its formula, for hand-made cases)."""
    height, width = shape
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    tx = (width - 1) / 2 + 1 - (cos * dx + sin * dy)
    ty = (height - 1) / 2 + 1 - (-sin * dx + cos * dy)
    return [cos, sin, -sin, cos, tx, ty]


@pytest.mark.parametrize("dx, dy", [(2, 0), (0, -3), (-1, 2)])
def test_a_shift_moves_whole_pixels_exactly(dx, dy):
    image = torch.rand(1, 1, 28 * 28)
    out = augmenter(fill=-0.5).apply(image, one_map(inverse_map((28, 28), dx, dy)))
    padded = torch.full((28 + 6, 28 + 6), -0.5)
    padded[3:31, 3:31] = image.view(28, 28)
    expected = padded[3 - dy : 31 - dy, 3 - dx : 31 - dx]
    assert torch.equal(out.view(28, 28), expected)


def test_a_quarter_turn_is_rot90_and_identity_is_identity():
    image = torch.rand(1, 1, 28 * 28)
    aug = augmenter()
    assert torch.equal(aug.apply(image, one_map(inverse_map((28, 28)))), image)
    turned = aug.apply(image, one_map(inverse_map((28, 28), theta=math.pi / 2))).view(28, 28)
    torch.testing.assert_close(turned, _rotated(image.view(28, 28)), atol=1e-5, rtol=0)


def _rotated(image: torch.Tensor) -> torch.Tensor:
    """A quarter turn as the map defines it: output (u, v) reads source R(-θ)(u, v)."""
    height, width = image.shape
    out = torch.empty_like(image)
    for row in range(height):
        for col in range(width):
            u, v = col - (width - 1) / 2, row - (height - 1) / 2
            su, sv = v, -u  # R(-90°) (u, v) with cos 0, sin 1: (u cos + v sin, -u sin + v cos)
            out[row, col] = image[round(sv + (height - 1) / 2), round(su + (width - 1) / 2)]
    return out


def test_zoom_out_brings_in_the_fill():
    image = torch.ones(1, 1, 28 * 28)
    out = augmenter(fill=0.0).apply(image, one_map(inverse_map((28, 28), scale=0.5))).view(28, 28)
    assert out[14, 14] == 1 and out[0, 0] == 0 and out[27, 27] == 0
    assert 0.2 < out.mean().item() < 0.35  # a quarter of the area, less the blurred rim


def test_draws_stay_in_their_ranges_and_depend_on_seed_and_epoch_only():
    aug = augment.Augmenter([(0, (2, 15.0, 0.1)), (1, (2, 15.0, 0.1))], (28, 28), 0.0, 50, 128,
                            torch.device("cpu"))
    maps = aug.epoch(0)
    assert maps.shape == (2, 50, 128, augment.PARAMS)
    a, b = maps[..., 0].double(), maps[..., 1].double()
    scale = 1 / torch.sqrt(a * a + b * b)
    theta = torch.atan2(b, a)
    assert scale.min() >= 0.9 - 1e-6 and scale.max() <= 1.1 + 1e-6
    assert theta.abs().max() <= math.radians(15) + 1e-6
    assert not torch.equal(maps[0], maps[1]) and not torch.equal(maps, aug.epoch(1))
    alone = augment.Augmenter([(1, (2, 15.0, 0.1))], (28, 28), 0.0, 50, 128, torch.device("cpu"))
    assert torch.equal(alone.epoch(0)[0], maps[1])
    # the shifts are whole pixels, each of -2..2 drawn
    shift = augment.Augmenter([(0, (2, 0.0, 0.0))], (28, 28), 0.0, 50, 128, torch.device("cpu"))
    tx = shift.epoch(0)[..., 4] - (27 / 2 + 1)
    assert set(tx.unique().tolist()) == {-2.0, -1.0, 0.0, 1.0, 2.0}


# --- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("rotate", 181), ("zoom", 1.0), ("warmup", 1.0),
                                          ("label_smoothing", -0.1), ("lr_schedule", "step"),
                                          ("translate", 1.5), ("patience", -1)])
def test_bad_recipe_values_are_one_line_errors(field, value):
    from mnistlab.validation import validate

    with pytest.raises(MnistlabError) as info:
        validate(RunConfig, {field: value}, "run.toml")
    assert "\n" not in str(info.value) and field in str(info.value)


def test_a_sweep_varies_the_recipe_and_names_it():
    spec = sweep_from_dict({"name": "recipe", "seeds": 1, "base": "lr1e-3-p0.2",
                            "grid": {"lr_schedule": ["constant", "onecycle"],
                                     "label_smoothing": [0.0, 0.1], "translate": [0, 2],
                                     "restore_best": [False, True]}})
    configs, _ = expand(spec)
    assert len(configs) == 16
    names = {c.name for c in configs}
    assert "onecycle_ls0.1_tr2_best" in names and "constant_ls0_tr0_last" in names
    assert {c.layernorm for c in configs} == {True}  # the base preset's architecture
