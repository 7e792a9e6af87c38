"""The engine on a CUDA GPU at sweep scale: stacks of 15, 150 and 1,500 models, fp32 and TF32.

Fashion-MNIST 48,000/12,000, the seed schedule (batch 128, 10 epochs, a record every 75 steps
with a full validation pass). Each stack holds random configurations as a sweep draws them
(lr log-uniform, dropout uniform, LayerNorm on or off; 784-150-150-10) × 3 seeds. "Seconds"
is train()'s own clock (`TrainResult.seconds`: every step and record, no data loading, no
model building, no test pass); TFLOP/s are nominal (bench_engine.nominal_gflop: per model 3 ×
forward for training plus a forward pass over the validation set per record) against the same
run's fp32 `torch.mm` 4096² rate. Then the same stacks with MNISTLAB_TF32=1: their speed and
how far their mean final validation accuracy moves. The first run in the process (Triton
compiles its kernels) is a small warm-up, timed apart.

    python benchmarks/bench_gpu.py --data /usr/share/datasets/fashion-mnist   # ≈ 1-3 min, H200
    python benchmarks/bench_gpu.py --techniques   # also: graphs/Triton on and off, idiomatic loop
    python benchmarks/bench_gpu.py --smoke        # tiny, on the CPU: checks the script works

Writes benchmarks/results/scale-<gpu>-<date>.json (or --json PATH) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_engine import nominal_gflop  # a sibling script, not a package

from mnistlab.config import PRESETS, RunConfig, Schedule
from mnistlab.data.dataset import Dataset, Source, Splits, make_splits
from mnistlab.data.idx import read_idx
from mnistlab.engine import Member, TrainResult, train

SIZES = (15, 150, 1500)
SEEDS = 3  # each configuration × seeds 0-2, as a sweep with `seeds = 3` stacks them
HIDDEN = (150, 150)
SINGLE = "lr1e-3-p0.2"
RESULTS = Path(__file__).parent / "results"


def fashion_splits(folder: Path) -> Splits:
    part = lambda p: read_idx(folder / f"{p}-images-idx3-ubyte.gz",  # noqa: E731
                              folder / f"{p}-labels-idx1-ubyte.gz")
    return make_splits(Source("fashion-mnist", part("train"), part("t10k")), 0.2, seed=0)


def synthetic_splits(n: int = 600) -> Splits:
    """Random 28×28 images for --smoke: the code path, not the numbers."""
    rng = np.random.default_rng(0)
    data = lambda k: Dataset(rng.integers(0, 256, (k, 28, 28), dtype=np.uint8),  # noqa: E731
                             np.arange(k) % 10, origin="synthetic")
    return make_splits(Source("synthetic", data(n), data(n // 4)), 0.2, seed=0)


def sweep_members(n: int, seed: int = 0) -> list[Member]:
    """n models as a random sweep draws them: n / SEEDS configurations × SEEDS seeds."""
    rng = np.random.default_rng(seed)
    configs = [
        RunConfig(name=f"r{i}", hidden=HIDDEN, lr=float(f"{10 ** rng.uniform(-4, -2.5):.3g}"),
                  dropout=float(f"{rng.uniform(0, 0.5):.3g}"),
                  layernorm=bool(rng.integers(2)))
        for i in range(max(1, n // SEEDS))
    ]
    return [Member(c, s) for c in configs for s in range(SEEDS)][:n]


@contextlib.contextmanager
def environment(**values: str) -> Iterator[None]:
    """MNISTLAB_* switches set for the duration (train() reads them when it resolves the
    device and builds the stack)."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def mm_tflops(device: str, size: int = 4096, repeats: int = 20) -> float:
    """torch.mm's float32 rate on `device` at size², as the matmul switches stand now."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        torch.mm(a, b)
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e12


def final_val_accuracy(result: TrainResult) -> list[float]:
    """Each model's validation accuracy at the last record."""
    last = result.rows[-1]["step"]
    return [r["accuracy"] for r in result.rows if r["split"] == "val" and r["step"] == last]


