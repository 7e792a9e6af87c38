"""Any small torch.nn.Module as a stack: N copies trained at once with torch.func.

The MLP has its own engine (mnistlab.engine: stacked matrix products, a hand-written backward
pass). Every other model — `lenet5`, or a factory the user names (`RunConfig.model`) — trains
here: the N copies' parameters and buffers are stacked (`torch.func.stack_module_state`), and one
`torch.func.vmap` of `functional_call` under `torch.func.grad_and_value` computes every model's
loss and gradients at once. The schedule is the MLP engine's, record for record: the same batches
(one permutation per seed and epoch), augmentation streams, learning-rate tables
(mnistlab.schedules), label smoothing, records, log lines, divergence freezing, early stopping and
best weights (mnistlab.stopping), resume states and the same `TrainResult`, so the pipeline, the
run directory, the statistics and the report take either engine's results alike.

A model is what its factory returns, built right after `torch.manual_seed(seed)` (as the MLP is):
it takes a batch of images (B, 1, H, W), pixels normalised as `RunConfig.input_norm` says, and
returns logits (B, classes). Per model and independent of its stack neighbours:
- its Adam (or AdamW) state and hyperparameters: learning rate and beta1 from its schedule's
  table, beta2, eps, L2 and decoupled weight decay, label smoothing;
- its dropout: each nn.Dropout (and Dropout1d/2d/3d) is swapped for a layer whose mask comes in
  from outside, drawn for each model from its own generator (seeded by `stack.dropout_seed`, its
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

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from mnistlab import augment, schedules
from mnistlab.arithmetic import Arithmetic, honour, requested
from mnistlab.config import RunConfig, Schedule, to_dict
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.engine import (
    EVAL_CHUNK,
    Member,
    Progress,
    RecordBooks,
    RecordEvent,
    TrainResult,
    _check_members,
    _digest,
    _set_matmul,
    _test_predictions,
    input_spec,
    resolve_device,
    run_schedule,
)
from mnistlab.errors import CheckpointError, ConfigError, MnistlabError
from mnistlab.model import Checkpoint, InputSpec, json_field, read_safetensors
from mnistlab.modules import build, on_images, probe
from mnistlab.stack import derived_seed, dropout_seed
from mnistlab.stopping import Monitor
from mnistlab.validation import validate

STATE_FORMAT = "mnistlab-module-state/1"
EVAL_FLOATS = 4 << 20  # activations per model of one evaluation block (its rows follow)


class ModuleResult(TrainResult):
    """A general stack's TrainResult: `weights` hold each parameter and buffer stacked."""

    def checkpoint(self, k: int) -> Checkpoint:
        """Member k as its factory's module (on flat pixel rows, see `on_images`)."""
        config = self.members[k].config
        with torch.random.fork_rng(devices=[]):
            net = build(config.model, self.inputs)
        state = net.state_dict()
        net.load_state_dict({name: self.weights[name][k] for name in state}, strict=True)
        return Checkpoint(on_images(net, self.inputs.shape), config, self.inputs,
                          self.members[k].seed, self.arithmetic.as_dict())


# --- the stack ----------------------------------------------------------------------------------


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
    """How `engine.evaluate` scores this stack: float64 sums, `eval_block` rows a pass."""

    eval_dtype: torch.dtype
    eval_block: int


class ModuleStack:
    """N copies of one module: stacked parameters and buffers, Adam moments, dropout generators.

    `forward` and `backend` are what `engine.evaluate` asks of a stack, so validation and test
    passes score a general stack exactly as they score an MLP one.
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
        rows = 1 << max(6, int(math.log2(max(1, EVAL_FLOATS // max(1, self.probe.activations)))))
        self.backend = _EvalSettings(torch.float64, min(rows, EVAL_CHUNK))
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
        (engine.evaluate's interface; its N rows of `x` are one batch, expanded)."""
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


# --- training -----------------------------------------------------------------------------------


