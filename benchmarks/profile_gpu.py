"""Where a GPU step of the full seed study (15 models) goes: graphed step and record times, and
the GPU time of each kernel of an eager step.

    python benchmarks/profile_gpu.py --data /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
from bench_gpu import fashion_splits
from torch.profiler import ProfilerActivity, profile

from mnistlab.config import PRESETS, SEED_STUDY, Schedule
from mnistlab.engine import Member, evaluate, input_spec, requested
from mnistlab.engine.mlp import MLPTraining


def training(splits, graphs: bool) -> MLPTraining:
    os.environ["MNISTLAB_CUDA_GRAPHS"] = "1" if graphs else "0"
    members = [Member(c, s) for s in (0, 1, 2) for c in (PRESETS[n] for n in SEED_STUDY)]
    spec = input_spec(splits.train, members[0].config.input_norm)
    device = torch.device("cuda")
    return MLPTraining(splits, members, Schedule(), device, spec, requested(device))


def per_call_ms(fn, calls: int) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    args = parser.parse_args()
    splits = fashion_splits(args.data)
    with torch.no_grad():
        run = training(splits, graphs=True)
        per_call_ms(run.train_step, 10)  # warm-up and capture
        step_ms = per_call_ms(run.train_step, 300)
        record_ms = per_call_ms(lambda: evaluate(run.stack, *run.val), 10)
        print(f"graphed step: {step_ms:.3f} ms; record (validation pass + read): "
              f"{record_ms:.3f} ms; 3750 steps + 50 records ≈ "
              f"{3.75 * step_ms + 0.05 * record_ms:.3f} s")
        eager = training(splits, graphs=False)
        per_call_ms(eager.train_step, 5)
        print(f"eager step: {per_call_ms(eager.train_step, 50):.3f} ms")
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(20):
                eager.train_step()
            torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / 20
    print(f"GPU kernel time per eager step: {total:.1f} us")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:25]:
        print(f"{e.device_time_total / 20:8.1f} us  {e.count / 20:5.1f}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
