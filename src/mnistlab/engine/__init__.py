"""The training engine: one call trains a stack of N models on one split, resumably.

This module is the engine's face: nothing else in mnistlab imports the modules behind it
(tests/test_architecture.py checks that). Inside, from the ground up:

  seeds.py, schedules.py,   independent random streams; learning-rate tables; best weights and
  stopping.py               early stopping
  backends/                 how a stack computes between its matrix products (PyTorch
                            operators, fused C++ on a CPU, Triton and CUDA graphs on CUDA), and
                            the arithmetic: the switches that pick one, recorded with the run
  device.py                 which device, and what is set up there
  stack.py                  the MLP stack: stacked weights, a hand-written backward pass, Adam
  augment.py                augmentation on the device
  records.py                members, records, evaluation and the result: both engines'
  resume.py                 resume states: what they hold, and the checks on reading one
  loop.py                   the schedule's loop over a training state, Ctrl-C, state writing
  module_stack.py           any nn.Module as a stack (torch.func)
  mlp.py, general.py        the two engines: the MLP's, and the general one for other models
  memory.py                 what a member needs in memory, what is free, a failed allocation
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from mnistlab.config import Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine.backends.arithmetic import Arithmetic, honour, overridden, requested
from mnistlab.engine.device import cluster_device, resolve_device
from mnistlab.engine.general import train_modules
from mnistlab.engine.loop import STEP_EVERY, Interrupted, StepEvent
from mnistlab.engine.memory import (
    free_bytes,
    member_bytes,
    out_of_memory,
    out_of_memory_reason,
    release_memory,
    stack_member_bytes,
)
from mnistlab.engine.mlp import train_mlp
from mnistlab.engine.records import (
    Member,
    RecordEvent,
    TestPredictions,
    TrainResult,
    check_bounds,
    evaluate,
    input_spec,
    steps_per_epoch,
)
from mnistlab.engine.schedules import constant, rates

__all__ = [
    "STEP_EVERY", "Arithmetic", "Interrupted", "Member", "RecordEvent", "StepEvent",
    "TestPredictions", "TrainResult", "check_bounds", "cluster_device", "constant", "evaluate",
    "free_bytes", "honour", "input_spec", "member_bytes", "out_of_memory", "out_of_memory_reason",
    "overridden", "rates", "release_memory", "requested", "resolve_device", "stack_member_bytes",
    "steps_per_epoch", "train",
]


def train(
    splits: Splits,
    members: Sequence[Member],
    schedule: Schedule,
    *,
    device: str = "auto",
    state_path: Path | None = None,
    resume: bool = False,
    on_record: Callable[[RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    arithmetic: Arithmetic | None = None,
    on_step: Callable[[StepEvent], None] | None = None,
) -> TrainResult:
    """Train every member on `splits` as one stack: MLPs in their own engine (mlp.train_mlp),
    any other model in the general one (general.train_modules); engine.loop describes the
    schedule and faults.

    With `resume` and an existing `state_path`, continue from it; the result equals an
    uninterrupted run's exactly. A missing state file starts from scratch. `arithmetic` is how
    the stack computes; by default what the environment asks for on the device, and an explicit
    one must be possible here. `on_step` hears where an MLP stack's training is, a few times a
    second (StepEvent), for a live progress bar; the general engine reports at records only.
    """
    common = dict(device=device, state_path=state_path, resume=resume, on_record=on_record,
                  on_log=on_log, arithmetic=arithmetic)
    members = list(members)
    if members and members[0].config.model != "mlp":
        return train_modules(splits, members, schedule, **common)
    return train_mlp(splits, members, schedule, on_step=on_step, **common)
