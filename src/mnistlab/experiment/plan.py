"""The one planner: trials cut into jobs, one engine stack each, sized to the memory they train in.

Trials of one architecture and schedule can share a stack (the engine trains them at once; see
mnistlab.engine). A job holds at most `size` models; its key names its stack's files in the run
directory (`checkpoints/stack-<key>.json`).
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mnistlab import augment, engine, general
from mnistlab.backend import CPU_EVAL_BLOCK
from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member
from mnistlab.experiment.trials import Trial


@dataclass(frozen=True)
class Job:
    """Trials the engine trains as one stack: one architecture and one schedule."""

    key: str
    members: tuple[Member, ...]
    schedule: Schedule

    @property
    def configurations(self) -> list[str]:
        return list(dict.fromkeys(m.config.name for m in self.members))


def plan(trials: Sequence[Trial], size: int, prefix: str = "") -> list[Job]:
    """`trials` grouped by (architecture, schedule) in order of first appearance, cut into
    stacks of at most `size` members; keys are `<prefix><i>`."""
    groups: dict[tuple, list[Member]] = {}
    for t in trials:
        groups.setdefault((t.config.architecture, t.schedule), []).append(Member(t.config, t.seed))
    jobs = []
    for (_, schedule), members in groups.items():
        for start in range(0, len(members), size):
            key = f"{prefix}{len(jobs)}"
            jobs.append(Job(key, tuple(members[start : start + size]), schedule))
    return jobs


def member_bytes(config: RunConfig, schedule: Schedule, splits: Splits, device: str = "cpu") -> int:
    """An upper bound on what one stack member adds to the memory of training on `device`.

    Its state, plus the working memory of a training step and of an evaluation block: the larger
    of the two on a CPU, both on a GPU (a CUDA graph keeps its step's buffers in its own pool
    while evaluation allocates outside it). What is not per member (the data, their conversion
    temporaries, allocator caches, the CUDA context) is covered by `auto_stack_size`'s margin.
    Checked against the tensors a stack really allocates in tests/test_stack_sizing.py. A model
    other than the MLP is measured by mnistlab.general.
    """
    if config.model != "mlp":
        return general.member_bytes(config, schedule, splits, device)
    d0, classes = int(np.prod(splits.train.images.shape[1:])), len(splits.train.classes)
    widths = [d0, *config.hidden, classes]
    state = _state_floats(config, schedule, splits, widths, device)
    step = _step_floats(config, schedule, splits, widths)
    evaluation = _eval_floats(config, splits, widths, device)
    work = max(step, evaluation) if device == "cpu" else step + evaluation
    return 4 * (state + work)


def _padded(n: int) -> int:
    return -(-n // 16) * 16  # each named tensor starts 64-byte aligned in the stack's flat rows


def _state_floats(config: RunConfig, schedule: Schedule, splits: Splits, widths: list[int],
                  device: str) -> int:
    """Weights, gradients and both Adam moments (four flat rows, LayerNorm always counted), the
    best weights of restore_best, the learning-rate table; on a CPU also the copies an
    epoch-end resume state passes through (host copy, contiguous tensors, serialised bytes)."""
    layers = itertools.pairwise(widths)
    params = sum(_padded(a * b) + _padded(b) for a, b in layers)
    params += sum(2 * _padded(h) for h in widths[1:-1])
    n, batch = len(splits.train), schedule.batch_size
    steps = (n // batch if schedule.drop_last else -(-n // batch)) * schedule.epochs
    copies = 4 + config.restore_best + (9 if device == "cpu" else 0)
    return copies * params + 2 * steps


def _step_floats(config: RunConfig, schedule: Schedule, splits: Splits, widths: list[int]) -> int:
    """A training step: the member's batch of inputs; per hidden layer the saved pre-activation
    and activation, with dropout its mask and the dropped activation, with LayerNorm the
    normalised values, the output and 2 floats of statistics per row, and two widths of the
    backward pass's temporaries; logits, log-probabilities and their gradient. An augmenting
    member adds its epoch of transforms and their arithmetic."""
    per_width = 4 + 2 * (config.dropout > 0) + 2 * config.layernorm
    hidden = sum(per_width * h + 2 * config.layernorm for h in widths[1:-1])
    transforms = 0
    if augment.settings(config) is not None:
        transforms = 6 * len(splits.train) + 12 * schedule.batch_size * widths[0]
    return schedule.batch_size * (widths[0] + hidden + 4 * widths[-1]) + transforms


def _eval_floats(config: RunConfig, splits: Splits, widths: list[int], device: str) -> int:
    """An evaluation block (CPU_EVAL_BLOCK rows on a CPU, EVAL_CHUNK elsewhere): per hidden
    layer the pre-activation and activation, with LayerNorm the normalised values, the output and
    2 floats of statistics per row; logits, log-probabilities and the predictions. Two blocks'
    layers are alive at once where a set takes more than one block (`engine.evaluate` holds the
    last block's until the next forward pass returns)."""
    block = CPU_EVAL_BLOCK if device == "cpu" else engine.EVAL_CHUNK
    largest = max(len(splits.val), len(splits.test))
    rows = min(block, largest)
    alive = 2 if largest > rows else 1
    hidden = sum((2 + 2 * config.layernorm) * h + 2 * config.layernorm for h in widths[1:-1])
    return alive * rows * (hidden + 3 * widths[-1] + 8)


def free_bytes(device: str) -> int:
    """Memory available for training now: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_stack_size(trials: Sequence[Trial], splits: Splits, device: str) -> int:
    """Members per stack so that half the free memory, less the data on the device, holds them.

    The other half is the margin for what `member_bytes` does not count per member: the data's
    conversion temporaries, allocator caches and fragmentation, the CUDA context and cuBLAS
    workspaces. Where even so a stack runs out of memory, the executor trains it in halves
    (`executor.train_job`). Capped at the largest group (one architecture and schedule), which
    is all a stack can hold.
    """
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    budget = free_bytes(device) // 2 - data
    groups: dict[tuple, list[RunConfig]] = {}
    for t in trials:
        groups.setdefault((t.config.architecture, t.schedule), []).append(t.config)
    need = max(member_bytes(_stacked(configs), schedule, splits, device)
               for (_, schedule), configs in groups.items())
    return max(1, min(budget // need, max(len(configs) for configs in groups.values())))


def _stacked(configs: list[RunConfig]) -> RunConfig:
    """A configuration that costs what each member of a stack of `configs` costs: a stack keeps
    LayerNorm values, dropout masks and best weights for all its members where one has them."""
    return dataclasses.replace(
        configs[0], layernorm=any(c.layernorm for c in configs),
        dropout=max(c.dropout for c in configs),
        restore_best=any(c.restore_best for c in configs),
        **{k: max(getattr(c, k) for c in configs) for k in ("translate", "rotate", "zoom")})