class _Training(RecordBooks):
    """One train() call's mutable state: exactly what a resume state file holds."""

    def __init__(self, splits: Splits, members: list[Member], schedule: Schedule,
                 device: torch.device, spec: InputSpec, arithmetic: Arithmetic):
        self.members, self.schedule, self.device, self.spec = members, schedule, device, spec
        self.x, self.y = self.on_device(splits.train)
        self.val = self.on_device(splits.val)
        n, batch = len(self.x), schedule.batch_size
        self.steps_per_epoch = n // batch if schedule.drop_last else math.ceil(n / batch)
        if self.steps_per_epoch == 0 or len(self.val[0]) == 0:
            raise MnistlabError(
                f"{splits.train.origin}: {n} training / {len(self.val[0])} validation images are "
                f"too few for batch size {batch}; use more data or a smaller batch")
        self.total = self.steps_per_epoch * schedule.epochs
        self.seeds = list(dict.fromkeys(m.seed for m in members))
        self.order_rngs = [torch.Generator().manual_seed(derived_seed("order", s))
                           for s in self.seeds]
        self._sources()
        self.stack = ModuleStack(members, spec, device, self.total)
        configs = [m.config for m in members]
        self.monitor = Monitor(configs)
        restoring = any(c.restore_best for c in configs)
        self.best = ({k: v.clone() for k, v in self.stack.state().items()
                      if k.startswith(("param.", "buffer."))} if restoring else {})
        zeros = torch.zeros(len(members), device=device)
        self.frozen, self.loss_sum, self.acc_sum = zeros, zeros.clone(), zeros.clone()
        self.last_loss = zeros.clone()
        self.diverged_at = torch.zeros(len(members), dtype=torch.int64, device=device)
        self.perms: Tensor | None = None
        self.maps: Tensor | None = None
        self.step, self.since, self.seconds = 0, 0, 0.0
        self.rows: list[dict] = []
        self.fingerprint = json.loads(json.dumps({
            "members": [[to_dict(m.config), m.seed] for m in members],
            "schedule": to_dict(schedule),
            "data": _digest(splits.train.images, splits.train.labels, splits.val.images,
                            splits.val.labels),
            "device": device.type,
            "arithmetic": arithmetic.as_dict(),
        }))

    def on_device(self, part: Dataset) -> tuple[Tensor, Tensor]:
        labels = torch.as_tensor(part.labels)
        return self.spec.prepare(part.images).to(self.device), labels.to(self.device)

    def _sources(self) -> None:
        """Where each model's images come from: one source per seed and augmentation (the
        MLP engine's streams, so a model sees the same images in either engine)."""
        streams = [(m.seed, augment.settings(m.config)) for m in self.members]
        sources = list(dict.fromkeys(streams))
        self.source_seed = torch.tensor([self.seeds.index(s) for s, _ in sources])
        self.source_of = torch.tensor([sources.index(s) for s in streams], device=self.device)
        self.augmented = [j for j, (_, values) in enumerate(sources) if values is not None]
        self.augmenter = None
        if self.augmented:
            black = self.spec.prepare(np.zeros((1, *self.spec.shape), np.uint8))[0, 0].item()
            self.augmenter = augment.Augmenter([sources[j] for j in self.augmented],
                                               self.spec.shape, black, self.steps_per_epoch,
                                               self.schedule.batch_size, self.device)

    def _epoch_start(self) -> None:
        perms = [torch.randperm(len(self.x), generator=g) for g in self.order_rngs]
        self.perms = torch.stack(perms).to(self.device)
        self._draw_transforms()

    def _draw_transforms(self) -> None:
        if self.augmenter is not None:
            self.maps = self.augmenter.epoch(self.step // self.steps_per_epoch)

    def batch(self) -> tuple[Tensor, Tensor]:
        """This step's images (N, B, H*W) and labels (N, B): each model its source's."""
        i = self.step % self.steps_per_epoch
        if i == 0:
            self._epoch_start()
        assert self.perms is not None
        size = self.schedule.batch_size
        rows = self.perms[self.source_seed.to(self.device), i * size : (i + 1) * size]
        x = self.x[rows]
        if self.augmenter is not None and self.maps is not None:
            x[self.augmented] = self.augmenter.apply(x[self.augmented], self.maps[:, i])
        return x[self.source_of], self.y[rows][self.source_of]

    def train_step(self) -> None:
        x, y = self.batch()
        self.step += 1
        self.since += 1
        loss, accuracy = self.stack.train_step(x, y, self.step, self.frozen)
        bad = ~torch.isfinite(loss)
        self.diverged_at.copy_(torch.where(bad & (self.frozen == 0), self.step, self.diverged_at))
        torch.maximum(self.frozen, bad.to(self.frozen.dtype), out=self.frozen)
        self.loss_sum.add_(loss)
        self.acc_sum.add_(accuracy)
        self.last_loss.copy_(loss)

    def watch(self, accuracy: list[float]) -> None:
        """Best weights and early stopping after this record's validation `accuracy`."""
        keep, stop = self.monitor.update(self.step, accuracy, self.step == self.total)
        state = self.stack.state()
        for k in keep:
            for name, best in self.best.items():
                best[k].copy_(state[name][k])
        for k in stop:
            self.frozen[k] = 1.0

    def restore_best(self) -> None:
        state = self.stack.state()
        for k, step in enumerate(self.monitor.restored()):
            if step is not None:
                for name, best in self.best.items():
                    state[name][k].copy_(best[k])

    # --- resume state -------------------------------------------------------------------------

    def _books(self) -> dict[str, Tensor]:
        return {
            **{f"order_rng.{j}": g.get_state() for j, g in enumerate(self.order_rngs)},
            "frozen": self.frozen, "diverged_at": self.diverged_at,
            "loss_sum": self.loss_sum, "acc_sum": self.acc_sum,
            **{f"best.{k}": v for k, v in self.best.items()},
        }

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The state as CPU copies and metadata: training may go on while they are written."""
        books = {**self._books(), **({"perms": self.perms} if self.perms is not None else {})}
        books = {k: v.detach().to("cpu", copy=True) for k, v in books.items()}
        progress = {"step": self.step, "since": self.since, "seconds": self.seconds,
                    "rows": self.rows}
        meta = {"format": STATE_FORMAT, "fingerprint": json.dumps(self.fingerprint),
                "progress": json.dumps(progress)}
        return {**self.stack.state(host_copy=True), **books}, meta

    def load(self, path: Path) -> None:
        """Continue from the resume state at `path`; a state of another run, or one that is
        not what this run writes, is a one-line error."""
        fix = "pass the state file of this run, or start a new run without resuming"
        tensors, meta = read_safetensors(path, STATE_FORMAT, "resume state", fix, "resume state")
        try:
            saved = json_field(meta, "fingerprint")
            progress = validate(Progress, json_field(meta, "progress"), "progress")
        except (ConfigError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state metadata ({exc}); {fix}") from None
        for what, mine in self.fingerprint.items():
            if not isinstance(saved, dict) or saved.get(what) != mine:
                raise MnistlabError(
                    f"{path}: this resume state was written for other {what} than this run's; "
                    "resume with the same configurations, seeds, schedule, data, device and "
                    "arithmetic, or start a new run")
        try:
            self._restore(tensors, progress)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state ({exc}); {fix}") from None

    def _restore(self, tensors: dict[str, Tensor], progress: Progress) -> None:
        step, since = progress["step"], progress["since"]
        if step > self.total or since != (0 if step == self.total
                                          else step % self.schedule.record_every):
            raise ValueError(f"step {step} of {self.total} with {since} since the last record")
        members = {(m.config.name, m.seed) for m in self.members}
        if any((r["run"], r["seed"]) not in members or r["step"] > step for r in progress["rows"]):
            raise ValueError("records this run cannot have written")
        expected = {**self.stack.state(), **self._books()}
        if set(tensors) - {"perms"} != set(expected):
            raise ValueError("other tensors than this run's")
        for name, mine in expected.items():
            if tensors[name].dtype != mine.dtype or tensors[name].shape != mine.shape:
                raise ValueError(f"{name} is not {mine.dtype} {tuple(mine.shape)}")
        val = {(r["step"], r["run"], r["seed"]): r["accuracy"] for r in progress["rows"]
               if r["split"] == "val"}
        for record in sorted({s for s, _, _ in val}):
            accuracy = [val[record, m.config.name, m.seed] for m in self.members]
            self.monitor.update(record, accuracy, record == self.total)
        self.step, self.since = step, since
        self.seconds, self.rows = progress["seconds"], [dict(r) for r in progress["rows"]]
        self.stack.load_state(tensors)
        for j, g in enumerate(self.order_rngs):
            g.set_state(tensors[f"order_rng.{j}"])
        for name, tensor in self._books().items():
            if not name.startswith("order_rng."):
                tensor.copy_(tensors[name])
        if self.step % self.steps_per_epoch:
            perms = tensors["perms"]
            rows = torch.arange(len(self.x)).expand(len(self.seeds), -1)
            if perms.shape != rows.shape or not torch.equal(perms.sort(dim=1).values, rows):
                raise ValueError(f"perms are not {len(self.seeds)} permutations")
            self.perms = perms.to(self.device)
            self._draw_transforms()


def train(
    splits: Splits,
    members: Sequence[Member],
    schedule: Schedule,
    *,
    device: str = "auto",
    state_path: Path | None = None,
    resume: bool = False,
    on_record: Callable[[RecordEvent], None] | None = None,
    on_log: Callable[[str], None] | None = None,
    arithmetic: Arithmetic | None = None,
) -> TrainResult:
    """Train every member (one model, `RunConfig.model`, other than the MLP) on `splits`, as
    `engine.train` trains MLPs: the same schedule, records, faults, resume and result."""
    members = list(members)
    _check_members(members)
    if members[0].config.model == "mlp":
        raise MnistlabError("general.train trains models other than the MLP; use engine.train")
    dev = resolve_device(device)
    arithmetic = honour(arithmetic, dev, "general.train") if arithmetic else requested(dev)
    _set_matmul(arithmetic)
    spec = input_spec(splits.train, members[0].config.input_norm)
    run = _Training(splits, members, schedule, dev, spec, arithmetic)
    if resume and state_path is not None and Path(state_path).is_file():
        run.load(Path(state_path))
    test_loss, test_acc, blocks = run_schedule(
        run, dev, lambda: run.on_device(splits.test), state_path=state_path,
        on_record=on_record, on_log=on_log)
    diverged = run.diverged()
    test = [{"loss": math.nan, "accuracy": math.nan} if d else {"loss": lo, "accuracy": acc}
            for d, lo, acc in zip(diverged, test_loss, test_acc, strict=True)]
    return ModuleResult(run.rows, test, diverged, run.monitor.stopped, run.monitor.restored(),
                        run.seconds, str(dev), members, spec, run.stack.weights(),
                        _test_predictions(blocks), arithmetic)


def member_bytes(config: RunConfig, schedule: Schedule, splits: Splits, device: str) -> int:
    """An upper bound on what one member of a general stack adds to the memory of training:
    parameters, buffers, gradients, Adam moments, best weights and (on a CPU) a resume
    state's copies; a step's activations and their gradients; an evaluation block's."""
    spec = input_spec(splits.train, config.input_norm)
    with torch.random.fork_rng(devices=[]):
        found = probe(build(config.model, spec), config.model, spec)
    n, batch = len(splits.train), schedule.batch_size
    steps = (n // batch if schedule.drop_last else -(-n // batch)) * schedule.epochs
    copies = 5 + 2 * config.restore_best + (4 if device == "cpu" else 0)
    state = copies * found.params + 2 * steps
    pixels = int(np.prod(spec.shape))
    step = batch * (3 * pixels + 4 * found.activations)
    rows = 1 << max(6, int(math.log2(max(1, EVAL_FLOATS // max(1, found.activations)))))
    evaluation = 2 * min(rows, EVAL_CHUNK) * (found.activations + 8)
    work = max(step, evaluation) if device == "cpu" else step + evaluation
    return 4 * (state + work)
