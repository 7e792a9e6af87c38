"""The run directory: every result of an experiment on disk, laid out in one place.

    study.toml   the configurations, seeds, schedule and split (re-runs a study)
    sweep.toml   a sweep's own file, when a sweep made the directory (re-runs the sweep)
    env.json     versions, device, git revision       metrics.csv   long-format records
    summary.json per model and per configuration, with the statistics
    checkpoints/ <run>-seed<k>.safetensors; stack-<key>.json (a finished stack's results) and
                 state-<key>.safetensors (an unfinished stack's resume state)
    predictions/ <run>-seed<k>.safetensors: each model's answer for every test image
    plots/, report.html, tb/   rendered from the files above alone

Every file is written atomically (mnistlab.atomic); a stack's models and predictions are written
before its done file, so a crash never leaves a stack that looks finished but is not.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, NotRequired

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from mnistlab.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, write_error
from mnistlab.config import MetricRow
from mnistlab.engine import Arithmetic
from mnistlab.errors import CheckpointError, ConfigError, MnistlabError
from mnistlab.inputs import open_input
from mnistlab.validation import Int, Name, Number, Text, validate

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; run directories are then not guarded
    fcntl = None  # type: ignore[assignment]

METRIC_COLUMNS = ("run", "seed", "step", "epoch", "split", "loss", "accuracy")


@with_config(ConfigDict(extra="allow"))
class ModelResult(TypedDict):
    """One model's line in a stack's done file (more keys may follow; these are relied on)."""

    run: Text
    seed: Int
    final_val_accuracy: Number
    final_val_loss: Number
    best_val_accuracy: Number
    best_val_step: Int | None
    final_train_accuracy: Number
    final_train_loss: Number
    test_accuracy: Number
    test_loss: Number
    diverged_at: Int | None
    stopped_at: NotRequired[Int | None]  # early stopping's record (runs before 0.2 lack it)
    restored_from: NotRequired[Int | None]  # restore_best's record
    seconds: Number


@with_config(ConfigDict(extra="forbid"))
class StackFile(TypedDict):
    """A finished stack's done file: its metric records, its models' results, its time."""

    rows: list[MetricRow]
    runs: list[ModelResult]
    seconds: Number
    device: Text


# summary.json as read back: what the report, `evaluate` and Results rely on (more may follow).
@with_config(ConfigDict(extra="allow"))
class Statistic(TypedDict):
    """One metric of a configuration over its seeds."""

    mean: Number
    ci_low: Number
    ci_high: Number


@with_config(ConfigDict(extra="allow"))
class ConfigSummary(TypedDict):
    run: Text
    config: dict[str, Any]
    n: Int
    test_accuracy: Statistic
    final_val_accuracy: Statistic
    best_val_accuracy: Statistic
    test_loss: Statistic
    train_val_gap: Statistic
    diverged: Int


@with_config(ConfigDict(extra="allow"))
class Selection(TypedDict):
    winner: Text | None
    seed: Int | None
    ranking: list[Text]


@with_config(ConfigDict(extra="allow"))
class Comparisons(TypedDict):
    alpha: Number
    replicates: Int
    pairs: list[dict[str, Any]]


@with_config(ConfigDict(extra="allow"))
class Summary(TypedDict):
    """summary.json: per model (`runs`) and per configuration (`configs`), the selection on
    validation and the comparisons."""

    data: Text
    seeds: list[Int]
    runs: list[ModelResult]
    configs: list[ConfigSummary]
    selection: Selection
    comparisons: Comparisons
    classes: NotRequired[list[Text]]
    split_note: NotRequired[Text]
    steps_per_epoch: NotRequired[Int | None]
    sweep: NotRequired[dict[str, Any]]


@with_config(ConfigDict(extra="allow"))
class Environment(TypedDict, total=False):
    """env.json: every key optional (older run directories lack the newer ones)."""

    mnistlab: Text
    device: Text
    matmul: Text
    arithmetic: dict[str, Any] | None
    seeds: list[Int]
    command: Text | None


def read_json(path: Path, kind: Any, what: str, fix: str) -> Any:
    """A JSON file of a run directory, checked against `kind` (a TypedDict): its values as
    written, or one MnistlabError line naming the file, what is wrong and `fix`. The file must
    be a regular file (mnistlab.inputs): a FIFO planted there would make a reader wait forever."""
    try:
        with open_input(path, f"a {what} written by mnistlab") as f:
            values = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise MnistlabError(f"{path}: damaged {what} ({reason}); {fix}") from None
    except MnistlabError as exc:
        raise MnistlabError(f"{exc}; {fix}") from None
    try:
        validate(kind, values, f"{path}: damaged {what}")
    except ConfigError as exc:
        raise MnistlabError(f"{exc}; {fix}") from None
    return values


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
    """metrics.csv's rows. A damaged file is a one-line MnistlabError: a resumed run rewrites it
    from the stack files."""
    try:
        with open_input(path, "a metrics file written by mnistlab") as raw, \
                io.TextIOWrapper(raw, encoding="utf-8", newline="") as f:
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
    except (OSError, KeyError, TypeError, ValueError, csv.Error, MnistlabError) as exc:
        raise MnistlabError(f"{path}: damaged metrics file ({type(exc).__name__}: {exc}); "
                            f"rewrite it with `mnistlab study --resume {Path(path).parent}` "
                            "(or sweep/train --resume)") from None


class RunDir:
    """Paths, readers and writers of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @classmethod
    def create(cls, out: str | Path, name: str) -> RunDir:
        """A new `<out>/<name>-<stamp>[-k]`, claimed by mkdir itself: two processes starting at
        the same second get two directories. `name` must be a plain name (no `..`, no slash),
        so the run directory is always inside `out`."""
        validate(Name, name, "run directory name")
        out = Path(out)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        try:
            out.mkdir(parents=True, exist_ok=True)
            for suffix in range(1, 10_000):
                root = out / (f"{name}-{stamp}" + (f"-{suffix}" if suffix > 1 else ""))
                try:
                    root.mkdir()
                except FileExistsError:
                    continue
                if root.resolve().parent != out.resolve():  # a guard: Name allows no way out
                    raise MnistlabError(f"{root}: outside {out}; pass a plain study name")
                return cls(root).claim()
        except OSError as exc:  # a full disk, no permission, `out` a file
            raise MnistlabError(f"{out}: cannot create a run directory there ({exc.strerror}); "
                                "pass an --out folder that is writable and has free space"
                                ) from None
        raise MnistlabError(f"{out}: cannot find a free run directory name for {name}-{stamp}")

    @classmethod
    def existing(cls, root: str | Path) -> RunDir:
        """A run directory made by mnistlab, checked to hold no symbolic link (`check_links`)."""
        run = cls(root)
        if not run.config_path.is_file():
            raise MnistlabError(
                f"{run.root}: not a run directory (no study.toml); pass a folder made by mnistlab"
            )
        run.check_links()
        return run

    def check_links(self) -> None:
        """Refuse a run directory that holds a symbolic link anywhere below its root: mnistlab
        never makes one, and reading or appending through it (a planted `tb/` event file, say)
        would touch files outside the run directory. The root itself may be a link."""
        for folder, dirs, files in os.walk(self.root):  # does not enter linked folders
            for name in sorted(dirs + files):
                path = Path(folder, name)
                if path.is_symlink():
                    raise MnistlabError(
                        f"{path}: a symbolic link inside the run directory (mnistlab makes "
                        "none, and neither follows nor writes through one); remove it, or "
                        "copy the run directory without links (cp -rL)")

    def claim(self) -> RunDir:
        """Take this run directory's advisory lock (flock on the folder itself: no lock file
        to leave behind or to race on) for this process, so no other mnistlab writes into it
        meanwhile: a second `--resume` or `report` of a run directory in use is one line saying
        so. Held until `release` (see `claims`); taking it again in the same process is a
        no-op. The lock goes with the process, however it ends."""
        key = str(self.root.resolve())
        if key in _HELD or fcntl is None:
            return self
        try:
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise write_error(self.root, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise MnistlabError(
                f"{self.root}: in use by another mnistlab process (a run, resume or report of "
                "it); wait for it to finish, then run this again") from None
        _HELD[key] = fd
        return self

    def release(self) -> None:
        """Give up this process's lock on the run directory, if it holds it."""
        fd = _HELD.pop(str(self.root.resolve()), None)
        if fd is not None:
            os.close(fd)  # closing the only descriptor releases the flock

    config_path = property(lambda self: self.root / "study.toml")
    sweep_path = property(lambda self: self.root / "sweep.toml")
    env_path = property(lambda self: self.root / "env.json")
    metrics_path = property(lambda self: self.root / "metrics.csv")
    summary_path = property(lambda self: self.root / "summary.json")
    checkpoints = property(lambda self: self.root / "checkpoints")
    predictions = property(lambda self: self.root / "predictions")
    plots = property(lambda self: self.root / "plots")
    report_path = property(lambda self: self.root / "report.html")
    tensorboard = property(lambda self: self.root / "tb")

    def model_path(self, run: str, seed: int) -> Path:
        return self.checkpoints / f"{run}-seed{seed}.safetensors"

    def predictions_path(self, run: str, seed: int) -> Path:
        return self.predictions / f"{run}-seed{seed}.safetensors"

    def state_path(self, stack: str) -> Path:
        """The engine's resume state of an unfinished stack."""
        return self.checkpoints / f"state-{stack}.safetensors"

    def _done_path(self, stack: str) -> Path:
        return self.checkpoints / f"stack-{stack}.json"

    def finished_stack(self, stack: str) -> dict[str, Any] | None:
        """The recorded results of a finished stack (a StackFile), or None when it has not
        finished. A damaged done file is a one-line CheckpointError that says how to retrain."""
        path = self._done_path(stack)
        if not os.path.lexists(path):
            return None
        fix = f"delete it to retrain that stack (--resume {self.root})"
        try:
            return dict(read_json(path, StackFile, "stack file", fix))
        except MnistlabError as exc:
            raise CheckpointError(str(exc)) from None

    def remove_temp_files(self) -> list[Path]:
        """Delete what interrupted writes left behind (`.<name>.<random>.tmp` files of atomic
        writes, `.tb.<random>` folders of a TensorBoard re-render); returns what went.

        Only the process that owns the run directory may call this (a resumed run does, before
        it writes): another process's write in progress would lose its temp file.
        """
        files = sorted(p for p in self.root.rglob(".*.tmp") if p.is_file())
        folders = sorted(p for p in self.root.glob(f".{self.tensorboard.name}.*") if p.is_dir())
        for path in files:
            path.unlink(missing_ok=True)
        for path in folders:
            shutil.rmtree(path, ignore_errors=True)
        return files + folders

    def record_stack(
        self,
        stack: str,
        results: Mapping[str, Any],
        files: Iterable[tuple[str, int, bytes, bytes]],
    ) -> None:
        """Write each (run, seed)'s model and predictions, then the done file that marks the
        stack finished; its resume state is no longer needed."""
        for run, seed, model, predictions in files:
            atomic_write_bytes(self.model_path(run, seed), model)
            atomic_write_bytes(self.predictions_path(run, seed), predictions)
        atomic_write_json(self._done_path(stack), dict(results))
        self.state_path(stack).unlink(missing_ok=True)

    def write_config(self, study_toml: str, sweep_toml: str | None = None) -> None:
        """study.toml, and a sweep's sweep.toml: what re-runs the experiment."""
        atomic_write_text(self.config_path, study_toml)
        if sweep_toml is not None:
            atomic_write_text(self.sweep_path, sweep_toml)

    def write_env(self, env: Mapping[str, Any]) -> None:
        atomic_write_json(self.env_path, dict(env))

    def read_env(self) -> dict[str, Any]:
        """env.json as a table ({} where there is none); a one-line error where it is damaged."""
        if not os.path.lexists(self.env_path):
            return {}
        return read_json(self.env_path, Environment, "env.json", "it records how the run was "
                         "made: restore it, or start a new run")

    def recorded_arithmetic(self) -> Arithmetic | None:
        """The arithmetic env.json records (None for a run made before it was recorded)."""
        recorded = self.read_env().get("arithmetic")
        return None if recorded is None else Arithmetic.from_dict(recorded, str(self.env_path))

    def write_metrics(self, rows: Iterable[Mapping[str, Any]]) -> None:
        atomic_write_text(self.metrics_path, metrics_csv(rows))

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.metrics_path)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def read_summary(self) -> dict[str, Any]:
        """summary.json, which exists once the run has finished; else a one-line error."""
        if not os.path.lexists(self.summary_path):
            raise MnistlabError(
                f"{self.summary_path}: missing, so the run has not finished; finish it with "
                f"`mnistlab study --resume {self.root}` (or sweep/train --resume)"
            )
        fix = f"rewrite it with `mnistlab study --resume {self.root}` (or sweep/train --resume)"
        summary = read_json(self.summary_path, Summary, "summary", fix)
        names = {c["run"] for c in summary["configs"]}
        named = [*summary["selection"]["ranking"], *(r["run"] for r in summary["runs"]),
                 *([summary["selection"]["winner"]] if summary["selection"]["winner"] else [])]
        unknown = sorted(set(named) - names)
        if unknown:
            raise MnistlabError(f"{self.summary_path}: damaged summary (names {unknown[0]!r}, "
                                f"which is none of its configurations); {fix}")
        return summary


_HELD: dict[str, int] = {}  # run directories this process has claimed: resolved root -> fd


@contextlib.contextmanager
def claims() -> Iterator[None]:
    """Release, when the block ends (however), every run directory claimed inside it: what
    a call of the Python API or a command took, it gives back, so a notebook that ran a study
    does not keep other processes out of its run directory."""
    before = set(_HELD)
    try:
        yield
    finally:
        for key in set(_HELD) - before:
            os.close(_HELD.pop(key))
