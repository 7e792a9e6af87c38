"""The switches that change a run's numbers, resolved once and recorded with the run.

Why: the same configuration and seed give other bits with the fused CPU step than with PyTorch's
operators (another dropout stream, other summation orders), with TF32 than with float32
products, on CUDA than on a CPU, with another PyTorch. A number is reproducible only together
with these, so env.json and every checkpoint record them, a resume state's fingerprint holds
them, and a resumed run trains with the ones it recorded, whatever the environment says now
(`honour`), or refuses in one line where they cannot be had here.

The switches and their environment variables (each way is bit-reproducible):
- `cpu_step`: "fused" (backends/cpu_kernels.py, C++ compiled at first use; the default) or "torch"
  (PyTorch operators: MNISTLAB_CPU_FUSED=0, for debugging, or where no compiler is found).
- `triton`: CUDA's fused Triton kernels (MNISTLAB_TRITON=0 switches them off).
- `cuda_graphs`: CUDA's step replayed as one graph (MNISTLAB_CUDA_GRAPHS=0 switches it off).
- `matmul`: "fp32", or "tf32" for CUDA's float32 products with MNISTLAB_TF32=1.
A switch that does not apply to the device is None, so two CPU runs never differ by a CUDA
setting.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from mnistlab.errors import MnistlabError

# switch -> (environment variable, its value that turns the non-default way on)
VARIABLES = {
    "cpu_step": ("MNISTLAB_CPU_FUSED", "0"),
    "triton": ("MNISTLAB_TRITON", "0"),
    "cuda_graphs": ("MNISTLAB_CUDA_GRAPHS", "0"),
    "matmul": ("MNISTLAB_TF32", "1"),
}


@dataclass(frozen=True)
class Arithmetic:
    """How a stack computes: the device kind, each switch, and PyTorch's version."""

    device: str  # "cpu", "cuda" or "mps"
    cpu_step: str | None  # CPU: "fused" or "torch"
    triton: bool | None  # CUDA: the fused Triton kernels
    cuda_graphs: bool | None  # CUDA: the step replayed as a graph
    matmul: str  # "fp32" or "tf32"
    torch: str  # torch.__version__

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any, where: str) -> Arithmetic:
        """What env.json or a checkpoint recorded; a one-line error naming `where` if damaged."""
        fields = set(cls.__dataclass_fields__)
        if not isinstance(values, dict) or set(values) != fields:
            raise MnistlabError(f"{where}: damaged 'arithmetic' record (expected the fields "
                                f"{', '.join(sorted(fields))}); start a new run")
        return cls(**values)

    def describe(self) -> str:
        """One phrase for a note: `cpu, fused CPU step, fp32`."""
        parts = [self.device]
        if self.cpu_step is not None:
            parts.append(f"{self.cpu_step} CPU step")
        if self.triton is not None:
            parts.append("Triton kernels" if self.triton else "PyTorch operators")
        if self.cuda_graphs is not None:
            parts.append("CUDA graphs" if self.cuda_graphs else "no CUDA graphs")
        return ", ".join([*parts, self.matmul])


def _variable_on(switch: str) -> bool:
    """Whether the environment turns `switch` to its non-default way."""
    name, value = VARIABLES[switch]
    return os.environ.get(name) == value


def requested(device: torch.device) -> Arithmetic:
    """The arithmetic the environment asks for on `device`, as it can be had here: the fused CPU
    step falls back to PyTorch operators where it cannot be built (said once on stderr), the
    Triton kernels where Triton does not import."""
    kind = device.type
    cpu_step = triton = graphs = None
    if kind == "cpu":
        cpu_step = "torch" if _variable_on("cpu_step") or not fused_cpu_available() else "fused"
    if kind == "cuda":
        triton = not _variable_on("triton") and triton_available()
        graphs = not _variable_on("cuda_graphs")
    matmul = "tf32" if kind == "cuda" and _variable_on("matmul") else "fp32"
    return Arithmetic(kind, cpu_step, triton, graphs, matmul, torch.__version__)


def fused_cpu_available() -> bool:
    from mnistlab.engine.backends import cpu_kernels

    return cpu_kernels.library() is not None


def triton_available() -> bool:
    try:
        from mnistlab.engine.backends import triton_kernels  # noqa: F401
    except ImportError:
        return False
    return True


def honour(recorded: Arithmetic, device: torch.device, where: str) -> Arithmetic:
    """`recorded` itself, checked to be possible on `device` here: a run resumes with the
    arithmetic it started with, so it ends as the uninterrupted run would. What cannot be had
    here is one line naming the switch and what to do (`where`: the run directory or file)."""
    fix = "resume it where that is possible, or start a new run"
    if recorded.device != device.type:
        raise MnistlabError(f"{where}: trained on {recorded.device}, this run is on "
                            f"{device.type}; resume with --device {recorded.device}, or start "
                            "a new run")
    if recorded.torch != torch.__version__:
        raise MnistlabError(f"{where}: trained with torch {recorded.torch}, this is torch "
                            f"{torch.__version__} (other kernels, other numbers); install "
                            f"torch=={recorded.torch.split('+')[0]} to resume, or start a new run")
    if recorded.cpu_step == "fused" and not fused_cpu_available():
        raise MnistlabError(f"{where}: trained with the fused CPU step, which cannot be built "
                            f"here (see the line above); install g++ or set CXX, then {fix}")
    if recorded.triton and not triton_available():
        raise MnistlabError(f"{where}: trained with the Triton kernels, and Triton does not "
                            f"import here; install the triton that ships with torch, then {fix}")
    return recorded


def variables(arithmetic: Arithmetic) -> list[str]:
    """The environment settings that ask for `arithmetic`'s switches on its device."""
    values = {"cpu_step": arithmetic.cpu_step == "fused" if arithmetic.cpu_step else None,
              "triton": arithmetic.triton, "cuda_graphs": arithmetic.cuda_graphs,
              "matmul": arithmetic.matmul == "tf32" if arithmetic.device == "cuda" else None}
    return [f"{VARIABLES[k][0]}={'1' if on else '0'}" for k, on in values.items()
            if on is not None]


def differences(a: Arithmetic, b: Arithmetic) -> list[str]:
    """The switches that differ, as `name a → b` phrases."""
    return [f"{k} {v} → {getattr(b, k)}" for k, v in a.as_dict().items() if getattr(b, k) != v]


def overridden(recorded: Arithmetic, device: torch.device) -> list[str]:
    """The environment variables set now that ask for another arithmetic than `recorded`
    (so a resume can say that it honours the run's own instead)."""
    wanted = replace(requested(device), torch=recorded.torch)
    return [f"{VARIABLES[k][0]}={os.environ.get(VARIABLES[k][0])}"
            for k in VARIABLES if getattr(wanted, k) != getattr(recorded, k)
            and VARIABLES[k][0] in os.environ]
