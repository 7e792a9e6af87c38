"""report.html: one self-contained page (inline CSS, PNGs as data: URIs, no URL of any kind).

Laid out for reading: the first screen holds what was run in one line, the summary table and the
validation comparison; then a short reading written from the numbers, the comparisons on the
test set, the seed's claims, each configuration's loss and accuracy side by side, the winner's
errors, the setup, and a footer that says how to reproduce the page.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any

from mnistlab.config import StudyConfig, to_dict
from mnistlab.report.reading import (
    interval,
    mean_ci,
    number,
    p_value,
    pct,
    points,
    reading,
    signed_points,
)

Figure = tuple[str, Path]  # (caption, png)


@dataclass(frozen=True)
class Figures:
    """The page's plots, by where they go."""

    main: Figure  # on the first screen: every configuration's validation accuracy (a lone
    # configuration's training and validation accuracy)
    comparison: Sequence[Figure] = ()  # test accuracy per configuration, validation loss
    sweep: Sequence[Figure] = ()  # a sweep's heat map
    curves: Sequence[tuple[str, Path, Path]] = ()  # per configuration: (name, loss, accuracy)
    winner: Sequence[Figure] = ()  # the winner's confusion matrix and worst errors
    # The winner's scores per class, summed over its seeds: (class, precision, recall, F1,
    # support) rows, one per class of the data however many.
    per_class: Sequence[tuple[str, float, float, float, int]] = ()

CSS = """
body { font: 15px/1.5 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em;
       color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; margin-top: 2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
table.words td, table.words th, table.ranked td:nth-child(2), table.ranked th:nth-child(2) {
  text-align: left; }
tr.best td { background: #eaf7ea; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 2px 1em; }
dt { font-weight: 600; } dd { margin: 0; }
figure { display: inline-block; margin: 0.5em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; }
figure.main img { max-height: 400px; }
figcaption { font-size: 13px; color: #555; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 0.5em; }
.note { background: #fff6e0; border-left: 4px solid #e0a800; padding: 0.5em 1em; }
.lede { font-size: 16px; margin: 0.3em 0 0.8em; }
footer { margin-top: 3em; border-top: 1px solid #ccc; font-size: 13px; color: #555; }
code { background: #f4f4f4; padding: 1px 4px; }
.wide { overflow-x: auto; max-width: 100%; }
"""


