"""Scale-out on a Ray cluster: each stack is one task; the driver records results as they come.

A task is the pure compute step (`study.compute_stack`: train, return the outcome and each
model's checkpoint bytes); only the driver writes files (`study.record_stack`), so a task that
is retried after a lost worker can never leave half a result or a duplicate behind. The splits
go to the object store once and every task reads them from there.

Ray is an optional extra (`pip install "mnistlab[ray]"`), imported only here and only when a
sweep names `--ray-address`.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from mnistlab.data.dataset import Splits
from mnistlab.errors import MnistlabError
from mnistlab.progress import StudyProgress
from mnistlab.runs import RunDir
from mnistlab.study import StackOutcome, StackResult, compute_stack, finished_stack, record_stack

if TYPE_CHECKING:
    from mnistlab.engine import Member
    from mnistlab.sweep import Stack

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
    if device == "cuda" or (device == "auto" and resources.get("GPU", 0) > 0):
        return 1, "cuda"
    return 0, "cpu" if device == "auto" else device


def parallel_slots(address: str, device: str) -> int:
    """How many stacks the cluster trains at once: its GPUs, or its CPUs / CPUS_PER_STACK."""
    with connected(address) as ray:
        resources = ray.cluster_resources()
    gpus, _ = _placement(resources, device)
    if gpus:
        return max(1, int(resources.get("GPU", 0)))
    return max(1, int(resources.get("CPU", 1)) // CPUS_PER_STACK)


def _compute(splits: Splits, members: Sequence[Member], schedule: Any, device: str) -> tuple:
    """The task body, run in a Ray worker: one stack's result and the node that computed it."""
    import ray
    import torch

    torch.set_num_threads(CPUS_PER_STACK)
    result = compute_stack(splits, members, schedule, device)
    return result, ray.get_runtime_context().get_node_id()


def run_stacks(
    address: str,
    run_dir: RunDir,
    splits: Splits,
    stacks: Sequence[Stack],
    device: str,
    *,
    resume: bool,
    display: StudyProgress,
    on_done: Callable[[list[StackOutcome]], None],
) -> list[StackOutcome]:
    """Train `stacks` as Ray tasks and record each as it finishes; outcomes in `stacks` order.

    On resume, stacks with a done file are taken from it and not sent. `on_done` gets the
    outcomes so far after each recorded stack.
    """
    outcomes = {s.key: o for s in stacks if resume and (o := finished_stack(run_dir, s.key))}
    todo = [s for s in stacks if s.key not in outcomes]
    with connected(address) as ray:
        if todo:
            display.note(f"ray: {len(todo)} stacks sent to {address}")
        for stack, result, node in _finished(ray, splits, todo, device):
            outcomes[stack.key] = record_stack(run_dir, stack.key, stack.members, result)
            display.note(
                f"stack {stack.key} ({len(stack.members)} models) done on node {node[:12]} in "
                f"{result.outcome.seconds:.1f} s; {len(outcomes)}/{len(stacks)} stacks done"
            )
            on_done([outcomes[s.key] for s in stacks if s.key in outcomes])
    return [outcomes[s.key] for s in stacks]


def _finished(
    ray: Any, splits: Splits, stacks: Sequence[Stack], device: str
) -> Iterator[tuple[Stack, StackResult, str]]:
    """Send each stack as a task; yield (stack, result, node) as each finishes, in any order.

    The splits go to the object store once. Tasks still running when the caller stops (Ctrl-C,
    an error) are cancelled.
    """
    if not stacks:
        return
    gpus, task_device = _placement(ray.cluster_resources(), device)
    task = ray.remote(_compute).options(
        num_cpus=CPUS_PER_STACK, num_gpus=gpus, max_retries=MAX_RETRIES
    )
    data = ray.put(splits)
    pending = {task.remote(data, s.members, s.schedule, task_device): s for s in stacks}
    try:
        while pending:
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            stack = pending.pop(ref)
            yield stack, *_result(ray, ref)
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _result(ray: Any, ref: Any) -> tuple[StackResult, str]:
    """A task's value; a user error raised in the worker surfaces as itself, one line."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, MnistlabError):
            raise exc.cause from None
        raise
