"""Fused CPU kernels for a stack: a step's non-GEMM work in a few calls instead of ~200.

Why: on a CPU a stack's matrix products are a few large calls, but everything between them
(a hidden layer's activation, dropout and LayerNorm and their gradients, the loss with its
books, Adam once per model) is ~200 eager PyTorch operators per step, each a dispatch and a
pass over memory: a third of a step. Here each is one call over the whole stack, as the Triton
kernels (triton_kernels.py) do on CUDA.

The kernels are plain C++ (csrc/step.cpp: no PyTorch headers, so a build takes a second or
two, not the minute a torch extension takes), compiled at first use with the system's C++
compiler (`$CXX`, else g++, c++ or clang++) for this CPU (-march=native) with OpenMP, cached
under the user cache folder keyed by the source, the compiler and what it targets, and
loaded with ctypes; tensors are passed as pointers. Their threads are PyTorch's: the library
links libgomp by the soname PyTorch's is loaded under, so one OpenMP pool serves both, and
each call runs on torch.get_num_threads() threads. Where no compiler is found or the build
fails, `library()` says so in one line on stderr (once per process) and returns None: the
stack then uses PyTorch operators (torch_ops.TorchOps).

What the kernels compute, and how exactly:
- `adam_`: torch._fused_adam_'s update (torch._fused_adamw_'s where a model decays
  decoupled), for each model's row with its own hyperparameters, span, frozen flag and
  scheduled learning rate, in the same operations and roundings: the same bits as the PyTorch
  backend's per-model calls. One-cycle's models (per-step beta1) follow
  `TorchOps.cycled_adam`'s operations, to float32 rounding (its torch.sqrt is MKL's).
- `hidden_forward` / `hidden_backward`: a hidden layer's ReLU (or an activation computed
  before), dropout and LayerNorm (per model on or off), and their gradient with LayerNorm's
  parameter gradients; ReLU exactly, LayerNorm to float32 rounding of PyTorch's (other
  summation order). The bias gradient is left to PyTorch's sum.
- `cross_entropy_step`: after PyTorch's log_softmax and exp, the loss gradient with label
  smoothing (PyTorch's bits) and the step's books (loss and accuracy sums, divergence marks).
- `affine_images`: augmentation's bilinear sampling (engine/augment.py), after PyTorch has
  computed each map's column and row terms: PyTorch's bits.
- Dropout draws from a counter-based stream (splitmix64 over each element's index, keyed by
  the model's dropout seed, the step count and the layer): a model's masks depend on nothing
  else, so they need no generator state to save or resume, and they differ from the PyTorch
  backend's generator streams (and from the Triton kernels' Philox stream).

Every kernel cuts its work into items whose arithmetic is fixed (fixed-order sums, no
reductions across threads), so a model's bits do not depend on its stack or the thread count.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import platformdirs
import torch
from torch import Tensor

from mnistlab.atomic import atomic_path
from mnistlab.errors import MnistlabError

SOURCE = Path(__file__).with_name("csrc") / "step.cpp"
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-std=c++17",
         "-shared", "-fPIC")
OPENMP = ("-fopenmp",)  # without it (no OpenMP runtime) the same kernels run on one thread
ADAM_KINDS = {"constant": 0, "scheduled": 1, "onecycle": 2}  # csrc/step.cpp's `kind`

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # the C functions' parameters (pointers as integers: Tensor.data_ptr())
    "adam": [_P, _P, _P, _P, _I, _I, _P, _P, _I, _P, _P, ctypes.c_int32],
    "hidden_forward": [_P, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _I, _I, _I,
                       ctypes.c_int32, _F, ctypes.c_int32],
    "hidden_backward": [_P, _P, _P, _P, _P, _I, _P, _P, _P, _I, _P, _P, _I, _I, _I,
                        ctypes.c_int32],
    "cross_entropy_step": [_P, _P, _P, _P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I],
    "affine_images": [_P, _P, _P, _P, _P, _P, _I, _I, _I, _F, ctypes.c_int32],
}


class BuildError(Exception):
    """Why the kernels could not be had: one line."""


def cache_dir() -> Path:
    return Path(platformdirs.user_cache_dir("mnistlab")) / "cpu-kernels"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None (said once on stderr) where they cannot
    be built or loaded here."""
    try:
        return _load(_build())
    except BuildError as exc:
        print(f"mnistlab: fused CPU kernels unavailable ({exc}); CPU training uses PyTorch "
              "operators (as with MNISTLAB_CPU_FUSED=0)", file=sys.stderr)
        return None


