"""Statistics: selection on validation, the two-level bootstrap, McNemar, P(A > B), power, the
seed's claims — each against a reference computation (scipy, closed forms, hand counts)."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from mnistlab import claims
from mnistlab.config import PRESETS, SEED_STUDY, to_dict
from mnistlab.stats import (
    BOOTSTRAP,
    NO_INTERVAL,
    Comparer,
    bootstrap,
    convergence_step,
    describe,
    holm,
    mcnemar,
    probability_of_improvement,
    seeds_needed,
    shown_seed,
    statistics,
)

A = [0.9812, 0.9790, 0.9825, 0.9801, 0.9808]
T = 4000  # test images in the synthetic cases


def answers(accuracy: float, seeds: int, rng: np.random.Generator) -> np.ndarray:
    """(seeds, T) correctness with about `accuracy` right, each seed its own errors."""
    return rng.random((seeds, T)) < accuracy


def row(run: str, seed: int, val: float, test: float, diverged: int | None = None) -> dict:
    return {"run": run, "seed": seed, "final_val_accuracy": val, "final_val_loss": 0.3,
            "best_val_accuracy": val, "best_val_step": 300, "final_train_accuracy": val + 0.01,
            "final_train_loss": 0.2, "test_accuracy": test, "test_loss": 0.3,
            "diverged_at": diverged, "seconds": 1.0}


def study(correct: dict[str, np.ndarray], val: dict[str, list[float]]) -> tuple[list, Comparer]:
    """Per-seed rows whose test accuracy is the correctness matrices' own."""
    runs = [row(name, s, val[name][s], float(c[s].mean())) for name, c in correct.items()
            for s in range(len(c))]
    return runs, Comparer(runs, correct)


def test_describe_matches_scipy_t_interval_and_clips_accuracies():
    d = describe(A)
    low, high = sps.t.interval(0.95, df=len(A) - 1, loc=np.mean(A), scale=sps.sem(A))
    assert (d["n"], d["interval"]) == (5, "t over seeds")
    assert d["std"] == pytest.approx(np.std(A, ddof=1), rel=1e-12)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((low, high), rel=1e-12)
    near_one = describe([0.999, 1.0, 0.95], bounded=True)
    assert near_one["ci_high"] == 1.0 and "clipped" in near_one["interval"]
    one = describe([0.5])
    assert one["interval"] == NO_INTERVAL and math.isnan(one["ci_low"]) and one["mean"] == 0.5
    assert describe([0.9, float("nan"), 0.8, None]) == describe([0.9, 0.8])


@pytest.mark.parametrize("seeds", [1, 2, 3, 10])
@pytest.mark.parametrize("accuracy", [0.0, 1.0, 0.999, 0.5])
def test_test_accuracy_intervals_never_leave_0_1(seeds, accuracy):
    rng = np.random.default_rng(seeds)
    correct = {"x": answers(accuracy, seeds, rng)}
    _, comparer = study(correct, {"x": [0.9] * seeds})
    d = comparer.accuracy("x")
    if seeds == 1:
        assert d["interval"] == NO_INTERVAL and math.isnan(d["ci_low"])
        return
    assert d["interval"] == BOOTSTRAP
    assert 0.0 <= d["ci_low"] <= d["mean"] <= d["ci_high"] <= 1.0
    if accuracy in (0.0, 1.0):  # every model got every image right (wrong): no doubt at all
        assert d["ci_low"] == d["ci_high"] == accuracy


def test_identical_seeds_give_an_interval_from_the_test_images_alone():
    """All seeds the same model: the spread is the test set's, a binomial standard error."""
    one = answers(0.88, 1, np.random.default_rng(0))
    replicates = bootstrap({"x": np.repeat(one, 4, axis=0)}, replicates=4000)["x"]
    p = one.mean()
    assert replicates.std() == pytest.approx(math.sqrt(p * (1 - p) / T), rel=0.08)


def test_the_paired_difference_has_mcnemars_standard_error():
    """Two single models on the same images: the bootstrap's spread of the difference is the
    closed form for paired proportions, sqrt(b + c − (b − c)²/n) / n; far below the unpaired
    one, which the pairing is for."""
    rng = np.random.default_rng(1)
    a = rng.random(T) < 0.9
    b = np.where(rng.random(T) < 0.03, ~a, a)  # disagrees with a on 3 % of the images
    reps = bootstrap({"a": a[None], "b": b[None]}, replicates=4000)
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    paired = math.sqrt(only_a + only_b - (only_a - only_b) ** 2 / T) / T
    assert (reps["a"] - reps["b"]).std() == pytest.approx(paired, rel=0.08)
    unpaired = math.sqrt(a.mean() * (1 - a.mean()) / T + b.mean() * (1 - b.mean()) / T)
    assert paired < unpaired / 2


