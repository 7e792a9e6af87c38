"""How a stack computes, chosen once when it is built: PyTorch operators, or fused kernels.

Why an object: the ways differ in everything between the matrix products (a hidden layer's
activation, dropout and LayerNorm and their gradients), in the loss and its books, in Adam, in
how a step is run and in how evaluation is cut into blocks. `choose` picks one per stack and the
stack holds it (`Stack.backend`), so neither the stack nor the engine asks which one it has.

- `TorchOps`, PyTorch operators on every device: MPS's, the CPU's where the stack's arithmetic
  says so (MNISTLAB_CPU_FUSED=0, or no C++ compiler), and CUDA's where Triton is missing or
  switched off (MNISTLAB_TRITON=0). The backward pass calls PyTorch's own backward
  kernels (threshold/gelu/tanh, layer norm) on whole stacks; dropout draws from one generator
  per model; Adam is PyTorch's fused kernel (AdamW's where a model decays its weights
  decoupled), one call per model so each model keeps its own hyperparameters and can be frozen
  (`found_inf`) without touching the others. A scheduled learning rate is a tensor the kernel
  reads; one-cycle's per-step beta1, which the kernel takes only as a number, takes PyTorch
  operations (`cycled_adam`).
- `TritonKernels`, on CUDA (mnistlab.kernels, imported here lazily: CPU runs never load Triton):
  one launch each for Adam, dropout and the loss with its books instead of one per model or a
  dozen; a ReLU stack's hidden layers are one launch each too (`TritonLayers`), other
  activations keep `TorchOps`'s layer operations.
- `CpuKernels`, on the CPU by default (mnistlab.cpu_kernels: C++ compiled at first use, loaded
  lazily):
  Adam, the loss with its books, and each hidden layer's dropout and LayerNorm (and ReLU) with
  their gradients as one call each for the whole stack. Its dropout masks are counter-based,
  as the Triton kernels' are (another stream): a run's numbers depend on which CPU backend
  trained it, and each is bit-reproducible.

On CUDA either one's step is replayed as a CUDA graph (mnistlab.graphs) unless
MNISTLAB_CUDA_GRAPHS=0. Which of these a stack uses is its `Arithmetic` (mnistlab.arithmetic),
resolved once per run and recorded with it: nothing here reads the environment.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch
from torch import Tensor

from mnistlab import schedules
from mnistlab.arithmetic import Arithmetic
from mnistlab.config import RunConfig
from mnistlab.errors import MnistlabError
from mnistlab.graphs import GraphedStep

LN_EPS = 1e-5  # nn.LayerNorm's default, which build_mlp uses
CPU_EVAL_BLOCK = 1024  # rows per CPU forward pass: large GEMMs whose intermediates stay in cache
_ACT_BACKWARD = {
    "relu": lambda grad, z, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "gelu": lambda grad, z, a: torch.ops.aten.gelu_backward(grad, z),
    "tanh": lambda grad, z, a: torch.ops.aten.tanh_backward(grad, a),
}
_ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}


def triton_kernels(arithmetic: Arithmetic) -> ModuleType | None:
    """mnistlab.kernels where `arithmetic` asks for them (CUDA with Triton), else None.
    Imported here, lazily: CPU runs never load Triton."""
    if not arithmetic.triton:
        return None
    from mnistlab import kernels

    return kernels


class Stack(Protocol):
    """What a backend reads and updates of its stack (mnistlab.stack.Stack, which holds it)."""

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


def cpu_kernels(arithmetic: Arithmetic) -> ModuleType | None:
    """mnistlab.cpu_kernels where `arithmetic` asks for the fused CPU step, else None. Imported
    here, lazily, as the Triton kernels are; `arithmetic.honour` or `requested` has checked
    that they build here."""
    if arithmetic.cpu_step != "fused":
        return None
    from mnistlab import cpu_kernels as kernels

    if kernels.library() is None:
        raise MnistlabError("the fused CPU step was asked for and cannot be built here (see "
                            "the line above); install g++ or set MNISTLAB_CPU_FUSED=0")
    return kernels


def choose(stack: Stack) -> TorchOps:
    """The backend for `stack`, as its arithmetic says: the Triton kernels, the fused CPU
    kernels, else PyTorch operators."""
    kernels = triton_kernels(stack.arithmetic)
    if kernels is not None:
        return (TritonLayers if stack.act == "relu" else TritonKernels)(stack, kernels)
    kernels = cpu_kernels(stack.arithmetic)
    return TorchOps(stack) if kernels is None else CpuKernels(stack, kernels)


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

    def __init__(self, stack: Stack):
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
        a = _ACT[s.act](z)
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
        d = _ACT_BACKWARD[self.stack.act](d, layer.z, layer.a)
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


class TritonKernels(TorchOps):
    """Adam, dropout and the loss with its books as one Triton launch each for the whole stack.

    Their dropout masks are counter-based (keyed by each model's dropout seed and the step
    count), so a CUDA graph registers no generators.
    """

    def __init__(self, stack: Stack, kernels: ModuleType):
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


class CpuKernels(TorchOps):
    """A CPU stack's non-GEMM work in fused C++ calls (mnistlab.cpu_kernels): Adam for all
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

    def __init__(self, stack: Stack, kernels: ModuleType):
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
        a = z if self.relu else _ACT[s.act](z)
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
            d = _ACT_BACKWARD[s.act](d, layer.z, layer.a)
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
    rate, or one-cycle's learning rate and beta1 (mnistlab.cpu_kernels.ADAM_KINDS)."""
    if config.lr_schedule == "onecycle":
        return "onecycle"
    return "constant" if schedules.constant(config) else "scheduled"


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
