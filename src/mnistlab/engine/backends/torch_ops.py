"""`TorchOps`: a stack's non-GEMM work in PyTorch operators, and what every backend shares.

On every device: MPS's, the CPU's where the stack's arithmetic says so (MNISTLAB_CPU_FUSED=0, or
no C++ compiler), and CUDA's where Triton is missing or switched off (MNISTLAB_TRITON=0). The
backward pass calls PyTorch's own backward kernels (threshold/gelu/tanh, layer norm) on whole
stacks; dropout draws from one generator per model; Adam is PyTorch's fused kernel (AdamW's where
a model decays its weights decoupled), one call per model so each model keeps its own
hyperparameters and can be frozen (`found_inf`) without touching the others. A scheduled
learning rate is a tensor the kernel reads; one-cycle's per-step beta1, which the kernel takes
only as a number, takes PyTorch operations (`cycled_adam`).

The fused backends (fused_cpu.py, fused_cuda.py) are subclasses: they replace some of its
methods and keep the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor

from mnistlab.config import RunConfig
from mnistlab.engine import schedules
from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.engine.backends.cuda_graphs import GraphedStep

LN_EPS = 1e-5  # nn.LayerNorm's default, which build_mlp uses
CPU_EVAL_BLOCK = 1024  # rows per CPU forward pass: large GEMMs whose intermediates stay in cache
ACT_BACKWARD = {
    "relu": lambda grad, z, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "gelu": lambda grad, z, a: torch.ops.aten.gelu_backward(grad, z),
    "tanh": lambda grad, z, a: torch.ops.aten.tanh_backward(grad, a),
}
ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}


class StackShape(Protocol):
    """What a backend reads and updates of its stack (engine.stack.MLPStack, which holds it)."""

    device: torch.device
    arithmetic: Arithmetic
    configs: list[RunConfig]
    act: str  # the activation
    layernorm: bool  # whether any model has LayerNorm
    dropout_layers: set[int]  # 0-based hidden layers followed by dropout
    params: dict[str, Tensor]  # named views of flat["param"]
    grads: dict[str, Tensor]  # named views of flat["grad"]
    flat: dict[str, Tensor]  # (N, P): param, grad, exp_avg, exp_avg_sq
    adam_span: list[int]  # per model, how much of its row Adam steps
    adam_step: Tensor  # steps completed
    steps: int  # the run's length
    rates: Tensor  # (N, steps, 2): each model's learning rate and beta1 at each step
    generators: list[torch.Generator]  # dropout draws, one per model
    dropout_seeds: list[int]


@dataclass
class Hidden:
    """What the backward pass needs from one hidden layer."""

    x: Tensor  # the layer's input
    z: Tensor  # pre-activation
    a: Tensor  # activation
    mask: Tensor | None  # dropout scale: 0 or 1/(1-p)
    u: Tensor  # LayerNorm input (the activation after dropout)
    xhat: Tensor | None = None
    mean: Tensor | None = None
    rstd: Tensor | None = None


class TorchOps:
    """A stack's non-GEMM work in PyTorch operators, each acting on every model's slice alone."""

    def __init__(self, stack: StackShape):
        self.stack = stack
        device, configs = stack.device, stack.configs
        has_ln = [c.layernorm for c in configs]
        mixed = stack.layernorm and not all(has_ln)
        # (N, 1, 1) selector where LayerNorm is on for some models only; None when all or none.
        self.ln_mask = torch.tensor(has_ln, device=device).view(-1, 1, 1) if mixed else None
        # Rows of models without LayerNorm as [a, b) ranges: copying them is cheapest on a CPU;
        # elsewhere each copy is a launch, so one `where` does them all (None). The same bits.
        cpu = device.type == "cpu"
        self.no_ln_runs = _runs([not ln for ln in has_ln]) if cpu else None
        p = torch.tensor([c.dropout for c in configs], device=device).view(-1, 1, 1)
        self.drop_p, self.keep_scale = p, 1.0 / (1.0 - p)
        # Each model's Adam operands, sliced once: per-step slicing is dispatcher time on a CPU.
        self.adam_rows = [
            [[stack.flat[kind][k, :span]] for kind in ("param", "grad", "exp_avg", "exp_avg_sq")]
            for k, span in enumerate(stack.adam_span)
        ]
        # Scheduled models read their step's rates from `now`, filled from the stack's table at
        # the step count the device holds (so a CUDA graph stays valid); the others take their
        # configuration's numbers, as they always did.
        scheduled = [not schedules.constant(c) for c in configs]
        self.now = torch.empty(len(configs), 1, 2, device=device) if any(scheduled) else None
        self.lr = [self.now[k, 0, 0] if on else c.lr
                   for k, (c, on) in enumerate(zip(configs, scheduled, strict=True))]
        smoothing = [c.label_smoothing for c in configs]
        self.smoothing = (torch.tensor(smoothing, device=device).view(-1, 1, 1)
                          if any(smoothing) else None)
        self.graph_generators = stack.generators  # advanced by every replay of a CUDA graph
        # Evaluation: rows per forward pass (None: a whole loss chunk, since a GPU wants few, big
        # launches) and the loss sum's dtype (MPS has no float64).
        self.eval_block = CPU_EVAL_BLOCK if cpu else None
        self.eval_dtype = torch.float32 if device.type == "mps" else torch.float64

    # --- hidden layers ------------------------------------------------------------------------

    def dropout(self, a: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """(a · mask, mask): inverted-dropout scales drawn per model (ones where p = 0). Each
        model's generator moves on with every draw, so each `layer` gets its own masks."""
        mask = torch.ones_like(a)
        for k, gen in enumerate(self.stack.generators):
            if self.stack.configs[k].dropout > 0:
                mask[k].uniform_(generator=gen)
        mask.ge_(self.drop_p).mul_(self.keep_scale)  # in place: 1.0/0.0, then the scale
        return a * mask, mask

    def hidden_forward(self, x: Tensor, z: Tensor, i: int, train: bool) -> tuple[Tensor, Hidden]:
        """Hidden layer i after its matrix product z = x W + b: (its output, its cache)."""
        s = self.stack
        a = ACT[s.act](z)
        u, mask = self.dropout(a, i) if train and i in s.dropout_layers else (a, None)
        layer = Hidden(x, z, a, mask, u)
        if not s.layernorm:
            return u, layer
        layer.xhat, layer.mean, layer.rstd = torch.native_layer_norm(
            u, [u.shape[-1]], None, None, LN_EPS
        )
        h = torch.addcmul(s.params[f"norm{i}.bias"], layer.xhat, s.params[f"norm{i}.weight"])
        return self._unnormed_where_off(h, u), layer

    def hidden_backward(self, d: Tensor, layer: Hidden, i: int) -> Tensor:
        """d at hidden layer i's output → d at its pre-activation (`d` may be overwritten).

        The layer's bias gradient, and its LayerNorm's, go into the stack's gradients.
        """
        if self.stack.layernorm:
            d = self._layernorm_backward(d, layer, i)
        if layer.mask is not None:
            d = d.mul_(layer.mask)  # d is this pass's own temporary
        d = ACT_BACKWARD[self.stack.act](d, layer.z, layer.a)
        torch.sum(d, 1, keepdim=True, out=self.stack.grads[f"linear{i}.bias"])
        return d

    def _unnormed_where_off(self, normed: Tensor, plain: Tensor) -> Tensor:
        """`normed`, with the rows of models without LayerNorm taken from `plain`."""
        if self.ln_mask is None:
            return normed
        if self.no_ln_runs is None:
            return torch.where(self.ln_mask, normed, plain)
        for a, b in self.no_ln_runs:
            normed[a:b] = plain[a:b]
        return normed

    def _layernorm_backward(self, d: Tensor, layer: Hidden, i: int) -> Tensor:
        """LayerNorm i's parameter gradients, and d through it (unchanged for models without)."""
        g = self.stack.grads
        torch.sum(d * layer.xhat, 1, keepdim=True, out=g[f"norm{i}.weight"])
        torch.sum(d, 1, keepdim=True, out=g[f"norm{i}.bias"])
        d_in = torch.ops.aten.native_layer_norm_backward(
            d * self.stack.params[f"norm{i}.weight"], layer.u, [d.shape[-1]], layer.mean,
            layer.rstd, None, None, [True, False, False],
        )[0]
        if self.ln_mask is None:
            return d_in
        # masked_fill, not a product: exact zeros even where a diverged model's d is NaN
        g[f"norm{i}.weight"].masked_fill_(~self.ln_mask, 0.0)
        g[f"norm{i}.bias"].masked_fill_(~self.ln_mask, 0.0)
        return self._unnormed_where_off(d_in, d)

    # --- loss, optimiser, step ----------------------------------------------------------------

    def loss(self, logits: Tensor, y: Tensor, books: dict[str, Tensor]) -> Tensor:
        """d loss/d logits; the step's loss and accuracy summed, divergence marked and frozen.

        `books` holds (N,) tensors updated in place: loss_sum, acc_sum, last_loss (this step's
        loss), frozen (1 from a model's first NaN/inf loss on) and diverged_at (that step).
        """
        loss, accuracy, dlogits = cross_entropy(logits, y, self.smoothing)
        frozen, diverged_at = books["frozen"], books["diverged_at"]
        bad = ~torch.isfinite(loss)
        step = (self.stack.adam_step + 1).to(diverged_at.dtype)  # this step's number
        diverged_at.copy_(torch.where(bad & (frozen == 0), step, diverged_at))
        torch.maximum(frozen, bad.to(frozen.dtype), out=frozen)
        books["loss_sum"].add_(loss)
        books["acc_sum"].add_(accuracy)
        books["last_loss"].copy_(loss)
        return dlogits

    def adam(self, frozen: Tensor) -> None:
        """Each model's Adam step (the stack's step count already advanced), except frozen ones."""
        s, step = self.stack, self.stack.adam_step
        if self.now is not None:
            at = (step - 1).clamp(0, s.steps - 1).to(torch.int64).view(1)
            torch.index_select(s.rates, 1, at, out=self.now)
        for k, c in enumerate(s.configs):
            if c.lr_schedule == "onecycle":
                self.cycled_adam(k, frozen[k])
                continue
            rows = self.adam_rows[k]
            fused, decay = torch._fused_adam_, c.weight_decay
            if c.decoupled_decay:  # AdamW, after any L2 term is added to the gradient
                if decay:
                    rows[1][0].add_(rows[0][0], alpha=decay)
                fused, decay = torch._fused_adamw_, c.decoupled_decay
            fused(*rows, [], [step], lr=self.lr[k], beta1=c.betas[0], beta2=c.betas[1],
                  weight_decay=decay, eps=c.eps, amsgrad=False, maximize=False,
                  found_inf=frozen[k])

    def cycled_adam(self, k: int, frozen: Tensor) -> None:
        """Model k's Adam step with this step's beta1 (one-cycle's), in PyTorch operations.

        torch.optim.Adam's (and AdamW's) update, with every step-dependent number a tensor.
        A frozen model's coefficients are zero and its gradient is masked, so its parameters
        and moments keep their exact values even where its gradient is NaN.
        """
        c, step = self.stack.configs[k], self.stack.adam_step
        (p,), (g,), (m,), (v,) = self.adam_rows[k]
        lr, beta1 = self.now[k, 0]
        live = 1 - frozen
        if c.weight_decay:
            g = g.add(p, alpha=c.weight_decay)
        g = g.masked_fill(frozen.bool(), 0.0)
        if c.decoupled_decay:
            p.mul_(1 - lr * c.decoupled_decay * live)
        m.lerp_(g, (1 - beta1) * live)
        v.lerp_(g * g, (1 - c.betas[1]) * live)
        # The bias corrections in float64, as PyTorch computes them (1 - 0.999 is 1e-3 to 1e-5
        # only in float32), applied to float32 tensors.
        t = step.to(torch.float64)
        correction2 = torch.sqrt(1 - torch.pow(c.betas[1], t))
        denom = v.sqrt().div_(correction2).add_(c.eps)
        p.addcmul_(m / denom, -lr * live / (1 - torch.pow(beta1.to(torch.float64), t)))

    def step_runner(self, body: Callable[..., None]) -> Callable[..., None]:
        """`body(*inputs)` as a training step runs: replayed as a CUDA graph where the stack's
        arithmetic says so, with the generators it draws from registered; else `body`."""
        if not self.stack.arithmetic.cuda_graphs:
            return body
        return GraphedStep(body, self.graph_generators)


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """The [start, stop) ranges where `flags` is true."""
    edges = [k for k in range(len(flags) + 1)
             if (k < len(flags) and flags[k]) != (k > 0 and flags[k - 1])]
    return list(zip(edges[::2], edges[1::2], strict=True))


def cross_entropy(logits: Tensor, y: Tensor, smoothing: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Per model mean loss (N,), accuracy (N,), and d(sum of the N losses)/d logits.

    With `smoothing` (N, 1, 1), model k's gradient is that of
    CrossEntropyLoss(label_smoothing=smoothing[k]); the loss stays the plain cross-entropy.
    """
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, y.unsqueeze(-1))
    loss = picked.mean((1, 2)).neg()
    accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean(1)
    batch, classes = y.shape[1], logits.shape[-1]
    grad = logp.exp_().scatter_(-1, y.unsqueeze(-1), picked.exp() - 1).mul_(1.0 / batch)
    if smoothing is not None:  # the target is (1 - ε) one-hot + ε / C: add ε (one-hot - 1/C)
        spread = torch.full_like(grad, -1.0 / classes).scatter_(-1, y.unsqueeze(-1),
                                                                 1.0 - 1.0 / classes)
        grad.add_(spread.mul_(smoothing / batch))
    return loss, accuracy, grad
