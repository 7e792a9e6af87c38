"""N MLPs of one layer shape trained as one: stacked weights, a hand-written backward pass, Adam.

Why by hand: on a small CPU the cost of this model is a handful of small matrix products per
step; autograd's bookkeeping and per-parameter optimiser loops are a visible share of it. Here a
layer of all N models is one `torch.baddbmm` on weights shaped (N, in, out), and the rest of a
step acts on whole stacks too.

The stack holds the state (each model's parameters and Adam moments as one row of flat (N, P)
tensors, with named views; the dropout generators; the step count) and the matrix products of
the forward and backward passes. Everything between those products (a hidden layer's activation,
dropout and LayerNorm, and their gradients), the loss, Adam and how a step is run belong to its
backend (mnistlab.engine.backends), chosen once when the stack is built: PyTorch operators, or
fused kernels (C++ on a CPU, Triton on CUDA).

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
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from mnistlab.config import RunConfig
from mnistlab.engine import schedules
from mnistlab.engine.backends import Hidden, choose
from mnistlab.engine.backends.arithmetic import Arithmetic, requested
from mnistlab.engine.seeds import dropout_seed
from mnistlab.model import build_mlp, stack_models


class MLPStack:
    """The parameters, Adam moments and dropout generators of N models, and their backend.

    `steps` is the length of the training run, which the learning-rate schedules span
    (engine.schedules; 1 for a stack that is not trained). `arithmetic` picks the backend
    (backends.arithmetic; by default what the environment asks for on `device`).
    """

    def __init__(
        self, configs: Sequence[RunConfig], seeds: Sequence[int], weights: dict[str, Tensor],
        device: torch.device, steps: int = 1, arithmetic: Arithmetic | None = None,
    ):
        self.configs, self.seeds, self.device = list(configs), list(seeds), device
        self.arithmetic = arithmetic or requested(device)
        self.n = len(self.configs)
        arch = configs[0]
        self.depth, self.act = len(arch.hidden), arch.activation
        has_ln = [c.layernorm for c in configs]
        self.layernorm = any(has_ln)
        # Each model's parameters fill one row of a flat (N, P) tensor, so Adam is one fused call
        # per model or one for all; the named tensors are views of it (offsets aligned to 64
        # bytes). LayerNorm parameters come last, so a model without LayerNorm steps only the
        # prefix before them (its span).
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
        self.adam_step = torch.zeros((), device=device)  # steps completed
        self.steps = steps
        self.rates = schedules.table(configs, steps, device)  # (N, steps, 2): lr, beta1
        any_dropout = any(c.dropout > 0 for c in configs)
        self.dropout_layers = set(i - 1 for i in arch.dropout_after) if any_dropout else set()
        self.dropout_seeds = [dropout_seed(c, s) for c, s in zip(configs, seeds, strict=True)]
        self.generators = [torch.Generator(device=device).manual_seed(s)
                           for s in self.dropout_seeds]
        self.backend = choose(self)

    @classmethod
    def initial(
        cls, configs: Sequence[RunConfig], seeds: Sequence[int], input_dim: int, n_classes: int,
        device: torch.device, steps: int = 1, arithmetic: Arithmetic | None = None,
    ) -> MLPStack:
        """Model k starts as `build_mlp(configs[k])` built right after `torch.manual_seed(seed)`."""
        models = []
        for config, seed in zip(configs, seeds, strict=True):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                models.append(build_mlp(config, input_dim, n_classes))
        return cls(configs, seeds, stack_models(models), device, steps, arithmetic)

    # --- forward / backward -------------------------------------------------------------------

    def forward(self, x: Tensor, train: bool = False) -> tuple[Tensor, list[Hidden] | None]:
        """Logits (N, B, classes) for input (N, B, in); with `train`, dropout and the layers'
        caches that `backward` needs (None without: evaluation keeps no layer alive)."""
        p, hidden, h = self.params, [], x
        for i in range(self.depth):
            z = product(h, p[f"linear{i}.weight"], p[f"linear{i}.bias"])
            h, layer = self.backend.hidden_forward(h, z, i, train)
            if train:
                hidden.append(layer)
        logits = product(h, p[f"linear{self.depth}.weight"], p[f"linear{self.depth}.bias"])
        if not train:
            return logits, None
        hidden.append(Hidden(h, logits, logits, None, logits))
        return logits, hidden

    def backward(self, dlogits: Tensor, hidden: list[Hidden]) -> None:
        """Gradients of the summed per-model losses into `self.grads`, given d loss / d logits.

        The matrix products are here; the rest of each hidden layer's backward (its activation,
        dropout and LayerNorm, its bias and LayerNorm gradients) is the backend's.
        """
        p, g, d, top = self.params, self.grads, dlogits, self.depth
        torch.sum(d, 1, keepdim=True, out=g[f"linear{top}.bias"])
        for i in range(top, -1, -1):
            product(hidden[i].x.transpose(1, 2), d, out=g[f"linear{i}.weight"])
            if i == 0:
                return
            d = product(d, p[f"linear{i}.weight"].transpose(1, 2))
            d = self.backend.hidden_backward(d, hidden[i - 1], i - 1)

    # --- optimiser ----------------------------------------------------------------------------

    def adam(self, frozen: Tensor) -> None:
        """A torch.optim.Adam step for each model, except where frozen[k] = 1: its L2 weight
        decay, its decoupled decay (torch.optim.AdamW's), its scheduled learning rate and beta1.

        Only a model's own parameters are stepped: not the unused LayerNorm ones of a model
        without LayerNorm, which weight decay would otherwise move.
        """
        self.adam_step += 1
        self.backend.adam(frozen)

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


SPLIT_WORK = 1 << 23  # multiply-adds per model above which a left-over model runs apart


def product(a: Tensor, b: Tensor, bias: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """a @ b [+ bias] per model, (N, R, K) × (N, K, M): the same bits for any N and thread count.

    A batched product of two or more models computes each model's product on one thread, so N
    models on T threads take ceil(N / T) rounds. Where one model is left over (N % T == 1: five
    models on two threads), it would run alone on one thread while the others wait, so on a CPU
    a large product's last model runs apart, as a lone model does (`_alone`): five models then
    cost 2.5 rounds, not 3 (layer 1 of the seed's MLP: -11 to -14 %; below SPLIT_WORK the
    second call costs more than it saves). A model's bits are the same either way (checked by
    the N-invariance tests).
    """
    n, work = a.shape[0], a.shape[1] * a.shape[2] * b.shape[2]
    left_over = n % torch.get_num_threads() == 1 and work >= SPLIT_WORK
    if a.device.type != "cpu" or (n > 1 and not left_over):
        return _batched(a, b, bias, out)
    if n == 1:
        return _alone(a, b, bias, out)
    if out is None:
        out = a.new_empty(n, a.shape[1], b.shape[-1])
    last = lambda t: None if t is None else t[-1:]  # noqa: E731
    rest = lambda t: None if t is None else t[:-1]  # noqa: E731
    _batched(rest(a), rest(b), rest(bias), rest(out))
    _alone(last(a), last(b), last(bias), last(out))
    return out


def _alone(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    """One model's product on a CPU. Split across threads by MKL it would sum in another order
    on some CPUs (MKL on AVX-512), so its rows are cut into two halves multiplied as a batch of
    two: each half on one thread, the one-thread bits at nearly the two-thread speed. Rows are
    independent dot products, so the cut changes no bit."""
    rows = a.shape[1]
    if rows % 2:
        with _one_thread():
            return _batched(a, b, bias, out)
    halves = lambda t: t[0].view(2, rows // 2, t.shape[-1])  # noqa: E731
    both = lambda t: None if t is None else t.expand(2, -1, -1)  # noqa: E731
    result = _batched(halves(a), both(b), both(bias), None if out is None else halves(out))
    return result.view(1, rows, -1) if out is None else out


def _batched(a: Tensor, b: Tensor, bias: Tensor | None, out: Tensor | None) -> Tensor:
    if bias is not None:
        return torch.baddbmm(bias, a, b, out=out)
    return torch.bmm(a, b, out=out)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

