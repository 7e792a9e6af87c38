"""Any small torch.nn.Module as a stack: N copies trained at once with torch.func.

The N copies' parameters and buffers are stacked (`torch.func.stack_module_state`), and one
`torch.func.vmap` of `functional_call` under `torch.func.grad_and_value` computes every model's
loss and gradients at once. A model is what its factory returns (mnistlab.modules), built right
after `torch.manual_seed(seed)` (as the MLP is): it takes a batch of images (B, 1, H, W), pixels
normalised as `RunConfig.input_norm` says, and returns logits (B, classes). Per model and
independent of its stack neighbours:
- its Adam (or AdamW) state and hyperparameters: learning rate and beta1 from its schedule's
  table, beta2, eps, L2 and decoupled weight decay, label smoothing;
- its dropout: each nn.Dropout (and Dropout1d/2d/3d) is swapped for a layer whose mask comes in
  from outside, drawn for each model from its own generator (seeded by `seeds.dropout_seed`, its
  seed and hyperparameters). vmap's own `randomness="different"` draws all models' masks from one
  stream, so a model's masks would depend on its place in the stack; any other random operation
  in a forward pass is refused (vmap's randomness="error").
- its buffers (BatchNorm's running statistics), updated in place by its own forward pass.
Numbers: model k computes the same bits whatever its neighbours are. PyTorch runs a stack's
convolutions as one grouped convolution, each model's group on its own; a lone model's would be
an ungrouped one, with other kernels and other last bits (which Adam then amplifies), so a lone
model trains beside a twin: a copy of itself whose results are dropped. On a CPU the bits
depend on the number of threads, as a plain nn.Module's do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from mnistlab.engine import schedules
from mnistlab.engine.records import EVAL_CHUNK, Member
from mnistlab.engine.seeds import dropout_seed
from mnistlab.errors import MnistlabError
from mnistlab.model import InputSpec
from mnistlab.modules import build, probe

EVAL_FLOATS = 4 << 20  # activations per model of one evaluation block (its rows follow)


def eval_rows(activations: int) -> int:
    """Rows per evaluation pass of a model with `activations` per image: the largest power of
    two whose block holds at most EVAL_FLOATS activations, but at least 64 and at most
    EVAL_CHUNK."""
    rows = 1 << max(6, int(math.log2(max(1, EVAL_FLOATS // max(1, activations)))))
    return min(rows, EVAL_CHUNK)


class _Masked(nn.Module):
    """A Dropout whose mask (already scaled by 1 / (1 - p)) comes in as a buffer of
    functional_call, so each model draws its own from its own generator."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", None, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.mask if self.training else x


@dataclass(frozen=True)
class _EvalSettings:
    """How `records.evaluate` scores this stack: float64 sums, `eval_block` rows a pass."""

    eval_dtype: torch.dtype
    eval_block: int