def _compiler() -> list[str]:
    """$CXX (split as a shell would: "ccache g++" works), else the first of g++, c++, clang++."""
    if os.environ.get("CXX"):
        return shlex.split(os.environ["CXX"])
    found = next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if found is None:
        raise BuildError("no C++ compiler found: install g++ or set CXX")
    return [found]


def _run(command: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"{command[0]} did not run: {exc}") from None


def _build() -> Path:
    """The shared library for this source, compiler and CPU: from the cache, else compiled
    (to a temp name renamed into place, so concurrent builds never expose a partial file)."""
    compiler = _compiler()
    source = SOURCE.read_bytes()
    errors = []
    for extra in (OPENMP, ()):
        flags = [*FLAGS, *extra]
        # The predefined macros name the compiler's version and every ISA extension that
        # -march=native enables: a cache shared between machines never hands out a library
        # built for another CPU.
        target = _run([*compiler, *flags, "-E", "-dM", "-x", "c++", os.devnull])
        if target.returncode != 0:
            errors.append(_first_error(target.stderr, compiler))
            continue
        key = hashlib.sha256(b"\0".join([source, " ".join([*compiler, *flags]).encode(),
                                         target.stdout.encode()])).hexdigest()[:16]
        path = cache_dir() / f"step-{key}.so"
        if path.is_file():
            return path
        try:
            with atomic_path(path) as tmp:
                built = _run([*compiler, *flags, "-o", str(tmp), str(SOURCE)])
                if built.returncode != 0:
                    raise BuildError(_first_error(built.stderr, compiler))
        except BuildError as exc:
            errors.append(str(exc))
            continue
        except (OSError, MnistlabError) as exc:
            raise BuildError(f"cannot write {path}: {exc}") from None
        return path
    raise BuildError(errors[0])


def _first_error(stderr: str, compiler: list[str]) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    line = next((ln for ln in lines if "error" in ln), lines[0] if lines else "failed")
    return f"{Path(compiler[-1]).name}: {line[:200]}"


def _load(path: Path) -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = None
    except (OSError, AttributeError) as exc:
        raise BuildError(f"cannot load {path}: {exc}") from None
    return lib


def _ptr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def adam_(flat: dict[str, Tensor], hyper: Tensor, rates: Tensor, frozen: Tensor,
          step: Tensor) -> None:
    """One Adam step for every row of the flat (N, P) tensors, in place.

    `hyper` (N, 8) float64 holds per model: lr, beta1, beta2, eps, L2 weight decay, decoupled
    (AdamW) decay, span (how much of the row to step) and its kind (ADAM_KINDS: whether lr,
    or lr and beta1, come from `rates` (N, T, 2) at this step). Rows with `frozen` != 0 are
    left untouched. `step` (0-dim float) is the step count after this step.
    """
    param = flat["param"]
    n, size = param.shape
    library().adam(param.data_ptr(), flat["grad"].data_ptr(), flat["exp_avg"].data_ptr(),
                   flat["exp_avg_sq"].data_ptr(), n, size, hyper.data_ptr(), rates.data_ptr(),
                   rates.shape[1], frozen.data_ptr(), step.data_ptr(), torch.get_num_threads())


def hidden_forward(x: Tensor, norm: tuple[Tensor, Tensor, Tensor] | None,
                   dropout: tuple[Tensor, Tensor, Tensor, int] | None, eps: float, relu: bool,
                   keep_stats: bool = True,
                   ) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """A hidden layer after its matrix product, in one call: (out, mask, xhat, rstd).

    x (N, B, W) is the pre-activation (with `relu`) or the activation. `dropout` = (seeds
    (N,) int64, p (N,), step (0-dim), layer): inverted-dropout scales from the counter-based
    stream; `norm` = (weight, bias, on): LayerNorm parameter views (N, 1, W) and which models
    (N,) int32 have it; the others pass their activation through. xhat/rstd feed
    `hidden_backward` (None without `keep_stats`).
    """
    x = x.contiguous()
    n, rows, width = x.shape
    stats = keep_stats and norm is not None
    out = torch.empty_like(x)
    mask = torch.empty_like(x) if dropout is not None else None
    xhat = torch.empty_like(x) if stats else None
    rstd = x.new_empty(n, rows, 1) if stats else None
    weight, bias, on = norm if norm is not None else (None, None, None)
    seeds, p, step, layer = dropout if dropout is not None else (None, None, None, 0)
    library().hidden_forward(
        x.data_ptr(), out.data_ptr(), _ptr(mask), _ptr(xhat), _ptr(rstd), _ptr(weight),
        _ptr(bias), weight.stride(0) if weight is not None else 0, _ptr(on), _ptr(seeds),
        _ptr(p), _ptr(step), layer, n, rows, width, relu, eps, torch.get_num_threads())
    return out, mask, xhat, rstd


