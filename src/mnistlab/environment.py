"""env.json: what it takes to say where a number came from (versions, machine, device, every
arithmetic switch that changes a number, git revision), recorded with every run.

Why the CPU is recorded as well as the switches: the same code, seed and switches give other
bits on another CPU model, because MKL and PyTorch pick their kernels (vector width, blocking for
the caches) by the CPU they find, and split work by the thread count. Figures re-run bit for bit
on the same kind of CPU with the same threads; `cpu_identity` names that kind.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from mnistlab._version import __version__
from mnistlab.engine import Arithmetic, requested


def environment(extra: Mapping[str, Any] | None = None, device: str = "",
                arithmetic: Arithmetic | None = None) -> dict[str, Any]:
    """Versions, device, the arithmetic (every switch that changes a number: engine.Arithmetic;
    by default what the environment asks for on `device`) and git revision: what it takes to
    say where a number came from."""
    import numpy
    import torch

    if arithmetic is None and device:
        arithmetic = requested(torch.device(device))

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
    return {
        "mnistlab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu_identity(),
        "device": device,
        "matmul": arithmetic.matmul if arithmetic else "fp32",  # kept flat: older readers
        "arithmetic": arithmetic.as_dict() if arithmetic else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_rev": rev or None,
        "created": datetime.now().isoformat(timespec="seconds"),
        **dict(extra or {}),
    }


def cpu_identity() -> dict[str, Any]:
    """What decides a CPU run's bits besides the code and the switches: the CPU's vendor,
    family and model (MKL's kernels and cache blocking), the widest vector instructions PyTorch
    uses here, and its thread count. `key` names it in one word, for file names."""
    import torch

    info = _cpuinfo()
    vendor = info.get("vendor_id", platform.machine() or "unknown")
    family, model = info.get("cpu family", "?"), info.get("model", "?")
    isa = torch.backends.cpu.get_cpu_capability()
    threads = torch.get_num_threads()
    return {"vendor": vendor, "family": family, "model": model, "name": info.get("model name"),
            "isa": isa, "threads": threads,
            "key": f"{vendor}-{family}-{model}-{isa}-{threads}t".lower()}


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo ({} where there is none: not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        name, _, value = line.partition(":")
        fields[name.strip()] = value.strip()
    return fields
