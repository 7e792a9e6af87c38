"""A finished run directory as an object: tables as pandas DataFrames, models, plots.

Everything is read from the run directory alone, so `mnistlab.load_run(path)` works anywhere the
folder is, with the data set gone and no network.
"""

from __future__ import annotations

import base64
import html
import io
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mnistlab import stats
from mnistlab.model import Checkpoint
from mnistlab.modules import load_checkpoint
from mnistlab.runs import METRIC_COLUMNS, RunDir

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.figure import Figure
    from torch import nn

# summary.json's per-configuration statistics, as DataFrame columns (mean and 95% interval)
_DESCRIBED = ("test_accuracy", "final_val_accuracy", "best_val_accuracy", "test_loss",
              "train_val_gap")
CORE = ("lr", "hidden", "dropout", "layernorm")  # a lone configuration's hyperparameter columns
METRICS = ("accuracy", "loss")  # what metrics.csv records, and so what `plot` can draw


def varied(configs: list[dict[str, Any]]) -> list[str]:
    """The configuration fields whose values differ between `configs` (RunConfig dicts), in
    field order; for a lone configuration, CORE."""
    fields = list(dict.fromkeys(k for c in configs for k in c if k != "name"))
    if len(configs) < 2:
        return [f for f in CORE if f in fields]
    return [f for f in fields if len({repr(c.get(f)) for c in configs}) > 1]


class Page:
    """An HTML file shown inline in a notebook (in an iframe: its styles stay its own)."""

    def __init__(self, path: Path, height: int = 800):
        self.path, self.height = Path(path), height

    def __repr__(self) -> str:
        return f"Page({str(self.path)!r})"

    def _repr_html_(self) -> str:
        page = html.escape(self.path.read_text(encoding="utf-8"), quote=True)
        return (f'<iframe srcdoc="{page}" style="width:100%;height:{self.height}px;border:0">'
                "</iframe>")


