"""Fused Triton kernels for a stack on CUDA: a step in ~20 launches instead of ~100.

Why: on a GPU this model's step is many tiny kernels, and their count, not their arithmetic,
sets the time. PyTorch's fused Adam takes one learning rate and one skip flag per call, so N
models with their own hyperparameters and divergence flags cost N launches; its dropout draws
from one generator per call, so per-model streams cost N more; LayerNorm, ReLU and the loss's
bookkeeping are a dozen elementwise launches each. Here each is one launch for the whole stack,
and a CUDA graph (cuda_graphs.py) replays them with the matrix products.

- `adam_`: torch.optim.Adam's update (L2 weight decay, bias correction) and AdamW's decoupled
  decay on the flat (N, P) parameter rows, each row with its own betas, eps, decays, span (how
  much of the row it steps), frozen flag, and learning rate and beta1 read from its schedule's
  table at the step count held on the device (engine.schedules). It follows PyTorch's fused
  CUDA kernel to float32 rounding, not bit for bit (its bias corrections are exp2(t·log2 β) in
  float64).
- `dropout`, and the dropout inside `hidden_forward`: inverted-dropout scales from a
  counter-based Philox stream keyed by each model's dropout seed, the step number and the
  hidden layer (`_dropout_key`), so a
  model's masks depend on nothing else (not on N, not on what ran before) and need no
  generator state to save, resume or capture. They differ from the CPU path's generator
  streams: results are reproducible per device, as documented.
- `hidden_forward` / `hidden_backward`: a ReLU hidden layer after its matrix product (ReLU,
  dropout, LayerNorm for the models that have it) and its gradient, including the LayerNorm
  and bias gradients as column sums added in a fixed order (deterministic, no atomics).
- `cross_entropy_step`: the loss gradient (with each model's label smoothing), and the step's
  loss/accuracy sums and divergence marks that the PyTorch backend keeps with a dozen small
  operations.

Importing this module needs Triton; mnistlab.engine.backends imports it only for a CUDA stack,
and without Triton (or with MNISTLAB_TRITON=0) the stack's backend is PyTorch operators. Tests
run the kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024
STEP_KEY = tl.constexpr(2654435761)  # Knuth's multiplicative constant: steps → Philox keys
# Layers → Philox keys: 2**40 is no multiple of the odd STEP_KEY, so no (step, layer) pair's key
# equals another's for the same seed; layer 0 keeps the key it had before layers counted.
LAYER_KEY = tl.constexpr(1 << 40)


@triton.jit
def _dropout_key(seed, step, layer):
    """The Philox key of a model's dropout masks at one step and hidden layer: two dropout
    layers of one model must not share a mask (they did when the layer was not part of it)."""
    return seed + step.to(tl.int64) * STEP_KEY + layer.to(tl.int64) * LAYER_KEY


@triton.jit
def _adam_kernel(param, grad, exp_avg, exp_avg_sq, hyper, rates, steps, span, frozen, step,
                 row_size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    if tl.load(frozen + row) != 0:
        return
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < tl.load(span + row)
    at = row.to(tl.int64) * row_size + offsets
    beta2 = tl.load(hyper + row * 4)
    eps = tl.load(hyper + row * 4 + 1)
    decay = tl.load(hyper + row * 4 + 2)
    decoupled = tl.load(hyper + row * 4 + 3)
    t = tl.load(step).to(tl.float64)
    now = tl.minimum(tl.maximum(t.to(tl.int64) - 1, 0), steps - 1)  # this step's row
    lr = tl.load(rates + (row.to(tl.int64) * steps + now) * 2)
    beta1 = tl.load(rates + (row.to(tl.int64) * steps + now) * 2 + 1)
    # Per-row scalars in float64, as PyTorch's kernel computes them, then float32 math.
    correction1 = 1.0 - tl.exp2(t * tl.log2(beta1.to(tl.float64)))
    correction2 = 1.0 - tl.exp2(t * tl.log2(beta2.to(tl.float64)))
    step_size = (lr.to(tl.float64) / correction1).to(tl.float32)
    correction2_sqrt = tl.sqrt(correction2).to(tl.float32)
    p = tl.load(param + at, mask=inside)
    g = tl.load(grad + at, mask=inside)
    m = tl.load(exp_avg + at, mask=inside)
    v = tl.load(exp_avg_sq + at, mask=inside)
    g = g + p * decay
    p = p * (1.0 - lr * decoupled)  # AdamW's decay, before the update (1.0 where off)
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * g * g
    denom = tl.div_rn(tl.sqrt_rn(v), correction2_sqrt) + eps  # IEEE-rounded, as PyTorch
    p = p - tl.div_rn(step_size * m, denom)
    tl.store(param + at, p, mask=inside)
    tl.store(exp_avg + at, m, mask=inside)
    tl.store(exp_avg_sq + at, v, mask=inside)


@triton.jit
def _dropout_kernel(a, out, scale, seeds, p, step, layer, row_size, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < row_size
    at = row.to(tl.int64) * row_size + offsets
    drop = tl.load(p + row)
    key = _dropout_key(tl.load(seeds + row), tl.load(step), layer)
    keep = tl.rand(key, offsets) >= drop
    s = tl.where(keep, tl.div_rn(1.0, 1.0 - drop), 0.0)
    tl.store(scale + at, s, mask=inside)
    tl.store(out + at, tl.load(a + at, mask=inside) * s, mask=inside)


@triton.jit
def _hidden_forward_kernel(z, out, scale, xhat, rstd, weight, bias, param_stride, layernorm,
                           seeds, p, step, layer, width, eps, BATCH: tl.constexpr,
                           HAS_NORM: tl.constexpr, STATS: tl.constexpr,
                           HAS_DROPOUT: tl.constexpr,
                           ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    k = tl.program_id(0)
    rows = tl.program_id(1) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_W)
    row_ok, col_ok = rows < BATCH, cols < width
    ok = row_ok[:, None] & col_ok[None, :]
    within = rows[:, None] * width + cols[None, :]  # the dropout kernel's offsets
    at = k.to(tl.int64) * BATCH * width + within
    v = tl.load(z + at, mask=ok, other=0.0)
    v = tl.where(v < 0, 0.0, v)  # ReLU that keeps NaN, so divergence still shows
    if HAS_DROPOUT:
        drop = tl.load(p + k)
        key = _dropout_key(tl.load(seeds + k), tl.load(step), layer)
        s = tl.where(tl.rand(key, within) >= drop, tl.div_rn(1.0, 1.0 - drop), 0.0)
        tl.store(scale + at, s, mask=ok)
        v = v * s
    if HAS_NORM:
        mean = tl.sum(tl.where(ok, v, 0.0), 1) / width
        centred = tl.where(ok, v - mean[:, None], 0.0)
        rs = tl.div_rn(1.0, tl.sqrt_rn(tl.sum(centred * centred, 1) / width + eps))
        xh = centred * rs[:, None]
        if STATS:
            tl.store(xhat + at, xh, mask=ok)
            tl.store(rstd + k * BATCH + rows, rs, mask=row_ok)
        w = tl.load(weight + k * param_stride + cols, mask=col_ok, other=0.0)
        b = tl.load(bias + k * param_stride + cols, mask=col_ok, other=0.0)
        v = tl.where(tl.load(layernorm + k) != 0, xh * w[None, :] + b[None, :], v)
    tl.store(out + at, v, mask=ok)


@triton.jit
def _loss_kernel(logits, labels, label_stride, grad, loss_sum, acc_sum, last_loss, frozen,
                 diverged_at, step, smoothing, classes, BATCH: tl.constexpr, ROWS: tl.constexpr,
                 BLOCK_C: tl.constexpr, HAS_SMOOTHING: tl.constexpr):
    batch = BATCH
    k = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < classes
    base = k.to(tl.int64) * batch * classes
    total = tl.sum(tl.zeros([ROWS], tl.float32), 0)
    correct = tl.sum(tl.zeros([ROWS], tl.float32), 0)
    for start in range(0, BATCH, ROWS):  # BATCH constexpr: the interpreter needs it
        rows = start + tl.arange(0, ROWS)
        row_ok = rows < batch
        ok = row_ok[:, None] & col_ok[None, :]
        at = base + rows[:, None] * classes + cols[None, :]
        x = tl.load(logits + at, mask=ok, other=-float("inf"))
        x = tl.where(row_ok[:, None], x, 0.0)  # padding rows: finite, ignored below
        y = tl.load(labels + k * label_stride + rows, mask=row_ok, other=0)
        top = tl.max(x, 1)
        e = tl.exp(x - top[:, None])
        norm = tl.sum(e, 1)
        logp = x - (top + tl.log(norm))[:, None]
        hit = cols[None, :] == y[:, None]
        picked = tl.sum(tl.where(hit & ok, logp, 0.0), 1)
        total += tl.sum(tl.where(row_ok, -picked, 0.0), 0)
        guess = tl.argmax(x, 1, tie_break_left=True)
        correct += tl.sum(tl.where(row_ok & (guess == y), 1.0, 0.0), 0)
        target = tl.where(hit, 1.0, 0.0)
        if HAS_SMOOTHING:  # CrossEntropyLoss(label_smoothing=ε): (1 - ε) one-hot + ε / C
            spread = tl.load(smoothing + k)
            target = target * (1.0 - spread) + spread / classes
        g = (e / norm[:, None] - target) / batch
        tl.store(grad + at, g, mask=ok)
    loss = total / batch
    bad = (loss != loss) | (tl.abs(loss) == float("inf"))
    was_frozen = tl.load(frozen + k)
    if bad & (was_frozen == 0):
        tl.store(diverged_at + k, tl.load(step).to(tl.int64) + 1)
    tl.store(frozen + k, tl.maximum(was_frozen, tl.where(bad, 1.0, 0.0)))
    tl.store(loss_sum + k, tl.load(loss_sum + k) + loss)
    tl.store(acc_sum + k, tl.load(acc_sum + k) + correct / batch)
    tl.store(last_loss + k, loss)


@triton.jit
def _hidden_backward_kernel(d, xhat, rstd, weight, weight_stride, layernorm, scale, act,
                            out, partial, width, BATCH: tl.constexpr,
                            HAS_NORM: tl.constexpr, HAS_SCALE: tl.constexpr,
                            ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
    # One program per model and block of rows; the column sums of its rows go to
    # `partial` (N, blocks, 3, W), summed in a fixed order by _column_sums_kernel.
    k, block = tl.program_id(0), tl.program_id(1)
    rows = block * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_W)
    row_ok, col_ok = rows < BATCH, cols < width
    ok = row_ok[:, None] & col_ok[None, :]
    at = k.to(tl.int64) * BATCH * width + rows[:, None] * width + cols[None, :]
    sums = partial + (k * tl.num_programs(1) + block) * 3 * width + cols
    g = tl.load(d + at, mask=ok, other=0.0)
    if HAS_NORM:
        normed = tl.load(layernorm + k) != 0
        w = tl.load(weight + k * weight_stride + cols, mask=col_ok, other=0.0)
        xh = tl.load(xhat + at, mask=ok, other=0.0)
        rs = tl.load(rstd + k * BATCH + rows, mask=row_ok, other=0.0)
        tl.store(sums, tl.sum(g * xh, 0), mask=col_ok)
        tl.store(sums + width, tl.sum(g, 0), mask=col_ok)
        gw = g * w[None, :]
        mean_g = tl.sum(gw, 1) / width
        mean_gx = tl.sum(gw * xh, 1) / width
        through = rs[:, None] * (gw - mean_g[:, None] - xh * mean_gx[:, None])
        g = tl.where(normed, through, g)
    if HAS_SCALE:
        g = g * tl.load(scale + at, mask=ok, other=0.0)
    g = tl.where(tl.load(act + at, mask=ok, other=0.0) > 0, g, 0.0)
    tl.store(out + at, g, mask=ok)
    tl.store(sums + 2 * width, tl.sum(g, 0), mask=col_ok)


@triton.jit
def _column_sums_kernel(partial, width, layernorm, grad_w, grad_b, grad_stride, bias,
                        bias_stride, BLOCKS: tl.constexpr, HAS_NORM: tl.constexpr,
                        BLOCK_W: tl.constexpr):
    k, kind = tl.program_id(0), tl.program_id(1)
    cols = tl.arange(0, BLOCK_W)
    col_ok = cols < width
    total = tl.zeros([BLOCK_W], tl.float32)
    for block in range(BLOCKS):
        at = partial + ((k * BLOCKS + block) * 3 + kind) * width + cols
        total += tl.load(at, mask=col_ok, other=0.0)
    if kind == 2:
        tl.store(bias + k * bias_stride + cols, total, mask=col_ok)
    if HAS_NORM:  # exact zeros for models without LayerNorm, as on the CPU path
        total = tl.where(tl.load(layernorm + k) != 0, total, 0.0)
        if kind == 0:
            tl.store(grad_w + k * grad_stride + cols, total, mask=col_ok)
        if kind == 1:
            tl.store(grad_b + k * grad_stride + cols, total, mask=col_ok)


def adam_(flat: dict[str, Tensor], hyper: Tensor, rates: Tensor, span: Tensor, frozen: Tensor,
          step: Tensor) -> None:
    """One Adam step for every row of the flat (N, P) tensors, in place.

    `hyper` (N, 4) holds beta2, eps, L2 weight decay and decoupled (AdamW) decay per row;
    `rates` (N, T, 2) each row's learning rate and beta1 for each step of its run (clamped to
    the last where a stack steps more); `span` (N,) how many leading elements of each row to
    step; rows with `frozen` != 0 are left untouched. `step` is the step count after this step
    (a 0-dim float tensor on the device), which picks the rates.
    """
    param = flat["param"]
    n, size = param.shape
    grid = (n, triton.cdiv(size, BLOCK))
    _adam_kernel[grid](param, flat["grad"], flat["exp_avg"], flat["exp_avg_sq"], hyper,
                       rates.contiguous(), rates.shape[1], span, frozen, step, size, BLOCK=BLOCK)


def dropout(a: Tensor, seeds: Tensor, p: Tensor, step: Tensor, layer: int = 0
            ) -> tuple[Tensor, Tensor]:
    """(a · scale, scale) for a (N, B, W): scale is 0 or 1/(1-p_k), drawn per model, step and
    hidden layer.

    `seeds` (N,) int64 are the models' dropout seeds, `p` (N,) their dropout rates, `step` a
    0-dim tensor that differs from step to step (the stack's completed-step count), `layer` the
    0-based hidden layer the dropout follows.
    """
    a = a.contiguous()
    n = a.shape[0]
    row_size = a[0].numel()
    out, scale = torch.empty_like(a), torch.empty_like(a)
    grid = (n, triton.cdiv(row_size, BLOCK))
    _dropout_kernel[grid](a, out, scale, seeds, p, step, layer, row_size, BLOCK=BLOCK)
    return out, scale


def cross_entropy_step(logits: Tensor, labels: Tensor, sums: dict[str, Tensor], step: Tensor,
                       smoothing: Tensor | None = None) -> Tensor:
    """d(sum of per-model mean losses)/d logits for logits (N, B, C), plus the step's books.

    In one launch per step, what the PyTorch backend does in twenty: per model the batch's
    mean cross-entropy and accuracy are added to `sums["loss_sum"]`/`["acc_sum"]` and kept in
    `["last_loss"]`; a model whose loss is NaN/inf gets `["frozen"]` = 1 and, the first time,
    `["diverged_at"]` = this step (`step` holds the steps completed before it). With
    `smoothing` (N,), model k's gradient is CrossEntropyLoss(label_smoothing=smoothing[k])'s;
    the books keep the plain cross-entropy.
    """
    n, batch, classes = logits.shape
    grad = torch.empty_like(logits)
    _loss_kernel[(n,)](logits.contiguous(), labels, labels.stride(0), grad, sums["loss_sum"],
                       sums["acc_sum"], sums["last_loss"], sums["frozen"], sums["diverged_at"],
                       step, smoothing if smoothing is not None else logits, classes,
                       BATCH=batch, ROWS=32, BLOCK_C=triton.next_power_of_2(classes),
                       HAS_SMOOTHING=smoothing is not None)
    return grad


def hidden_backward(d: Tensor, xhat: Tensor | None, rstd: Tensor | None,
                    norm_weight: Tensor | None, layernorm: Tensor | None, scale: Tensor | None,
                    activation: Tensor, norm_grads: tuple[Tensor, Tensor] | None,
                    bias_grad: Tensor) -> Tensor:
    """d through a ReLU hidden layer's LayerNorm (where on), dropout scale and ReLU.

    `d` (N, B, W) is the gradient at the layer's output; returns the gradient at its
    pre-activation, whose column sums (the layer's bias gradient) go to `bias_grad`. With
    LayerNorm, `xhat`/`rstd` are its forward statistics, `layernorm` (N,) says which models
    have it, and its weight/bias gradients go to `norm_grads` (zero for models without it).
    Gradient targets are (N, 1, W) views of the flat gradient rows. Two launches; the column
    sums are added in a fixed order, so the results are deterministic.
    """
    n, batch, width = d.shape
    rows = 16
    blocks = triton.cdiv(batch, rows)
    out = torch.empty_like(d)
    partial = d.new_empty(n, blocks, 3, width)  # every slot that is read gets written
    has_norm = norm_grads is not None
    grad_w, grad_b = norm_grads if has_norm else (bias_grad, bias_grad)
    block_w = triton.next_power_of_2(width)
    _hidden_backward_kernel[(n, blocks)](
        d.contiguous(), xhat if has_norm else d, rstd if has_norm else d,
        norm_weight if has_norm else d, norm_weight.stride(0) if has_norm else 0,
        layernorm if has_norm else d, scale if scale is not None else d, activation, out,
        partial, width, BATCH=batch, HAS_NORM=has_norm, HAS_SCALE=scale is not None,
        ROWS=rows, BLOCK_W=block_w,
    )
    _column_sums_kernel[(n, 3)](
        partial, width, layernorm if has_norm else d, grad_w, grad_b, grad_w.stride(0),
        bias_grad, bias_grad.stride(0), BLOCKS=blocks, HAS_NORM=has_norm, BLOCK_W=block_w,
    )
    return out


def hidden_forward(z: Tensor, norm: tuple[Tensor, Tensor, Tensor] | None,
                   dropout: tuple[Tensor, Tensor, Tensor, int] | None, eps: float,
                   keep_stats: bool = True,
                   ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """A ReLU hidden layer after its matrix product, in one launch: (out, scale, xhat, rstd).

    z (N, B, W) is the pre-activation. `dropout` = (seeds, p, step, layer) as for `dropout`
    (same masks); `norm` = (weight, bias, on): LayerNorm parameter views (N, 1, W) and which models
    have it; the others pass their activation through. xhat/rstd feed `hidden_backward`
    (None without `keep_stats`: evaluation needs only the output).
    """
    n, batch, width = z.shape
    stats = keep_stats and norm is not None
    out = torch.empty_like(z)
    scale = torch.empty_like(z) if dropout is not None else None
    xhat = torch.empty_like(z) if stats else None
    rstd = z.new_empty(n, batch, 1) if stats else None
    weight, bias, on = norm if norm is not None else (z, z, z)
    seeds, p, step, layer = dropout if dropout is not None else (z, z, z, 0)
    rows = 16
    _hidden_forward_kernel[(n, triton.cdiv(batch, rows))](
        z.contiguous(), out, scale if scale is not None else z, xhat if xhat is not None else z,
        rstd if rstd is not None else z, weight, bias, weight.stride(0) if norm else 0, on,
        seeds, p, step, layer, width, eps, BATCH=batch, HAS_NORM=norm is not None, STATS=stats,
        HAS_DROPOUT=dropout is not None, ROWS=rows, BLOCK_W=triton.next_power_of_2(width),
    )
    return out, scale, xhat, rstd