def test_bootstrap_is_reproducible_and_resamples_seeds():
    rng = np.random.default_rng(2)
    correct = {"x": answers(0.8, 3, rng), "y": answers(0.7, 5, rng)}
    first, again = bootstrap(correct), bootstrap(correct)
    assert all(np.array_equal(first[k], again[k]) for k in correct)
    # With the images fixed (one image drawn back each time), only the seeds vary: every
    # replicate is a mean of resampled per-seed accuracies, within their range.
    per_seed = correct["x"].mean(1)
    assert per_seed.min() - 0.05 < first["x"].min() and first["x"].max() < per_seed.max() + 0.05


def test_mcnemar_matches_the_exact_binomial_reference():
    a = np.array([True] * 10 + [False] * 2 + [True] * 50 + [False] * 30)
    b = np.array([False] * 10 + [True] * 2 + [True] * 50 + [False] * 30)
    result = mcnemar(a, b)
    assert (result["a_only"], result["b_only"]) == (10, 2)
    # statsmodels' mcnemar(exact=True): two-sided binomial on the discordant pairs.
    assert result["p"] == pytest.approx(min(1.0, 2 * sps.binom.cdf(2, 12, 0.5)))
    assert result["p"] == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar(a, a)["p"] == 1.0


def test_probability_of_improvement_counts_seed_pairs():
    # (0.9 > 0.85) + (0.9 > 0.8) + (0.8 < 0.85) + (0.8 = 0.8, half) over four pairs
    assert probability_of_improvement([0.9, 0.8], [0.85, 0.8]) == pytest.approx(2.5 / 4)
    assert probability_of_improvement(A, [0.5] * 3) == 1.0


def test_probability_of_improvement_is_scipy_s_mann_whitney_u_over_the_pairs():
    rng = np.random.default_rng(0)
    for n_a, n_b in ((1, 1), (2, 7), (5, 5), (10, 3)):
        a, b = rng.integers(0, 4, n_a) / 4, rng.integers(0, 4, n_b) / 4  # ties on purpose
        u = sps.mannwhitneyu(a, b, alternative="two-sided").statistic
        assert probability_of_improvement(a, b) == u / (n_a * n_b)
    assert math.isnan(probability_of_improvement([0.9, math.nan], [0.8]))
    assert math.isnan(probability_of_improvement([], [0.8]))


def test_seeds_needed_matches_the_textbook_power_calculation():
    """d = 1 at α = 0.05 two-sided and 80 % power needs 17 per group (Cohen's tables)."""
    assert seeds_needed(diff=0.01, sd_a=0.01, sd_b=0.01) == 17
    assert seeds_needed(diff=0.02, sd_a=0.01, sd_b=0.01) < 17
    assert seeds_needed(diff=0.0, sd_a=0.01, sd_b=0.01) is None
    assert seeds_needed(diff=0.01, sd_a=0.0, sd_b=0.0) is None


def test_holm_adjustment():
    # Hand-computed: sorted p 0.01, 0.02, 0.04 → 0.03, 0.04, max(0.04, 0.04) = 0.04; order kept.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # Step-down monotonicity and the cap at 1; NaN is not a test and does not count in m.
    assert holm([0.5, 0.3, float("nan")]) == pytest.approx([0.6, 0.6, float("nan")], nan_ok=True)
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_the_winner_is_chosen_on_validation_even_where_the_test_set_disagrees():
    rng = np.random.default_rng(3)
    correct = {"test-better": answers(0.93, 3, rng), "val-better": answers(0.90, 3, rng)}
    val = {"test-better": [0.91, 0.92, 0.91], "val-better": [0.95, 0.95, 0.96]}
    _, comparer = study(correct, val)
    result = statistics({name: {} for name in correct}, comparer)
    selection = result["selection"]
    assert selection["winner"] == "val-better"
    assert selection["ranking"] == ["val-better", "test-better"]
    assert selection["seed"] == 2  # the winner's seed with the best validation accuracy
    (pair,) = result["comparisons"]["pairs"]
    assert (pair["a"], pair["b"]) == ("val-better", "test-better")
    assert pair["diff"] < 0 and pair["ci_high"] < 0  # the test set says otherwise, and says so
    assert len(pair["mcnemar"]) == 3 and pair["p_a_beats_b"] == 0.0
    assert result["power"]["a"] == "val-better" and result["warnings"] == []


def test_few_seeds_are_said_and_diverged_seeds_left_out():
    rng = np.random.default_rng(4)
    correct = {"a": answers(0.9, 2, rng), "b": answers(0.8, 2, rng)}
    runs, comparer = study(correct, {"a": [0.9, 0.9], "b": [0.8, 0.8]})
    assert "only 2 seeds" in statistics({"a": {}, "b": {}}, comparer)["warnings"][0]
    single = {"a": correct["a"][:1], "b": correct["b"][:1]}
    runs, comparer = study(single, {"a": [0.9], "b": [0.8]})
    result = statistics({"a": {}, "b": {}}, comparer)
    (pair,) = result["comparisons"]["pairs"]
    assert pair["note"] == NO_INTERVAL and math.isnan(pair["p"]) and not pair["significant"]
    assert result["configs"][0]["test_accuracy"]["interval"] == NO_INTERVAL
    assert "1 seed" in result["warnings"][0]
    runs = [row("a", 0, 0.9, 0.9), row("a", 1, math.nan, math.nan, diverged=40)]
    comparer = Comparer(runs, {"a": correct["a"][:1]})
    entry = statistics({"a": {}}, comparer)["configs"][0]
    assert entry["n"] == 2 and entry["diverged"] == 1 and entry["test_accuracy"]["n"] == 1
    assert entry["train_val_gap"]["mean"] == pytest.approx(0.01)  # train − val, finite seed
    assert "seconds" not in entry  # wall-clock time would make reruns differ


