"""What `mnistlab.evaluate` hands back: an Evaluation with the model, data and seeds it
describes, shown in a notebook as tables and a confusion matrix, or as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mnistlab.evaluation import Evaluation


@dataclass(frozen=True, repr=False)
class Scored:
    """A model (or a configuration over its seeds) scored on a labelled set. In a notebook it
    shows its totals, per-class scores and confusion matrix (`per_class`, `confusion` as
    DataFrames; `plot()` draws the matrix)."""

    model: str  # which model: a checkpoint file, or a configuration and its seeds
    data: str  # what it was scored on
    note: str  # how that set was made, where it needs saying
    evaluation: Evaluation  # over several seeds: mean accuracy and loss, summed confusion
    classes: tuple[str, ...]
    per_seed: dict[int, float]  # test accuracy of each seed
    plots: list[Path]

    def __repr__(self) -> str:
        seeds = f", {len(self.per_seed)} seeds" if len(self.per_seed) > 1 else ""
        return (f"Scored({self.model!r}: accuracy {self.evaluation.accuracy:.4f}, loss "
                f"{self.evaluation.loss:.4f} on {self.data}{seeds})")

    @property
    def per_class(self) -> Any:
        """Precision, recall, F1 and support per class (a pandas DataFrame indexed by class)."""
        import pandas as pd

        ev = self.evaluation
        return pd.DataFrame({"precision": ev.precision, "recall": ev.recall, "f1": ev.f1,
                             "support": ev.support}, index=pd.Index(self.classes, name="class"))

    @property
    def confusion(self) -> Any:
        """The confusion matrix as a DataFrame: rows the true class, columns the predicted."""
        import pandas as pd

        return pd.DataFrame(self.evaluation.confusion,
                            index=pd.Index(self.classes, name="true"),
                            columns=pd.Index(self.classes, name="predicted"))

    def plot(self) -> Any:
        """The confusion matrix as a figure (shown inline in a notebook)."""
        from mnistlab.report.plots import confusion_figure

        return confusion_figure(self.evaluation, self.classes, f"{self.model}: confusion matrix")

    def _repr_html_(self) -> str:
        from html import escape

        ev = self.evaluation
        head = (f"<p><b>{escape(self.model)}</b> on {escape(self.data)}: accuracy "
                f"{ev.accuracy:.4f}, loss {ev.loss:.4f}</p>")
        note = f"<p>{escape(self.note)}</p>" if self.note else ""
        seeds = ""
        if len(self.per_seed) > 1:
            each = ", ".join(f"seed {k}: {a:.4f}" for k, a in self.per_seed.items())
            seeds = (f"<p>mean over {len(self.per_seed)} seeds ({escape(each)}); the confusion "
                     "matrix is summed over them</p>")
        return (head + note + seeds
                + self.per_class.to_html(float_format="{:.4f}".format)
                + self.confusion.to_html())

    def record(self) -> dict[str, Any]:
        """The JSON form (`mnistlab evaluate --json`): what the text shows, with each class as
        named (a string) and its index (an int); the worst errors without their images;
        `confusion[i][j]` counts true class i predicted as j."""
        ev = self.evaluation
        named = lambda i: {"label": self.classes[i], "index": int(i)}  # noqa: E731
        scores = zip(ev.precision, ev.recall, ev.f1, ev.support, strict=True)
        return {
            "model": self.model, "data": self.data, "note": self.note,
            "accuracy": ev.accuracy, "loss": ev.loss, "images": int(ev.support.sum()),
            "per_class": [{**named(i), "precision": float(p), "recall": float(r), "f1": float(f),
                           "support": int(n)} for i, (p, r, f, n) in enumerate(scores)],
            "macro_average": ev.macro,
            "confusion": ev.confusion.tolist(),
            "per_seed": [{"seed": s, "accuracy": a} for s, a in self.per_seed.items()],
            "worst_errors": [{"image": m.index, "true": named(m.true),
                              "predicted": named(m.predicted), "confidence": m.confidence}
                             for m in ev.worst],
            "plots": [str(path) for path in self.plots],
        }
