"""Could a matrix kernel of our own beat MKL at the stack's products without changing a bit?

On a CPU the products are three quarters or more of an N=5 training step (BENCHMARKS.md). MKL
computes each model's product of a batch on one thread, and on the MLP's shapes its single-thread
rate is well below its rate on large squares, so a kernel of our own looked like the way to a
faster stack. It may not change the numbers: every published figure must regenerate bit for bit.
`gemm_order.cpp` therefore sums in the order MKL's AVX2 kernel was found to use (bias first, then
blocks of 192 depths, each a chain of fused multiply-adds from zero), skips depths where a register
tile's rows are all zero (exact: an added zero changes no sum), cuts the work into (model, block of
rows) items so five models keep two threads busy, and tiles 6 × 16 outputs in registers.

For each product of one N=5 step and evaluation block at the seed study's shapes, with real
images as layer 1's input (their zeros are what the kernel skips), this script checks the
kernel's bits against the engine's own product (MKL) and against the order written out as a
scalar loop, and times both, alternating, with the same threads.

    python benchmarks/bench_gemm_order.py [--data fashion-mnist mnist] [--repeats 200]

Needs g++ (or $CXX) and an x86 CPU with AVX2 and FMA.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mnistlab.data.loader import load
from mnistlab.engine.backends import cpu_kernels
from mnistlab.engine.stack import product

SOURCE = Path(__file__).with_name("gemm_order.cpp")
_P, _I = ctypes.c_void_p, ctypes.c_int64
ARGTYPES = [_P, _I, _I, _I, _P, _I, _I, _I, _P, _I, _P, _I, _I, _I, _I, _I, _I, ctypes.c_int32,
            ctypes.c_int32]


def build(folder: Path) -> ctypes.CDLL:
    """The kernel, compiled as the fused step's own kernels are (same compiler, same flags)."""
    library = folder / "gemm_order.so"
    subprocess.run([*cpu_kernels._compiler(), *cpu_kernels.FLAGS, *cpu_kernels.OPENMP,
                    "-o", str(library), str(SOURCE)], check=True)
    lib = ctypes.CDLL(str(library))
    lib.gemm.argtypes, lib.gemm.restype = ARGTYPES, None
    return lib


def ours(lib: ctypes.CDLL, a: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
         reference: bool = False) -> torch.Tensor:
    n, rows, depth = a.shape
    out = torch.empty(n, rows, w.shape[2])
    lib.gemm(a.data_ptr(), *a.stride(), w.data_ptr(), *w.stride(),
             None if bias is None else bias.data_ptr(), 0 if bias is None else bias.stride(0),
             out.data_ptr(), out.stride(0), out.stride(1), n, rows, depth, w.shape[2],
             torch.get_num_threads(), int(reference))
    return out


def shapes(n: int, images: torch.Tensor
           ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """One step's products and one evaluation block's, laid out as the engine lays them out:
    weights as views of each model's flat parameter row, inputs transposed where it transposes
    them, a one-seed stack's batch and evaluation block shared by every model (`images`: pixels
    scaled to [0, 1], as the seed's MLP sees them; hidden activations after ReLU)."""
    g = torch.Generator().manual_seed(n)
    sizes = [(784, 150), (1, 150), (150, 150), (1, 150), (150, 10), (1, 10)]
    flat = torch.randn(n, sum(r * c for r, c in sizes), generator=g) * 0.05
    parts = flat.split([r * c for r, c in sizes], dim=1)
    w1, b1, w2, b2, w3, b3 = (p.view(n, r, c) for p, (r, c) in zip(parts, sizes, strict=True))
    picked = torch.randperm(len(images), generator=g)
    x = images[picked[:128]].expand(n, -1, -1)
    h = torch.relu(torch.randn(n, 128, 150, generator=g))
    d2 = torch.randn(n, 128, 150, generator=g)
    d3 = torch.randn(n, 128, 10, generator=g)
    block = images[picked[128:1152]].expand(n, -1, -1)
    return {
        "layer 1 forward (128×784 · 784×150)": (x, w1, b1),
        "layer 1 weight gradient (784×128 · 128×150)": (x.transpose(1, 2), d2, None),
        "layer 2 forward (128×150 · 150×150)": (h, w2, b2),
        "layer 2 weight gradient (150×128 · 128×150)": (h.transpose(1, 2), d2, None),
        "layer 2 input gradient (128×150 · 150×150ᵀ)": (d2, w2.transpose(1, 2), None),
        "layer 3 input gradient (128×10 · 10×150)": (d3, w3.transpose(1, 2), None),
        "evaluation, layer 1 (1024×784 · 784×150)": (block, w1, b1),
        "layer 3 forward (128×150 · 150×10)": (h, w3, b3),
    }


def paired(first, second, repeats: int) -> tuple[float, float]:
    """Median seconds of each, called alternately (first, second, first, ...), after a warm-up."""
    for _ in range(10):
        first(), second()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((first, a), (second, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(a)[repeats // 2], sorted(b)[repeats // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=["fashion-mnist", "mnist"])
    parser.add_argument("--models", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        lib = build(Path(folder))
        for data in args.data:
            train = load(data).train
            images = torch.as_tensor(np.asarray(train.images).reshape(len(train.labels), -1),
                                     dtype=torch.float32) / 255
            print(f"\n{data} ({(images == 0).float().mean():.0%} of pixels zero), {args.models} "
                  f"models, {torch.get_num_threads()} threads, medians of {args.repeats} "
                  "alternating calls\n")
            print("| product | MKL (µs) | ours (µs) | MKL / ours | bits as MKL's | "
                  "as the order's |\n|---|---:|---:|---:|:---:|:---:|")
            for name, (a, w, bias) in shapes(args.models, images).items():
                _row(lib, name, a, w, bias, args.repeats)


def _row(lib: ctypes.CDLL, name: str, a: torch.Tensor, w: torch.Tensor,
         bias: torch.Tensor | None, repeats: int) -> None:
    same = lambda x, y: torch.equal(x.view(torch.int32), y.view(torch.int32))  # noqa: E731
    mine = ours(lib, a, w, bias)
    exact = same(mine, ours(lib, a, w, bias, reference=True))
    t_mkl, t_ours = paired(lambda: product(a, w, bias), lambda: ours(lib, a, w, bias), repeats)
    print(f"| {name} | {t_mkl * 1e6:.0f} | {t_ours * 1e6:.0f} | {t_mkl / t_ours:.2f}× | "
          f"{'yes' if same(mine, product(a, w, bias)) else 'no'} | {'yes' if exact else 'no'} |")


if __name__ == "__main__":
    main()