def test_pairs_are_holm_corrected_over_all_pairs():
    rng = np.random.default_rng(5)
    correct = {n: answers(acc, 3, rng) for n, acc in (("a", 0.9), ("b", 0.85), ("c", 0.84))}
    _, comparer = study(correct, {"a": [0.9] * 3, "b": [0.85] * 3, "c": [0.84] * 3})
    pairs = statistics({n: {} for n in correct}, comparer)["comparisons"]["pairs"]
    assert [(p["a"], p["b"]) for p in pairs] == [("a", "b"), ("a", "c"), ("b", "c")]
    assert [p["p_holm"] for p in pairs] == pytest.approx(holm([p["p"] for p in pairs]))
    assert pairs[0]["significant"] and pairs[1]["significant"]


def test_convergence_step():
    steps = [75, 150, 225, 300]
    assert convergence_step(steps, [0.5, 0.94, 0.97, 0.98]) == 150  # 0.95 * 0.98 = 0.931
    assert convergence_step(steps, [0.5, 0.9, 0.92, 0.98]) == 300
    assert convergence_step(steps, [0.5, 0.9, 0.92, float("nan")]) is None
    assert convergence_step([], []) is None


# --- the seed's claims -----------------------------------------------------------------------


def _pair(table: dict[tuple[str, str], tuple[float, float, float]]):
    def pair(a: str, b: str) -> dict:
        diff, low, high = table[a, b]
        return {"a": a, "b": b, "diff": diff, "ci_low": low, "ci_high": high}
    return pair


def test_claims_apply_only_to_the_five_presets():
    presets = {name: to_dict(PRESETS[name]) for name in SEED_STUDY}
    assert claims.applies(presets)
    assert claims.applies({**presets, "tuned": to_dict(PRESETS["tuned"])})  # others may join
    assert not claims.applies({**presets, "baseline": {**presets["baseline"], "lr": 0.02}})
    assert not claims.applies({k: v for k, v in presets.items() if k != "lr1e-4-p0.6"})


def test_claim_verdicts_follow_the_intervals():
    baseline = {"run": "baseline",
                "final_val_accuracy": {"mean": 0.897, "ci_low": 0.89, "ci_high": 0.905, "n": 5}}
    table = {
        ("layernorm-dropout", "baseline"): (0.004, -0.001, 0.009),  # straddles zero
        ("lr1e-3-p0.2", "lr5e-4-p0.4"): (0.01, 0.004, 0.016),
        ("lr1e-3-p0.2", "lr1e-4-p0.6"): (0.03, 0.02, 0.04),
        ("lr5e-4-p0.4", "lr1e-4-p0.6"): (0.02, 0.01, 0.03),
    }
    steps = {"lr1e-3-p0.2": 150, "lr5e-4-p0.4": 225, "lr1e-4-p0.6": 600}
    verdicts = [c["verdict"] for c in claims.check([baseline], _pair(table), steps)]
    # about 90 %: yes; beats baseline: not shown; best tuned: yes; slowest but gets there:
    # slowest yes, but 2–4 points behind, so it does not get there
    assert verdicts == ["supported", "inconclusive", "supported", "contradicted"]
    table["lr1e-3-p0.2", "lr1e-4-p0.6"] = (0.002, -0.003, 0.008)
    table["lr1e-3-p0.2", "lr5e-4-p0.4"] = (-0.01, -0.016, -0.004)
    table["lr5e-4-p0.4", "lr1e-4-p0.6"] = (0.001, -0.004, 0.006)
    baseline["final_val_accuracy"] |= {"ci_low": 0.95, "ci_high": 0.97}
    evidence = claims.check([baseline], _pair(table), steps)
    assert [c["verdict"] for c in evidence] == ["contradicted", "inconclusive", "contradicted",
                                                 "supported"]
    assert "lr1e-4-p0.6 at iteration 600" in evidence[3]["evidence"]


def test_the_shown_seed_is_the_winner_s_best_else_the_first_finished():
    """One rule for the model that stands for a configuration when no seed is asked for."""
    runs = [{"run": "a", "seed": s, "diverged_at": None} for s in (0, 1, 2)]
    runs += [{"run": "b", "seed": 0, "diverged_at": 40}, {"run": "b", "seed": 1,
             "diverged_at": None}, {"run": "c", "seed": 0, "diverged_at": 5}]
    summary = {"selection": {"winner": "a", "seed": 2}, "runs": runs}
    assert [shown_seed(summary, n) for n in ("a", "b", "c", None)] == [2, 1, None, None]
