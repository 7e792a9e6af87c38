"""How a stack computes, chosen once when it is built: PyTorch operators, or fused kernels.

Why an object: the ways differ in everything between the matrix products (a hidden layer's
activation, dropout and LayerNorm and their gradients), in the loss and its books, in Adam, in
how a step is run and in how evaluation is cut into blocks. `choose` picks one per stack and the
stack holds it (`MLPStack.backend`), so neither the stack nor the engine asks which one it has.
One module per backend, each with the kernels it runs beside it:

  torch_ops.py       `TorchOps`: PyTorch operators, on every device; the others subclass it
  fused_cpu.py       `CpuKernels`: on the CPU by default (cpu_kernels.py, csrc/step.cpp)
  fused_cuda.py      `TritonKernels`, `TritonLayers`: on CUDA (triton_kernels.py)
  cuda_graphs.py     `GraphedStep`: on CUDA, either way's step replayed as one CUDA graph
  arithmetic.py      `Arithmetic`: which of these a stack uses, and every other switch that
                     changes a run's numbers

A run's arithmetic is resolved once from the environment (`requested`) or from what the run
recorded (`honour`), and recorded with it; the backends themselves read no environment variable.
"""

from __future__ import annotations

from types import ModuleType

from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.engine.backends.fused_cpu import CpuKernels
from mnistlab.engine.backends.fused_cuda import TritonKernels, TritonLayers
from mnistlab.engine.backends.torch_ops import (
    CPU_EVAL_BLOCK,
    Hidden,
    StackShape,
    TorchOps,
    cross_entropy,
)
from mnistlab.errors import MnistlabError

__all__ = [
    "CPU_EVAL_BLOCK", "CpuKernels", "Hidden", "StackShape", "TorchOps", "TritonKernels",
    "TritonLayers", "choose", "cpu_kernels_for", "cross_entropy", "triton_kernels_for",
]


def triton_kernels_for(arithmetic: Arithmetic) -> ModuleType | None:
    """The Triton kernels where `arithmetic` asks for them (CUDA with Triton), else None.
    Imported here, lazily: CPU runs never load Triton."""
    if not arithmetic.triton:
        return None
    from mnistlab.engine.backends import triton_kernels

    return triton_kernels


def cpu_kernels_for(arithmetic: Arithmetic) -> ModuleType | None:
    """The fused CPU kernels where `arithmetic` asks for the fused CPU step, else None.
    Imported here, lazily, as the Triton kernels are; `arithmetic.honour` or `requested` has
    checked that they build here."""
    if arithmetic.cpu_step != "fused":
        return None
    from mnistlab.engine.backends import cpu_kernels

    if cpu_kernels.library() is None:
        raise MnistlabError("the fused CPU step was asked for and cannot be built here (see "
                            "the line above); install g++ or set MNISTLAB_CPU_FUSED=0")
    return cpu_kernels


def choose(stack: StackShape) -> TorchOps:
    """The backend for `stack`, as its arithmetic says: the Triton kernels, the fused CPU
    kernels, else PyTorch operators."""
    kernels = triton_kernels_for(stack.arithmetic)
    if kernels is not None:
        return (TritonLayers if stack.act == "relu" else TritonKernels)(stack, kernels)
    kernels = cpu_kernels_for(stack.arithmetic)
    return TorchOps(stack) if kernels is None else CpuKernels(stack, kernels)
