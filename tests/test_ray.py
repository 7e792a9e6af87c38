"""Sweeps on a real two-node Ray cluster on 127.0.0.1: same numbers, and a lost node loses nothing.

The fixture starts a head node and one more worker node with `ray start`, each in its own process
group, and at teardown kills exactly those two groups (by id, not `ray stop`, which would also
stop anybody else's Ray on this machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mnistlab as ml
from mnistlab.config import Schedule
from mnistlab.experiment.sweep import SweepSpec, expand
from mnistlab.progress import Progress

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mnistlab[ray]')")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

OBJECT_STORE = str(200 * 1024 * 1024)  # small, so `ray start` succeeds on a 24 GiB machine
SWEEP = SweepSpec(
    name="raysweep",
    seeds=(0, 1),
    device="cpu",
    stack_size=2,
    schedule=Schedule(batch_size=64, epochs=1, record_every=4),
    grid={"lr": (3e-3, 1e-3, 3e-4), "dropout": (0.0, 0.3)},
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_cli() -> str:
    beside = Path(sys.executable).with_name("ray")
    found = str(beside) if beside.is_file() else shutil.which("ray")
    if not found:
        pytest.skip(reason="the `ray` command is not installed next to this Python")
    return found


def _start(args: list[str], temp: str) -> int:
    """Run `ray start ...` in a new process group; the node's processes stay in that group."""
    env = {
        **os.environ,
        "RAY_TMPDIR": temp,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Notice a dead node within seconds rather than the default half a minute.
        "RAY_health_check_period_ms": "500",
        "RAY_health_check_failure_threshold": "4",
    }
    proc = subprocess.run(
        [
            _ray_cli(),
            "start",
            *args,
            "--num-cpus=1",
            f"--object-store-memory={OBJECT_STORE}",
            "--node-ip-address=127.0.0.1",
            "--disable-usage-stats",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        start_new_session=True,
    )
    if proc.returncode != 0:
        pytest.fail(f"ray start failed: {proc.stderr[-2000:]}")
    return _new_group("raylet")


def _processes() -> dict[int, tuple[int, str]]:
    """pid → (process group, command name) of every process we can see."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                name = (entry / "comm").read_text().strip()
            except OSError:
                continue
            out[int(entry.name)] = (int(fields[2]), name)
    return out


_seen_groups: set[int] = set()


def _new_group(name: str) -> int:
    """The process group of a `name` process that is not in a group we already know."""
    groups = [g for pid, (g, n) in sorted(_processes().items()) if n == name]
    fresh = [g for g in groups if g not in _seen_groups]
    assert fresh, f"no new {name} process after ray start"
    _seen_groups.add(fresh[-1])
    return fresh[-1]


def _kill_group(group: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, sig)


def _raylet_of(group: int) -> int:
    (pid,) = [p for p, (g, n) in _processes().items() if g == group and n == "raylet"]
    return pid


@pytest.fixture(scope="module")
def cluster():
    """(address, worker node's process group) of a fresh head + worker node, one CPU each."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    groups = []
    try:
        groups.append(
            _start(
                [
                    "--head",
                    f"--port={port}",
                    "--include-dashboard=false",
                    f"--temp-dir={temp}",
                    f"--ray-client-server-port={_free_port()}",
                ],
                temp,
            )
        )
        address = f"127.0.0.1:{port}"
        groups.append(_start([f"--address={address}"], temp))
        _wait_for_nodes(address, 2)
        yield address, groups[1]
    finally:
        for group in groups:
            _kill_group(group)
        shutil.rmtree(temp, ignore_errors=True)


def _wait_for_nodes(address: str, count: int) -> None:
    ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        deadline = time.monotonic() + 60
        while sum(n["Alive"] for n in ray.nodes()) < count:
            assert time.monotonic() < deadline, "the worker node never joined"
            time.sleep(0.2)
        # The driver (this process) must sit on the head node, so killing the worker spares it.
        head = [n["NodeID"] for n in ray.nodes() if "node:__internal_head__" in n["Resources"]]
        assert head == [ray.get_runtime_context().get_node_id()]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def tiny_data(mnist_t10k_dir, tmp_path_factory) -> str:
    from mnistlab.data import load
    from mnistlab.data.npz import write_npz

    path = tmp_path_factory.mktemp("data") / "mnist-tiny.npz"
    write_npz(path, load(str(mnist_t10k_dir), progress=False).train.subset(np.arange(720)))
    return str(path)


@pytest.fixture(scope="module")
def local_run(tiny_data, tmp_path_factory):
    spec = dataclasses.replace(SWEEP, data=tiny_data)
    out = tmp_path_factory.mktemp("local")
    results = ml.sweep(spec, out=out, progress=False, report=False)
    return results.run_dir, results.raw


class KillAfterFirstStack(Progress):
    """Kills the worker node's raylet as soon as the first stack has been recorded."""

    def __init__(self, raylet: int):
        super().__init__(io.StringIO(), live=False)
        self.raylet, self.killed_with_pending = raylet, None

    def note(self, text: str) -> None:
        super().note(text)
        if self.killed_with_pending is None and " done on node " in text:
            done, total = text.rsplit("; ", 1)[1].split()[0].split("/")
            self.killed_with_pending = int(total) - int(done)
            os.kill(self.raylet, signal.SIGKILL)


def test_sweep_survives_a_lost_node_and_matches_in_process(
    cluster, local_run, tiny_data, tmp_path, monkeypatch
):
    address, worker = cluster
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(1) or real_put(value, **kw))
    display = KillAfterFirstStack(_raylet_of(worker))
    spec = dataclasses.replace(SWEEP, data=tiny_data)
    results = ml.sweep(spec, out=tmp_path, ray_address=address, progress=display, report=False)
    run_dir, summary = results.run_dir, results.raw
    log = display.stream.getvalue()
    stacks = len(expand(spec)[0]) * len(spec.seeds) // spec.stack_size
    # The kill landed mid-sweep: with two one-CPU nodes and tasks queued, the worker node was
    # running one of them, which Ray re-ran on the head node.
    assert display.killed_with_pending is not None and display.killed_with_pending >= 3
    nodes = [
        line.split(" done on node ")[1].split()[0]
        for line in log.splitlines()
        if " done on node " in line
    ]
    assert len(nodes) == stacks
    assert len(set(nodes[1:])) == 1  # after the kill, only the surviving node ran stacks
    assert puts == [1]  # the splits went to the object store once, not once per task
    # Nothing lost, nothing duplicated: each configuration × seed exactly once.
    names = [c.name for c in expand(spec)[0]]
    expected = Counter((n, s) for n in names for s in spec.seeds)
    assert Counter((r["run"], r["seed"]) for r in summary["runs"]) == expected
    rows = run_dir.read_metrics()
    keys = Counter((r["run"], r["seed"], r["step"], r["split"]) for r in rows)
    assert set(keys.values()) == {1} and {k[:2] for k in keys} == set(expected)
    assert len(list(run_dir.checkpoints.glob("stack-*.json"))) == stacks
    # The same numbers as in-process, record for record.
    local_dir, local = local_run
    assert run_dir.metrics_path.read_text() == local_dir.metrics_path.read_text()
    strip = lambda s: [{k: v for k, v in r.items() if k != "seconds"} for r in s["runs"]]  # noqa: E731
    assert strip(summary) == strip(local)
    for name, seed in expected:
        assert _model(run_dir.model_path(name, seed)) == _model(local_dir.model_path(name, seed))


def _model(path: Path) -> tuple[dict, dict]:
    """A checkpoint's metadata and tensors as lists (its bytes are not canonical: safetensors
    writes metadata keys in hash order)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k).tolist() for k in f.keys()}  # noqa: SIM118


def test_resume_on_ray_sends_only_unfinished_stacks(cluster, local_run, tmp_path):
    address, _ = cluster
    local_dir, local = local_run
    copy = tmp_path / local_dir.root.name
    shutil.copytree(local_dir.root, copy)
    (copy / "checkpoints" / "stack-1.json").unlink()
    (copy / "summary.json").unlink()
    display = Progress(io.StringIO(), live=False)
    again = ml.sweep(resume=copy, ray_address=address, progress=display, report=False).raw
    log = display.stream.getvalue()
    assert f"ray: 1 stacks sent to {address}" in log and "stack 1 (2 models) done" in log
    assert (copy / "metrics.csv").read_text() == local_dir.metrics_path.read_text()
    assert [r["test_accuracy"] for r in again["runs"]] == [
        r["test_accuracy"] for r in local["runs"]
    ]


def test_a_user_error_in_a_worker_is_one_line(cluster, tiny_data, tmp_path):
    from mnistlab.errors import MnistlabError

    address, _ = cluster
    schedule = Schedule(batch_size=4096, epochs=1, drop_last=True)  # no full batch at all
    spec = dataclasses.replace(SWEEP, data=tiny_data, schedule=schedule, grid={"lr": (1e-3,)})
    with pytest.raises(MnistlabError, match="too few for batch size 4096") as info:
        ml.sweep(spec, out=tmp_path, ray_address=address, report=False,
                 progress=Progress(io.StringIO(), live=False))
    assert "\n" not in str(info.value)


def test_unreachable_cluster_is_one_line():
    from mnistlab.errors import MnistlabError
    from mnistlab.experiment.ray import connected

    for address, why in (("127.0.0.1:1", "Connection refused"), ("nowhere", "HOST:PORT")):
        expected = f"--ray-address {address}: cannot connect.*{why}"
        with pytest.raises(MnistlabError, match=expected), connected(address):
            pass