def hidden_backward(d: Tensor, xhat: Tensor | None, rstd: Tensor | None,
                    norm: tuple[Tensor, Tensor, Tensor, Tensor] | None, mask: Tensor | None,
                    gate: Tensor | None) -> Tensor:
    """d (N, B, W) at a hidden layer's output → d at its pre-activation (at its activation
    without `gate`).

    `norm` = (weight, on, weight grad, bias grad) where the stack has LayerNorm: its weight
    view, which models have it, and the (N, 1, W) gradient views its column sums go to (zero
    for models without it; each column summed in row order). `mask`: the dropout scales;
    `gate`: ReLU's pre-activation.
    """
    d = d.contiguous()
    n, rows, width = d.shape
    out = torch.empty_like(d)
    weight, on, grad_w, grad_b = norm if norm is not None else (None, None, None, None)
    library().hidden_backward(
        d.data_ptr(), out.data_ptr(), _ptr(xhat), _ptr(rstd), _ptr(weight),
        weight.stride(0) if weight is not None else 0, _ptr(on), _ptr(grad_w), _ptr(grad_b),
        grad_w.stride(0) if grad_w is not None else 0, _ptr(mask), _ptr(gate), n, rows, width,
        torch.get_num_threads())
    return out


def cross_entropy_step(logits: Tensor, labels: Tensor, books: dict[str, Tensor], step: Tensor,
                       smoothing: Tensor | None = None) -> Tensor:
    """d(sum of per-model mean losses)/d logits for logits (N, B, C), plus the step's books.

    As triton_kernels.cross_entropy_step: per model the batch's mean cross-entropy and
    accuracy are added to `books["loss_sum"]`/`["acc_sum"]` and kept in `["last_loss"]`; a
    NaN/inf loss sets `["frozen"]` and, the first time, `["diverged_at"]` to this step (`step`
    holds the steps completed before it). With `smoothing` (N,), model k's gradient is
    CrossEntropyLoss(label_smoothing=smoothing[k])'s; the books keep the plain cross-entropy.
    log_softmax and exp are PyTorch's: the gradient has the PyTorch backend's bits.
    """
    logits = logits.contiguous()
    logp = torch.log_softmax(logits, -1)
    grad = logp.exp()
    if labels.stride(-1) != 1:
        labels = labels.contiguous()
    n, batch, classes = logits.shape
    library().cross_entropy_step(
        logits.data_ptr(), logp.data_ptr(), grad.data_ptr(), labels.data_ptr(),
        labels.stride(0), books["loss_sum"].data_ptr(), books["acc_sum"].data_ptr(),
        books["last_loss"].data_ptr(), books["frozen"].data_ptr(),
        books["diverged_at"].data_ptr(), step.data_ptr(), _ptr(smoothing), n, batch, classes)
    return grad


def affine_images(x: Tensor, xs: tuple[Tensor, Tensor], ys: tuple[Tensor, Tensor],
                  shape: tuple[int, int], fill: float) -> Tensor:
    """Augmenter.apply's sampling for images x (S, B, height × width): pixel (r, c) of image
    (s, b) read bilinearly from the image padded by `fill` at (col_x + row_x, col_y + row_y),
    where xs = (col_x (S, B, width), row_x (S, B, height)) and ys likewise."""
    height, width = shape
    x = x.contiguous()
    parts = [t.contiguous() for t in (*xs, *ys)]
    out = torch.empty_like(x)
    images = x.shape[0] * x.shape[1]
    library().affine_images(x.data_ptr(), out.data_ptr(), *(t.data_ptr() for t in parts),
                            images, height, width, fill, torch.get_num_threads())
    return out
