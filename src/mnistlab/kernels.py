"""Two fused Triton kernels for a stack on CUDA: Adam for all N models, and dropout masks.

Why: on a GPU this model's step is a hundred tiny kernels, and their count, not their
arithmetic, sets the time. PyTorch's own fused Adam takes one learning rate and one skip flag
per call, so N models with their own hyperparameters and divergence flags cost N launches; its
dropout draws from one generator per call, so per-model streams cost N more. Here each is one
launch for the whole stack, and a CUDA graph (mnistlab.graphs) replays them with the rest.

- `adam_`: torch.optim.Adam's update (L2 weight decay, bias correction) on the flat (N, P)
  parameter rows, each row with its own lr, betas, eps, weight decay, span (how much of the row
  it steps) and frozen flag. The arithmetic follows PyTorch's fused CUDA kernel; it agrees with
  it to float32 rounding, not bit for bit (its bias corrections are exp2(t·log2 β) in float64).
- `dropout`: inverted-dropout scales from a counter-based Philox stream keyed by each model's
  own dropout seed and the step number: a model's masks depend on nothing else (not on N, not
  on what ran before), so they need no generator state to save, resume or capture. They differ
  from the CPU path's generator streams: results are reproducible per device, as documented.

Without Triton (or with MNISTLAB_TRITON=0) the stack uses its PyTorch path on every device.
Tests run both kernels on the CPU through Triton's interpreter (TRITON_INTERPRET=1); the
product uses them on CUDA only.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the stack's PyTorch path is used
    triton = None

BLOCK = 1024


def usable(device: torch.device) -> bool:
    """Whether the stack should use these kernels on `device`."""
    return (triton is not None and device.type == "cuda"
            and os.environ.get("MNISTLAB_TRITON", "1") != "0")


if triton is not None:
    STEP_KEY = tl.constexpr(2654435761)  # Knuth's multiplicative constant: steps → Philox keys

    @triton.jit
    def _adam_kernel(param, grad, exp_avg, exp_avg_sq, hyper, span, frozen, step, row_size,
                     BLOCK: tl.constexpr):
        row = tl.program_id(0)
        if tl.load(frozen + row) != 0:
            return
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < tl.load(span + row)
        at = row.to(tl.int64) * row_size + offsets
        lr = tl.load(hyper + row * 5)
        beta1 = tl.load(hyper + row * 5 + 1)
        beta2 = tl.load(hyper + row * 5 + 2)
        eps = tl.load(hyper + row * 5 + 3)
        decay = tl.load(hyper + row * 5 + 4)
        # Per-row scalars in float64, as PyTorch's kernel computes them, then float32 math.
        t = tl.load(step).to(tl.float64)
        correction1 = 1.0 - tl.exp2(t * tl.log2(beta1.to(tl.float64)))
        correction2 = 1.0 - tl.exp2(t * tl.log2(beta2.to(tl.float64)))
        step_size = (lr.to(tl.float64) / correction1).to(tl.float32)
        correction2_sqrt = tl.sqrt(correction2).to(tl.float32)
        p = tl.load(param + at, mask=inside)
        g = tl.load(grad + at, mask=inside)
        m = tl.load(exp_avg + at, mask=inside)
        v = tl.load(exp_avg_sq + at, mask=inside)
        g = g + p * decay
        m = beta1 * m + (1.0 - beta1) * g
        v = beta2 * v + (1.0 - beta2) * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), correction2_sqrt) + eps  # IEEE-rounded, as PyTorch
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(param + at, p, mask=inside)
        tl.store(exp_avg + at, m, mask=inside)
        tl.store(exp_avg_sq + at, v, mask=inside)

    @triton.jit
    def _dropout_kernel(a, out, scale, seeds, p, step, row_size, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offsets = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < row_size
        at = row.to(tl.int64) * row_size + offsets
        drop = tl.load(p + row)
        key = tl.load(seeds + row) + tl.load(step).to(tl.int64) * STEP_KEY
        keep = tl.rand(key, offsets) >= drop
        s = tl.where(keep, tl.div_rn(1.0, 1.0 - drop), 0.0)
        tl.store(scale + at, s, mask=inside)
        tl.store(out + at, tl.load(a + at, mask=inside) * s, mask=inside)


def adam_(flat: dict[str, Tensor], hyper: Tensor, span: Tensor, frozen: Tensor,
          step: Tensor) -> None:
    """One Adam step for every row of the flat (N, P) tensors, in place.

    `hyper` (N, 5) holds lr, beta1, beta2, eps, weight decay per row; `span` (N,) how many
    leading elements of each row to step; rows with `frozen` != 0 are left untouched. `step`
    is the step count after this step (a 0-dim float tensor on the device).
    """
    param = flat["param"]
    n, size = param.shape
    grid = (n, triton.cdiv(size, BLOCK))
    _adam_kernel[grid](param, flat["grad"], flat["exp_avg"], flat["exp_avg_sq"], hyper, span,
                       frozen, step, size, BLOCK=BLOCK)


def dropout(a: Tensor, seeds: Tensor, p: Tensor, step: Tensor) -> tuple[Tensor, Tensor]:
    """(a · scale, scale) for a (N, B, W): scale is 0 or 1/(1-p_k), drawn per model and step.

    `seeds` (N,) int64 are the models' dropout seeds, `p` (N,) their dropout rates, `step` a
    0-dim tensor that differs from step to step (the stack's completed-step count).
    """
    a = a.contiguous()
    n = a.shape[0]
    row_size = a[0].numel()
    out, scale = torch.empty_like(a), torch.empty_like(a)
    grid = (n, triton.cdiv(row_size, BLOCK))
    _dropout_kernel[grid](a, out, scale, seeds, p, step, row_size, BLOCK=BLOCK)
    return out, scale
