"""The Triton backends, on CUDA: one launch each for Adam, dropout and the loss with its books.

`TritonKernels` replaces `TorchOps`'s per-model launches (or dozen operators) with one launch
each (triton_kernels.py, imported lazily by `backends.triton_kernels_for`: CPU runs never load
Triton); a ReLU stack's hidden layers are one launch each way too (`TritonLayers`), other
activations keep `TorchOps`'s layer operations.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from mnistlab.engine.backends.torch_ops import LN_EPS, Hidden, StackShape, TorchOps


class TritonKernels(TorchOps):
    """Adam, dropout and the loss with its books as one Triton launch each for the whole stack.

    Their dropout masks are counter-based (keyed by each model's dropout seed and the step
    count), so a CUDA graph registers no generators.
    """

    def __init__(self, stack: StackShape, kernels: ModuleType):
        super().__init__(stack)
        self.kernels, self.graph_generators = kernels, []
        device = stack.device
        self.hyper = torch.tensor(
            [[c.betas[1], c.eps, c.weight_decay, c.decoupled_decay] for c in stack.configs],
            device=device,
        )
        self.span = torch.tensor(stack.adam_span, dtype=torch.int32, device=device)
        self.seeds = torch.tensor(stack.dropout_seeds, dtype=torch.int64, device=device)
        has_ln = [c.layernorm for c in stack.configs]
        self.layernorm_on = torch.tensor(has_ln, dtype=torch.int32, device=device)

    def dropout(self, a: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        return self.kernels.dropout(a, self.seeds, self.drop_p.view(-1), self.stack.adam_step,
                                    layer)

    def loss(self, logits: Tensor, y: Tensor, books: dict[str, Tensor]) -> Tensor:
        smoothing = None if self.smoothing is None else self.smoothing.view(-1)
        return self.kernels.cross_entropy_step(logits, y, books, self.stack.adam_step, smoothing)

    def adam(self, frozen: Tensor) -> None:
        s = self.stack
        self.kernels.adam_(s.flat, self.hyper, s.rates, self.span, frozen, s.adam_step)


class TritonLayers(TritonKernels):
    """`TritonKernels`, and each ReLU hidden layer's non-GEMM work as one launch each way."""

    def hidden_forward(self, x: Tensor, z: Tensor, i: int, train: bool) -> tuple[Tensor, Hidden]:
        """ReLU, dropout (training) and LayerNorm of hidden layer i in one Triton launch.

        The cache holds z as the activation (ReLU's gradient gate z > 0 is the same as a > 0)
        and the layer's output as `u`; the fused backward needs no more.
        """
        s, norm, dropout = self.stack, None, None
        if s.layernorm:
            norm = (s.params[f"norm{i}.weight"], s.params[f"norm{i}.bias"], self.layernorm_on)
        if train and i in s.dropout_layers:
            dropout = (self.seeds, self.drop_p.view(-1), s.adam_step, i)
        out, scale, xhat, rstd = self.kernels.hidden_forward(z, norm, dropout, LN_EPS, train)
        return out, Hidden(x, z, z, scale, out, xhat, None, rstd)

    def hidden_backward(self, d: Tensor, layer: Hidden, i: int) -> Tensor:
        """LayerNorm, dropout, ReLU and the bias (and LayerNorm) column sums, fused."""
        s, g, weight, grads = self.stack, self.stack.grads, None, None
        if s.layernorm:
            weight = s.params[f"norm{i}.weight"]
            grads = g[f"norm{i}.weight"], g[f"norm{i}.bias"]
        return self.kernels.hidden_backward(d, layer.xhat, layer.rstd, weight, self.layernorm_on,
                                            layer.mask, layer.a, grads, g[f"linear{i}.bias"])
