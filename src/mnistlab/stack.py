"""N MLPs of one layer shape trained as one: stacked weights, a hand-written backward pass, Adam.

Why by hand: on a small CPU the cost of this model is a handful of small matrix products per
step; autograd's bookkeeping and per-parameter optimiser loops are a visible share of it. Here a
layer of all N models is one `torch.baddbmm` on weights shaped (N, in, out), the backward pass
calls PyTorch's own backward kernels (threshold/gelu/tanh, layer norm) on whole stacks, and Adam
is PyTorch's fused kernel, one call per model so each model keeps its own hyperparameters and can
be frozen (`found_inf`) without touching the others.

Models share hidden sizes, activation and dropout placement (`RunConfig.architecture`); learning
rate, Adam settings, dropout p and LayerNorm on/off are per model. In a stack mixing models with
and without LayerNorm, LayerNorm is computed for the whole stack and selected per model; a model
without it holds unused identity LayerNorm parameters that get zero gradients, stay outside its
Adam step (so weight decay never moves them) and are never exported.

Every operation acts on each model's slice independently, so model k computes bit for bit the
same numbers whatever the other models are and however many threads run (checked by the tests;
see `product` for the one case where that takes care).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType

import torch
from torch import Tensor

from mnistlab.config import RunConfig, to_dict
from mnistlab.model import build_mlp, stack_models

LN_EPS = 1e-5  # nn.LayerNorm's default, which build_mlp uses
_ACT_BACKWARD = {
    "relu": lambda grad, z, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "gelu": lambda grad, z, a: torch.ops.aten.gelu_backward(grad, z),
    "tanh": lambda grad, z, a: torch.ops.aten.tanh_backward(grad, a),
}
_ACT = {"relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}


def fused_kernels(device: torch.device) -> ModuleType | None:
    """mnistlab.kernels where a stack on `device` should use them, else None.

    CUDA only, and only where Triton imports (a missing or broken Triton means PyTorch ops);
    MNISTLAB_TRITON=0 switches them off. Imported here, lazily: CPU runs never load Triton.
    """
    if device.type != "cuda" or os.environ.get("MNISTLAB_TRITON", "1") == "0":
        return None
    try:
        from mnistlab import kernels
    except ImportError:
        return None
    return kernels


def derived_seed(*parts: object) -> int:
    """A stable 63-bit seed from JSON-able parts: independent streams for independent purposes."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def dropout_seed(config: RunConfig, seed: int) -> int:
    """A model's dropout stream: its seed and hyperparameters, not its name or stack position."""
    return derived_seed("dropout", seed, {**to_dict(config), "name": None})


@dataclass
class _Hidden:
    """What the backward pass needs from one hidden layer."""

    x: Tensor  # the layer's input
    z: Tensor  # pre-activation
    a: Tensor  # activation
    mask: Tensor | None  # dropout scale: 0 or 1/(1-p)
    u: Tensor  # LayerNorm input (the activation after dropout)
    xhat: Tensor | None = None
    mean: Tensor | None = None
    rstd: Tensor | None = None


