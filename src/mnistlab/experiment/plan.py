"""The one planner: trials cut into jobs, one engine stack each, sized to the memory they train in.

Trials of one architecture and schedule can share a stack (the engine trains them at once; see
mnistlab.engine). A job holds at most `size` models; its key names its stack's files in the run
directory (`checkpoints/stack-<key>.json`).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mnistlab import engine
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


def member_bytes(config: RunConfig, schedule: Schedule, splits: Splits) -> int:
    """A generous estimate of one stack member's memory while training.

    fp32 weights, gradients and two Adam moments, plus the activations of a batch (pre- and
    post-activation, dropout mask, norm output and their gradients: ~8 copies of the hidden
    widths) and of a validation chunk.
    """
    widths = [
        int(np.prod(splits.train.images.shape[1:])),
        *config.hidden,
        len(splits.train.classes),
    ]
    params = sum((a + 1) * b for a, b in itertools.pairwise(widths)) + 2 * sum(config.hidden)
    rows = max(schedule.batch_size, min(len(splits.val), engine.EVAL_CHUNK))
    return 4 * (4 * params + 8 * rows * sum(widths[1:]))


def free_bytes(device: str) -> int:
    """Memory available for training now: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.mem_get_info()[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def auto_stack_size(trials: Sequence[Trial], splits: Splits, device: str) -> int:
    """Members per stack so that half the free memory, less the data on the device, holds them.

    Capped at the largest group (one architecture and schedule), which is all a stack can hold.
    """
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    budget = free_bytes(device) // 2 - data
    need = max(member_bytes(t.config, t.schedule, splits) for t in trials)
    groups: dict[tuple, int] = {}
    for t in trials:
        key = (t.config.architecture, t.schedule)
        groups[key] = groups.get(key, 0) + 1
    return max(1, min(budget // need, max(groups.values())))