def measure(splits: Splits, members: list[Member], schedule: Schedule, device: str,
            mm: float) -> dict[str, Any]:
    """One stack trained once: time, rates, peak GPU memory, final validation accuracy."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    wall = time.perf_counter()
    result = train(splits, members, schedule, device=device)
    wall = time.perf_counter() - wall
    tflop = nominal_gflop(splits, schedule, HIDDEN) * len(members) / 1e3
    accuracy = final_val_accuracy(result)
    return {
        "models": len(members), "seconds": result.seconds, "wall_seconds": wall,
        "models_per_second": len(members) / result.seconds,
        "tflops": tflop / result.seconds, "of_fp32_mm": tflop / result.seconds / mm,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
        "mean_final_val_accuracy": statistics.fmean(accuracy),
        "final_val_accuracy": accuracy,
    }


def attempt(name: str, fn: Callable[[], Any], failures: dict[str, str]) -> Any:
    """fn(), or None with the failure noted: a lent GPU's time is short, the others still run."""
    try:
        return fn()
    except Exception as exc:  # reported, not hidden
        failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"{name}: FAILED {failures[name]}", flush=True)
        return None


def scaling(splits: Splits, schedule: Schedule, sizes: tuple[int, ...], device: str,
            facts: dict[str, Any], failures: dict[str, str],
            save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """fp32 then TF32 for each stack size, smallest first, saved after each run (a run cut
    short by a time limit keeps what was measured); a TF32 row carries its change vs fp32."""
    warm = time.perf_counter()
    train(splits, sweep_members(min(sizes)), Schedule(epochs=1, batch_size=schedule.batch_size,
                                                      record_every=schedule.record_every),
          device=device)
    facts["warmup_wall_seconds"] = time.perf_counter() - warm
    rows: list[dict[str, Any]] = []
    for n in sizes:
        fp32 = None
        for precision, switch in (("fp32", "0"), ("tf32", "1")):
            with environment(MNISTLAB_TF32=switch):
                row = attempt(f"N={n} {precision}", lambda n=n: measure(
                    splits, sweep_members(n), schedule, device, facts["mm_fp32_tflops"]),
                    failures)
            if row is None:
                continue
            row["precision"] = precision
            if precision == "fp32":
                fp32 = row
            elif fp32 is not None:
                row["val_accuracy_change"] = (row["mean_final_val_accuracy"]
                                              - fp32["mean_final_val_accuracy"])
                row["largest_model_change"] = max(
                    abs(a - b) for a, b in zip(row["final_val_accuracy"],
                                               fp32["final_val_accuracy"], strict=True))
                row["speedup_vs_fp32"] = fp32["seconds"] / row["seconds"]
            rows.append(row)
            print(line(row), flush=True)
            save(rows)
    return rows


def line(row: dict[str, Any]) -> str:
    """A row of `table`."""
    peak = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
    moved = ""
    if "val_accuracy_change" in row:
        moved = (f"{100 * row['val_accuracy_change']:+.2f} (largest "
                 f"{100 * row['largest_model_change']:.2f}), {row['speedup_vs_fp32']:.2f}× fp32")
    return (f"| {row['models']} | {row['precision']} | {row['seconds']:.2f} | "
            f"{row['models_per_second']:.1f} | {row['tflops']:.2f} | {row['of_fp32_mm']:.0%} | "
            f"{peak} | {100 * row['mean_final_val_accuracy']:.2f} | {moved} |")


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| models | matmul | seconds | models/s | TFLOP/s | of fp32 mm | peak GiB | "
            "mean final val acc % | TF32 − fp32 (points), speed |\n"
            "|---:|---|---:|---:|---:|---:|---:|---:|---|")
    return "\n".join([head, *(line(r) for r in rows)])