class Stack:
    """The parameters, Adam moments and dropout generators of N models; one training step."""

    def __init__(
        self, configs: Sequence[RunConfig], seeds: Sequence[int], weights: dict[str, Tensor],
        device: torch.device,
    ):
        self.configs, self.seeds, self.device = list(configs), list(seeds), device
        self.n = len(self.configs)
        arch = configs[0]
        self.depth, self.act = len(arch.hidden), arch.activation
        has_ln = [c.layernorm for c in configs]
        self.layernorm = any(has_ln)
        # (N, 1, 1) selector where LayerNorm is on for some models only; None when all or none.
        mixed = self.layernorm and not all(has_ln)
        self.ln_mask = torch.tensor(has_ln, device=device).view(-1, 1, 1) if mixed else None
        # The same as [a, b) slices: copying those rows is cheaper than a `where` over all.
        self.no_ln_runs = _runs([not ln for ln in has_ln]) if mixed else []
        # Each model's parameters fill one row of a flat (N, P) tensor, so Adam is one fused call
        # per model; the named tensors are views of it (offsets aligned to 64 bytes). LayerNorm
        # parameters come last, so a model without LayerNorm steps only the prefix before them.
        offsets, size = {}, 0
        for key in sorted(weights, key=lambda key: key.startswith("norm")):
            offsets[key] = size
            size += -(-weights[key][0].numel() // 16) * 16
        no_norm = min([o for key, o in offsets.items() if key.startswith("norm")], default=size)
        self.adam_span = [size if ln else no_norm for ln in has_ln]
        self.flat = {kind: torch.zeros(self.n, size, device=device) for kind in (*_KINDS, "grad")}

        self.layout = {key: (o, weights[key].shape) for key, o in offsets.items()}
        self.named = {kind: self._views(self.flat[kind]) for kind in _KINDS}
        self.params, self.grads = self.named["param"], self._views(self.flat["grad"])
        for key, v in weights.items():
            self.params[key].copy_(v)
        self.adam_step = torch.zeros((), device=device)
        # Each model's Adam operands, sliced once: per-step slicing is dispatcher time on a CPU.
        self.adam_rows = [[[self.flat[kind][k, :span]] for kind in ("param", "grad", *_KINDS[1:])]
                          for k, span in enumerate(self.adam_span)]
        p = torch.tensor([c.dropout for c in configs], device=device).view(-1, 1, 1)
        self.drop_p, self.keep_scale = p, 1.0 / (1.0 - p)
        any_dropout = any(c.dropout > 0 for c in configs)
        self.dropout_layers = set(i - 1 for i in arch.dropout_after) if any_dropout else set()
        seeds_ = [dropout_seed(c, s) for c, s in zip(configs, seeds, strict=True)]
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds_]
        # On CUDA, one Triton launch each for Adam and dropout instead of one per model.
        self.kernels = fused_kernels(device)
        self.fused = self.kernels is not None
        self.fused_layers = self.fused and self.act == "relu"  # hidden layers in one launch each
        if self.fused:
            self.hyper = torch.tensor([[c.lr, *c.betas, c.eps, c.weight_decay] for c in configs],
                                      device=device)
            self.span = torch.tensor(self.adam_span, dtype=torch.int32, device=device)
            self.dropout_seeds = torch.tensor(seeds_, dtype=torch.int64, device=device)
            self.layernorm_on = torch.tensor(has_ln, dtype=torch.int32, device=device)

    @classmethod
    def initial(
        cls, configs: Sequence[RunConfig], seeds: Sequence[int], input_dim: int, n_classes: int,
        device: torch.device,
    ) -> Stack:
        """Model k starts as `build_mlp(configs[k])` built right after `torch.manual_seed(seed)`."""
        models = []
        for config, seed in zip(configs, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(build_mlp(config, input_dim, n_classes))
        return cls(configs, seeds, stack_models(models), device)

    # --- forward / backward -------------------------------------------------------------------

    def _dropout(self, a: Tensor) -> tuple[Tensor, Tensor]:
        """(a · mask, mask): inverted-dropout scales drawn per model (ones where p = 0)."""
        if self.fused:
            return self.kernels.dropout(a, self.dropout_seeds, self.drop_p.view(-1), self.adam_step)
        mask = torch.ones_like(a)
        for k, gen in enumerate(self.generators):
            if self.configs[k].dropout > 0:
                mask[k].uniform_(generator=gen)
        mask.ge_(self.drop_p).mul_(self.keep_scale)  # in place: 1.0/0.0, then the scale
        return a * mask, mask

    def _unnormed_where_off(self, normed: Tensor, plain: Tensor) -> Tensor:
        """`normed`, with the rows of models without LayerNorm taken from `plain`.

        Copying [a, b) row ranges is cheapest on a CPU; on a GPU each copy is a launch, so one
        `where` does them all. Either way a selection: the same bits.
        """
        if self.ln_mask is None:
            return normed
        if self.device.type != "cpu":
            return torch.where(self.ln_mask, normed, plain)
        for a, b in self.no_ln_runs:
            normed[a:b] = plain[a:b]
        return normed

    def forward(self, x: Tensor, train: bool = False) -> tuple[Tensor, list[_Hidden]]:
        """Logits (N, B, classes) for input (N, B, in); with `train`, dropout and the cache."""
        p, hidden, h = self.params, [], x
        for i in range(self.depth):
            z = product(h, p[f"linear{i}.weight"], p[f"linear{i}.bias"])
            if self.fused_layers:
                layer = self._fused_hidden_forward(h, z, i, train)
                hidden.append(layer)
                h = layer.u
                continue
            a = _ACT[self.act](z)
            u, mask = self._dropout(a) if train and i in self.dropout_layers else (a, None)
            layer = _Hidden(h, z, a, mask, u)
            h = u
            if self.layernorm:
                layer.xhat, layer.mean, layer.rstd = torch.native_layer_norm(
                    u, [h.shape[-1]], None, None, LN_EPS
                )
                h = torch.addcmul(p[f"norm{i}.bias"], layer.xhat, p[f"norm{i}.weight"])
                h = self._unnormed_where_off(h, u)
            hidden.append(layer)
        logits = product(h, p[f"linear{self.depth}.weight"], p[f"linear{self.depth}.bias"])
        hidden.append(_Hidden(h, logits, logits, None, logits))
        return logits, hidden

    def backward(self, dlogits: Tensor, hidden: list[_Hidden]) -> None:
        """Gradients of the summed per-model losses into `self.grads`, given d loss / d logits."""
        if self.fused_layers:
            return self._fused_backward(dlogits, hidden)
        p, g, d = self.params, self.grads, dlogits
        for i in range(self.depth, -1, -1):
            product(hidden[i].x.transpose(1, 2), d, out=g[f"linear{i}.weight"])
            torch.sum(d, 1, keepdim=True, out=g[f"linear{i}.bias"])
            if i == 0:
                return
            d = product(d, p[f"linear{i}.weight"].transpose(1, 2))
            layer = hidden[i - 1]
            if self.layernorm:
                d = self._layernorm_backward(d, layer, i - 1)
            if layer.mask is not None:
                d = d.mul_(layer.mask)  # d is this pass's own temporary
            d = _ACT_BACKWARD[self.act](d, layer.z, layer.a)

    def _fused_hidden_forward(self, x: Tensor, z: Tensor, i: int, train: bool) -> _Hidden:
        """ReLU, dropout (training) and LayerNorm of hidden layer i in one Triton launch.

        The cache holds z as the activation (ReLU's gradient gate z > 0 is the same as a > 0)
        and the layer's output as `u`; the fused backward needs no more.
        """
        norm = dropout = None
        if self.layernorm:
            norm = (self.params[f"norm{i}.weight"], self.params[f"norm{i}.bias"],
                    self.layernorm_on)
        if train and i in self.dropout_layers:
            dropout = (self.dropout_seeds, self.drop_p.view(-1), self.adam_step)
        out, scale, xhat, rstd = self.kernels.hidden_forward(z, norm, dropout, LN_EPS, train)
        return _Hidden(x, z, z, scale, out, xhat, None, rstd)

    def _fused_backward(self, dlogits: Tensor, hidden: list[_Hidden]) -> None:
        """`backward` with each hidden layer's LayerNorm, dropout, ReLU and bias sums fused."""
        p, g, d, top = self.params, self.grads, dlogits, self.depth
        torch.sum(d, 1, keepdim=True, out=g[f"linear{top}.bias"])
        for i in range(top, -1, -1):
            product(hidden[i].x.transpose(1, 2), d, out=g[f"linear{i}.weight"])
            if i == 0:
                return
            d = product(d, p[f"linear{i}.weight"].transpose(1, 2))
            layer, weight, grads = hidden[i - 1], None, None
            if self.layernorm:
                weight = self.params[f"norm{i - 1}.weight"]
                grads = g[f"norm{i - 1}.weight"], g[f"norm{i - 1}.bias"]
            d = self.kernels.hidden_backward(d, layer.xhat, layer.rstd, weight, self.layernorm_on,
                                        layer.mask, layer.a, grads, g[f"linear{i - 1}.bias"])

    def _layernorm_backward(self, d: Tensor, layer: _Hidden, i: int) -> Tensor:
        """LayerNorm i's parameter gradients, and d through it (unchanged for models without)."""
        g = self.grads
        torch.sum(d * layer.xhat, 1, keepdim=True, out=g[f"norm{i}.weight"])
        torch.sum(d, 1, keepdim=True, out=g[f"norm{i}.bias"])
        d_in = torch.ops.aten.native_layer_norm_backward(
            d * self.params[f"norm{i}.weight"], layer.u, [d.shape[-1]], layer.mean, layer.rstd,
            None, None, [True, False, False],
        )[0]
        if self.ln_mask is None:
            return d_in
        # masked_fill, not a product: exact zeros even where a diverged model's d is NaN
        g[f"norm{i}.weight"].masked_fill_(~self.ln_mask, 0.0)
        g[f"norm{i}.bias"].masked_fill_(~self.ln_mask, 0.0)
        return self._unnormed_where_off(d_in, d)

    # --- optimiser ----------------------------------------------------------------------------

    def adam(self, frozen: Tensor) -> None:
        """A torch.optim.Adam step (L2 weight decay) for each model, except where frozen[k] = 1.

        Only a model's own parameters are stepped: not the unused LayerNorm ones of a model
        without LayerNorm, which weight decay would otherwise move.
        """
        self.adam_step += 1
        if self.fused:
            self.kernels.adam_(self.flat, self.hyper, self.span, frozen, self.adam_step)
            return
        for k, c in enumerate(self.configs):
            torch._fused_adam_(
                *self.adam_rows[k], [], [self.adam_step], lr=c.lr, beta1=c.betas[0],
                beta2=c.betas[1], weight_decay=c.weight_decay, eps=c.eps, amsgrad=False,
                maximize=False, found_inf=frozen[k],
            )

    # --- state --------------------------------------------------------------------------------

    def _views(self, flat: Tensor) -> dict[str, Tensor]:
        """The named tensors inside a flat (N, P) tensor."""
        return {key: flat[:, o : o + shape[1:].numel()].view(shape)
                for key, (o, shape) in self.layout.items()}

    def state(self, host_copy: bool = False) -> dict[str, Tensor]:
        """Weights, Adam moments and dropout generator states, as named tensors.

        With `host_copy`: views into one CPU copy per flat tensor (one transfer each, not one
        per name), which later changes to the stack do not touch.
        """
        named = self.named
        if host_copy:
            named = {kind: self._views(self.flat[kind].to("cpu", copy=True)) for kind in _KINDS}
        out = {f"{kind}.{key}": v for kind, views in named.items() for key, v in views.items()}
        out.update({f"dropout_rng.{k}": g.get_state() for k, g in enumerate(self.generators)})
        return out

    def load_state(self, tensors: dict[str, Tensor], step: int) -> None:
        """Inverse of `state`; KeyError or a shape mismatch means a damaged state file."""
        for name, v in self.state().items():
            source = tensors[name]
            if source.shape != v.shape:
                raise KeyError(f"{name} has shape {tuple(source.shape)}")
            if name.startswith("dropout_rng."):
                self.generators[int(name.split(".")[1])].set_state(source)
            else:
                v.copy_(source)
        self.adam_step.fill_(float(step))


_KINDS = ("param", "exp_avg", "exp_avg_sq")


def _runs(flags: Sequence[bool]) -> list[tuple[int, int]]:
    """The [start, stop) ranges where `flags` is true."""
    edges = [k for k in range(len(flags) + 1)
             if (k < len(flags) and flags[k]) != (k > 0 and flags[k - 1])]
    return list(zip(edges[::2], edges[1::2], strict=True))


def product(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """a @ b [+ bias] per model, (N, R, K) × (N, K, M): the same bits for any N and thread count.

    A batched product of two or more models computes each model's product on one thread. A lone
    model's product would be split across threads in another summation order on some CPUs (MKL
    on AVX-512), so on a CPU its rows are cut into two halves multiplied as a batch of two: each
    half on one thread, the one-thread bits at nearly the two-thread speed. Rows are independent
    dot products, so the cut changes no bit (checked by the N-invariance tests).
    """
    rows = a.shape[1]
    if a.shape[0] > 1 or a.device.type != "cpu":
        return _batched(a, b, bias, out)
    if rows % 2:
        with _one_thread():
            return _batched(a, b, bias, out)
    halves = lambda t: t[0].view(2, rows // 2, t.shape[-1])  # noqa: E731
    both = lambda t: None if t is None else t.expand(2, -1, -1)  # noqa: E731
    result = _batched(halves(a), both(b), both(bias), None if out is None else halves(out))
    return result.view(1, rows, -1) if out is None else out


def _batched(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if bias is not None:
        return torch.baddbmm(bias, a, b)
    return torch.bmm(a, b, out=out)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def cross_entropy(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per model mean loss (N,), accuracy (N,), and d(sum of the N losses)/d logits."""
    logp = torch.log_softmax(logits, -1)
    picked = logp.gather(-1, y.unsqueeze(-1))
    loss = picked.mean((1, 2)).neg()
    accuracy = (logits.argmax(-1) == y).to(logits.dtype).mean(1)
    grad = logp.exp_().scatter_(-1, y.unsqueeze(-1), picked.exp() - 1).mul_(1.0 / y.shape[1])
    return loss, accuracy, grad

