"""Scale-out on a Ray cluster: each job is one Ray task, results come back as tasks finish.

A task runs the pure compute step (`executor.train_job`) and returns the job's result; the
driver records it, so a task retried after a lost worker can never leave half a result or a
duplicate behind. The splits go to the object store once and every task reads them from there.

Ray is an optional extra (`pip install "mnistlab[ray]"`), imported only here and only when an
experiment names a Ray address.
"""

from __future__ import annotations

import contextlib
import math
import socket
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from mnistlab.data.dataset import Splits
from mnistlab.engine import Arithmetic, cluster_device
from mnistlab.errors import MnistlabError
from mnistlab.experiment.executor import JobResult, Watcher, train_job
from mnistlab.experiment.plan import Job, auto_stack_size
from mnistlab.experiment.trials import Trial

CPUS_PER_STACK = 1  # the engine's GEMMs on one core each; a many-core node runs many stacks
MAX_RETRIES = 3  # re-runs of a task whose worker or node died (application errors are not retried)


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise MnistlabError(
            "--ray-address needs Ray, which is not installed; pip install 'mnistlab[ray]'"
        ) from None
    return ray


@contextlib.contextmanager
def connected(address: str) -> Iterator[Any]:
    """The `ray` module, connected to the cluster at `address` (auto or HOST:PORT) for the
    duration; an existing connection is reused and left open."""
    ray = _ray()
    if ray.is_initialized():
        yield ray
        return
    try:
        _check_reachable(address)
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    except (OSError, ValueError, RuntimeError) as exc:  # ConnectionError is an OSError
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MnistlabError(
            f"--ray-address {address}: cannot connect to a Ray cluster ({first}); start one with "
            "`ray start --head` and pass its address (see docs/ray.md)"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT with nothing listening; Ray itself retries for minutes."""
    if address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError("expected auto or HOST:PORT, e.g. 10.0.0.5:6379")
    socket.create_connection((host, int(port)), timeout=10).close()


def _placement(resources: dict[str, float], device: str) -> tuple[int, str]:
    """(GPUs per task, device the task trains on): a GPU each when asked for or, with auto, when
    the cluster has any; otherwise the CPU, so no task uses a GPU it did not reserve."""
    device = cluster_device(device, resources.get("GPU", 0) > 0)
    return (1 if device == "cuda" else 0), device


def _task(splits: Splits, job: Job, device: str, arithmetic: Arithmetic
          ) -> tuple[JobResult, str]:
    """The task body, run in a Ray worker: one job's result and the node that computed it, with
    the driver's arithmetic (a worker that cannot have it says so in one line)."""
    import ray
    import torch

    torch.set_num_threads(CPUS_PER_STACK)
    result = train_job(job, splits, device, arithmetic=arithmetic)
    return result, ray.get_runtime_context().get_node_id()


class RayExecutor:
    """Runs each job as a Ray task on the cluster at `address`; the numbers are the same as
    in-process (the engine's are independent of thread count and stack composition)."""

    def __init__(self, address: str):
        self.address = address
        self.name = f"ray ({address})"

    def session(self) -> contextlib.AbstractContextManager:
        """One connection for the whole experiment: sizing and every rung."""
        return connected(self.address)

    def device(self, requested: str) -> str:
        """The device the tasks train on: a GPU where asked for or, with auto, where the cluster
        has any (this machine need not have it)."""
        with connected(self.address) as ray:
            return _placement(ray.cluster_resources(), requested)[1]

    def stack_size(self, trials: Sequence[Trial], splits: Splits, device: str) -> int:
        """From the host's free memory, and small enough that every slot gets a stack: on a
        cluster, keeping every slot busy beats the biggest stack that fits."""
        size = auto_stack_size(trials, splits, "cpu")
        return max(1, min(size, math.ceil(len(trials) / self._slots(device))))

    def _slots(self, device: str) -> int:
        """How many stacks the cluster trains at once: its GPUs, or its CPUs / CPUS_PER_STACK."""
        with connected(self.address) as ray:
            resources = ray.cluster_resources()
        gpus, _ = _placement(resources, device)
        if gpus:
            return max(1, int(resources.get("GPU", 0)))
        return max(1, int(resources.get("CPU", 1)) // CPUS_PER_STACK)

    def run(self, jobs: Sequence[Job], splits: Splits, device: str, arithmetic: Arithmetic,
            watch: Watcher, state_path: Callable[[str], Path]
            ) -> Iterator[tuple[Job, JobResult]]:
        """Send each job as a task; yield (job, result) as each finishes, in any order. Tasks
        still running when the caller stops (Ctrl-C, an error) are cancelled. Tasks keep no
        resume state (`state_path` is unused): a lost task is run again from the start."""
        if not jobs:
            return
        with connected(self.address) as ray:
            watch.note(f"ray: {len(jobs)} stacks sent to {self.address}")
            gpus, _ = _placement(ray.cluster_resources(), device)
            task = ray.remote(_task).options(
                num_cpus=CPUS_PER_STACK, num_gpus=gpus, max_retries=MAX_RETRIES
            )
            data = ray.put(splits)
            pending = {task.remote(data, job, device, arithmetic): job for job in jobs}
            try:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    job = pending.pop(ref)
                    result, node = _result(ray, ref)
                    watch.note(f"stack {job.key} ({len(job.members)} models) done on node "
                               f"{node[:12]} in {result.outcome.seconds:.1f} s; "
                               f"{len(jobs) - len(pending)}/{len(jobs)} stacks done")
                    yield job, result
            finally:
                for ref in pending:
                    ray.cancel(ref, force=True)


def _result(ray: Any, ref: Any) -> tuple[JobResult, str]:
    """A task's value; a user error raised in the worker surfaces as itself, one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MnistlabError):
            raise exc.cause from None
        raise