class Results:
    """What a study, sweep or train produced; `ml.load_run(path)` gives the same object."""

    def __init__(self, run_dir: RunDir):
        self.run_dir = run_dir
        self.raw: dict[str, Any] = run_dir.read_summary()  # summary.json as it is on disk

    def __repr__(self) -> str:
        return f"Results({str(self.path)!r}, winner={self.winner!r})"

    @property
    def path(self) -> Path:
        return self.run_dir.root

    @property
    def report_path(self) -> Path:
        return self.run_dir.report_path

    @property
    def winner(self) -> str | None:
        """The best configuration (see summary.json's comparisons)."""
        return stats.winner(self.raw)

    @cached_property
    def metrics(self) -> pd.DataFrame:
        """Every record, long format as in metrics.csv: run, seed, step, epoch, split, loss,
        accuracy."""
        import pandas as pd  # on first use: a command that only prints needs no pandas

        return pd.DataFrame(self.run_dir.read_metrics(), columns=list(METRIC_COLUMNS))

    @cached_property
    def runs(self) -> pd.DataFrame:
        """One row per model (configuration × seed): final and best validation, test metrics,
        divergence, seconds."""
        import pandas as pd

        return pd.DataFrame(self.raw["runs"])

    @cached_property
    def summary(self) -> pd.DataFrame:
        """One row per configuration: its hyperparameters that differ between configurations
        (a lone one: lr, hidden, dropout, layernorm), seeds, and for each statistic its mean and
        95% interval over seeds (`<stat>`, `<stat>_low`, `<stat>_high`), and how many seeds
        diverged."""
        import pandas as pd

        rows = []
        fields = varied([c["config"] for c in self.raw["configs"]])
        plain = lambda v: tuple(v) if isinstance(v, list) else v  # noqa: E731
        for c in self.raw["configs"]:
            row: dict[str, Any] = {"configuration": c["run"],
                                   **{f: plain(c["config"].get(f)) for f in fields},
                                   "seeds": c["n"]}
            for key in _DESCRIBED:
                d = c[key]
                row |= {key: d["mean"], f"{key}_low": d["ci_low"], f"{key}_high": d["ci_high"]}
            rows.append(row | {"diverged": c["diverged"]})
        return pd.DataFrame(rows).set_index("configuration")

    @cached_property
    def comparisons(self) -> pd.DataFrame:
        """Each compared pair (a − b on the test set, a ranked higher on validation): the
        difference with its 95% interval, bootstrap p and its Holm correction, significance,
        the probability that a seed of a beats one of b, and McNemar's p per seed pair."""
        import pandas as pd

        rows = [{"a": p["a"], "b": p["b"], "diff": p["diff"], "ci_low": p["ci_low"],
                 "ci_high": p["ci_high"], "p": p["p"], "p_holm": p["p_holm"],
                 "significant": p["significant"], "p_a_beats_b": p["p_a_beats_b"],
                 "mcnemar_p": [t["p"] for t in p["mcnemar"]], "note": p.get("note", "")}
                for p in self.raw["comparisons"]["pairs"]]
        return pd.DataFrame(rows, columns=["a", "b", "diff", "ci_low", "ci_high", "p", "p_holm",
                                           "significant", "p_a_beats_b", "mcnemar_p", "note"])

    def report(self, height: int = 800) -> Page:
        """report.html, shown inline in a notebook (`results.report()`)."""
        return Page(self.report_path, height)

    def checkpoint(self, name: str | None = None, seed: int | None = None) -> Checkpoint:
        """A model with its configuration and input normalisation: configuration `name`'s (by
        default the winner) with `seed` (by default its shown seed: mnistlab.stats.shown_seed,
        as the report, `evaluate` and `predict` choose)."""
        name = name or self.winner
        if seed is None:
            seed = stats.shown_seed(self.raw, name)
        if name is None or seed is None:
            from mnistlab.errors import MnistlabError

            raise MnistlabError(f"{self.path}: every model of {name or 'the run'} diverged; pass "
                                "name= and seed= to load one")
        return load_checkpoint(self.run_dir.model_path(name, seed))

    def model(self, name: str | None = None, seed: int | None = None) -> nn.Sequential:
        """A trained model as a plain `nn.Sequential` in eval mode (see `checkpoint`)."""
        return self.checkpoint(name, seed).model

    def models(self) -> dict[tuple[str, int], nn.Sequential]:
        """Every trained model, keyed by (configuration, seed)."""
        return {(r["run"], r["seed"]): self.model(r["run"], r["seed"]) for r in self.raw["runs"]}

    def plot(self, metric: str = "accuracy") -> Figure:
        """Every configuration's validation curve (mean over seeds, min–max band) of `metric`,
        accuracy or loss; shown inline in a notebook."""
        from mnistlab.report.plots import comparison_figure

        if metric not in METRICS:
            from mnistlab.errors import MnistlabError
            from mnistlab.suggest import did_you_mean

            raise MnistlabError(f"plot({metric!r}): no such curve{did_you_mean(metric, METRICS)};"
                                f" the records hold {' and '.join(METRICS)} (per-class scores: "
                                "ml.evaluate(path).per_class)")
        names = self.raw["selection"]["ranking"]  # best first: a large sweep shows its top
        rows = self.metrics.to_dict("records")
        return comparison_figure(rows, names, metric, self.raw.get("steps_per_epoch"))

    def _repr_html_(self) -> str:
        """The summary table and the validation-accuracy comparison, for Jupyter."""
        buffer = io.BytesIO()
        self.plot().savefig(buffer, format="png", dpi=80)
        image = base64.b64encode(buffer.getvalue()).decode("ascii")
        title = html.escape(f"{self.raw.get('study', '')}: winner {self.winner}")
        table = self.summary[["seeds", "test_accuracy", "test_accuracy_low",
                              "test_accuracy_high", "final_val_accuracy", "diverged"]]
        return (f"<h4>{title}</h4>{table.to_html(float_format='{:.4f}'.format)}"
                f'<img src="data:image/png;base64,{image}" style="max-width:100%">'
                f"<p>{html.escape(str(self.path))}</p>")
