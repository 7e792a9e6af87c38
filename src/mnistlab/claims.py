"""The seed study's four claims, each checked against a run's numbers with a verdict.

The student study this project reproduces concluded: (1) the baseline reaches about 90 %
validation accuracy; (2) LayerNorm + dropout beats the baseline; (3) lr 0.001 / p 0.2 is the best
of the three tuned settings; (4) lr 0.0001 / p 0.6 learns slowest but gets there. A verdict is
"supported", "contradicted" or "inconclusive" (at this number of seeds), always with its
evidence. They apply when the five presets are in the run; other runs get the general Reading.

Claims about which configuration is better use the paired bootstrap interval of the test-accuracy
difference (the test set reports; nothing here chooses a model): above zero supports, below zero
contradicts, straddling zero is inconclusive.

The seed made its claims on MNIST, so every verdict says which data judged it. On MNIST they
check the seed's findings. On other data (Fashion-MNIST, EMNIST, a folder of anything) the three
comparisons ask whether those findings carry over, and "about 90 %", a figure about MNIST, is
"not applicable": the baseline's accuracy is reported but not held against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mnistlab.config import PRESETS, SEED_STUDY, to_dict

ABOUT = (0.88, 0.92)  # "about 90 %": within two points
GETS_THERE = 0.01  # "gets there": final test accuracy within one point of the best tuned setting
TUNED = ("lr1e-3-p0.2", "lr5e-4-p0.4", "lr1e-4-p0.6")
SEED_DATA = "mnist"  # the registered data set the seed study made its claims on
NOT_APPLICABLE = "not applicable"

Pair = Callable[[str, str], Mapping[str, Any]]  # (a, b) → stats.Comparer.pair's result


def applies(configs: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether the five presets are in the run, unchanged."""
    return all(configs.get(name) == to_dict(PRESETS[name]) for name in SEED_STUDY)


def check(entries: Sequence[Mapping[str, Any]], pair: Pair,
          convergence: Mapping[str, int | None], data: str = SEED_DATA,
          on_seed_data: bool = True) -> list[dict[str, Any]]:
    """The four claims with verdicts. `entries` are summary.json's per-configuration statistics,
    `convergence` each configuration's convergence iteration (stats.convergence_step); `data`
    what judged them (the study's data name or path) and `on_seed_data` whether that is MNIST,
    the data the seed made them on. Each claim carries both."""
    by_name = {e["run"]: e for e in entries}
    baseline = by_name["baseline"]
    verdicts = [_about_90(baseline) if on_seed_data else _not_about_mnist(baseline, data),
                _beats(pair), _best_tuned(pair), _slowest(pair, convergence)]
    return [c | {"data": data, "on_seed_data": on_seed_data} for c in verdicts]


def _claim(text: str, verdict: str, evidence: str) -> dict[str, str]:
    return {"claim": text, "verdict": verdict, "evidence": evidence}


ABOUT_90 = "The baseline reaches about 90 % validation accuracy."


def _pct(value: float) -> str:
    return f"{100 * value:.2f} %" if math.isfinite(value) else "n/a"


def _interval(low: float, high: float) -> str:
    return f"[{100 * low:.2f}, {100 * high:.2f}]" if math.isfinite(low) else "(no interval)"


def _about_90(baseline: Mapping[str, Any]) -> dict[str, str]:
    d = baseline["final_val_accuracy"]
    low, high = d["ci_low"], d["ci_high"]
    if not math.isfinite(low):
        verdict = "inconclusive"
    elif ABOUT[0] <= low and high <= ABOUT[1]:
        verdict = "supported"
    elif high < ABOUT[0] or low > ABOUT[1]:
        verdict = "contradicted"
    else:
        verdict = "inconclusive"
    evidence = (f"{_baseline_accuracy(d)}; 'about 90 %' read as "
                f"{100 * ABOUT[0]:.0f}–{100 * ABOUT[1]:.0f} %")
    return _claim(ABOUT_90, verdict, evidence)


def _not_about_mnist(baseline: Mapping[str, Any], data: str) -> dict[str, str]:
    """'About 90 %' was measured on MNIST: on other data the number is shown, never judged."""
    evidence = (f"the seed's 90 % is a figure about MNIST, not about {data}; here the "
                f"{_baseline_accuracy(baseline['final_val_accuracy'])}")
    return _claim(ABOUT_90, NOT_APPLICABLE, evidence)


def _baseline_accuracy(d: Mapping[str, Any]) -> str:
    return (f"baseline's final validation accuracy: mean {_pct(d['mean'])} "
            f"{_interval(d['ci_low'], d['ci_high'])} over {d['n']} seed(s)")


def _sign(p: Mapping[str, Any]) -> str:
    """supported / contradicted / inconclusive from a difference's interval (a − b)."""
    if not math.isfinite(p["ci_low"]):
        return "inconclusive"
    if p["ci_low"] > 0:
        return "supported"
    return "contradicted" if p["ci_high"] < 0 else "inconclusive"


def _difference(p: Mapping[str, Any]) -> str:
    return (f"{p['a']} − {p['b']}: {100 * p['diff']:+.2f} points, 95 % interval "
            f"{_interval(p['ci_low'], p['ci_high'])}")


def _beats(pair: Pair) -> dict[str, str]:
    p = pair("layernorm-dropout", "baseline")
    return _claim("LayerNorm + dropout (p 0.5) beats the baseline (both lr 0.01).", _sign(p),
                  f"test accuracy {_difference(p)}")


def _best_tuned(pair: Pair) -> dict[str, str]:
    against = [pair(TUNED[0], other) for other in TUNED[1:]]
    signs = [_sign(p) for p in against]
    if "contradicted" in signs:
        verdict = "contradicted"
    else:
        verdict = "supported" if set(signs) == {"supported"} else "inconclusive"
    return _claim("lr 0.001 / p 0.2 is the best of the three tuned settings.", verdict,
                  "test accuracy " + "; ".join(_difference(p) for p in against))


def _slowest(pair: Pair, convergence: Mapping[str, int | None]) -> dict[str, str]:
    """Slowest: the latest iteration at which mean validation accuracy first reaches 95 % of its
    final value. Gets there: the test-accuracy gap to the best tuned setting is under a point."""
    slow, others = TUNED[2], TUNED[:2]
    steps = {name: convergence.get(name) for name in TUNED}
    best = max(others, key=lambda name: pair(name, slow)["diff"])
    gap = pair(best, slow)
    slowest, there = _is_latest(steps, slow), _under(gap, GETS_THERE)
    if slowest is False or there is False:
        verdict = "contradicted"
    else:
        verdict = "supported" if slowest and there else "inconclusive"
    reached = ", ".join(f"{name} at iteration {s}" for name, s in steps.items())
    evidence = (f"95 % of final validation accuracy first reached: {reached}; "
                f"{_difference(gap)} (gets there: under {100 * GETS_THERE:.0f} point)")
    return _claim("lr 0.0001 / p 0.6 learns slowest but gets there.", verdict, evidence)


def _is_latest(steps: Mapping[str, int | None], name: str) -> bool | None:
    """Whether `name` converges last; None for a tie or a curve that never converged."""
    if None in steps.values():
        return None
    others = max(s for n, s in steps.items() if n != name)
    return None if steps[name] == others else steps[name] > others


def _under(p: Mapping[str, Any], bound: float) -> bool | None:
    """Whether a difference is below `bound`: its whole interval (True), none of it (False)."""
    if not math.isfinite(p["ci_high"]):
        return None
    if p["ci_high"] < bound:
        return True
    return False if p["ci_low"] > bound else None
