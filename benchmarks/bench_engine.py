"""The engine against the idiomatic PyTorch loop, measured in one run on this machine.

Fashion-MNIST (Debian's dataset-fashion-mnist), 48,000/12,000 stratified split, the seed schedule
(batch 128, record every 75 steps). Each timing excludes data loading and is the median of
`--repeats`. FLOP counts are nominal, as in issue 3: per model 3 × forward for training plus one
forward over the validation set per record (≈ 578 GFLOP for 10 epochs). The engine runs with
the fused CPU kernels (engine/backends/cpu_kernels.py), with PyTorch operators, or both
(`--cpu-fused`); with both, each repeat runs the two in turn, so the ratio is measured under the
same load.

    python benchmarks/bench_engine.py --epochs 10 --repeats 3
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import resource
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnistlab.config import PRESETS, RunConfig, Schedule, seed_study
from mnistlab.data.dataset import Source, Splits, make_splits
from mnistlab.data.idx import read_idx
from mnistlab.engine import Member, input_spec, train
from mnistlab.engine.device import keep_freed_memory
from mnistlab.model import build_mlp

FASHION = Path("/usr/share/datasets/fashion-mnist")
SINGLE = "lr1e-3-p0.2"  # config A of the seed study: LayerNorm + dropout, lr 1e-3


def fashion_splits() -> Splits:
    part = lambda p: read_idx(FASHION / f"{p}-images-idx3-ubyte.gz",  # noqa: E731
                              FASHION / f"{p}-labels-idx1-ubyte.gz")
    return make_splits(Source("fashion-mnist", part("train"), part("t10k")), 0.2, seed=0)


def nominal_gflop(splits: Splits, schedule: Schedule, hidden=(150, 150)) -> float:
    """Per model: 2·MACs per sample forward; training 3×; a full validation pass per record."""
    dims = [784, *hidden, 10]
    forward = 2 * sum(a * b for a, b in itertools.pairwise(dims))
    steps = -(-len(splits.train) // schedule.batch_size) * schedule.epochs
    records = steps // schedule.record_every
    return (3 * forward * len(splits.train) * schedule.epochs
            + forward * len(splits.val) * records) / 1e9


def idiomatic(splits: Splits, config: RunConfig, schedule: Schedule, seed: int = 0,
              device: str = "cpu") -> float:
    """The seed's loop: DataLoader batches, nn.Sequential, torch.optim.Adam, DataLoader eval
    (on a GPU: each batch moved with `.to(device)`, as that loop is usually written)."""
    spec = input_spec(splits.train, config.input_norm)
    tensors = lambda d: TensorDataset(spec.prepare(d.images), torch.as_tensor(d.labels))  # noqa: E731
    torch.manual_seed(seed)
    loader = DataLoader(tensors(splits.train), batch_size=schedule.batch_size, shuffle=True)
    val_loader = DataLoader(tensors(splits.val), batch_size=1000)
    model = build_mlp(config).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn, history, step = nn.CrossEntropyLoss(), [], 0
    start = time.perf_counter()
    for _ in range(schedule.epochs):
        running = 0.0
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            model.train()
            loss = loss_fn(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item()
            step += 1
            if step % schedule.record_every == 0:
                model.eval()
                with torch.no_grad():
                    val = [loss_fn(model(vx.to(device)), vy.to(device)).item()
                           for vx, vy in val_loader]
                history.append((running / schedule.record_every, sum(val) / len(val)))
                running = 0.0
    return time.perf_counter() - start


def engine(splits: Splits, configs: list[RunConfig], schedule: Schedule, fused: bool) -> float:
    """The engine as a study runs it: all configurations in one stack (they share a layer
    shape), its non-GEMM work in the fused CPU kernels or in PyTorch operators."""
    previous = os.environ.get("MNISTLAB_CPU_FUSED")
    os.environ["MNISTLAB_CPU_FUSED"] = "1" if fused else "0"
    try:
        return train(splits, [Member(c, 0) for c in configs], schedule, device="cpu").seconds
    finally:
        if previous is None:
            del os.environ["MNISTLAB_CPU_FUSED"]
        else:
            os.environ["MNISTLAB_CPU_FUSED"] = previous


def mm_gflops(repeats: int = 10) -> float:
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times) / 1e9


def medians(repeats: int, runs: dict[str, Callable[[], float]]) -> dict[str, float]:
    """Each run's median seconds over `repeats` rounds, the runs taking turns in each round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(run())
    return {name: statistics.median(t) for name, t in times.items()}


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-fused", choices=("on", "off", "both"), default="both",
                        help="the engine with the fused CPU kernels, with PyTorch operators "
                             "(MNISTLAB_CPU_FUSED=0), or both in turn (default)")
    args = parser.parse_args()
    keep_freed_memory()  # train() sets this allocator policy; the idiomatic loop gets it too
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), platform.processor())
    print(f"machine: {model_name}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"load average before: {os.getloadavg()}")
    splits = fashion_splits()
    schedule = Schedule(epochs=args.epochs)
    gflop = nominal_gflop(splits, schedule)
    five = list(seed_study().runs)  # its five presets, one N=5 stack
    print(f"data: {len(splits.train)}/{len(splits.val)}/{len(splits.test)}, "
          f"{args.epochs} epochs, {gflop:.0f} nominal GFLOP per model; peak {peak_mib():.0f} MiB")
    mm = mm_gflops()
    print(f"torch.mm 2048x2048 fp32: {mm:.1f} GFLOP/s")
    kinds = {"on": [True], "off": [False], "both": [True, False]}[args.cpu_fused]
    ways = {True: "fused CPU kernels", False: "PyTorch ops"}
    groups = {"N=1": ("idiomatic, " + SINGLE, [PRESETS[SINGLE]], "engine N=1, " + SINGLE),
              "five": ("idiomatic, five configs one after another", five,
                       "engine, five configs (one N=5 stack)")}
    for group, (baseline, configs, label) in groups.items():
        runs: dict[str, Callable[[], float]] = {
            baseline: lambda configs=configs: sum(idiomatic(splits, c, schedule) for c in configs)}
        for fused in kinds:
            runs[f"{label}, {ways[fused]}"] = (
                lambda configs=configs, fused=fused: engine(splits, configs, schedule, fused))
        results = medians(args.repeats, runs)
        for name, seconds in results.items():
            rate = gflop * len(configs) / seconds
            print(f"{name:72s} {seconds:7.2f} s  {rate:6.1f} GFLOP/s  {rate / mm:5.0%} of mm")
        engines = {fused: results[f"{label}, {ways[fused]}"] for fused in kinds}
        line = ", ".join(f"{ways[fused]} {results[baseline] / t:.2f}x"
                         for fused, t in engines.items())
        if len(engines) == 2:
            line += f"; fused kernels {engines[False] / engines[True]:.2f}x PyTorch ops"
        print(f"speed-up {group}: {line}; peak {peak_mib():.0f} MiB; "
              f"load average {os.getloadavg()}", flush=True)
    print(f"torch.mm 2048x2048 again: {mm_gflops():.1f} GFLOP/s; "
          f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
