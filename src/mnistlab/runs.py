"""The run directory: every result of a study on disk, each file written atomically.

A write goes to a temp file in the same folder, is flushed and fsynced, then renamed over the
target, so a crash or a full disk leaves the previous version intact and never a half-written file.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from mnistlab.errors import MnistlabError

_UMASK = os.umask(0o022)
os.umask(_UMASK)
METRIC_COLUMNS = ("run", "seed", "step", "epoch", "split", "loss", "accuracy")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success rename it over `path`, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; results should be as readable as any file
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise MnistlabError(
                f"{path}: disk full while writing; free space and rerun "
                "(--resume RUN_DIR continues from the last checkpoint); "
                "nothing already written was lost"
            ) from None
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, value: Any) -> None:
    """JSON written atomically. A diverged run's metrics are NaN, written as the `NaN` token that
    Python, pandas and JavaScript's JSON5 read (strict parsers need `allow_nan` or equivalent)."""
    atomic_write_text(path, json.dumps(value, indent=2) + "\n")


def metrics_csv(rows: Iterable[Mapping[str, Any]]) -> str:
    """Long format: one row per (run, seed, step, split)."""
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=METRIC_COLUMNS, lineterminator="\n", extrasaction="ignore"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return [
            {
                "run": r["run"],
                "seed": int(r["seed"]),
                "step": int(r["step"]),
                "epoch": float(r["epoch"]),
                "split": r["split"],
                "loss": float(r["loss"]),
                "accuracy": float(r["accuracy"]),
            }
            for r in csv.DictReader(f)
        ]


def environment(seed_info: Mapping[str, Any] | None = None, device: str = "") -> dict[str, Any]:
    """Versions, device and git revision: what it takes to say where a number came from."""
    import numpy
    import torch

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    from mnistlab import __version__

    return {
        "mnistlab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_rev": rev or None,
        "created": datetime.now().isoformat(timespec="seconds"),
        **dict(seed_info or {}),
    }


class RunDir:
    """Paths and writers of one run directory (layout in DESIGN.md)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def create(cls, out: str | Path, name: str) -> RunDir:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(out) / f"{name}-{stamp}"
        suffix = 1
        while root.exists():
            suffix += 1
            root = Path(out) / f"{name}-{stamp}-{suffix}"
        root.mkdir(parents=True)
        return cls(root)

    @classmethod
    def existing(cls, root: str | Path) -> RunDir:
        run = cls(root)
        if not run.config_path.is_file():
            raise MnistlabError(
                f"{run.root}: not a run directory (no study.toml); pass a folder made by mnistlab"
            )
        return run

    config_path = property(lambda self: self.root / "study.toml")
    env_path = property(lambda self: self.root / "env.json")
    metrics_path = property(lambda self: self.root / "metrics.csv")
    summary_path = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    plots = property(lambda self: self.root / "plots")
    report_path = property(lambda self: self.root / "report.html")
    tensorboard = property(lambda self: self.root / "tb")
    state_path = property(lambda self: self.root / "checkpoints" / "state.safetensors")

    def model_path(self, run: str, seed: int) -> Path:
        return self.checkpoints / f"{run}-seed{seed}.safetensors"

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        atomic_write_text(self.metrics_path, metrics_csv(rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        return json.loads(self.summary_path.read_text(encoding="utf-8"))
