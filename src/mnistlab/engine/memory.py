"""Memory: what a stack member needs to train, what is free, and a failed allocation.

The planner (mnistlab.experiment.plan) sizes stacks from `member_bytes` and `free_bytes`; the
executor recognises a stack that ran out of memory (`out_of_memory`), gives back what it held
(`release_memory`) and trains it in halves.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import os
import re
from collections.abc import Sequence

import numpy as np
import torch

from mnistlab.config import RunConfig, Schedule
from mnistlab.data.dataset import Splits
from mnistlab.engine import augment
from mnistlab.engine.backends import CPU_EVAL_BLOCK
from mnistlab.engine.module_stack import eval_rows
from mnistlab.engine.records import EVAL_CHUNK, input_spec, steps_per_epoch
from mnistlab.modules import build, probe


def member_bytes(config: RunConfig, schedule: Schedule, splits: Splits, device: str = "cpu") -> int:
    """An upper bound on what one stack member adds to the memory of training on `device`.

    Its state, plus the working memory of a training step and of an evaluation block: the larger
    of the two on a CPU, both on a GPU (a CUDA graph keeps its step's buffers in its own pool
    while evaluation allocates outside it). What is not per member (the data, their conversion
    temporaries, allocator caches, the CUDA context) is covered by the planner's margin
    (experiment.plan.auto_stack_size).
    Checked against the tensors a stack really allocates in tests/test_stack_sizing.py. A model
    other than the MLP is measured by what it holds (`_module_bytes`).
    """
    if config.model != "mlp":
        return _module_bytes(config, schedule, splits, device)
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
    steps = steps_per_epoch(len(splits.train), schedule) * schedule.epochs
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
    """An evaluation block (CPU_EVAL_BLOCK rows on a CPU, EVAL_CHUNK elsewhere): the hidden
    layer that takes most while it runs (its input, pre-activation and activation; with
    LayerNorm the normalised values, the output, its selection for the models that have it and
    2 floats of statistics per row; the layers before it are gone), then logits,
    log-probabilities and the predictions, which are alive for two blocks at once where a set
    takes more than one (`evaluate` holds the last block's until the next forward pass
    returns)."""
    block = CPU_EVAL_BLOCK if device == "cpu" else EVAL_CHUNK
    largest = max(len(splits.val), len(splits.test))
    rows = min(block, largest)
    alive = 2 if largest > rows else 1
    ln = config.layernorm
    hidden = max(((i > 1) * w + (2 + 3 * ln) * h + 2 * ln
                  for i, (w, h) in enumerate(itertools.pairwise(widths[:-1]), 1)), default=0)
    return rows * (hidden + alive * (3 * widths[-1] + 8))


def _module_bytes(config: RunConfig, schedule: Schedule, splits: Splits, device: str) -> int:
    """An upper bound on what one member of a general stack adds to the memory of training:
    parameters, buffers, gradients, Adam moments, best weights and (on a CPU) a resume
    state's copies; a step's activations and their gradients; an evaluation block's."""
    spec = input_spec(splits.train, config.input_norm)
    with torch.random.fork_rng(devices=[]):
        found = probe(build(config.model, spec), config.model, spec)
    batch = schedule.batch_size
    steps = steps_per_epoch(len(splits.train), schedule) * schedule.epochs
    copies = 5 + 2 * config.restore_best + (4 if device == "cpu" else 0)
    state = copies * found.params + 2 * steps
    pixels = int(np.prod(spec.shape))
    step = batch * (3 * pixels + 4 * found.activations)
    evaluation = 2 * eval_rows(found.activations) * (found.activations + 8)
    work = max(step, evaluation) if device == "cpu" else step + evaluation
    return 4 * (state + work)


def stack_member_bytes(configs: Sequence[RunConfig], schedule: Schedule, splits: Splits,
                       device: str) -> int:
    """`member_bytes` of each member of a stack of `configs`: a stack keeps LayerNorm values,
    dropout masks and best weights for all its members where one has them."""
    return member_bytes(_stacked(configs), schedule, splits, device)


def _stacked(configs: Sequence[RunConfig]) -> RunConfig:
    """A configuration that costs what each member of a stack of `configs` costs."""
    return dataclasses.replace(
        configs[0], layernorm=any(c.layernorm for c in configs),
        dropout=max(c.dropout for c in configs),
        restore_best=any(c.restore_best for c in configs),
        **{k: max(getattr(c, k) for c in configs) for k in ("translate", "rotate", "zoom")})


def free_bytes(device: str) -> int:
    """Memory available for training now: the GPU's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


_ALLOCATION_FAILED = ("out of memory", "can't allocate memory", "CUBLAS_STATUS_ALLOC_FAILED")


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised while handling, is a failed allocation: CUDA's
    torch.OutOfMemoryError, the CPU allocator's RuntimeError, Python's MemoryError (a failed CUDA
    graph capture reports the allocation as its context)."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, torch.OutOfMemoryError | MemoryError):
            return True
        if isinstance(error, RuntimeError) and any(t in str(error) for t in _ALLOCATION_FAILED):
            return True
        error = error.__cause__ or error.__context__
    return False


def out_of_memory_reason(exc: BaseException) -> str:
    """A failed allocation in a few words: PyTorch's messages run to a paragraph."""
    asked = re.search(r"allocate (\d+(?:\.\d+)? ?[KMGT]?i?B|\d+ bytes)", str(exc))
    return "out of memory" + (f" allocating {asked.group(1)}" if asked else "")


def release_memory(device: str) -> None:
    """Give back what a failed attempt held: its tensors (reference cycles too: a stack and its
    backend point at each other) and, on CUDA, the allocator's cached blocks."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
