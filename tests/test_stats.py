"""Statistics over seeds, checked against scipy.stats on known inputs."""

import math

import numpy as np
import pytest
from scipy import stats as sps

from mnistlab.stats import compare, convergence_step, describe, holm, summarize, welch

A = [0.9812, 0.9790, 0.9825, 0.9801, 0.9808]
B = [0.9755, 0.9781, 0.9749, 0.9770]


def test_describe_matches_scipy_t_interval():
    d = describe(A)
    low, high = sps.t.interval(0.95, df=len(A) - 1, loc=np.mean(A), scale=sps.sem(A))
    assert d["n"] == 5
    assert d["mean"] == pytest.approx(np.mean(A), abs=1e-15)
    assert d["std"] == pytest.approx(np.std(A, ddof=1), rel=1e-12)
    assert (d["ci_low"], d["ci_high"]) == pytest.approx((low, high), rel=1e-12)


def test_describe_small_and_degenerate_inputs():
    assert describe([0.5]) == {"mean": 0.5, "std": 0.0, "ci_low": 0.5, "ci_high": 0.5, "n": 1}
    empty = describe([])
    assert empty["n"] == 0 and math.isnan(empty["mean"]) and math.isnan(empty["ci_high"])
    # A diverged seed's NaN is left out rather than poisoning the mean.
    assert describe([0.9, float("nan"), 0.8, None]) == describe([0.9, 0.8])


def test_welch_matches_scipy():
    t, p, note = welch(A, B)
    expected = sps.ttest_ind(A, B, equal_var=False)
    assert (t, p) == pytest.approx((expected.statistic, expected.pvalue), rel=1e-10)
    assert note == ""


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")  # scipy, on constant data
def test_welch_with_one_constant_group_matches_scipy():
    constant = [0.9375] * 3  # exact in binary: variance exactly 0
    t, p, _ = welch(A, constant)
    expected = sps.ttest_ind(A, constant, equal_var=False)
    assert (t, p) == pytest.approx((expected.statistic, expected.pvalue), rel=1e-10)


@pytest.mark.parametrize(
    ("a", "b", "why"),
    [([0.9], [0.8, 0.85], "fewer than 2"), ([0.9, 0.9], [0.8, 0.8], "same value")],
)
def test_welch_undefined_cases_are_nan_with_a_reason(a, b, why):
    t, p, note = welch(a, b)
    assert math.isnan(t) and math.isnan(p)
    assert why in note


def test_holm_adjustment():
    # Hand-computed: sorted p 0.01, 0.02, 0.04 → 0.03, 0.04, max(0.04, 0.04) = 0.04; order kept.
    assert holm([0.04, 0.01, 0.02]) == pytest.approx([0.04, 0.03, 0.04])
    # Step-down monotonicity and the cap at 1; NaN is not a test and does not count in m.
    assert holm([0.5, 0.3, float("nan")]) == pytest.approx([0.6, 0.6, float("nan")], nan_ok=True)
    assert holm([0.9, 0.8]) == [1.0, 1.0]


def test_compare_best_against_the_rest():
    groups = {"b": B, "a": A, "c": [0.90, 0.91, 0.92], "flat": [0.97]}
    result = compare(groups, alpha=0.05)
    assert result["best"] == "a"
    assert "Welch" in result["test"] and result["alpha"] == 0.05
    pairs = {p["b"]: p for p in result["pairs"]}
    assert set(pairs) == {"b", "c", "flat"} and all(p["a"] == "a" for p in pairs.values())
    p_b = sps.ttest_ind(A, B, equal_var=False).pvalue
    p_c = sps.ttest_ind(A, groups["c"], equal_var=False).pvalue
    assert pairs["b"]["p"] == pytest.approx(p_b)
    assert pairs["b"]["diff"] == pytest.approx(np.mean(A) - np.mean(B))
    # Two valid tests: the smaller p is doubled, the larger kept (if still larger).
    small, large = sorted([p_b, p_c])
    assert sorted([pairs["b"]["p_holm"], pairs["c"]["p_holm"]]) == pytest.approx(
        [2 * small, max(2 * small, large)]
    )
    assert pairs["c"]["significant"] is True
    assert math.isnan(pairs["flat"]["p"]) and pairs["flat"]["significant"] is False
    assert "fewer than 2" in pairs["flat"]["note"]


def test_compare_degenerate_groups():
    assert compare({"only": [0.9, 0.91]})["pairs"] == []
    nothing = compare({"x": [float("nan")], "y": []})
    assert nothing["best"] is None and nothing["pairs"] == []
    dead = compare({"ok": [0.9, 0.91], "dead": [float("nan")] * 2})
    assert dead["pairs"][0]["significant"] is False and "diverged" in dead["pairs"][0]["note"]


def test_summarize_builds_configs_and_comparisons():
    def row(run, seed, test, train=0.99, val=0.97, diverged=None):
        return {"run": run, "seed": seed, "final_val_accuracy": val, "final_val_loss": 0.1,
                "best_val_accuracy": val + 0.002, "best_val_step": 300,
                "final_train_accuracy": train, "final_train_loss": 0.03, "test_accuracy": test,
                "test_loss": 0.1, "diverged_at": diverged, "seconds": 10.0 + seed}

    rows = [row("base", s, t, train=0.995) for s, t in enumerate(B[:3])]
    rows += [row("reg", s, t, train=0.975) for s, t in enumerate(A[:3])]
    rows += [row("reg", 3, float("nan"), diverged=150)]
    configs, comparisons = summarize(rows, {"base": {"lr": 0.01}, "reg": {"lr": 0.001}})
    assert [c["run"] for c in configs] == ["base", "reg"]
    base, reg = configs
    assert base["config"] == {"lr": 0.01} and base["n"] == 3 and base["diverged"] == 0
    assert base["test_accuracy"] == describe(B[:3])
    assert base["train_val_gap"]["mean"] == pytest.approx(0.995 - 0.97)
    assert "seconds" not in base  # wall-clock time would make reruns differ
    assert reg["n"] == 4 and reg["diverged"] == 1 and reg["test_accuracy"]["n"] == 3
    assert comparisons["best"] == "reg"
    assert comparisons["pairs"][0]["p"] == pytest.approx(
        sps.ttest_ind(A[:3], B[:3], equal_var=False).pvalue
    )


def test_convergence_step():
    steps = [75, 150, 225, 300]
    assert convergence_step(steps, [0.5, 0.94, 0.97, 0.98]) == 150  # 0.95 * 0.98 = 0.931
    assert convergence_step(steps, [0.5, 0.9, 0.92, 0.98]) == 300
    assert convergence_step(steps, [0.5, 0.9, 0.92, float("nan")]) is None
    assert convergence_step([], []) is None
