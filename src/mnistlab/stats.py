"""Statistics a reviewer would accept: choose on validation, score the test set once, and report
both sources of noise — the seeds, and the finite test set every model is scored on.

- Selection: configurations rank by mean final validation accuracy (the saved checkpoint holds
  the final weights, so the metric matches the model that is kept); the test set never chooses.
- Per configuration, test accuracy gets a 95% interval from a two-level bootstrap: resample the
  seeds, then the test images (the same resampled images for every model, since they are
  scored on the same images). It covers seed-to-seed variation and test-set sampling, and as a
  mean of accuracies it never leaves [0, 1]. Other per-seed figures (validation accuracy, loss,
  the train−val gap) get a t-interval over seeds, clipped to [0, 1] for accuracies.
- Per pair, paired on the same test images: the difference with its two-level bootstrap interval
  and p-value (Holm-corrected over the pairs), McNemar's exact test per seed pair, and the
  probability that a seed of one beats a seed of the other (rliable's probability of improvement).
- One seed has no spread to estimate: intervals and tests are "n/a (1 seed)". Two seeds say
  little, and the summary warns; a power line says how many seeds would resolve the observed
  difference at the observed spread.
"""

from __future__ import annotations

import functools
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

CONFIDENCE = 0.95
ALPHA = 0.05
REPLICATES = 2000  # bootstrap resamples: percentile intervals stable to about 0.05 points
BOOTSTRAP_SEED = 20261130  # fixed, so a rerun reproduces the summary exactly
SELECTION = "final_val_accuracy"
ALL_PAIRS_UP_TO = 10  # configurations; beyond, the winner against each other one
POWER = 0.8
NO_INTERVAL = "n/a (1 seed)"
BOOTSTRAP = "two-level bootstrap: seeds, then the same test images for every model"
# Per-seed values summarised for every configuration in summary.json. Wall-clock seconds are
# left out on purpose: a rerun must reproduce the summary's statistics exactly.
SUMMARISED = (
    "test_accuracy", "final_val_accuracy", "best_val_accuracy", "test_loss", "train_val_gap",
)
BOUNDED = {"test_accuracy", "final_val_accuracy", "best_val_accuracy"}


def describe(values: Iterable[float], bounded: bool = False) -> dict[str, Any]:
    """Mean, sample std, n and a 95% t-interval over the finite values (a diverged seed's NaN is
    left out). `bounded` values (accuracies) have their interval clipped to [0, 1]. Fewer than
    two values: no interval."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    n, nan = len(x), math.nan
    if n < 2:
        mean = float(x.mean()) if n else nan
        return {"mean": mean, "std": nan, "n": n, "ci_low": nan, "ci_high": nan,
                "interval": NO_INTERVAL if n else "n/a (no finite value)"}
    from scipy import stats as sps  # here: a run of one seed never needs SciPy's import

    mean, std = float(x.mean()), float(x.std(ddof=1))
    half = float(sps.t.ppf(0.5 + CONFIDENCE / 2, df=n - 1)) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    label = "t over seeds"
    if bounded:
        low, high, label = max(low, 0.0), min(high, 1.0), "t over seeds, clipped to [0, 1]"
    return {"mean": mean, "std": std, "n": n, "ci_low": low, "ci_high": high, "interval": label}


# --- the bootstrap ---------------------------------------------------------------------------


def bootstrap(correct: Mapping[str, np.ndarray], replicates: int = REPLICATES,
              seed: int = BOOTSTRAP_SEED, chunk: int = 200) -> dict[str, np.ndarray]:
    """Two-level bootstrap of mean test accuracy: per configuration `replicates` values.

    `correct[name]` is (seeds, images) booleans, one row per (non-diverged) seed, all on the same
    images. Each replicate draws the images once with replacement, shared by every model (the
    comparison is paired), then each configuration's seeds with replacement.
    """
    names = [n for n, c in correct.items() if len(c)]
    if not names:
        return {}
    images = correct[names[0]].shape[1]
    rows = np.concatenate([correct[n] for n in names]).astype(np.float32)  # (models, images)
    starts = np.cumsum([0] + [len(correct[n]) for n in names])
    rng = np.random.default_rng(seed)
    out: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for done in range(0, replicates, chunk):
        b = min(chunk, replicates - done)
        drawn = rng.integers(0, images, size=(b, images))
        weights = np.bincount((np.arange(b)[:, None] * images + drawn).ravel(),
                              minlength=b * images).reshape(b, images).astype(np.float32)
        per_model = weights @ rows.T / images  # (b, models): each model on the drawn images
        for name, start, stop in zip(names, starts, starts[1:], strict=False):
            seeds = rng.integers(start, stop, size=(b, stop - start))
            out[name].append(per_model[np.arange(b)[:, None], seeds].mean(1))
    return {n: np.concatenate(v).astype(np.float64) for n, v in out.items()}


def percentile_interval(replicates: np.ndarray) -> tuple[float, float]:
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(replicates, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided p-value of "no difference" from bootstrap replicates of a difference."""
    below = np.mean(differences <= 0)
    above = np.mean(differences >= 0)
    return float(min(1.0, 2 * min(below, above)))


