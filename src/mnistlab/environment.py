"""env.json: what it takes to say where a number came from (versions, machine, device, every
arithmetic switch that changes a number, git revision), recorded with every run."""

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
        "device": device,
        "matmul": arithmetic.matmul if arithmetic else "fp32",  # kept flat: older readers
        "arithmetic": arithmetic.as_dict() if arithmetic else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "git_rev": rev or None,
        "created": datetime.now().isoformat(timespec="seconds"),
        **dict(extra or {}),
    }
