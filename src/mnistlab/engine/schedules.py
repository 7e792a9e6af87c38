"""Learning-rate schedules: each model's learning rate and Adam beta1 at every step of a run.

Why a table: the rates are computed once, on the host, in double precision with the formulas of
PyTorch's schedulers (whose values are Python floats too), so a model's rates are torch's and
the same in any stack. On the device a step reads its row at the step count the device holds,
so a captured CUDA graph stays valid: no per-step value is baked into it. A table costs 8 bytes
per model and step (30 kB for the seed study's 3,750 steps), little beside a model's weights.

The schedules (`RunConfig.lr_schedule`), for the step that follows t of T steps:
- "constant": `lr`; with `warmup`, a linear warmup first (below).
- "cosine": after the warmup, CosineAnnealingLR(T_max = T - W, eta_min = 0) from `lr` to 0.
- "onecycle": OneCycleLR(max_lr = `lr`, total_steps = T, pct_start = `warmup`) with its other
  defaults (div_factor 25, final_div_factor 1e4, cosine annealing, three_phase False and
  cycle_momentum: beta1 goes 0.95 → 0.85 → 0.95 in place of the configured `betas[0]`).
Linear warmup: the first W = round(`warmup` × T) steps take `lr` × (t + 1) / W, which is
LinearLR(start_factor = 1/W, total_iters = W - 1) before the main schedule (SequentialLR with
the milestone W).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mnistlab.config import RunConfig
from mnistlab.errors import ConfigError

# OneCycleLR's defaults.
DIV_FACTOR, FINAL_DIV_FACTOR = 25.0, 1e4
BASE_MOMENTUM, MAX_MOMENTUM = 0.85, 0.95
# The longest run a changing schedule is tabulated for: 16 MB a model (5,592 epochs of MNIST at
# batch 128), and a few hundred MB of Python floats while the table is computed.
MAX_SCHEDULED_STEPS = 1 << 21


def constant(config: RunConfig) -> bool:
    """Whether a model's rates never change: its lr and beta1 are its configuration's."""
    return config.lr_schedule == "constant" and config.warmup == 0


def check_length(config: RunConfig, steps: int) -> None:
    """Refuse, before anything is allocated, a changing schedule longer than
    MAX_SCHEDULED_STEPS: its table grows with the run (a constant rate's does not)."""
    if not constant(config) and steps > MAX_SCHEDULED_STEPS:
        raise ConfigError(
            f"run '{config.name}': a {config.lr_schedule} learning-rate schedule"
            f"{' with warmup' if config.warmup else ''} over {steps:,} steps is longer than the "
            f"{MAX_SCHEDULED_STEPS:,} mnistlab tabulates (8 bytes a step and model); use fewer "
            "epochs or a larger batch_size, or a constant rate without warmup")


def rates(config: RunConfig, steps: int) -> list[tuple[float, float]]:
    """(learning rate, beta1) for each of the `steps` steps of a run, in order."""
    if config.lr_schedule == "onecycle":
        return [_one_cycle(config.lr, config.warmup, steps, t) for t in range(steps)]
    warm, cosine = round(config.warmup * steps), config.lr_schedule == "cosine"
    return [(_warm_then(config.lr, warm, steps, t, cosine), config.betas[0])
            for t in range(steps)]


def table(configs: Sequence[RunConfig], steps: int, device: torch.device) -> Tensor:
    """(N, steps, 2) float32: each model's `rates`, row k for model k (each distinct schedule
    computed once: a configuration's seeds share it)."""
    for config in configs:
        check_length(config, steps)
    rows: dict[tuple, Tensor] = {}
    out = torch.empty(len(configs), steps, 2)
    for k, config in enumerate(configs):
        key = (config.lr_schedule, config.warmup, config.lr, config.betas[0])
        if key not in rows:
            rows[key] = torch.tensor(rates(config, 1 if constant(config) else steps))
        out[k] = rows[key]
    return out.to(device)


def _warm_then(lr: float, warm: int, steps: int, t: int, cosine: bool) -> float:
    """Linear warmup over `warm` steps, then `lr` or a cosine decay from it to 0."""
    if t < warm:
        return lr * (t + 1) / warm
    if not cosine:
        return lr
    return lr * (1 + math.cos(math.pi * (t - warm) / (steps - warm))) / 2


def _one_cycle(lr: float, pct_start: float, steps: int, t: int) -> tuple[float, float]:
    """OneCycleLR's learning rate and beta1 at step t, as torch's get_lr computes them: a rise
    from lr / 25 to lr while beta1 falls, then the way back down to lr / 25 / 1e4."""
    initial, peak = lr / DIV_FACTOR, float(pct_start * steps) - 1
    if t <= peak:
        pct = t / peak if peak > 0 else 1.0  # torch divides by zero where the rise is one step
        return _annealing_cos(initial, lr, pct), _annealing_cos(MAX_MOMENTUM, BASE_MOMENTUM, pct)
    pct = (t - peak) / (steps - 1 - peak)
    low = initial / FINAL_DIV_FACTOR
    return _annealing_cos(lr, low, pct), _annealing_cos(BASE_MOMENTUM, MAX_MOMENTUM, pct)


def _annealing_cos(start: float, end: float, pct: float) -> float:
    """OneCycleLR's cosine from `start` (pct 0) to `end` (pct 1), operation for operation."""
    cos_out = math.cos(math.pi * pct) + 1
    return end + (start - end) / 2.0 * cos_out
