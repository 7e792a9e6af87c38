"""TensorBoard event files from metrics.csv, so `tensorboard --logdir RUN_DIR/tb` shows the curves.

One TensorBoard run per (configuration, seed) named `<run>-seed<k>`, with the scalars
loss/train, loss/val, accuracy/train and accuracy/val against the global iteration.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mnistlab.report.plots import safe_name


def write_tensorboard(rows: Sequence[Mapping[str, Any]], folder: Path) -> list[Path]:
    """(Re)write `folder` from metrics rows; returns the per-run event folders.

    Event files only ever append, so re-rendering builds a fresh tree in a temp folder beside
    `folder` and swaps it in: a reader never sees a half-written or doubled set of curves.
    """
    from torch.utils.tensorboard import SummaryWriter  # slow import, only when writing

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    by_run: dict[tuple[str, int], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        by_run[(r["run"], r["seed"])].append(r)
    fresh = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for (run, seed), run_rows in by_run.items():
            writer = SummaryWriter(log_dir=str(fresh / f"{safe_name(run)}-seed{seed}"))
            for r in sorted(run_rows, key=lambda r: r["step"]):
                for metric in ("loss", "accuracy"):
                    writer.add_scalar(f"{metric}/{r['split']}", r[metric], r["step"])
            writer.close()
        _swap(fresh, folder)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return sorted(p for p in folder.iterdir() if p.is_dir())


def _swap(fresh: Path, folder: Path) -> None:
    """Replace `folder` by `fresh` with two renames; the old tree is deleted afterwards."""
    old = None
    if folder.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old.", dir=folder.parent))
        folder.rename(old / folder.name)
    fresh.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
