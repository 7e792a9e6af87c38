"""The engine on a CUDA GPU against the idiomatic PyTorch loop, measured in one run.

Fashion-MNIST 48,000/12,000, the seed schedule (batch 128, 10 epochs, a record every 75 steps).
The full seed study is 5 configurations × 3 seeds = 15 models in one stack; "training time" is
train()'s own clock (`TrainResult.seconds`): every step, every record with its validation pass,
no data loading and no test pass. The engine's variants switch its two GPU techniques on and
off (MNISTLAB_CUDA_GRAPHS, MNISTLAB_TRITON) so each one's share is visible.

    python benchmarks/bench_gpu.py --data /usr/share/datasets/fashion-mnist --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from mnistlab.config import PRESETS, Schedule
from mnistlab.data.dataset import Source, Splits, make_splits
from mnistlab.data.idx import read_idx
from mnistlab.engine import Member, train

SINGLE = "lr1e-3-p0.2"


def fashion_splits(folder: Path) -> Splits:
    part = lambda p: read_idx(folder / f"{p}-images-idx3-ubyte.gz",  # noqa: E731
                              folder / f"{p}-labels-idx1-ubyte.gz")
    return make_splits(Source("fashion-mnist", part("train"), part("t10k")), 0.2, seed=0)


def mm_tflops(size: int, repeats: int = 20) -> float:
    a, b = torch.randn(size, size, device="cuda"), torch.randn(size, size, device="cuda")
    torch.mm(a, b)
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        torch.mm(a, b)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return 2 * size**3 / statistics.median(times) / 1e12


def idiomatic_gpu(splits: Splits, schedule: Schedule) -> float:
    """The seed's loop as people write it for a GPU: DataLoader batches moved per step,
    `.item()` per step, a validation DataLoader per record."""
    from bench_engine import idiomatic  # the CPU benchmark's loop, given a device

    return idiomatic(splits, PRESETS[SINGLE], schedule, device="cuda")


def engine_run(splits: Splits, members: list[Member], schedule: Schedule, graphs: bool,
               triton: bool, state_path: Path | None = None):
    os.environ["MNISTLAB_CUDA_GRAPHS"] = "1" if graphs else "0"
    os.environ["MNISTLAB_TRITON"] = "1" if triton else "0"
    return train(splits, members, schedule, device="cuda", state_path=state_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    facts = {"gpu": props.name, "torch": torch.__version__,
             "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}
    print(facts)
    splits = fashion_splits(args.data)
    schedule = Schedule(epochs=args.epochs)
    study = [Member(c, s) for s in (0, 1, 2) for c in PRESETS.values()]
    results: dict[str, float] = {}

    def record(name: str, seconds: float) -> None:
        results[name] = seconds
        print(f"{name:66s} {seconds:8.3f} s", flush=True)

    def attempt(name: str, fn) -> None:
        """Run one variant; a failure is printed and the others still run."""
        try:
            record(name, fn())
        except Exception as exc:  # a lent GPU's time is short: keep going
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)

    facts["mm_fp32_tflops_4096"] = mm_tflops(4096)
    print(f"torch.mm 4096² fp32: {facts['mm_fp32_tflops_4096']:.1f} TFLOP/s")
    def study_runs() -> float:
        cold = time.perf_counter()
        first = engine_run(splits, study, schedule, graphs=True, triton=True)
        record("engine study N=15, first run in this process (Triton JIT, capture)", first.seconds)
        facts["first_run_wall_s"] = time.perf_counter() - cold
        runs = [engine_run(splits, study, schedule, graphs=True, triton=True)
                for _ in range(args.repeats)]
        facts["study_identical_across_repeats"] = all(r.rows == first.rows for r in runs)
        last = first.rows[-1]["step"]
        facts["study_best_val_accuracy"] = max(
            r["accuracy"] for r in first.rows if r["split"] == "val" and r["step"] == last)
        return statistics.median(r.seconds for r in runs)

    attempt("engine study N=15, graphs + Triton (median)", study_runs)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        attempt("engine study N=15, graphs + Triton, with epoch-end resume states (median)",
                lambda: statistics.median(
                    engine_run(splits, study, schedule, True, True, state).seconds
                    for _ in range(args.repeats)))
    for graphs, triton, name in ((True, False, "graphs, torch ops"), (False, True, "eager, Triton"),
                                 (False, False, "eager, torch ops")):
        attempt(f"engine study N=15, {name}",
                lambda g=graphs, t=triton: engine_run(splits, study, schedule, g, t).seconds)
    single = [Member(PRESETS[SINGLE], 0)]
    five = [Member(c, 0) for c in PRESETS.values()]
    for members, name in ((single, f"engine N=1 {SINGLE}"), (five, "engine five configs N=5")):
        attempt(f"{name}, graphs + Triton (median)", lambda m=members: statistics.median(
            engine_run(splits, m, schedule, True, True).seconds for _ in range(args.repeats)))
    attempt(f"idiomatic loop on the GPU, {SINGLE}", lambda: idiomatic_gpu(splits, schedule))
    facts["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    idiomatic = results.get(f"idiomatic loop on the GPU, {SINGLE}", math.nan)
    study_s = results.get("engine study N=15, graphs + Triton (median)", math.nan)
    single_s = results.get(f"engine N=1 {SINGLE}, graphs + Triton (median)", math.nan)
    print(f"study (15 models) vs 15 idiomatic runs: {15 * idiomatic / study_s:.0f}x; "
          f"N=1 vs idiomatic: {idiomatic / single_s:.1f}x")
    print(json.dumps(facts, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"facts": facts, "seconds": results}, indent=1))


if __name__ == "__main__":
    main()
