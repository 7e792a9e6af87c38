"""Configurations from several run directories side by side: `mnistlab compare` and `ml.compare`.

Each run directory's configurations become rows (grouped where two runs trained the same
hyperparameters), with the hyperparameters that differ as columns. Runs scored on the same test
images are compared with the same paired statistics as one study (mnistlab.stats: two-level
bootstrap, Holm, McNemar), so "run A's winner against run B's" has an interval and a p-value.
Same test images means: the same data and split recorded (data, test size, validation fraction,
split seed) and identical stored test labels. Runs scored on other images are shown side by
side, never paired, and the comparison says so in one line. Like the report, it reads run
directories alone: no data set, no network.
"""

from __future__ import annotations

import html
import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mnistlab import stats
from mnistlab.errors import MnistlabError
from mnistlab.evaluation import Predictions
from mnistlab.experiment.trials import Experiment
from mnistlab.report import plots
from mnistlab.report.html import CSS, _comparison_table, _figure, table
from mnistlab.report.reading import mean_ci, number
from mnistlab.runs import RunDir


@dataclass(frozen=True)
class _Run:
    """One run directory as the comparison reads it."""

    key: str  # A, B, ...: its short name in tables and pairs
    run_dir: RunDir
    summary: dict[str, Any]
    test_set: tuple[Any, ...]  # what it was tested on: data, sizes, split (see `_test_set`)
    labels: np.ndarray | None  # its stored test labels (None: every model diverged)

    @property
    def name(self) -> str:
        return self.run_dir.root.name

    def label(self, config: str) -> str:
        """A configuration's name across runs: `A/configuration`."""
        return f"{self.key}/{config}"


