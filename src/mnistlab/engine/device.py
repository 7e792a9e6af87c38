"""Which device a run trains on, and what is set up there for it."""

from __future__ import annotations

import ctypes

import torch

from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.errors import MnistlabError


def resolve_device(name: str) -> torch.device:
    """auto → CUDA, then MPS, then CPU; a named device must exist here."""
    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name == "auto":
        return torch.device(next((d for d, ok in available.items() if ok), "cpu"))
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MnistlabError(f"unknown device '{name}'; use auto, cpu, cuda or mps") from None
    if device.type not in ("cpu", *available):
        raise MnistlabError(f"unsupported device '{name}'; use auto, cpu, cuda or mps")
    if device.type != "cpu" and not available[device.type]:
        raise MnistlabError(f"device '{name}' is not available on this machine; use auto or cpu")
    return device


def cluster_device(name: str, gpus: bool) -> str:
    """The device that `name` means on the workers of a cluster with (or without) GPUs, which
    this machine need not have: auto is CUDA where the cluster has GPUs, else the CPU; a named
    device is itself."""
    if name == "auto":
        return "cuda" if gpus else "cpu"
    return name


def set_matmul(arithmetic: Arithmetic) -> None:
    """cuBLAS's float32 products as `arithmetic` says: "tf32" rounds their inputs to TF32's
    10-bit mantissa on tensor cores (faster, other numbers). The switch is process-wide, so it
    is set for every CUDA run: the run's arithmetic decides, not whatever ran before."""
    if arithmetic.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = arithmetic.matmul == "tf32"


def keep_freed_memory() -> None:
    """Let glibc keep freed buffers for reuse instead of handing them back to the OS.

    By default a step's multi-megabyte temporaries are unmapped when freed and page-faulted in
    again on the next step: about a fifth of a CPU step here (measured). Elsewhere (macOS, no
    glibc) there is nothing to tune.
    """
    try:
        mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    except (OSError, TypeError):  # no C library handle to look into (Windows)
        return
    if mallopt is not None:
        mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: only huge blocks get their own mapping
        mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep up to 1 GiB of free heap


def sync(device: torch.device) -> None:
    """Wait until a CUDA device has done the work queued on it; other devices are not waited
    for."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
