"""`CpuKernels`: on the CPU by default, a step's non-GEMM work as fused C++ calls.

Adam, the loss with its books, and each hidden layer's dropout and LayerNorm (and ReLU) with
their gradients as one call each for the whole stack (cpu_kernels.py: C++ compiled at first use,
loaded lazily by `backends.cpu_kernels_for`). Its dropout masks are counter-based, as the Triton
kernels' are (another stream): a run's numbers depend on which CPU backend trained it, and each
is bit-reproducible.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

from mnistlab.config import RunConfig
from mnistlab.engine import schedules
from mnistlab.engine.backends.torch_ops import (
    ACT,
    ACT_BACKWARD,
    LN_EPS,
    Hidden,
    StackShape,
    TorchOps,
)


class CpuKernels(TorchOps):
    """A CPU stack's non-GEMM work in fused C++ calls (cpu_kernels.py): Adam for all
    models in one, the loss's gradient and books in one (after PyTorch's log_softmax and exp),
    each hidden layer's activation (ReLU; others are PyTorch's), dropout and LayerNorm in one
    call each way.

    Where its arithmetic is PyTorch's it has `TorchOps`'s bits: Adam (one-cycle's models: to
    float32 rounding), the loss gradient, ReLU and its gate, the bias sums; so a model without
    LayerNorm and dropout trains to the same bits. LayerNorm agrees to float32 rounding (its
    sums run in another order). Dropout masks are counter-based (keyed by each model's dropout
    seed, the step count and the layer), not drawn from the stack's generators: other masks
    than `TorchOps`'s, and no generator state needed.
    """

    def __init__(self, stack: StackShape, kernels: ModuleType):
        super().__init__(stack)
        self.kernels = kernels
        self.hyper = torch.tensor(
            [[c.lr, *c.betas, c.eps, c.weight_decay, c.decoupled_decay, span,
              kernels.ADAM_KINDS[_adam_kind(c)]]
             for c, span in zip(stack.configs, stack.adam_span, strict=True)],
            dtype=torch.float64,
        )
        self.seeds = torch.tensor(stack.dropout_seeds, dtype=torch.int64)
        self.p = self.drop_p.view(-1)
        self.layernorm_on = torch.tensor([c.layernorm for c in stack.configs], dtype=torch.int32)
        self.relu = stack.act == "relu"

    def dropout(self, a: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        drop = (self.seeds, self.p, self.stack.adam_step, layer)
        out, mask, _, _ = self.kernels.hidden_forward(a, None, drop, LN_EPS, relu=False)
        return out, mask

    def hidden_forward(self, x: Tensor, z: Tensor, i: int, train: bool) -> tuple[Tensor, Hidden]:
        """Hidden layer i after z = x W + b: the activation (ReLU fused, others PyTorch's),
        dropout (training) and LayerNorm in one call. For ReLU the cache's activation is z
        (its gradient's gate z > 0 is a > 0's); its output is `u`."""
        s = self.stack
        a = z if self.relu else ACT[s.act](z)
        norm = None
        if s.layernorm:
            norm = (s.params[f"norm{i}.weight"], s.params[f"norm{i}.bias"], self.layernorm_on)
        drop = (self.seeds, self.p, s.adam_step, i) if train and i in s.dropout_layers else None
        out, mask, xhat, rstd = self.kernels.hidden_forward(a, norm, drop, LN_EPS, self.relu,
                                                            train)
        return out, Hidden(x, z, a, mask, out, xhat, None, rstd)

    def hidden_backward(self, d: Tensor, layer: Hidden, i: int) -> Tensor:
        """LayerNorm (with its parameters' gradients), dropout and ReLU backward in one call;
        another activation's backward is PyTorch's, after it. The bias gradient is `TorchOps`'s
        sum: a model without LayerNorm and dropout gets `TorchOps`'s bits."""
        s, g = self.stack, self.stack.grads
        norm = None
        if s.layernorm:
            norm = (s.params[f"norm{i}.weight"], self.layernorm_on, g[f"norm{i}.weight"],
                    g[f"norm{i}.bias"])
        gate = layer.z if self.relu else None
        d = self.kernels.hidden_backward(d, layer.xhat, layer.rstd, norm, layer.mask, gate)
        if not self.relu:
            d = ACT_BACKWARD[s.act](d, layer.z, layer.a)
        torch.sum(d, 1, keepdim=True, out=g[f"linear{i}.bias"])
        return d

    def loss(self, logits: Tensor, y: Tensor, books: dict[str, Tensor]) -> Tensor:
        smoothing = None if self.smoothing is None else self.smoothing.view(-1)
        return self.kernels.cross_entropy_step(logits, y, books, self.stack.adam_step, smoothing)

    def adam(self, frozen: Tensor) -> None:
        s = self.stack
        self.kernels.adam_(s.flat, self.hyper, s.rates, frozen, s.adam_step)


def _adam_kind(config: RunConfig) -> str:
    """How a model's Adam reads its rates: its configuration's numbers, a scheduled learning
    rate, or one-cycle's learning rate and beta1 (cpu_kernels.ADAM_KINDS)."""
    if config.lr_schedule == "onecycle":
        return "onecycle"
    return "constant" if schedules.constant(config) else "scheduled"
