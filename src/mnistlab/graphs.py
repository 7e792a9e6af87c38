"""The training step replayed as one CUDA graph.

Why: a step of a stack is about a hundred small kernels. Launched one by one from Python, the
GPU waits on the launches (tens of microseconds a step); captured once and replayed, the whole
step is one launch and its kernels run back to back.

What a captured step needs, and gets from the engine: fixed shapes (the last, partial batch of an
epoch runs eagerly), fixed memory (state is updated in place, never rebound), no host reads
inside (metrics stay on the device), and a per-step input copied into a static tensor before
each replay (the batch's row indices). Random draws inside are either counter-based (the Triton
dropout kernel keys on the step count held on the device) or come from generators registered
with the graph, which advance their offsets on every replay as eager calls would.

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
    """Calls `body(index)` eagerly a few times, then captures it and replays the capture."""

    def __init__(self, body: Callable[[Tensor], None], generators: Sequence[torch.Generator] = ()):
        self.body, self.generators = body, list(generators)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.index: Tensor | None = None  # the captured step's input
        self.stream = torch.cuda.Stream()
        self.eager_steps = 0

    def __call__(self, index: Tensor) -> None:
        if self.graph is not None and index.shape == self.index.shape:
            self.index.copy_(index)
            self.graph.replay()
        elif self.graph is not None or self.eager_steps < WARMUP_STEPS:
            self._eager(index)
        else:
            self._capture(index)
            self.graph.replay()

    def _eager(self, index: Tensor) -> None:
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            self.body(index)
        torch.cuda.current_stream().wait_stream(self.stream)
        self.eager_steps += 1

    def _capture(self, index: Tensor) -> None:
        self.index = index.clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph, stream=self.stream):
            self.body(self.index)
        self.graph = graph
