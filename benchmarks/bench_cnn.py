"""Five CNN configurations as one general stack against five idiomatic per-model PyTorch loops.

The target (issue 25): on a CPU the stack is at least 2× faster than the loops, in paired
whole-process timings. Both sides train the same five LeNet-5 configurations (Adam, learning
rates LRS, seed 0) on the same data with the same schedule: batch 128, a validation pass every
75 iterations, the test set once at the end. The loops are what a student writes: a DataLoader
with shuffle, nn.Module, torch.optim.Adam, nn.CrossEntropyLoss, one model after another.

    python benchmarks/bench_cnn.py compare                     # full MNIST, 10 epochs, 3 pairs
    python benchmarks/bench_cnn.py compare --train 2000 --epochs 1 --repeats 1   # a quick look
    python benchmarks/bench_cnn.py stack | loops [...]         # one side, once (what compare times)
    python benchmarks/bench_cnn.py steps                       # one training step, both sides

`steps` times the training step alone, in one process, alternating: the stack's one step of
five models (vmap over functional_call, Adam) against one step of each of the five loops
(nn.Module, torch.optim.Adam), batch 128, random images; no data loading, no evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mnistlab import engine, modules
from mnistlab.config import RunConfig, Schedule
from mnistlab.data import load, make_splits
from mnistlab.data.dataset import Dataset, Splits
from mnistlab.engine import Member

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"
LRS = (3e-4, 1e-3, 2e-3, 3e-3, 5e-3)
SCHEDULE = dict(batch_size=128, record_every=75, log_every=10**9)


def splits(data: str, train: int) -> Splits:
    """The seeded 80/20 split of `data` (its first `train` training images when > 0)."""
    source = load(data, progress=False)
    parts = make_splits(source, 0.2, 0)
    if train:
        cut = parts.train
        parts = Splits(Dataset(cut.images[:train], cut.labels[:train], cut.classes, cut.origin),
                       parts.val, parts.test)
    return parts


def stack(parts: Splits, epochs: int) -> None:
    members = [Member(RunConfig(name=f"lenet5-{lr:g}", model="lenet5", lr=lr), 0) for lr in LRS]
    engine.train(parts, members, Schedule(epochs=epochs, **SCHEDULE), device="cpu")


def loops(parts: Splits, epochs: int) -> None:
    def tensors(d: Dataset) -> TensorDataset:
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 255
        return TensorDataset(x, torch.tensor(d.labels, dtype=torch.int64))

    val = DataLoader(tensors(parts.val), batch_size=1000)
    test = DataLoader(tensors(parts.test), batch_size=1000)
    loss_fn = nn.CrossEntropyLoss()

    def score(model: nn.Module, loader: DataLoader) -> float:
        model.eval()
        with torch.no_grad():
            return sum((model(x).argmax(1) == y).sum().item() for x, y in loader) / len(
                loader.dataset)

    for lr in LRS:
        torch.manual_seed(0)
        model = modules.lenet5()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        train = DataLoader(tensors(parts.train), batch_size=128, shuffle=True)
        step = 0
        for _ in range(epochs):
            for x, y in train:
                model.train()
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if step % 75 == 0:
                    score(model, val)
        score(model, val)
        score(model, test)


def steps(repeats: int = 5, per_round: int = 10) -> None:
    """Milliseconds per training step of the stack and of the five loops, alternating."""
    from mnistlab.engine.module_stack import ModuleStack
    from mnistlab.model import InputSpec

    torch.manual_seed(0)
    n, batch = len(LRS), 128
    spec = InputSpec((28, 28), tuple(str(c) for c in range(10)), 0.0, 1.0)
    members = [Member(RunConfig(name=f"lenet5-{lr:g}", model="lenet5", lr=lr), 0) for lr in LRS]
    stacked = ModuleStack(members, spec, torch.device("cpu"), repeats * per_round + 2)
    x, y, frozen = torch.randn(n, batch, 784), torch.randint(0, 10, (n, batch)), torch.zeros(n)
    nets = [modules.lenet5() for _ in LRS]
    optimisers = [torch.optim.Adam(m.parameters(), lr=lr) for m, lr in zip(nets, LRS, strict=True)]
    loss_fn = nn.CrossEntropyLoss()

    def stack_step(i: int) -> None:
        with torch.no_grad():
            stacked.train_step(x, y, i, frozen)

    def loops_step(_: int) -> None:
        for net, opt in zip(nets, optimisers, strict=True):
            loss = loss_fn(net(x[0].view(batch, 1, 28, 28)), y[0])
            opt.zero_grad()
            loss.backward()
            opt.step()

    ms: dict[str, list[float]] = {"stack": [], "loops": []}
    sides = {"stack": stack_step, "loops": loops_step}
    for side in sides.values():
        side(1)  # warm-up
    for r in range(repeats):
        for name, side in sides.items():
            start = time.perf_counter()
            for i in range(per_round):
                side(2 + r * per_round + i)
            ms[name].append((time.perf_counter() - start) / per_round * 1000)
    stack_ms, loops_ms = (statistics.median(ms[s]) for s in ("stack", "loops"))
    print(f"one training step of five LeNet-5, {torch.get_num_threads()} threads: stack "
          f"{stack_ms:.1f} ms, five loops {loops_ms:.1f} ms (medians of {repeats} rounds of "
          f"{per_round}); the stack is {loops_ms / stack_ms:.2f}× the loops' speed")


def compare(args: argparse.Namespace) -> None:
    """Paired whole-process timings, the two sides alternating; medians and their ratio."""
    seconds: dict[str, list[float]] = {"stack": [], "loops": []}
    for _ in range(args.repeats):
        for side in seconds:
            command = [sys.executable, __file__, side, "--data", args.data, "--epochs",
                       str(args.epochs), "--train", str(args.train)]
            start = time.perf_counter()
            subprocess.run(command, check=True)
            seconds[side].append(time.perf_counter() - start)
    stack_s, loops_s = (statistics.median(seconds[s]) for s in ("stack", "loops"))
    print(f"five LeNet-5 configurations, {args.epochs} epoch(s), {torch.get_num_threads()} "
          f"threads: stack {stack_s:.1f} s, loops {loops_s:.1f} s (medians of "
          f"{args.repeats}); the stack is {loops_s / stack_s:.2f}× the loops' speed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("side", choices=("compare", "stack", "loops", "steps"))
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train", type=int, default=0, help="training images (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.side == "compare":
        compare(args)
        return
    if args.side == "steps":
        steps()
        return
    {"stack": stack, "loops": loops}[args.side](splits(args.data, args.train), args.epochs)


if __name__ == "__main__":
    main()