class ModuleStack:
    """N copies of one module: stacked parameters and buffers, Adam moments, dropout generators.

    `n`, `forward` and `backend` are what `records.evaluate` asks of a stack, so validation and
    test passes score a general stack exactly as they score an MLP one.
    """

    def __init__(self, members: Sequence[Member], inputs: InputSpec, device: torch.device,
                 steps: int):
        self.n, self.shape, self.device = len(members), tuple(inputs.shape), device
        self.width = max(2, self.n)  # a lone model's twin: see the module docstring
        members = [*members, *[members[0]] * (self.width - self.n)]
        configs = [m.config for m in members]
        modules = []
        for m in members:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(m.seed)
                modules.append(build(m.config.model, inputs))
        params, buffers = stack_module_state(modules)
        self.probe = probe(modules[0], configs[0].model, inputs)
        self.params = {k: v.detach().to(device).contiguous() for k, v in params.items()}
        self.buffers = {k: v.detach().to(device).contiguous() for k, v in buffers.items()}
        self.exp_avg = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.exp_avg_sq = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.template = self._template(modules[0])
        self.generators = [torch.Generator(device=device).manual_seed(dropout_seed(c, m.seed))
                           for c, m in zip(configs[: self.n], members[: self.n], strict=True)]
        column = lambda values: torch.tensor(values, device=device)  # noqa: E731
        self.beta2 = column([c.betas[1] for c in configs])
        self.eps = column([c.eps for c in configs])
        self.l2 = column([c.weight_decay for c in configs])
        self.decay = column([c.decoupled_decay for c in configs])
        self.smoothing = column([c.label_smoothing for c in configs])
        self.rates = schedules.table(configs, steps, device)  # (N, steps, 2): lr, beta1
        self.backend = _EvalSettings(torch.float64, eval_rows(self.probe.activations))
        self._step = vmap(grad_and_value(self._loss, has_aux=True), randomness="error")
        self._logits = vmap(self._forward, in_dims=(0, 0, None), randomness="error")

    def _template(self, module: nn.Module) -> nn.Module:
        """The module functional_call runs, its tensors on the meta device (every call passes
        the stack's), each Dropout with p > 0 swapped for a `_Masked`."""
        template = module.to("meta")
        for name in self.probe.dropouts:
            parent, _, child = name.rpartition(".")
            template.get_submodule(parent).register_module(child, _Masked())
        return template

    def _forward(self, params: dict, buffers: dict, x: Tensor) -> Tensor:
        return functional_call(self.template, (params, buffers), (x.unflatten(-1, (1,
                                                                                  *self.shape)),))

    def _loss(self, params: dict, buffers: dict, x: Tensor, y: Tensor,
              smoothing: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """One model's training loss (label-smoothed as torch's CrossEntropyLoss), with its
        plain cross-entropy and accuracy (what the records hold)."""
        logits = self._forward(params, buffers, x)
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(-1, y.unsqueeze(-1)).mean()
        loss = (1 - smoothing) * nll - smoothing * logp.mean()
        return loss, (nll.detach(), (logits.argmax(-1) == y).to(logits.dtype).mean())

    def forward(self, x: Tensor, train: bool = False) -> tuple[Tensor, None]:
        """Logits (N, B, classes) of each model for its rows of `x` (N, B, H*W), in eval mode
        (records.evaluate's interface; its N rows of `x` are one batch, expanded)."""
        self.template.eval()
        return self._logits(self.params, self.buffers, x[0])[: self.n], None

    def _padded(self, t: Tensor) -> Tensor:
        """Per-model rows `t` (n, ...) with the twin's row (model 0's) where there is one."""
        if self.width == self.n:
            return t
        return torch.cat([t, t[:1].expand(self.width - self.n, *t.shape[1:])])

    def masks(self, batch: int) -> dict[str, Tensor]:
        """This step's dropout masks, each model's from its own generator."""
        out = {}
        for name, (p, shape) in self.probe.dropouts.items():
            out[f"{name}.mask"] = torch.stack([
                torch.empty(batch, *shape, device=self.device).bernoulli_(1 - p, generator=g)
                for g in self.generators]).div_(1 - p)
        return {k: self._padded(v) for k, v in out.items()}

    def train_step(self, x: Tensor, y: Tensor, step: int, frozen: Tensor) -> tuple[Tensor,
                                                                                   Tensor]:
        """One training step of every model on its rows of `x` (N, B, H*W) and `y` (N, B):
        gradients, Adam, and back to the old values where a model is frozen (its loss NaN now,
        or frozen before). Returns each model's plain loss and accuracy."""
        self.template.train()
        old = {k: v.clone() for k, v in self.buffers.items()}
        x, y, frozen = self._padded(x), self._padded(y), self._padded(frozen)
        try:
            grads, (_, (loss, accuracy)) = self._step(
                self.params, {**self.buffers, **self.masks(x.shape[1])}, x, y, self.smoothing)
        except RuntimeError as exc:
            if "randomness" not in str(exc):
                raise
            raise MnistlabError(
                "a model's forward pass draws random numbers outside nn.Dropout layers (e.g. "
                "F.dropout); use nn.Dropout modules, whose masks mnistlab draws per model"
            ) from None
        frozen = torch.maximum(frozen, (~torch.isfinite(loss)).to(frozen.dtype))
        self.adam(grads, step, frozen)
        for k, v in self.buffers.items():
            v.copy_(torch.where(_column(frozen > 0, v), old[k], v))
        return loss[: self.n], accuracy[: self.n]

    def adam(self, grads: dict[str, Tensor], step: int, frozen: Tensor) -> None:
        """torch.optim.Adam's update (AdamW's decoupled decay where set) of each model not
        frozen, with its own hyperparameters and this step's learning rate and beta1; the bias
        corrections in float64, as PyTorch computes them."""
        lr, beta1 = self.rates[:, step - 1].unbind(-1)
        correction1 = 1 - beta1.to(torch.float64) ** step
        correction2 = torch.sqrt(1 - self.beta2.to(torch.float64) ** step).to(torch.float32)
        step_size = (lr.to(torch.float64) / correction1).to(torch.float32)
        shrink = 1 - lr * self.decay
        for name, p in self.params.items():
            c = lambda v, p=p: _column(v, p)  # noqa: E731
            g = grads[name] + c(self.l2) * p
            m = self.exp_avg[name].lerp(g, c(1 - beta1))
            v = self.exp_avg_sq[name] * c(self.beta2) + g * g * c(1 - self.beta2)
            new = p * c(shrink) - c(step_size) * (m / (v.sqrt() / c(correction2) + c(self.eps)))
            keep = c(frozen > 0)
            self.exp_avg[name].copy_(torch.where(keep, self.exp_avg[name], m))
            self.exp_avg_sq[name].copy_(torch.where(keep, self.exp_avg_sq[name], v))
            p.copy_(torch.where(keep, p, new))

    def state(self, host_copy: bool = False) -> dict[str, Tensor]:
        """Parameters, buffers, Adam moments and dropout generator states, named (views of the
        stack's, the twin's left out: it follows model 0 again after `load_state`)."""
        named = {f"{kind}.{k}": v[: self.n] for kind, group in (
            ("param", self.params), ("buffer", self.buffers), ("exp_avg", self.exp_avg),
            ("exp_avg_sq", self.exp_avg_sq)) for k, v in group.items()}
        if host_copy:
            named = {k: v.to("cpu", copy=True) for k, v in named.items()}
        named.update({f"dropout_rng.{k}": g.get_state() for k, g in enumerate(self.generators)})
        return named

    def load_state(self, tensors: dict[str, Tensor]) -> None:
        for name, v in self.state().items():
            if name.startswith("dropout_rng."):
                self.generators[int(name.split(".")[1])].set_state(tensors[name])
            else:
                v.copy_(tensors[name])
        for group in (self.params, self.buffers, self.exp_avg, self.exp_avg_sq):
            for v in group.values():
                v[self.n :] = v[:1]

    def weights(self) -> dict[str, Tensor]:
        return {k: v[: self.n].cpu() for k, v in {**self.params, **self.buffers}.items()}


def _column(values: Tensor, like: Tensor) -> Tensor:
    """(N,) per-model values shaped to broadcast over a stacked (N, ...) tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))
