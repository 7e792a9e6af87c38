"""report.html: one self-contained page (inline CSS, PNGs as data: URIs, no URL of any kind).

It states what was run and on what, the configuration and statistics tables, the significance
tests, a short reading of the results written from the numbers, and every plot.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Collection, Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from mnistlab.config import StudyConfig, to_dict
from mnistlab.report.plots import seed_band
from mnistlab.stats import convergence_step

Figures = Sequence[tuple[str, Sequence[tuple[str, Path]]]]  # (section title, [(caption, png)])

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
tr.best td { background: #eaf7ea; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 13px; color: #555; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
"""


def pct(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}%}" if math.isfinite(value) else "–"


def points(value: float) -> str:
    """A difference of two accuracies in percentage points."""
    return f"{100 * value:.2f} pp" if math.isfinite(value) else "–"


def mean_ci(d: Mapping[str, Any]) -> str:
    """'97.83% [97.60, 98.06]' for an accuracy described by stats.describe."""
    if not d["n"]:
        return "–"
    return f"{pct(d['mean'])} [{100 * d['ci_low']:.2f}, {100 * d['ci_high']:.2f}]"


def number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(number(v) for v in value)
    return str(value)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          best_rows: Collection[int] = ()) -> str:
    """An HTML table; every cell is escaped text; `best_rows` are highlighted."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        ('<tr class="best">' if i in best_rows else "<tr>")
        + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


# --- the reading --------------------------------------------------------------------------------


def reading(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A few plain sentences on the results: winner, margin and significance, overfitting,
    slow convergence, divergence."""
    configs = {c["run"]: c for c in summary["configs"]}
    comparisons = summary["comparisons"]
    best = comparisons.get("best")
    if best is None:
        return ["No configuration has a finite test accuracy: every run diverged."]
    b = configs[best]["test_accuracy"]
    text = [f"{best} has the highest mean test accuracy, {pct(b['mean'])} (95% CI "
            f"{pct(b['ci_low'])}–{pct(b['ci_high'])}, {b['n']} seed{'s' * (b['n'] != 1)})."]
    text += _margin_sentences(comparisons)
    text += [_overfit_sentence(configs), _convergence_sentence(configs, rows, summary)]
    text += [_divergence_sentence(summary["runs"])]
    return [t for t in text if t]


def _margin_sentences(comparisons: Mapping[str, Any]) -> list[str]:
    pairs = [p for p in comparisons["pairs"] if math.isfinite(p["diff"])]
    if not pairs:
        return ["There is no other configuration to compare it with."]
    closest = min(pairs, key=lambda p: p["diff"])
    if math.isnan(closest["p_holm"]):
        verdict = f"whether this is significant cannot be tested: {closest['note']}"
    else:
        verdict = (f"this is {'' if closest['significant'] else 'not '}significant at "
                   f"α = {comparisons['alpha']} (Holm-corrected p = {number(closest['p_holm'])})")
    text = [f"It beats the runner-up, {closest['b']}, by {points(closest['diff'])}; {verdict}."]
    better = [p["b"] for p in pairs if p["significant"]]
    same = [p["b"] for p in pairs if not p["significant"]]
    if better:
        rest = f"; not distinguishable from {', '.join(same)} with these seeds" if same else ""
        text.append(f"It is significantly better than {', '.join(better)}{rest}.")
    return text


