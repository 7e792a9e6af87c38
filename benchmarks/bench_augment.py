"""Augmentation's sampling on the CPU: the fused kernel (csrc/step.cpp's `affine_images`)
against the PyTorch operators it replaces, in one process, alternating, on the same draws.

Each figure is the median over `--repeats` passes of one epoch's steps (375 steps of 128
images per stream, shifts 2 px, turns 10°, zooms 10 %), for one stream (N=1) and five (N=5).

    python benchmarks/bench_augment.py --repeats 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mnistlab.engine import augment
from mnistlab.engine.backends.arithmetic import requested

CPU = torch.device("cpu")
STEPS, BATCH, SHAPE = 375, 128, (28, 28)


def per_step(sampler: augment.Augmenter, x: torch.Tensor, maps: torch.Tensor) -> float:
    """Milliseconds a step, over one epoch's draws."""
    start = time.perf_counter()
    for step in range(STEPS):
        sampler.apply(x, maps[:, step])
    return (time.perf_counter() - start) / STEPS * 1e3


def measure(streams: int, repeats: int) -> dict[str, float]:
    draws = [(seed, (2, 10.0, 0.1)) for seed in range(streams)]
    arithmetic = requested(CPU)
    if arithmetic.cpu_step != "fused":
        raise SystemExit("the fused CPU step is off or cannot be built here: nothing to compare")
    fused = augment.Augmenter(draws, SHAPE, -0.42, STEPS, BATCH, CPU, arithmetic)
    operators = augment.Augmenter(draws, SHAPE, -0.42, STEPS, BATCH, CPU)
    x = torch.randn(streams, BATCH, SHAPE[0] * SHAPE[1])
    maps = fused.epoch(0)
    times: dict[str, list[float]] = {"fused": [], "operators": []}
    for _ in range(repeats):
        times["fused"].append(per_step(fused, x, maps))
        times["operators"].append(per_step(operators, x, maps))
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    figures = {}
    for streams in (1, 5):
        ms = measure(streams, args.repeats)
        figures[f"N={streams}"] = ms
        print(f"N={streams}: fused {ms['fused']:.3f} ms/step, operators {ms['operators']:.3f} "
              f"ms/step: {ms['operators'] / ms['fused']:.2f}x")
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                      "ms_per_step": figures}))


if __name__ == "__main__":
    main()