def techniques(splits: Splits, schedule: Schedule, repeats: int, facts: dict[str, Any],
               failures: dict[str, str]) -> dict[str, float]:
    """The seed study (5 configurations × 3 seeds) with the engine's GPU techniques on and off
    (MNISTLAB_CUDA_GRAPHS, MNISTLAB_TRITON), N=1 and N=5, and the idiomatic loop on the GPU."""
    from bench_engine import idiomatic

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32, as train() sets it without the switch
    study = [Member(c, s) for s in (0, 1, 2) for c in PRESETS.values()]
    seconds: dict[str, float] = {}

    def run(members: list[Member], graphs: bool, triton: bool,
            state_path: Path | None = None) -> TrainResult:
        with environment(MNISTLAB_CUDA_GRAPHS=str(int(graphs)), MNISTLAB_TRITON=str(int(triton))):
            return train(splits, members, schedule, device="cuda", state_path=state_path)

    def record(name: str, fn: Callable[[], float]) -> None:
        value = attempt(name, fn, failures)
        if value is not None:
            seconds[name] = value
            print(f"{name:66s} {value:8.3f} s", flush=True)

    def study_runs() -> float:
        first = run(study, True, True)
        runs = [run(study, True, True) for _ in range(repeats)]
        facts["study_identical_across_repeats"] = all(r.rows == first.rows for r in runs)
        return statistics.median(r.seconds for r in runs)

    record("engine study N=15, graphs + Triton (median)", study_runs)
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(tmp) / "state.safetensors"
        record("engine study N=15, graphs + Triton, with epoch-end resume states (median)",
               lambda: statistics.median(run(study, True, True, state).seconds
                                         for _ in range(repeats)))
    for graphs, triton, name in ((True, False, "graphs, torch ops"), (False, True, "eager, Triton"),
                                 (False, False, "eager, torch ops")):
        record(f"engine study N=15, {name}",
               lambda g=graphs, t=triton: run(study, g, t).seconds)
    single = [Member(PRESETS[SINGLE], 0)]
    five = [Member(c, 0) for c in PRESETS.values()]
    for members, name in ((single, f"engine N=1 {SINGLE}"), (five, "engine five configs N=5")):
        record(f"{name}, graphs + Triton (median)", lambda m=members: statistics.median(
            run(m, True, True).seconds for _ in range(repeats)))
    record(f"idiomatic loop on the GPU, {SINGLE}",
           lambda: idiomatic(splits, PRESETS[SINGLE], schedule, device="cuda"))
    return seconds


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--techniques", action="store_true",
                        help="also the seed study with graphs/Triton on and off, and the "
                             "idiomatic loop")
    parser.add_argument("--repeats", type=int, default=3, help="for --techniques")
    parser.add_argument("--smoke", action="store_true",
                        help="3 models, 1 epoch, synthetic data, on the CPU: a check that runs")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="cuda, or cpu with --smoke (or to try the full mode's code path)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke else "cuda")
    if args.techniques and device != "cuda":
        parser.error("--techniques compares the CUDA techniques: it needs --device cuda")
    if args.smoke:
        splits, sizes = synthetic_splits(), (3,)
        schedule = Schedule(epochs=1, record_every=2)
    else:
        splits, sizes = fashion_splits(args.data), tuple(args.sizes)
        schedule = Schedule(epochs=args.epochs)
    name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
    facts: dict[str, Any] = {
        "device": name, "torch": torch.__version__, "data": splits.train.origin,
        "sizes": {"train": len(splits.train), "val": len(splits.val)},
        "schedule": {"epochs": schedule.epochs, "batch_size": schedule.batch_size,
                     "record_every": schedule.record_every},
        "nominal_gflop_per_model": nominal_gflop(splits, schedule, HIDDEN),
    }
    torch.backends.cuda.matmul.allow_tf32 = False
    facts["mm_fp32_tflops"] = mm_tflops(device, 4096 if device == "cuda" else 512)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        facts["mm_tf32_tflops"] = mm_tflops(device)
        torch.backends.cuda.matmul.allow_tf32 = False
    print(json.dumps(facts), flush=True)
    path = args.json
    if path is None and device == "cuda":
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")
        path = RESULTS / f"scale-{slug}-{datetime.date.today()}.json"
    out: dict[str, Any] = {"facts": facts, "scaling": [], "techniques": {}, "failures": {}}

    def save(rows: list[dict[str, Any]]) -> None:
        out["scaling"] = rows
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(out, indent=1))

    rows = scaling(splits, schedule, sizes, device, facts, out["failures"], save)
    if args.techniques:
        out["techniques"] = techniques(splits, schedule, args.repeats, facts, out["failures"])
    if device == "cuda":
        facts["peak_gpu_gib_overall"] = torch.cuda.max_memory_allocated() / 2**30
    save(rows)
    print()
    print(table(rows))
    if path is not None:
        print(f"\nwritten: {path}")
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
