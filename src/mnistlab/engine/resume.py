"""Resume states: everything needed to continue a run bit for bit, and the checks on reading one.

At every epoch end and on Ctrl-C (taken between steps) a training state's `snapshot` goes to
`state_path` atomically (loop.py writes it): safetensors for tensors (weights, Adam moments,
generator states, permutations, best weights), JSON in its metadata for the rest. No pickle.
Learning-rate schedules and augmentation draws are functions of the step count, so they need
nothing saved; the early-stopping monitor is replayed from the records.

A state holds a fingerprint of what it was written for (members, schedule, data, device,
arithmetic); `load` refuses a state of another run naming what differs, and anything in it
that this run would not have written as a one-line CheckpointError.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
from annotated_types import Ge
from pydantic import ConfigDict, with_config
from torch import Tensor
from typing_extensions import TypedDict

from mnistlab.config import MetricRow, Schedule, to_dict
from mnistlab.data.dataset import Splits
from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.engine.records import Member
from mnistlab.errors import CheckpointError, ConfigError
from mnistlab.model import json_field, read_safetensors
from mnistlab.validation import NonNegative, Real, validate

FIX = "pass the state file of this run, or start a new run without resuming"


@with_config(ConfigDict(extra="forbid"))
class ResumeProgress(TypedDict):
    """A resume state's progress: steps done, steps since the last record, training seconds so
    far, and the records written so far."""

    step: NonNegative
    since: NonNegative
    seconds: Annotated[Real, Ge(0)]
    rows: list[MetricRow]


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


def fingerprint(members: Sequence[Member], schedule: Schedule, splits: Splits,
                device: torch.device, arithmetic: Arithmetic, *, test: bool) -> dict:
    """What a state is written for, as JSON values: the members, the schedule, the training and
    validation data (with `test`, the test data too: scored once, at the end), the device kind
    and the arithmetic."""
    values = {
        "members": [[to_dict(m.config), m.seed] for m in members],
        "schedule": to_dict(schedule),
        "data": _digest(splits.train.images, splits.train.labels, splits.val.images,
                        splits.val.labels),
    }
    if test:
        values["test"] = _digest(splits.test.images, splits.test.labels)
    values.update(device=device.type, arithmetic=arithmetic.as_dict())
    return json.loads(json.dumps(values))


class ResumeState:
    """The resume state of a training state (mlp.MLPTraining, general.ModuleTraining), which
    holds `stack`, `members`, `schedule`, `monitor`, `total`, `steps_per_epoch`, `seeds`, `x`,
    `device`, `order_rngs`, `perms`, `step`, `since`, `seconds`, `rows` and `fingerprint`, and
    says its `FORMAT`, its other tensors (`_books`), how it checks a fingerprint
    (`_check_fingerprint`), loads its stack (`_load_stack`) and draws an epoch's
    augmentation (`_draw_transforms`)."""

    FORMAT: str

    def snapshot(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        """The state as CPU copies and metadata: training may go on while they are written."""
        books = {**self._books(), **({"perms": self.perms} if self.perms is not None else {})}
        progress = {"step": self.step, "since": self.since, "seconds": self.seconds,
                    "rows": self.rows}
        meta = {"format": self.FORMAT, "fingerprint": json.dumps(self.fingerprint),
                "progress": json.dumps(progress)}
        books = {k: v.detach().to("cpu", copy=True) for k, v in books.items()}
        return {**self.stack.state(host_copy=True), **books}, meta

    def load(self, path: Path) -> None:
        """Continue from the resume state at `path`. Anything in it that is not what this run
        would have written (types, step counts, records, batch order) is a one-line
        CheckpointError; a state of another run is refused naming what differs."""
        tensors, meta = read_safetensors(path, self.FORMAT, "resume state", FIX, "resume state")
        try:
            saved = json_field(meta, "fingerprint")
            progress = validate(ResumeProgress, json_field(meta, "progress"), "progress")
        except (ConfigError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state metadata ({exc}); {FIX}") from None
        self._check_fingerprint(path, saved)
        try:
            self._check_progress(progress)
            self._restore(tensors, progress)
        except (KeyError, RuntimeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged resume state ({exc}); {FIX}") from None

    def _check_progress(self, progress: ResumeProgress) -> None:
        """The progress this run could have reached: 0 <= step <= total, `since` the steps after
        the last record, and records only of this stack's models up to `step`."""
        step, since = progress["step"], progress["since"]
        expected_since = 0 if step == self.total else step % self.schedule.record_every
        if step > self.total or since != expected_since:
            raise ValueError(f"step {step} of {self.total} with {since} since the last record")
        members = {(m.config.name, m.seed) for m in self.members}
        for row in progress["rows"]:
            if (row["run"], row["seed"]) not in members or row["step"] > step:
                raise ValueError(f"a record of {row['run']} seed {row['seed']} at step "
                                 f"{row['step']} that this run cannot have written")

    def _check_tensors(self, tensors: dict[str, Tensor], step: int) -> None:
        """Exactly the tensors this run saves, each of its dtype and shape (perms: see
        _permutations), and divergence marks that agree with the records: frozen from the step
        it diverged or the record it stopped at (`_replay` has read the records)."""
        expected = {**self.stack.state(), **self._books()}
        unknown = sorted(set(tensors) - set(expected) - {"perms"})
        if unknown:
            raise ValueError(f"unknown tensors {', '.join(unknown[:3])}")
        for name, mine in expected.items():
            found = tensors.get(name)
            if found is None or found.dtype != mine.dtype or found.shape != mine.shape:
                raise ValueError(f"{name} is missing or not {mine.dtype} {tuple(mine.shape)}")
        frozen, dead = tensors["frozen"], tensors["diverged_at"]
        stopped = torch.tensor([s is not None for s in self.monitor.stopped])
        if not (torch.equal(frozen, ((dead > 0) | stopped).to(frozen.dtype)) and dead.min() >= 0
                and dead.max() <= step):
            raise ValueError("frozen disagrees with diverged_at and the records")

    def _replay(self, rows: list[MetricRow]) -> None:
        """The monitor's state after `rows`: each record's validation accuracies, in order (a
        record missing a model's row is a damaged state: KeyError)."""
        val = {(r["step"], r["run"], r["seed"]): r["accuracy"] for r in rows
               if r["split"] == "val"}
        for step in sorted({step for step, _, _ in val}):
            accuracy = [val[step, m.config.name, m.seed] for m in self.members]
            self.monitor.update(step, accuracy, step == self.total)

    def _restore(self, tensors: dict[str, Tensor], progress: ResumeProgress) -> None:
        self._replay(progress["rows"])
        self._check_tensors(tensors, progress["step"])
        self.step, self.since = progress["step"], progress["since"]
        self.seconds, self.rows = progress["seconds"], [dict(r) for r in progress["rows"]]
        self._load_stack(tensors)
        for j, g in enumerate(self.order_rngs):
            g.set_state(tensors[f"order_rng.{j}"])
        for name, tensor in self._books().items():
            if not name.startswith("order_rng."):
                tensor.copy_(tensors[name])
        if "perms" in tensors or self.step % self.steps_per_epoch:
            self.perms = self._permutations(tensors.get("perms")).to(self.device)
        if self.step % self.steps_per_epoch:
            self._draw_transforms()

    def _permutations(self, perms: Tensor | None) -> Tensor:
        """The saved epoch's batch order: one permutation of the training rows per seed (which
        a state taken mid-epoch must hold)."""
        rows = torch.arange(len(self.x)).expand(len(self.seeds), -1)
        if perms is None:
            raise ValueError(f"no perms at step {self.step}, in the middle of an epoch")
        if (perms.dtype != torch.int64 or perms.shape != rows.shape
                or not torch.equal(perms.sort(dim=1).values, rows)):
            raise ValueError(f"perms {tuple(perms.shape)} are not {len(self.seeds)} "
                             f"permutations of {len(self.x)} rows")
        return perms
