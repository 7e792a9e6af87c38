"""The report's words: numbers formatted for reading, and a few plain sentences on the results
(the winner, its margin and significance, overfitting, convergence, divergence), written from
summary.json and metrics.csv alone."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from mnistlab.stats import convergence_step, seed_band


def pct(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}%}" if math.isfinite(value) else "–"


def points(value: float) -> str:
    """A difference of two accuracies in percentage points."""
    return f"{100 * value:.2f} pp" if math.isfinite(value) else "–"


def mean_ci(d: Mapping[str, Any]) -> str:
    """'97.83% [97.60, 98.06]' for an accuracy described by stats.describe; with no interval
    (one seed) the reason instead of brackets."""
    if not d["n"]:
        return "–"
    return f"{pct(d['mean'])} {interval(d['ci_low'], d['ci_high'], d.get('interval', ''))}"


def interval(low: float, high: float, why: str = "") -> str:
    """'[97.60, 98.06]' in percent, or why there is none ('n/a (1 seed)')."""
    if not math.isfinite(low):
        return why or "n/a"
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def signed_points(value: float) -> str:
    return f"{100 * value:+.2f} pp" if math.isfinite(value) else "–"


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


def p_value(p: float, replicates: int | None = None) -> str:
    """Two significant digits; a bootstrap p of 0 is below one resample in `replicates`."""
    if not math.isfinite(p):
        return "–"
    if p == 0 and replicates:
        return f"< {1 / replicates:.2g}"
    return f"{p:.2g}"


# --- the reading --------------------------------------------------------------------------------


def reading(summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """A few plain sentences on the results: the winner (chosen on validation) and its test
    accuracy, its margin and significance, overfitting, slow convergence, divergence."""
    configs = {c["run"]: c for c in summary["configs"]}
    best = summary["selection"]["winner"]
    if best is None:
        return ["No configuration has a finite validation accuracy: every model diverged."]
    v, t = configs[best]["final_val_accuracy"], configs[best]["test_accuracy"]
    seeds = f"{v['n']} seed{'s' * (v['n'] != 1)}"
    if len(configs) == 1:  # one configuration: nothing was chosen, nothing to compare
        text = [f"{best} ends with a final validation accuracy of {mean_ci(v)} over {seeds}; "
                f"its test accuracy, scored once, is {mean_ci(t)}."]
    else:
        text = [f"{best} has the highest mean final validation accuracy, {mean_ci(v)} over "
                f"{seeds}, and is the winner; its test accuracy, scored once, is {mean_ci(t)}."]
        text += _margin_sentences(summary)
    text += [_overfit_sentence(configs), _convergence_sentence(configs, rows, summary)]
    text += [_divergence_sentence(summary["runs"])]
    return [t for t in text if t]


def _margin_sentences(summary: Mapping[str, Any]) -> list[str]:
    """The winner against the runner-up (by validation), and against the rest, on the test set."""
    ranking, comparisons = summary["selection"]["ranking"], summary["comparisons"]
    pairs = {(p["a"], p["b"]): p for p in comparisons["pairs"]}
    mine = [pairs[ranking[0], other] for other in ranking[1:] if (ranking[0], other) in pairs]
    if not mine:
        return ["There is no other configuration to compare it with."]
    runner = mine[0]
    if math.isnan(runner["p_holm"]):
        verdict = f"no test is possible: {runner['note']}"
    else:
        verdict = (f"the difference is {'' if runner['significant'] else 'not '}significant at "
                   f"α = {comparisons['alpha']} (paired bootstrap, Holm-corrected p "
                   f"{_p_text(runner['p_holm'], comparisons['replicates'])}; P(a seed of "
                   f"{runner['a']} beats one of "
                   f"{runner['b']}) = {number(runner['p_a_beats_b'])})")
    text = [f"On the test set it differs from the runner-up, {runner['b']}, by "
            f"{signed_points(runner['diff'])} {interval(runner['ci_low'], runner['ci_high'])}; "
            f"{verdict}."]
    better = [p["b"] for p in mine if p["significant"] and p["diff"] > 0]
    same = [p["b"] for p in mine if not p["significant"]]
    if better:
        rest = f"; not distinguishable from {', '.join(same)} with these seeds" if same else ""
        text.append(f"It is significantly better than {', '.join(better)}{rest}.")
    power = summary.get("power")
    if power and power.get("seeds_needed"):
        text.append(f"At the observed spread, {power['seeds_needed']} seeds per configuration "
                    f"would resolve the {signed_points(power['diff'])} difference between "
                    f"{power['a']} and {power['b']} (t-test, α = {power['alpha']}, power "
                    f"{power['power']:.0%}).")
    return text


def _p_text(p: float, replicates: int) -> str:
    shown = p_value(p, replicates)
    return shown if shown.startswith("<") else f"= {shown}"


OVERFIT_GAP = 0.005  # a train − val gap below half a point is noise, not overfitting


def _real_gap(gap: Mapping[str, Any]) -> bool:
    """Whether a train − val gap (stats.describe over seeds) is overfitting: at least
    OVERFIT_GAP, and with two or more seeds its 95% interval above 0."""
    if not math.isfinite(gap["mean"]) or gap["mean"] < OVERFIT_GAP:
        return False
    return not math.isfinite(gap.get("ci_low", math.nan)) or gap["ci_low"] > 0


def _overfit_sentence(configs: Mapping[str, Mapping[str, Any]]) -> str:
    """Training accuracy is measured in train mode (dropout on), so a negative gap is common.
    A configuration is said to overfit only when its gap is real (`_real_gap`)."""
    gaps = {name: c["train_val_gap"]["mean"] for name, c in configs.items()
            if math.isfinite(c["train_val_gap"]["mean"])}
    if not gaps:
        return ""
    worst = max(gaps, key=gaps.get)
    if len(gaps) == 1:
        if not _real_gap(configs[worst]["train_val_gap"]):
            return (f"No sign of overfitting: the final training accuracy (train mode) is "
                    f"{points(gaps[worst])} from the validation accuracy.")
        return (f"{worst} overfits: at the end its training accuracy is {points(gaps[worst])} "
                "above its validation accuracy.")
    if not _real_gap(configs[worst]["train_val_gap"]) and gaps[worst] > 0:
        return (f"No configuration overfits clearly: the largest gap between final training "
                f"and validation accuracy, {worst}'s, is {points(gaps[worst])}, within noise.")
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