def _key(k: int) -> str:
    """A, B, ..., Z, AA, AB, ...: the k-th run's short name."""
    return _key(k // 26 - 1) + chr(65 + k % 26) if k >= 26 else chr(65 + k)


def _read(key: str, path: str | Path) -> _Run:
    run_dir = RunDir.existing(path)
    summary = run_dir.read_summary()
    study = Experiment.from_run_dir(run_dir).study
    sizes = summary.get("sizes", {})
    test_set = (summary.get("data"), sizes.get("test"), study.val_fraction, study.split_seed)
    finished = [r for r in summary["runs"] if r.get("diverged_at") is None]
    labels = (Predictions.load(run_dir.predictions_path(finished[0]["run"], finished[0]["seed"]))
              .labels if finished else None)
    return _Run(key, run_dir, summary, test_set, labels)


def _same_images(a: _Run, b: _Run) -> str:
    """'' when `a` and `b` were scored on the same test images; else what differs."""
    names = ("data", "test images", "val_fraction", "split_seed")
    for name, x, y in zip(names, a.test_set, b.test_set, strict=True):
        if x != y:
            return f"{name} {x} vs {y}"
    if a.labels is None or b.labels is None:
        return "no finished model to pair"
    if not np.array_equal(a.labels, b.labels):
        return "their stored test labels differ"
    return ""


class Comparison:
    """Several run directories' configurations side by side, with paired statistics where they
    share their test images. `table` and `pairs` are DataFrames; in a notebook it shows itself;
    `write(folder)` writes the HTML page."""

    def __init__(self, paths: Sequence[str | Path]):
        if len(paths) < 2:
            raise MnistlabError("compare: pass two or more run directories (RUN_DIR RUN_DIR ...)")
        self.runs = [_read(_key(k), p) for k, p in enumerate(paths)]
        names = [r.run_dir.root.resolve() for r in self.runs]
        if len(set(names)) != len(names):
            raise MnistlabError("compare: a run directory is given twice; pass each once")
        self.groups: list[list[_Run]] = []  # runs that share their test images
        self.refused: list[str] = []
        for run in self.runs:
            home = next((g for g in self.groups if not _same_images(g[0], run)), None)
            if home is None:
                if self.groups:
                    self.refused.append(f"{run.key} vs {self.groups[0][0].key}: "
                                        f"{_same_images(self.groups[0][0], run)}")
                self.groups.append([run])
            else:
                home.append(run)
        self.statistics = [self._statistics(group) for group in self.groups]

    @property
    def note(self) -> str:
        """The one line that says which runs are not paired, and why ('' when all are)."""
        if not self.refused:
            return ""
        return ("not paired, tested on different images (shown side by side only): "
                + "; ".join(self.refused))

    def _statistics(self, group: list[_Run]) -> dict[str, Any]:
        """stats.statistics over every configuration of runs sharing their test images: the
        paired bootstrap and McNemar's test as within one study."""
        configs: dict[str, dict[str, Any]] = {}
        rows: list[dict[str, Any]] = []
        correct: dict[str, list[np.ndarray]] = {}
        for run in group:
            for c in run.summary["configs"]:
                configs[run.label(c["run"])] = c["config"]
            for r in run.summary["runs"]:
                rows.append({**r, "run": run.label(r["run"])})
                if math.isfinite(r["test_accuracy"]):
                    p = Predictions.load(run.run_dir.predictions_path(r["run"], r["seed"]))
                    correct.setdefault(run.label(r["run"]), []).append(p.predicted == p.labels)
        comparer = stats.Comparer(rows, {k: np.stack(v) for k, v in correct.items()})
        return {**stats.statistics(configs, comparer), "runs": rows}

    @cached_property
    def hyperparameters(self) -> list[str]:
        """The configuration fields whose values differ between the rows, in field order."""
        configs = [c["config"] for run in self.runs for c in run.summary["configs"]]
        fields = list(dict.fromkeys(k for c in configs for k in c if k != "name"))
        return [f for f in fields if len({repr(c.get(f)) for c in configs}) > 1]

    @cached_property
    def table(self) -> pd.DataFrame:
        """One row per (run directory, configuration), rows of the same hyperparameters next to
        each other (`group`): the varying hyperparameters, seeds, and mean final validation and
        test accuracy with their 95% intervals (test: paired within the test-set group)."""
        groups: dict[str, int] = {}
        rows = []
        for k, statistics in enumerate(self.statistics):
            for entry in statistics["configs"]:
                run, configuration = entry["run"].split("/", 1)
                config = entry["config"]
                key = repr({f: v for f, v in config.items() if f != "name"})
                group = groups.setdefault(key, len(groups) + 1)
                v, t = entry["final_val_accuracy"], entry["test_accuracy"]
                rows.append({
                    "group": group, "run": run, "configuration": configuration,
                    **{f: number(config.get(f)) for f in self.hyperparameters},
                    "seeds": entry["n"], "final_val_accuracy": v["mean"],
                    "test_accuracy": t["mean"], "test_accuracy_low": t["ci_low"],
                    "test_accuracy_high": t["ci_high"], "test_set": k + 1,
                })
        frame = pd.DataFrame(rows)
        return frame.sort_values(["group", "test_set"], kind="stable").reset_index(drop=True)

    @cached_property
    def pairs(self) -> pd.DataFrame:
        """Every paired comparison (a − b on the same test images): difference, interval,
        p-values, significance after Holm."""
        rows = [{"a": p["a"], "b": p["b"], "diff": p["diff"], "ci_low": p["ci_low"],
                 "ci_high": p["ci_high"], "p": p["p"], "p_holm": p["p_holm"],
                 "significant": p["significant"], "p_a_beats_b": p["p_a_beats_b"],
                 "note": p["note"]}
                for s in self.statistics for p in s["comparisons"]["pairs"]]
        return pd.DataFrame(rows, columns=["a", "b", "diff", "ci_low", "ci_high", "p", "p_holm",
                                           "significant", "p_a_beats_b", "note"])

    def __repr__(self) -> str:
        return (f"Comparison({len(self.runs)} run directories, {len(self.table)} configurations, "
                f"{len(self.pairs)} paired comparisons)")

    def text(self, width: int | None = None) -> str:
        """The configurations table and the pairs, for a terminal."""
        from mnistlab.report.table import fitted, folded, new_table, plain_text

        def make(fold: bool) -> Any:
            grid = new_table("configurations (rows of one group: the same hyperparameters)",
                             ("group", "run", "configuration", *self.hyperparameters),
                             ("seeds", "final val acc", "test acc [95%]"))
            for _, row in self.table.iterrows():
                test = _ci(row)
                grid.add_row(str(row["group"]), row["run"], row["configuration"],
                             *(row[f] for f in self.hyperparameters), str(row["seeds"]),
                             f"{row['final_val_accuracy']:.4f}", folded(test) if fold else test)
            return grid

        from mnistlab.report.table import console_width

        width = width or console_width()
        parts: list[Any] = [f"{r.key}: {r.run_dir.root}" for r in self.runs]
        parts.append(fitted(width, lambda: make(False), lambda: make(True)))
        pairs = new_table("paired on the same test images (a − b, two-level bootstrap)",
                          ("a", "b"), ("diff", "95% interval", "p (Holm)", "significant"))
        for _, p in self.pairs.iterrows():
            pairs.add_row(p["a"], p["b"], _pp(p["diff"]), _interval(p), _p(p["p_holm"]),
                          "yes" if p["significant"] else "no")
        parts += [pairs] if len(self.pairs) else ["no paired comparison"]
        parts += [f"note: {self.note}"] if self.note else []
        return plain_text(*parts, width=width)

    def html(self) -> str:
        """The comparison as one self-contained page (inline CSS, images as data: URIs)."""
        heads = ["group", "run", "configuration", *self.hyperparameters, "seeds",
                 "final val accuracy", "test accuracy [95% CI]"]
        rows = [[r["group"], r["run"], r["configuration"],
                 *(r[f] for f in self.hyperparameters), r["seeds"],
                 f"{100 * r['final_val_accuracy']:.2f}%", _ci_pct(r)]
                for _, r in self.table.iterrows()]
        runs = [[r.key, r.name, r.summary.get("data"), r.summary.get("sizes", {}).get("test"),
                 ", ".join(map(str, r.summary.get("seeds", []))), len(r.summary["configs"]),
                 k + 1] for k, g in enumerate(self.groups) for r in g]
        parts = [
            f"<h1>mnistlab compare: {len(self.runs)} run directories</h1>",
            table(["run", "run directory", "data", "test images", "seeds", "configurations",
                   "test set"], runs, kind="words"),
            *([f'<p class="note">{html.escape(self.note)}</p>'] if self.note else []),
            "<h2>Configurations</h2>",
            "<p>Rows of one group trained the same hyperparameters; the columns are the "
            "hyperparameters that differ. Test intervals: two-level bootstrap over seeds and "
            "test images, within runs that share their test images (test set).</p>",
            '<div class="wide">' + table(heads, rows) + "</div>",
            self._figure(),
            "<h2>Paired comparisons</h2>",
        ]
        for statistics in self.statistics:
            if statistics["comparisons"]["pairs"]:
                parts.append(_comparison_table(statistics["comparisons"]))
        if not len(self.pairs):
            parts.append("<p>No two configurations share their test images.</p>")
        title = html.escape(f"mnistlab compare: {', '.join(r.name for r in self.runs)}")
        return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}'
                f"</title><style>{CSS} .wide {{ overflow-x: auto; }}</style></head>\n<body>\n"
                + "\n".join(parts) + "\n</body></html>\n")

    def _figure(self) -> str:
        """Test accuracy per configuration, ranked on validation, each test set on its own."""
        shown = []
        with tempfile.TemporaryDirectory() as folder:
            for k, statistics in enumerate(self.statistics):
                ranking = statistics["selection"]["ranking"]
                path = plots.compare_test_accuracy(statistics["configs"], statistics["runs"],
                                                   ranking, Path(folder))
                shown.append(_figure(f"Test accuracy per configuration (test set {k + 1}): "
                                     "dot = mean, bar = 95% interval, ticks = seeds",
                                     path.rename(Path(folder) / f"test-set-{k + 1}.png")))
        return "".join(shown)

    def _repr_html_(self) -> str:
        body = self.html().split("<body>", 1)[1].rsplit("</body>", 1)[0]
        return f"<div><style>{CSS}</style>{body}</div>"

    def write(self, folder: str | Path) -> Path:
        """`<folder>/compare-<stamp>.html`, written atomically; returns its path."""
        from datetime import datetime

        from mnistlab.atomic import atomic_write_text

        path = Path(folder) / f"compare-{datetime.now().strftime('%Y%m%d-%H%M%S')}.html"
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise MnistlabError(f"{folder}: cannot create the folder ({exc.strerror}); pass an "
                                "--out folder that is writable") from None
        atomic_write_text(path, self.html())
        return path


def _ci(row: Any) -> str:
    low, high = row["test_accuracy_low"], row["test_accuracy_high"]
    interval = f" [{low:.4f}, {high:.4f}]" if math.isfinite(low) else " n/a (1 seed)"
    return f"{row['test_accuracy']:.4f}{interval}"


def _ci_pct(row: Any) -> str:
    return mean_ci({"n": row["seeds"], "mean": row["test_accuracy"],
                    "ci_low": row["test_accuracy_low"], "ci_high": row["test_accuracy_high"],
                    "interval": stats.NO_INTERVAL})


def _pp(value: float) -> str:
    return f"{100 * value:+.2f} pp" if math.isfinite(value) else "–"


def _interval(p: Any) -> str:
    if not math.isfinite(p["ci_low"]):
        return p["note"] or "–"
    return f"[{100 * p['ci_low']:+.2f}, {100 * p['ci_high']:+.2f}]"


def _p(value: float) -> str:
    return f"{value:.2g}" if math.isfinite(value) else "–"
