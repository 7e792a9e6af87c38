"""The seed study's training loop in plain PyTorch, for one model: the loop mnistlab's engine is
tested against (test_engine.py, test_recipe.py, test_kernels.py, test_reference_loop.py) and the
one docs/training-loop.md walks through, step by step, to where the engine does each part.

It is the idiomatic way: nn.Sequential, torch.optim.Adam (AdamW where the configuration decays
decoupled), the torch scheduler and smoothed loss the configuration names, one model and one
batch at a time. It is fed the engine's documented batches: one permutation of the training
images per epoch from a generator seeded by the seed alone, so every model of a seed sees the
same batches. It leaves out what the seed study does not use (augmentation, best weights, early
stopping) and what a single model does not need (stacking, divergence, resume states).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.engine import input_spec
from mnistlab.engine.seeds import derived_seed
from mnistlab.model import build_mlp


@dataclass
class Reference:
    """What the loop leaves: the trained model and what mnistlab records of it."""

    model: nn.Sequential
    losses: list[float]  # each step's cross-entropy (train mode, without label smoothing)
    rows: list[dict]  # the records, as metrics.csv holds them
    log: list[str]  # the log lines
    test: dict[str, float]  # test loss and accuracy, once, at the end


def reference(splits: Splits, config: RunConfig, seed: int, schedule: Schedule,
              device: str = "cpu") -> Reference:
    """Train one model as the engine does, one step at a time."""
    # The data on the device, once, as float tensors: batches are index slices of them.
    spec = input_spec(splits.train, config.input_norm)

    def on_device(part: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        return spec.prepare(part.images).to(device), torch.as_tensor(part.labels).to(device)

    (x, y), val, test = on_device(splits.train), on_device(splits.val), on_device(splits.test)
    per_epoch = len(x) // schedule.batch_size if schedule.drop_last else \
        math.ceil(len(x) / schedule.batch_size)
    total = per_epoch * schedule.epochs

    torch.manual_seed(seed)  # the initial weights: the seed alone
    model = build_mlp(config).to(device)
    if config.decoupled_decay:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=config.betas,
                                      eps=config.eps, weight_decay=config.decoupled_decay)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, betas=config.betas,
                                     eps=config.eps, weight_decay=config.weight_decay)
    scheduler = torch_schedule(config, optimizer, total)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    order = torch.Generator().manual_seed(derived_seed("order", seed))  # batches: the seed's

    losses, rows, log, since = [], [], [], []  # since: (loss, accuracy) of each step since a record
    for step in range(total):
        epoch, i = divmod(step, per_epoch)
        if i == 0:
            perm = torch.randperm(len(x), generator=order).to(device)
        index = perm[i * schedule.batch_size : (i + 1) * schedule.batch_size]
        model.train()
        logits = model(x[index])
        loss = loss_fn(logits, y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        plain = nn.functional.cross_entropy(logits.detach(), y[index]).item()  # recorded unsmoothed
        losses.append(plain)
        since.append((plain, (logits.argmax(1) == y[index]).float().mean().item()))
        done = step + 1
        if done % schedule.record_every == 0 or done == total:
            train_loss, train_acc = (sum(v) / len(since) for v in zip(*since, strict=True))
            val_loss, val_acc = evaluate(model, *val)
            for split, mean_loss, acc in (("train", train_loss, train_acc),
                                          ("val", val_loss, val_acc)):
                rows.append({"run": config.name, "seed": seed, "step": done,
                             "epoch": round(done / per_epoch, 6), "split": split,
                             "loss": mean_loss, "accuracy": acc})
            since = []
        if (i + 1) % schedule.log_every == 0:
            log.append(f"{config.name} seed{seed} | epoch {epoch + 1}/{schedule.epochs} | "
                       f"step {i + 1}/{per_epoch} | loss {plain:.4f}")
    test_loss, test_acc = evaluate(model, *test)  # the test set, scored once
    return Reference(model, losses, rows, log, {"loss": test_loss, "accuracy": test_acc})


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over the whole of (x, y), in eval mode."""
    model.eval()
    logits = model(x)
    return (nn.functional.cross_entropy(logits, y).item(),
            (logits.argmax(1) == y).float().mean().item())


def torch_schedule(config: RunConfig, optimizer: torch.optim.Optimizer, steps: int):
    """The PyTorch scheduler that `config.lr_schedule` and `warmup` name (see schedules.py)."""
    sched = torch.optim.lr_scheduler
    if config.lr_schedule == "onecycle":
        return sched.OneCycleLR(optimizer, max_lr=config.lr, total_steps=steps,
                                pct_start=config.warmup)
    warm = round(config.warmup * steps)
    main = (sched.CosineAnnealingLR(optimizer, T_max=steps - warm)
            if config.lr_schedule == "cosine" else sched.ConstantLR(optimizer, factor=1.0))
    if not warm:
        return main
    linear = sched.LinearLR(optimizer, start_factor=1 / warm, total_iters=warm - 1)
    return sched.SequentialLR(optimizer, [linear, main], milestones=[warm])


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """PyTorch on one thread while comparing with the engine. MKL splits a lone matrix product
    across threads in another summation order than the engine's per-model products (on
    AVX-512), and over 100 steps a LayerNorm model on random-pixel images amplifies that
    last-bit difference past any tolerance. One thread gives the reference the engine's
    rounding, so a comparison tests the arithmetic, not the split."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_run(splits: Splits, config: RunConfig, seed: int, steps: int, batch: int = 128):
    """(model, each step's loss) after `steps` steps, whole epochs of `batch` images, on one
    thread."""
    per_epoch = math.ceil(len(splits.train) / batch)
    assert steps % per_epoch == 0, f"{steps} steps are not whole epochs of {per_epoch}"
    with one_thread():
        done = reference(splits, config, seed, Schedule(batch_size=batch,
                                                         epochs=steps // per_epoch))
    return done.model, done.losses
