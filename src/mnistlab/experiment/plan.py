"""The one planner: trials cut into jobs, one engine stack each, sized to the memory they train in.

Trials of one architecture and schedule can share a stack (the engine trains them at once; see
mnistlab.engine). A job holds at most `size` models; its key names its stack's files in the run
directory (`checkpoints/stack-<key>.json`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import Member, free_bytes, stack_member_bytes
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


def auto_stack_size(trials: Sequence[Trial], splits: Splits, device: str) -> int:
    """Members per stack so that half the free memory, less the data on the device, holds them.

    The other half is the margin for what `engine.member_bytes` does not count per member: the
    data's conversion temporaries, allocator caches and fragmentation, the CUDA context and
    cuBLAS workspaces. Where even so a stack runs out of memory, the executor trains it in halves
    (`executor.train_job`). Capped at the largest group (one architecture and schedule), which
    is all a stack can hold.
    """
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    budget = free_bytes(device) // 2 - data
    groups: dict[tuple, list[RunConfig]] = {}
    for t in trials:
        groups.setdefault((t.config.architecture, t.schedule), []).append(t.config)
    need = max(stack_member_bytes(configs, schedule, splits, device)
               for (_, schedule), configs in groups.items())
    return max(1, min(budget // need, max(len(configs) for configs in groups.values())))
