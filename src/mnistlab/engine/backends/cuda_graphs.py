"""The training step replayed as one CUDA graph.

Why: a step of a stack is about a hundred small kernels. Launched one by one from Python, the
GPU waits on the launches (tens of microseconds a step); captured once and replayed, the whole
step is one launch and its kernels run back to back.

What a captured step needs, and gets from the engine: fixed shapes (the last, partial batch of an
epoch runs eagerly), fixed memory (state is updated in place, never rebound), no host reads
inside (metrics stay on the device), and per-step inputs copied into static tensors before each
replay (the batch's row indices, and its augmentation's transforms where a model augments).
Random draws inside are either counter-based (the Triton dropout kernel keys on the step count
held on the device) or come from generators registered with the graph, which advance their
offsets on every replay as eager calls would; anything else that changes from step to step (a
scheduled learning rate) is read on the device at the step count the device holds.

The first steps run eagerly on a side stream: they are real steps of the schedule, and they
leave cuBLAS workspaces, Triton compilations and allocator pools warm, so nothing is created
during the capture.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

WARMUP_STEPS = 3


class GraphedStep:
    """Calls `body(*inputs)` eagerly a few times, then captures it and replays the capture.

    A step whose first input has another shape than the captured one's (an epoch's last,
    partial batch) runs eagerly.
    """

    def __init__(self, body: Callable[..., None], generators: Sequence[torch.Generator] = ()):
        self.body, self.generators = body, list(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: tuple[Tensor, ...] = ()  # the captured step's inputs
        self.stream = torch.cuda.Stream()
        self.eager_steps = 0

    def __call__(self, *inputs: Tensor) -> None:
        if self.graph is not None and inputs[0].shape == self.inputs[0].shape:
            for static, value in zip(self.inputs, inputs, strict=True):
                static.copy_(value)
            self.graph.replay()
        elif self.graph is not None or self.eager_steps < WARMUP_STEPS:
            self._eager(inputs)
        else:
            self._capture(inputs)
            self.graph.replay()

    def _eager(self, inputs: tuple[Tensor, ...]) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.body(*inputs)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.eager_steps += 1

    def _capture(self, inputs: tuple[Tensor, ...]) -> None:
        self.inputs = tuple(value.clone() for value in inputs)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, stream=self.stream):
            self.body(*self.inputs)
        self.graph = graph