def table(header: Sequence[str], rows: Sequence[Sequence[Any]],
          best_rows: Collection[int] = (), kind: str = "") -> str:
    """An HTML table; every cell is escaped text; `best_rows` are highlighted. Numbers align
    right, the first column left; `kind` "words" aligns every column left, "ranked" the second
    too (a rank, then a name)."""
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        ('<tr class="best">' if i in best_rows else "<tr>")
        + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
        for i, row in enumerate(rows)
    )
    opening = f'<table class="{kind}">' if kind else "<table>"
    return f"{opening}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
    """Every configuration field, one row each (its name a row header), one column per
    configuration: a column per field would be wider than a screen. The fields that differ
    between configurations come first; a long row of configurations scrolls in its box."""
    fields: list[str] = []
    for c in configs:
        fields += [f for f in c["config"] if f not in fields and f != "name"]
    differ = [f for f in fields if len({number(c["config"].get(f)) for c in configs}) > 1]
    head = "".join(f"<th>{escape(str(c['run']))}</th>" for c in configs)
    body = "".join(
        f"<tr><th>{escape(f)}</th>"
        + "".join(f"<td>{escape(number(c['config'].get(f)))}</td>" for c in configs) + "</tr>"
        for f in [*differ, *(f for f in fields if f not in differ)])
    return (f'<div class="wide"><table><thead><tr><th>configuration</th>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>")


def _stats_table(configs: Sequence[Mapping[str, Any]], runs: Sequence[Mapping[str, Any]],
                 ranking: Sequence[str]) -> str:
    """One row per configuration in the order of selection (mean final validation accuracy);
    the winner highlighted."""
    header = ["rank", "configuration", "seeds", "final val accuracy [95% CI]",
              "test accuracy [95% CI]", "best val accuracy", "train − val gap", "test loss",
              "time per model", "diverged"]
    by_name = {c["run"]: c for c in configs}
    rows = [[
        i, c["run"], c["n"], mean_ci(c["final_val_accuracy"]), mean_ci(c["test_accuracy"]),
        pct(c["best_val_accuracy"]["mean"]), points(c["train_val_gap"]["mean"]),
        number(c["test_loss"]["mean"]), _seconds(runs, c["run"]), c["diverged"],
    ] for i, c in enumerate((by_name[name] for name in ranking), start=1)]
    return table(header, rows, {0}, kind="ranked")


def _seconds(runs: Sequence[Mapping[str, Any]], name: str) -> str:
    """Mean training seconds per model of one configuration (its stack's time, split per model)."""
    seconds = [r["seconds"] for r in runs if r["run"] == name and r.get("seconds") is not None]
    return f"{sum(seconds) / len(seconds):.1f} s" if seconds else "–"


def _comparison_table(comparisons: Mapping[str, Any]) -> str:
    n = comparisons["replicates"]
    rows = [[f"{p['a']} − {p['b']}", signed_points(p["diff"]),
             interval(p["ci_low"], p["ci_high"], p.get("note", "")), p_value(p["p"], n),
             p_value(p["p_holm"], n), "yes" if p["significant"] else "no",
             number(p["p_a_beats_b"]), _mcnemar(p["mcnemar"])]
            for p in comparisons["pairs"]]
    return table(["pair (a − b)", "test accuracy difference", "95% interval (bootstrap)",
                  "p: a = b (paired bootstrap)", "p after Holm (over the pairs)",
                  "significant: Holm p < α", "P(a seed of a beats one of b)",
                  "McNemar per seed pair: pairs with p < 0.05 (uncorrected)"], rows)


def _mcnemar(tests: Sequence[Mapping[str, Any]]) -> str:
    """'3 of 3 (p 0.001, 0.02, 0.04)': the seed pairs whose McNemar p is under 0.05."""
    if not tests:
        return "–"
    low = sum(t["p"] < 0.05 for t in tests)
    return f"{low} of {len(tests)} (p {', '.join(p_value(t['p']) for t in tests)})"


def _claims_table(claims: Sequence[Mapping[str, Any]]) -> str:
    """Which data judged the claims (summaries written before they said so: nothing), then the
    claims with their verdicts."""
    data = claims[0].get("data")
    if data is None:
        judged = ""
    elif claims[0].get("on_seed_data"):
        judged = (f"<p>Judged on {escape(str(data))}: MNIST, the data the seed study made "
                  "them on.</p>")
    else:
        judged = (f"<p>Judged on {escape(str(data))}. The seed study made these claims on "
                  "MNIST: here the comparisons say whether its findings hold on this data, and "
                  "its “about 90 %”, a figure about MNIST, is not judged.</p>")
    return judged + table(["the seed study's claim", "verdict", "evidence"],
                          [[c["claim"], c["verdict"], c["evidence"]] for c in claims],
                          kind="words")


def _method(summary: Mapping[str, Any]) -> str:
    c, s = summary["comparisons"], summary["selection"]
    return (f"<p>Selection: {escape(s['rule'])}. Test accuracy intervals and differences: "
            f"{escape(c['method'])} ({c['replicates']} resamples, percentile intervals; other "
            "intervals: t over seeds). Pairs are ordered by validation rank; p-values are "
            f"Holm-corrected over the pairs, α = {c['alpha']}. McNemar: {escape(c['mcnemar'])}. "
            "P(a &gt; b): the share of seed pairs in which a scores above b (ties half).</p>")


def _figure(caption: str, path: Path, css: str = "") -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    opening = f'<figure class="{css}"' if css else "<figure"
    return (f'{opening} id="{css or "f"}-{escape(path.stem)}"><img src="data:image/png;base64,'
            f'{data}" alt="{escape(caption)}"><figcaption>{escape(caption)}</figcaption>'
            "</figure>")


def _lede(summary: Mapping[str, Any], study: StudyConfig | None) -> str:
    """What was run, on what, in one line; and the winner."""
    sizes = summary.get("sizes", {})
    images = "/".join(str(sizes.get(k, "?")) for k in ("train", "val", "test"))
    configs, seeds = len(summary["configs"]), len(summary["seeds"])
    epochs = f", {study.schedule.epochs} epochs" if study is not None else ""
    winner = summary["selection"]["winner"]
    chosen = (f" Winner, chosen on validation: <strong>{escape(str(winner))}</strong>."
              if configs > 1 else "")
    return (f'<p class="lede">{configs} configuration{"s" * (configs != 1)} × {seeds} '
            f"seed{'s' * (seeds != 1)} on {escape(str(summary.get('data')))} ({images} "
            f"train/validation/test images){epochs}, {escape(str(summary.get('device')))}, "
            f"{summary.get('seconds', math.nan):.0f} s of training.{chosen}</p>")


def _curves(curves: Sequence[tuple[str, Path, Path]], shown: Path) -> list[str]:
    """One row per configuration: its loss and accuracy side by side; not the figure already
    `shown` first (a lone configuration's accuracy)."""
    return ['<div class="pair">' + "".join(
        _figure(f"{name}: {metric}", path)
        for metric, path in (("loss", loss), ("accuracy", accuracy)) if path != shown) + "</div>"
        for name, loss, accuracy in curves]


def _footer(summary: Mapping[str, Any], env: Mapping[str, Any], reproduce: str) -> str:
    """Where the numbers came from, and the command that makes them again."""
    facts = [f"mnistlab {env.get('mnistlab', '?')}", f"git {env.get('git_rev') or 'unknown'}",
             f"run {env.get('created', '?')}", f"device {summary.get('device', '?')}",
             f"torch {env.get('torch', '?')}", f"python {env.get('python', '?')}"]
    cpu = env.get("cpu")
    if cpu:  # the same code and seed give other bits on another kind of CPU
        facts.append(f"CPU {cpu['name'] or cpu['vendor']} ({cpu['isa']}, {cpu['threads']} "
                     "threads)")
    command = env.get("command")
    ran = f" It was run as <code>{escape(command)}</code>." if command else ""
    return (f"<footer><p>{escape(' · '.join(facts))}</p><p>Reproduce: "
            f"<code>{escape(reproduce)}</code> (the run directory's own file holds every "
            f"setting).{ran}</p></footer>")


def render_html(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], figures: Figures,
                *, study: StudyConfig | None = None, notes: Sequence[str] = (),
                extra: Sequence[str] = (), env: Mapping[str, Any] | None = None,
                reproduce: str = "") -> str:
    """The whole page as a string; `notes` are shown prominently (e.g. plots that were skipped).

    `extra` is trusted HTML (already escaped by its maker, e.g. a sweep's top-10 table) placed
    after the reading. `env` is env.json's content, `reproduce` the command that re-runs it.
    """
    kind = summary.get("kind", "study")
    title = f"mnistlab {kind}: {summary.get('study', '')}"
    notes = [*summary.get("warnings", []), *notes]
    parts = [
        f"<h1>{escape(title)}</h1>",
        _lede(summary, study),
        *(f'<p class="note">{escape(n)}</p>' for n in notes),
        '<section id="summary">',
        _stats_table(summary["configs"], summary["runs"], summary["selection"]["ranking"]),
        "</section>",
        _figure(*figures.main, css="main"),
        "<h2>Reading</h2>",
        "<ul>" + "".join(f"<li>{escape(s)}</li>" for s in reading(summary, rows)) + "</ul>",
    ]
    if extra or figures.sweep:
        parts += ["<h2>Sweep</h2>", *extra, *(_figure(c, p) for c, p in figures.sweep)]
    if len(summary["configs"]) > 1:  # one configuration: nothing to compare
        parts += ["<h2>Comparison</h2>", *(_figure(c, p) for c, p in figures.comparison),
                  _method(summary), _comparison_table(summary["comparisons"])]
    if summary.get("claims"):
        parts += ["<h2>The seed study's claims</h2>", _claims_table(summary["claims"])]
    single = len(summary["configs"]) == 1
    parts += ["<h2>Learning curves" + ("" if single else " per configuration") + "</h2>",
              *_curves(figures.curves, figures.main[1])]
    who = "The model" if single and len(summary["seeds"]) == 1 else (
        "The configuration" if single else "The winner")
    if figures.winner:
        parts += [f"<h2>{who} on the test set</h2>",
                  *(_figure(c, p) for c, p in figures.winner)]
    if figures.per_class:
        parts += [f"<h3>{who} per class (test set, over its seeds)</h3>",
                  table(["class", "precision", "recall", "F1", "test images"],
                        [[name, f"{p:.4f}", f"{r:.4f}", f"{f:.4f}", n]
                         for name, p, r, f, n in figures.per_class])]
    parts += ["<h2>Setup</h2>", _overview(summary, study), _config_table(summary["configs"]),
              _footer(summary, env or {}, reproduce)]
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
            + "\n".join(parts) + "\n</body></html>\n")