def _overfit_sentence(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """Training accuracy is measured in train mode (dropout on), so a negative gap is common."""
    gaps = {name: c["train_val_gap"]["mean"] for name, c in configs.items()
            if math.isfinite(c["train_val_gap"]["mean"])}
    if not gaps:
        return ""
    worst = max(gaps, key=gaps.get)
    if gaps[worst] <= 0:
        return (f"No configuration overfits: every final training accuracy (train mode, mean "
                f"since the previous record) is at or below the validation accuracy; the largest "
                f"gap is {worst}'s, {points(gaps[worst])}.")
    least = min(gaps, key=gaps.get)
    text = (f"{worst} overfits most: at the end its training accuracy is {points(gaps[worst])} "
            "above its validation accuracy (mean over seeds)")
    if least == worst:
        return text + "."
    return text + f"; the smallest gap is {least}'s, {points(gaps[least])}."


def _convergence_sentence(configs: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                          summary: Mapping[str, Any]) -> str:
    reached = {}
    for name in configs:
        steps, mean, _, _ = seed_band(rows, name, "val", "accuracy")
        step = convergence_step(steps, mean) if len(steps) else None
        if step is not None:
            reached[name] = step
    if len(reached) < 2:
        return ""
    slow, fast = max(reached, key=reached.get), min(reached, key=reached.get)
    per_epoch = summary.get("steps_per_epoch")
    when = lambda s: f"iteration {s}" + (f" (epoch {s / per_epoch:.1f})" if per_epoch else "")  # noqa: E731
    if reached[slow] == reached[fast]:
        return (f"Every configuration's mean validation accuracy reaches 95% of its final value "
                f"at the same record, {when(reached[slow])}: too few records to rank their speed.")
    return (f"{slow} converges slowest: its mean validation accuracy first reaches 95% of its "
            f"final value at {when(reached[slow])}, against {when(reached[fast])} for {fast}, "
            "the fastest.")


def _divergence_sentence(runs: Sequence[Mapping[str, Any]]) -> str:
    diverged = [f"{r['run']} seed {r['seed']} (iteration {r['diverged_at']})"
                for r in runs if r.get("diverged_at") is not None]
    if not diverged:
        return "No run diverged."
    return f"Diverged (loss became NaN/inf; model frozen): {', '.join(diverged)}."


# --- the page -----------------------------------------------------------------------------------


def _overview(summary: Mapping[str, Any], study: StudyConfig | None) -> str:
    sizes = summary.get("sizes", {})
    items = [
        ("data", summary.get("data")),
        ("split", ", ".join(f"{k} {v}" for k, v in sizes.items())),
        ("split note", summary.get("split_note")),
        ("classes", ", ".join(summary.get("classes", []))),
        ("device", summary.get("device")),
        ("seeds", ", ".join(str(s) for s in summary.get("seeds", []))),
        ("training time", f"{summary.get('seconds', math.nan):.1f} s for all runs"),
        ("iterations per epoch", summary.get("steps_per_epoch")),
    ]
    if study is not None:
        items += [(f"schedule: {k}", number(v)) for k, v in to_dict(study.schedule).items()]
        items += [("validation fraction", study.val_fraction), ("split seed", study.split_seed)]
    return "<dl>" + "".join(
        f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items if v not in (None, "")
    ) + "</dl>"


def _config_table(configs: Sequence[Mapping[str, Any]]) -> str:
    fields: list[str] = []
    for c in configs:
        fields += [f for f in c["config"] if f not in fields and f != "name"]
    rows = [[c["run"], *(number(c["config"].get(f)) for f in fields)] for c in configs]
    return table(["configuration", *fields], rows)


def _stats_table(configs: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
                 best: str | None) -> str:
    header = ["configuration", "seeds", "test accuracy, mean [95% CI]",
              "final val accuracy [95% CI]", "best val accuracy", "train − val gap", "test loss",
              "time per run", "diverged"]
    rows = [[
        c["run"], c["n"], mean_ci(c["test_accuracy"]), mean_ci(c["final_val_accuracy"]),
        pct(c["best_val_accuracy"]["mean"]), points(c["train_val_gap"]["mean"]),
        number(c["test_loss"]["mean"]), _seconds(runs, c["run"]), c["diverged"],
    ] for c in configs]
    return table(header, rows, {i for i, c in enumerate(configs) if c["run"] == best})


def _seconds(runs: Sequence[Mapping[str, Any]], name: str) -> str:
    """Mean training seconds per run of one configuration (its stack's time, split per model)."""
    seconds = [r["seconds"] for r in runs if r["run"] == name and r.get("seconds") is not None]
    return f"{sum(seconds) / len(seconds):.1f} s" if seconds else "–"


def _comparison_table(comparisons: Mapping[str, Any]) -> str:
    rows = [[f"{p['a']} vs {p['b']}", points(p["diff"]), number(p["t"]), number(p["p"]),
             number(p["p_holm"]), "yes" if p["significant"] else "no", p.get("note", "")]
            for p in comparisons["pairs"]]
    return table(["pair", "difference", "t", "p", "p (Holm)", "significant", "note"], rows)


def _figure(caption: str, path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def render_html(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], figures: Figures,
                *, study: StudyConfig | None = None, notes: Sequence[str] = (),
                extra: Sequence[str] = ()) -> str:
    """The whole page as a string; `notes` are shown prominently (e.g. plots that were skipped).

    `extra` is trusted HTML (already escaped by its maker, e.g. a sweep's top-10 table) placed
    after the reading.
    """
    comparisons = summary["comparisons"]
    title = f"mnistlab study: {summary.get('study', '')}"
    parts = [
        f"<h1>{escape(title)}</h1>",
        _overview(summary, study),
        *(f'<p class="note">{escape(n)}</p>' for n in notes),
        "<h2>Reading</h2>",
        "<ul>" + "".join(f"<li>{escape(s)}</li>" for s in reading(summary, rows)) + "</ul>",
        *extra,
        "<h2>Statistics over seeds</h2>",
        _stats_table(summary["configs"], summary["runs"], comparisons.get("best")),
        "<h2>Comparisons</h2>",
        f"<p>{escape(comparisons['test'])}, α = {escape(str(comparisons['alpha']))}. "
        f"Best: {escape(str(comparisons.get('best')))}.</p>",
        _comparison_table(comparisons),
        "<h2>Configurations</h2>",
        _config_table(summary["configs"]),
    ]
    for section, items in figures:
        parts.append(f"<h2>{escape(section)}</h2>")
        parts += [_figure(caption, path) for caption, path in items]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
