"""Statistics over seeds: mean ± 95% CI per configuration, and which differences are significant.

Seeds are few (3–5), so intervals use the t-distribution and comparisons use Welch's t-test
(no equal-variance assumption), Holm-corrected because the best configuration is tested against
every other one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats as sps

TEST_NAME = "Welch's t-test on per-seed test accuracy, two-sided, Holm-corrected vs the best"
CONFIDENCE = 0.95
# Per-seed values summarised for every configuration in summary.json. Wall-clock seconds are
# left out on purpose: a rerun must reproduce the summary's statistics exactly.
SUMMARISED = (
    "test_accuracy", "final_val_accuracy", "best_val_accuracy", "test_loss", "train_val_gap",
)


def describe(values: Iterable[float]) -> dict[str, float | int]:
    """Mean, sample std (ddof=1), 95% t-interval of the mean and n over the finite values.

    Non-finite values (a diverged seed's NaN loss) are left out and n counts what is left. With
    n = 1 there is no spread to estimate: std is 0 and the interval is the value itself. With
    n = 0 every number is NaN.
    """
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        nan = float("nan")
        return {"mean": nan, "std": nan, "ci_low": nan, "ci_high": nan, "n": 0}
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": 0.0, "ci_low": mean, "ci_high": mean, "n": 1}
    std = float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


def welch(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, str]:
    """(t, two-sided p, note) of Welch's t-test of mean(a) - mean(b).

    Undefined cases give NaN and a note saying why, instead of scipy's warnings and NaN/inf.
    """
    if len(a) < 2 or len(b) < 2:
        return math.nan, math.nan, "fewer than 2 seeds in a group: no variance to test against"
    va, vb = np.var(a, ddof=1) / len(a), np.var(b, ddof=1) / len(b)
    if va + vb == 0:
        return math.nan, math.nan, "every seed gave the same value in both groups: t is undefined"
    t = (np.mean(a) - np.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch–Satterthwaite
    return float(t), float(2 * sps.t.sf(abs(t), df)), ""


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN."""
    valid = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


def compare(groups: Mapping[str, Sequence[float]], alpha: float = 0.05) -> dict[str, Any]:
    """The best group (highest mean) against each other one: Welch's t-test, Holm-corrected.

    `diff` is mean(best) - mean(other), so it is never negative. A pair is significant when its
    Holm-adjusted p is below `alpha`; an untestable pair has p = NaN, is not significant, and its
    `note` says why.
    """
    clean = {
        name: [float(v) for v in values if v is not None and math.isfinite(v)]
        for name, values in groups.items()
    }
    means = {name: float(np.mean(v)) for name, v in clean.items() if v}
    best = max(means, key=means.get) if means else None
    others = [name for name in clean if name != best] if best is not None else []
    pairs = []
    for name in others:
        if name in means:
            t, p, note = welch(clean[best], clean[name])
        else:
            t, p, note = math.nan, math.nan, "no finite values (every seed diverged)"
        diff = means[best] - means.get(name, math.nan)
        pairs.append({"a": best, "b": name, "diff": diff, "t": t, "p": p, "note": note})
    for pair, p_holm in zip(pairs, holm([p["p"] for p in pairs]), strict=True):
        pair["p_holm"] = p_holm
        pair["significant"] = bool(p_holm < alpha)
    return {"test": TEST_NAME, "alpha": alpha, "best": best, "pairs": pairs}


def summarize(
    run_rows: Sequence[Mapping[str, Any]], configs: Mapping[str, Mapping[str, Any]]
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """summary.json's "configs" list (in `configs` order) and "comparisons" from per-seed rows.

    `configs` maps each run name to its plain RunConfig dict. `train_val_gap` is the final training
    accuracy minus the final validation accuracy: large means overfitting.
    """
    out = []
    for name, config in configs.items():
        rows = [r for r in run_rows if r["run"] == name]
        entry: dict[str, Any] = {"run": name, "config": dict(config), "n": len(rows)}
        entry |= {key: describe(_value(r, key) for r in rows) for key in SUMMARISED}
        entry["diverged"] = sum(r.get("diverged_at") is not None for r in rows)
        out.append(entry)
    groups = {name: [r["test_accuracy"] for r in run_rows if r["run"] == name] for name in configs}
    return out, compare(groups)


def _value(row: Mapping[str, Any], key: str) -> float:
    if key == "train_val_gap":
        return row["final_train_accuracy"] - row["final_val_accuracy"]
    return row[key]


def convergence_step(
    steps: Sequence[int], accuracy: Sequence[float], fraction: float = 0.95
) -> int | None:
    """First step at which a (mean) validation-accuracy curve reaches `fraction` of its final value.

    A proxy for how slowly a configuration learns; None for an empty or non-finite curve.
    """
    acc = np.asarray(accuracy, dtype=np.float64)
    if len(acc) == 0 or not math.isfinite(acc[-1]):
        return None
    reached = np.flatnonzero(acc >= fraction * acc[-1])
    return int(steps[reached[0]])


def winner(summary: Mapping[str, Any]) -> str | None:
    """The configuration a run directory reports as its best: a sweep's ranked winner, else the
    comparisons' best."""
    sweep = summary.get("sweep")
    return sweep["winner"] if sweep else summary.get("comparisons", {}).get("best")


def winner_seed(summary: Mapping[str, Any]) -> int | None:
    """The seed of the winner whose model is shown (confusion matrix, errors, `evaluate`)."""
    best = winner(summary)
    rows = [r for r in summary.get("runs", [])
            if r["run"] == best and math.isfinite(r.get("test_accuracy") or math.nan)]
    return max(rows, key=lambda r: r["test_accuracy"])["seed"] if rows else None