# --- tests -----------------------------------------------------------------------------------


def mcnemar(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of two models on the same images: only the images exactly one of
    them gets right count; under "equally good" each such image is a fair coin."""
    from scipy import stats as sps

    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = sps.binomtest(a_only, a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p": float(p)}


def probability_of_improvement(a: Sequence[float], b: Sequence[float]) -> float:
    """P(a seed of A scores above a seed of B), ties counting half, over all seed pairs: the
    Mann–Whitney U statistic over the number of pairs (as rliable reports it), NaN where a
    score is NaN. Counted directly: a few seeds make a few dozen pairs, and importing SciPy's
    statistics for them would cost a one-seed study more than its test pass."""
    a_, b_ = np.asarray(a, dtype=np.float64)[:, None], np.asarray(b, dtype=np.float64)[None, :]
    if not a_.size or not b_.size or np.isnan(a_).any() or np.isnan(b_).any():
        return math.nan
    return float(((a_ > b_).sum() + 0.5 * (a_ == b_).sum()) / (a_.size * b_.size))


def seeds_needed(diff: float, sd_a: float, sd_b: float, alpha: float = ALPHA,
                 power: float = POWER, most: int = 1000) -> int | None:
    """Seeds per configuration for a two-sided t-test at `alpha` to detect `diff` with `power`,
    at the observed spread (noncentral t); None when there is no difference or no spread, or
    when more than `most` would be needed."""
    sd = math.sqrt((sd_a**2 + sd_b**2) / 2)
    if not (math.isfinite(diff) and math.isfinite(sd)) or diff == 0 or sd == 0:
        return None
    from scipy import stats as sps

    for n in range(2, most + 1):
        df, ncp = 2 * n - 2, abs(diff) / (sd * math.sqrt(2 / n))
        critical = sps.t.ppf(1 - alpha / 2, df)
        if sps.nct.sf(critical, df, ncp) + sps.nct.cdf(-critical, df, ncp) >= power:
            return n
    return None


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (step-down, monotone, capped at 1); NaN stays NaN."""
    valid = sorted((p, i) for i, p in enumerate(p_values) if math.isfinite(p))
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(valid):
        running = max(running, min(1.0, (len(valid) - rank) * p))
        adjusted[i] = running
    return adjusted


# --- the summary -----------------------------------------------------------------------------


class Comparer:
    """Everything about two configurations, from the per-seed rows and the test answers."""

    def __init__(self, runs: Sequence[Mapping[str, Any]], correct: Mapping[str, np.ndarray]):
        """`runs` are the per-seed rows; `correct[name]` is (seeds, images) booleans of the
        configuration's non-diverged seeds, in `runs` order."""
        self.runs, self.correct = runs, correct
        self.seeds: dict[str, list[int]] = {}
        for r in runs:
            if math.isfinite(r["test_accuracy"]):
                self.seeds.setdefault(r["run"], []).append(r["seed"])

    @functools.cached_property
    def replicates(self) -> dict[str, np.ndarray]:
        """The bootstrap's replicates, drawn where an interval is asked for (never with one
        seed, where none is possible)."""
        return bootstrap(self.correct)

    def test_accuracies(self, name: str) -> list[float]:
        return [r["test_accuracy"] for r in self.runs
                if r["run"] == name and math.isfinite(r["test_accuracy"])]

    def accuracy(self, name: str) -> dict[str, Any]:
        """Mean test accuracy over seeds with its bootstrap interval (n/a with one seed)."""
        values = self.test_accuracies(name)
        d = describe(values, bounded=True)
        if d["n"] >= 2:
            d["ci_low"], d["ci_high"] = percentile_interval(self.replicates[name])
            d["interval"] = BOOTSTRAP
        return d

    def pair(self, a: str, b: str) -> dict[str, Any]:
        """A against B on the test set (difference A − B)."""
        acc_a, acc_b = self.test_accuracies(a), self.test_accuracies(b)
        diff = float(np.mean(acc_a) - np.mean(acc_b)) if acc_a and acc_b else math.nan
        out: dict[str, Any] = {"a": a, "b": b, "diff": diff, "ci_low": math.nan,
                               "ci_high": math.nan, "p": math.nan,
                               "p_a_beats_b": probability_of_improvement(acc_a, acc_b),
                               "mcnemar": [], "note": ""}
        if min(len(acc_a), len(acc_b)) < 2:
            out["note"] = NO_INTERVAL if min(len(acc_a), len(acc_b)) == 1 else "diverged"
            return out
        differences = self.replicates[a] - self.replicates[b]
        out["ci_low"], out["ci_high"] = percentile_interval(differences)
        out["p"] = bootstrap_p(differences)
        out["mcnemar"] = self._mcnemar(a, b)
        return out

    def _mcnemar(self, a: str, b: str) -> list[dict[str, Any]]:
        """Per seed pair: the same seed where both have it, else seeds paired in order."""
        common = [s for s in self.seeds[a] if s in self.seeds[b]]
        pairs = [(s, s) for s in common] or list(zip(self.seeds[a], self.seeds[b], strict=False))
        return [{"seed_a": sa, "seed_b": sb,
                 **mcnemar(self.correct[a][self.seeds[a].index(sa)],
                           self.correct[b][self.seeds[b].index(sb)])}
                for sa, sb in pairs]


def rank(configs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Configuration names best first: the furthest successive-halving rung reached (a sweep's
    configurations stopped early compare shorter training), then mean final validation
    accuracy. Ties keep their order; no finite value (every seed diverged) comes last."""
    def key(c: Mapping[str, Any]) -> tuple[int, float]:
        mean = c[SELECTION]["mean"]
        return -c.get("rung", 0), -mean if math.isfinite(mean) else math.inf

    return [c["run"] for c in sorted(configs, key=key)]


def statistics(configs: Mapping[str, Mapping[str, Any]], comparer: Comparer,
               rungs: Mapping[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """summary.json's statistics: "configs" (in `configs` order, which maps each name to its
    plain RunConfig dict), "selection", "comparisons", "power" and "warnings". `rungs` maps a
    sweep's configurations to (rung reached, epochs trained)."""
    entries = [_entry(name, config, comparer) for name, config in configs.items()]
    for entry in entries:
        if rungs:
            entry["rung"], entry["epochs"] = rungs[entry["run"]]
    ranking = rank(entries)
    finite = [e for e in entries if math.isfinite(e[SELECTION]["mean"])]
    winner = ranking[0] if finite else None
    return {
        "configs": entries,
        "selection": _selection(ranking, winner, comparer.runs),
        "comparisons": _comparisons(ranking, winner, comparer),
        "power": _power(ranking, comparer),
        "warnings": _warnings(comparer.runs),
    }


def _entry(name: str, config: Mapping[str, Any], comparer: Comparer) -> dict[str, Any]:
    mine = [r for r in comparer.runs if r["run"] == name]
    entry: dict[str, Any] = {"run": name, "config": dict(config), "n": len(mine)}
    for key in SUMMARISED:
        entry[key] = describe((_value(r, key) for r in mine), bounded=key in BOUNDED)
    entry["test_accuracy"] = comparer.accuracy(name)
    entry["diverged"] = sum(r.get("diverged_at") is not None for r in mine)
    return entry


def _value(row: Mapping[str, Any], key: str) -> float:
    if key == "train_val_gap":
        return row["final_train_accuracy"] - row["final_val_accuracy"]
    return row[key]


def _selection(ranking: list[str], winner: str | None,
               runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The winner by validation, and the seed whose model is shown (its best validation)."""
    mine = [r for r in runs if r["run"] == winner and math.isfinite(r[SELECTION])]
    seed = max(mine, key=lambda r: r[SELECTION])["seed"] if mine else None
    return {"metric": SELECTION, "rule": "highest mean final validation accuracy over seeds; "
            "the test set is scored once per model and never chooses",
            "winner": winner, "seed": seed, "ranking": ranking}


def _comparisons(ranking: list[str], winner: str | None,
                 comparer: Comparer) -> dict[str, Any]:
    """Every pair (the winner against each other one beyond ALL_PAIRS_UP_TO), each as higher- vs
    lower-ranked by validation, Holm-corrected over the pairs."""
    if len(ranking) <= ALL_PAIRS_UP_TO:
        pairs = list(itertools.combinations(ranking, 2))
    else:
        pairs = [(winner, other) for other in ranking if other != winner] if winner else []
    results = [comparer.pair(a, b) for a, b in pairs]
    for pair, p_holm in zip(results, holm([p["p"] for p in results]), strict=True):
        pair["p_holm"] = p_holm
        pair["significant"] = bool(p_holm < ALPHA)
    return {"alpha": ALPHA, "method": BOOTSTRAP, "replicates": REPLICATES,
            "mcnemar": "exact (binomial) per seed pair on the images exactly one model gets right",
            "pairs": results}


def _power(ranking: list[str], comparer: Comparer) -> dict[str, Any] | None:
    """How many seeds would resolve the winner against the runner-up at the observed spread."""
    if len(ranking) < 2:
        return None
    a, b = ranking[:2]
    acc_a, acc_b = comparer.test_accuracies(a), comparer.test_accuracies(b)
    if min(len(acc_a), len(acc_b)) < 2:
        return {"a": a, "b": b, "seeds_needed": None, "note": NO_INTERVAL}
    diff = float(np.mean(acc_a) - np.mean(acc_b))
    sd_a, sd_b = float(np.std(acc_a, ddof=1)), float(np.std(acc_b, ddof=1))
    need = seeds_needed(diff, sd_a, sd_b)
    note = "" if need else "no difference or no spread to size a study on, or over 1000 seeds"
    return {"a": a, "b": b, "diff": diff, "sd_a": sd_a, "sd_b": sd_b, "alpha": ALPHA,
            "power": POWER, "seeds_needed": need, "note": note}


def _warnings(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    seeds = len({r["seed"] for r in runs})
    if seeds == 1:
        return ["1 seed: no interval or test is possible; run 3 or more seeds (5 for claims)"]
    if seeds == 2:
        return ["only 2 seeds: intervals are wide and tests weak; run 5 or more seeds before "
                "trusting a difference"]
    return []


def winner(summary: Mapping[str, Any]) -> str | None:
    """The configuration chosen on validation (summary.json's selection)."""
    return summary.get("selection", {}).get("winner")


def winner_seed(summary: Mapping[str, Any]) -> int | None:
    """The winner's seed whose model is shown: its best final validation accuracy."""
    return summary.get("selection", {}).get("seed")


def finished_seeds(summary: Mapping[str, Any], name: str | None) -> list[int]:
    """The seeds of configuration `name` whose models finished (did not diverge), in run
    order."""
    return [r["seed"] for r in summary["runs"]
            if r["run"] == name and r.get("diverged_at") is None]


def shown_seed(summary: Mapping[str, Any], name: str | None) -> int | None:
    """The seed whose model stands for configuration `name` where no seed is asked for (the
    report, `evaluate`, `predict`, `export`, `Results.checkpoint`): the winner's shown seed
    (winner_seed), else the configuration's first finished seed; None when every seed of it
    diverged. The one place this default is decided."""
    if name is not None and name == winner(summary) and winner_seed(summary) is not None:
        return winner_seed(summary)
    return next(iter(finished_seeds(summary, name)), None)


def seed_band(
    rows: Sequence[Mapping[str, Any]], run: str, split: str, metric: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) of `metric` over seeds at each recorded step of one configuration
    (`run`, its name) and split.

    NaN values (a diverged seed) are left out of the mean and band; a step where every seed is
    NaN stays NaN, which breaks a plotted line there instead of drawing a wrong value.
    """
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if r["run"] == run and r["split"] == split:
            by_step.setdefault(r["step"], []).append(r[metric])
    steps = np.array(sorted(by_step), dtype=np.int64)
    values = [np.asarray(by_step[s], dtype=np.float64) for s in steps]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN steps → NaN, as intended
        bands = [(np.nanmean(v), np.nanmin(v), np.nanmax(v)) for v in values]
    if not bands:
        return steps, np.empty(0), np.empty(0), np.empty(0)
    mean, low, high = (np.array(col) for col in zip(*bands, strict=True))
    return steps, mean, low, high


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
