"""Layer 1 as one product per input: measured, and checked for what it would cost in bits.

Members of a stack that see the same batch (one seed, no augmentation) could share one product
`X @ [W1_1 … W1_N]` instead of N batched ones, and one `Xᵀ @ [dH1_1 … dH1_N]` for the weight
gradients. The engine keeps a rule this must not break: a model's numbers do not depend on its
stack neighbours (mnistlab.engine.stack.product). So this script times both ways at the seed study's
shapes, in the same run as `torch.mm` at 2048² (the machine's matrix rate), and checks whether
each model's slice of the shared product has the bits of the product the engine computes now
(which equal the model's product alone).

    python benchmarks/bench_layer1.py [--models 1 5 15] [--repeats 200]

Prints one table: per N, microseconds per layer-1 forward + weight-gradient pair both ways,
their GFLOP/s as a share of `torch.mm`'s, and whether the shared way is bit-identical.
"""

from __future__ import annotations

import argparse
import time

import torch

from mnistlab.engine.stack import product

BATCH, INPUTS, WIDTH = 128, 784, 150


def _timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` calls, after a warm-up."""
    for _ in range(10):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def mm_rate(repeats: int = 5) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048**3 / _timed(lambda: a @ b, repeats) / 1e9


def measure(n: int, repeats: int) -> dict[str, float | bool]:
    g = torch.Generator().manual_seed(n)
    x = torch.rand(BATCH, INPUTS, generator=g)
    w = torch.randn(n, INPUTS, WIDTH, generator=g) * 0.05
    bias = torch.randn(n, 1, WIDTH, generator=g) * 0.05
    dh = torch.randn(n, BATCH, WIDTH, generator=g)
    grad = torch.empty(n, INPUTS, WIDTH)

    def stacked() -> tuple[torch.Tensor, torch.Tensor]:
        xs = x.expand(n, -1, -1)
        z = product(xs, w, bias)
        product(xs.transpose(1, 2), dh, out=grad)
        return z, grad

    def shared() -> tuple[torch.Tensor, torch.Tensor]:
        wide = w.permute(1, 0, 2).reshape(INPUTS, n * WIDTH)  # the layout it needs (a copy)
        z = torch.addmm(bias.permute(1, 0, 2).reshape(1, n * WIDTH), x, wide)
        dwide = dh.permute(1, 0, 2).reshape(BATCH, n * WIDTH)
        g_wide = x.t() @ dwide
        return (z.view(BATCH, n, WIDTH).permute(1, 0, 2),
                g_wide.view(INPUTS, n, WIDTH).permute(1, 0, 2))

    z_now, g_now = (t.clone() for t in stacked())
    z_wide, g_wide = shared()
    flop = 2 * 2 * BATCH * INPUTS * WIDTH * n  # forward and weight gradient
    now, wide = _timed(stacked, repeats), _timed(shared, repeats)
    return {"now_us": now * 1e6, "wide_us": wide * 1e6, "now_gflops": flop / now / 1e9,
            "wide_gflops": flop / wide / 1e9,
            "same_bits": bool(torch.equal(z_now, z_wide) and torch.equal(g_now, g_wide))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=int, nargs="+", default=[1, 5, 15])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    before = mm_rate()
    rows = [(n, measure(n, args.repeats)) for n in args.models]
    rate = max(before, mm_rate())
    print(f"torch.mm 2048² fp32: {rate:.1f} GFLOP/s ({torch.get_num_threads()} threads)")
    print("| models | now µs | shared µs | now % of mm | shared % of mm | shared bit-identical |")
    print("|---:|---:|---:|---:|---:|:---:|")
    for n, r in rows:
        print(f"| {n} | {r['now_us']:.0f} | {r['wide_us']:.0f} | "
              f"{100 * r['now_gflops'] / rate:.0f} % | {100 * r['wide_gflops'] / rate:.0f} % | "
              f"{'yes' if r['same_bits'] else 'no'} |")


if __name__ == "__main__":
    main()
