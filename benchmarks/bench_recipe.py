"""What the training recipe costs on this machine (issue 14), measured in one run.

Fashion-MNIST 48,000/12,000 (as bench_engine.py), the seed schedule, the five seed presets as one
N=5 stack; each figure the median of `--repeats` engine training times (no data loading):
- `presets`: the five presets as they are (constant lr, no smoothing, no augmentation). Run with
  PYTHONPATH pointing at an older checkout (`--only presets`) it times that code on the same
  data, which is how BENCHMARKS.md compares before and after (paired, alternating runs).
- `+ schedule`: each preset with one-cycle, AdamW's decoupled decay and label smoothing.
- `+ augmentation`: each preset with shifts (2 px), rotations (8°) and zooms (8 %).
- the same for one model (N=1, `lr1e-3-p0.2`), and the augmentation's cost per step.

    python benchmarks/bench_recipe.py --epochs 2 --repeats 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_engine import SINGLE, fashion_splits

from mnistlab.config import PRESETS, Schedule
from mnistlab.engine import Member, train

SCHEDULED = {"lr_schedule": "onecycle", "warmup": 0.3, "decoupled_decay": 0.05,
             "label_smoothing": 0.1}
AUGMENTED = {"translate": 2, "rotate": 8.0, "zoom": 0.08}


def seconds(splits, configs, schedule: Schedule, repeats: int) -> float:
    members = [Member(c, 0) for c in configs]
    return statistics.median(train(splits, members, schedule, device="cpu").seconds
                             for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=["presets", "all"], default="all")
    args = parser.parse_args()
    splits = fashion_splits()
    schedule = Schedule(epochs=args.epochs)
    steps = -(-len(splits.train) // schedule.batch_size) * schedule.epochs
    five = list(PRESETS[name] for name in ("baseline", "layernorm-dropout", "lr1e-3-p0.2",
                                           "lr5e-4-p0.4", "lr1e-4-p0.6"))
    figures = {"presets N=5": seconds(splits, five, schedule, args.repeats)}
    if args.only == "all":
        with_ = lambda configs, extra: [dataclasses.replace(c, **extra) for c in configs]  # noqa: E731
        single = [PRESETS[SINGLE]]
        figures |= {
            "presets N=5 + schedule, AdamW, smoothing": seconds(
                splits, with_(five, SCHEDULED), schedule, args.repeats),
            "presets N=5 + augmentation": seconds(splits, with_(five, AUGMENTED), schedule,
                                                  args.repeats),
            f"N=1 {SINGLE}": seconds(splits, single, schedule, args.repeats),
            f"N=1 {SINGLE} + augmentation": seconds(splits, with_(single, AUGMENTED), schedule,
                                                    args.repeats),
        }
    for name, value in figures.items():
        print(f"{name:45s} {value:7.2f} s  {1000 * value / steps:6.2f} ms/step")
    if args.only == "all":
        base, aug = figures[f"N=1 {SINGLE}"], figures[f"N=1 {SINGLE} + augmentation"]
        print(f"augmentation, N=1: +{1000 * (aug - base) / steps:.2f} ms/step "
              f"({aug / base - 1:+.0%})")
    print(json.dumps({"torch": torch.__version__, "epochs": args.epochs, "steps": steps,
                      "seconds": figures}))


if __name__ == "__main__":
    main()
