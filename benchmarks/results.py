"""Every table of RESULTS.md, generated: run its command, keep its per-model figures, write it.

    python benchmarks/results.py run NAME [NAME ...]    # run the commands: results/NAME.json
    python benchmarks/results.py collect NAME RUN_DIR   # the same from a run dir of that command
    python benchmarks/results.py render                 # RESULTS.md's blocks from results/
    python benchmarks/results.py check NAME [NAME ...]  # run again: exit 1 unless identical

A table is one `mnistlab` command (TABLES). Its JSON (results/NAME.json) holds the command, the
data, the git revision and arithmetic it ran with (env.json), every model's figures in
summary.json's `runs` schema, and the statistics the tables show (computed by mnistlab.stats from
the run directory, so a re-run must reproduce them too). RESULTS.md's numbers sit only in blocks
between `<!-- generated: NAME KIND -->` and `<!-- end generated -->`, which `render` rewrites
from the JSON; the prose around them is written by hand and quotes no figure. `check` re-runs a
table on this checkout and compares every per-model figure and statistic bit for bit (training
times excepted); CI does so for the small `regeneration-check` table.

Bits depend on the CPU as well as on the code (MKL and PyTorch choose kernels by the CPU model,
split work by the thread count: environment.cpu_identity), so a table's JSON says which CPU made
it, and `run --other-cpu` keeps a further set of the same table made on another kind of CPU in
results/other-cpus/NAME/KEY.json. `check` compares with the set made on this kind of CPU, or,
where there is none, with results/NAME.json, and says so when the CPUs differ.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mnistlab import stats
from mnistlab.engine import Arithmetic
from mnistlab.evaluation import Predictions
from mnistlab.runs import RunDir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
RESULTS_MD = ROOT / "RESULTS.md"
OTHER_CPUS = RESULTS / "other-cpus"


@dataclass(frozen=True)
class Table:
    args: tuple[str, ...]  # mnistlab's arguments: the command is `mnistlab <args>`
    reference: str | None = None  # the configuration the `reference` block compares against
    target: float | None = None  # the reference's mean test accuracy a goal asks for


TABLES = {
    "seed-mnist": Table(("study", "--seeds", "5")),
    "seed-fashion": Table(("study", "--data", "fashion-mnist", "--seeds", "5")),
    "recipe-fashion": Table(("study", "--config", "studies/recipe.toml"), "tuned", 0.89),
    "recipe-mnist": Table(("study", "--config", "studies/recipe.toml", "--data", "mnist"),
                          "tuned"),
    "lenet5-mnist": Table(("study", "--config", "studies/lenet5-mnist.toml"), "lenet5", 0.99),
    "regeneration-check": Table(("study", "--config", "studies/regeneration-check.toml"),
                                "tuned"),
}
# Per-model fields kept (summary.json's `runs` schema less the training time, which no re-run
# reproduces).
MODEL_FIELDS = ("run", "seed", "test_accuracy", "test_loss", "final_val_accuracy",
                "final_val_loss", "best_val_accuracy", "best_val_step", "final_train_accuracy",
                "final_train_loss", "diverged_at", "stopped_at", "restored_from")
# what a faithful re-run may change; the CPU chooses which committed set a re-run is held to
UNCOMPARED = ("git_rev", "created", "seconds", "cpu")


# --- run and collect -------------------------------------------------------------------------


def command(name: str) -> str:
    return "mnistlab " + " ".join(TABLES[name].args)


def run(name: str, out: Path) -> Path:
    """Run table `name`'s command into a fresh folder under `out`; its run directory."""
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=out))
    argv = [sys.executable, "-m", "mnistlab.cli", *TABLES[name].args, "--out", str(target),
            "--quiet"]
    subprocess.run(argv, cwd=ROOT, check=True)
    (run_dir,) = [p for p in target.iterdir() if p.is_dir()]
    return run_dir


def collect(name: str, path: Path) -> dict[str, Any]:
    """Table `name`'s figures from the run directory its command made."""
    run_dir = RunDir.existing(path)
    summary, env = run_dir.read_summary(), run_dir.read_env()
    table = TABLES[name]
    runs = [{k: r.get(k) for k in MODEL_FIELDS} for r in summary["runs"]]
    configs = [_config(c, runs) for c in summary["configs"]]
    out = {
        "table": name,
        "command": command(name),
        "data": summary["data"],
        "sizes": summary["sizes"],
        "seeds": summary["seeds"],
        "git_rev": env.get("git_rev"),
        "arithmetic": env.get("arithmetic"),
        "cpu": env.get("cpu"),
        "created": env.get("created"),
        "seconds": summary["seconds"],
        "runs": runs,
        "configs": configs,
        "ranking": summary["selection"]["ranking"],
        "winner": summary["selection"]["winner"],
        "pairs": [_pair(p) for p in summary["comparisons"]["pairs"]],
        "power": summary["power"],
        "claims": summary["claims"],
    }
    if table.reference is not None:
        out["reference"] = _against(run_dir, summary, table.reference)
    return out


def _config(c: dict[str, Any], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """A configuration's intervals: test (two-level bootstrap), test over seeds alone (t),
    final validation (t), train − val gap (t)."""
    keep = ("mean", "ci_low", "ci_high", "n")
    seeds_only = stats.describe([r["test_accuracy"] for r in runs if r["run"] == c["run"]],
                                bounded=True)
    return {"run": c["run"], "n": c["n"], "diverged": c["diverged"],
            **{k: {f: c[k][f] for f in keep} for k in
               ("test_accuracy", "final_val_accuracy", "train_val_gap")},
            "test_accuracy_seeds": {f: seeds_only[f] for f in keep}}


def _pair(p: dict[str, Any]) -> dict[str, Any]:
    return {"a": p["a"], "b": p["b"], "diff": p["diff"], "ci_low": p["ci_low"],
            "ci_high": p["ci_high"], "p_holm": p.get("p_holm", math.nan),
            "significant": p.get("significant", False), "p_a_beats_b": p["p_a_beats_b"],
            "mcnemar_below_05": sum(m["p"] < 0.05 for m in p["mcnemar"]),
            "mcnemar_pairs": len(p["mcnemar"])}


def _against(run_dir: RunDir, summary: dict[str, Any], reference: str) -> list[dict[str, Any]]:
    """`reference` against every other configuration, paired on the same test images, Holm
    over these pairs (the study's own `comparisons` pair by validation rank instead)."""
    runs = summary["runs"]
    correct: dict[str, list[np.ndarray]] = {}
    for r in runs:
        if math.isfinite(r["test_accuracy"]):
            p = Predictions.load(run_dir.predictions_path(r["run"], r["seed"]))
            correct.setdefault(r["run"], []).append(p.predicted == p.labels)
    comparer = stats.Comparer(runs, {k: np.stack(v) for k, v in correct.items()})
    others = [c["run"] for c in summary["configs"] if c["run"] != reference]
    pairs = [comparer.pair(reference, other) for other in others]
    for pair, p_holm in zip(pairs, stats.holm([p["p"] for p in pairs]), strict=True):
        pair["p_holm"], pair["significant"] = p_holm, bool(p_holm < stats.ALPHA)
    return [_pair(p) for p in pairs]


def write(name: str, figures: dict[str, Any], other_cpu: bool = False) -> Path:
    """results/NAME.json, or with `other_cpu` the set this kind of CPU made beside it."""
    path = RESULTS / f"{name}.json"
    if other_cpu:
        if not figures.get("cpu"):
            raise SystemExit(f"{name}: the run directory records no CPU; run the table again")
        path = OTHER_CPUS / name / f"{figures['cpu']['key']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=1) + "\n", encoding="utf-8")
    return path


def read(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def committed(name: str, cpu: dict[str, Any] | None) -> tuple[dict[str, Any], Path]:
    """The committed figures a re-run on `cpu` must reproduce, and their file: the set made on
    this kind of CPU, else results/NAME.json."""
    primary = RESULTS / f"{name}.json"
    for path in [primary, *sorted((OTHER_CPUS / name).glob("*.json"))]:
        figures = json.loads(path.read_text(encoding="utf-8"))
        if cpu and (figures.get("cpu") or {}).get("key") == cpu["key"]:
            return figures, path
    return read(name), primary


def made_on(figures: dict[str, Any]) -> str:
    cpu = figures.get("cpu")
    return cpu["key"] if cpu else "a CPU it does not record"


def differences(committed: dict[str, Any], fresh: dict[str, Any]) -> list[str]:
    """Where a re-run's figures differ from the committed ones (training times aside)."""
    found = []
    for key in sorted(set(committed) | set(fresh)):
        if key in UNCOMPARED:
            continue
        a, b = committed.get(key), fresh.get(key)
        if json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            found.append(key)
    return found


# --- render ----------------------------------------------------------------------------------

BLOCK = re.compile(r"(<!-- generated: (\S+) (\S+) -->\n)(.*?)(<!-- end generated -->)", re.S)


def render(text: str, tables: dict[str, dict[str, Any]] | None = None) -> str:
    """`text` (RESULTS.md) with every generated block rewritten from results/*.json."""
    tables = tables if tables is not None else {}

    def block(match: re.Match) -> str:
        name, kind = match.group(2), match.group(3)
        if name not in tables:
            tables[name] = read(name)
        body = RENDERERS[kind](tables[name], TABLES[name])
        return f"{match.group(1)}{body.rstrip()}\n{match.group(5)}"

    return BLOCK.sub(block, text)


def pct(x: float) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.2f}"


def interval(d: dict[str, Any]) -> str:
    if not math.isfinite(d["ci_low"]):
        return pct(d["mean"])
    return f"{pct(d['mean'])} [{pct(d['ci_low'])}, {pct(d['ci_high'])}]"


def points(p: dict[str, Any]) -> str:
    sign = lambda x: f"{100 * x:+.2f}".replace("-", "−")  # noqa: E731
    if not math.isfinite(p["ci_low"]):
        return sign(p["diff"])
    low, high = (f"{100 * x:.2f}".replace("-", "−") for x in (p["ci_low"], p["ci_high"]))
    return f"{sign(p['diff'])} [{low}, {high}]"


def p_value(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return "< 0.0005" if p < 0.0005 else f"{p:.2g}"


def _source(t: dict[str, Any], table: Table) -> str:
    sizes = t["sizes"]
    arithmetic = Arithmetic.from_dict(t["arithmetic"], t["table"]).describe()
    models = len(t["runs"])
    return (f"    {t['command']}\n\n"
            f"Data `{t['data']}`: {sizes['train']:,} training, {sizes['val']:,} validation, "
            f"{sizes['test']:,} test images; {models} models ({len(t['configs'])} configurations "
            f"× seeds {', '.join(map(str, t['seeds']))}); arithmetic: {arithmetic}{_cpu(t)}; "
            f"git `{(t['git_rev'] or 'unknown')[:10]}`. Figures: `results/{t['table']}.json`.\n")


def _cpu(t: dict[str, Any]) -> str:
    cpu = t.get("cpu")
    return f" on {cpu['name'] or cpu['vendor']} ({cpu['isa']}, {cpu['threads']} threads)" if cpu \
        else ""


def _summary(t: dict[str, Any], table: Table) -> str:
    configs = {c["run"]: c for c in t["configs"]}
    lines = ["| rank | configuration | final val acc % [95%] | test acc % [95%, seeds × images] "
             "| test acc % ± 95% (seeds only) | train − val gap (pp) |",
             "|---:|---|---:|---:|---:|---:|"]
    for rank, name in enumerate(t["ranking"], 1):
        c = configs[name]
        seeds = c["test_accuracy_seeds"]
        half = (seeds["ci_high"] - seeds["ci_low"]) / 2
        spread = f"{pct(seeds['mean'])} ± {100 * half:.2f}" if math.isfinite(half) else "n/a"
        label = f"**`{name}`**" if name == t["winner"] else f"`{name}`"
        gap = f"{100 * c['train_val_gap']['mean']:.2f}".replace("-", "−")
        lines.append(f"| {rank} | {label} | {interval(c['final_val_accuracy'])} | "
                     f"{interval(c['test_accuracy'])} | {spread} | {gap} |")
    return "\n".join(lines) + "\n"


def _pairs_rows(pairs: list[dict[str, Any]], label: str) -> str:
    lines = [f"| {label} | test difference (pp) [95%] | p (Holm) | significant | P(a > b) | "
             "McNemar p < 0.05 |", "|---|---:|---:|:---:|---:|---:|"]
    for p in pairs:
        name = f"`{p['a']}` − `{p['b']}`" if label == "pair (a − b)" else f"`{p['b']}`"
        lines.append(f"| {name} | {points(p)} | {p_value(p['p_holm'])} | "
                     f"{'yes' if p['significant'] else 'no'} | {p['p_a_beats_b']:.2f} | "
                     f"{p['mcnemar_below_05']} of {p['mcnemar_pairs']} |")
    return "\n".join(lines) + "\n"


def _pairs(t: dict[str, Any], table: Table) -> str:
    return _pairs_rows(t["pairs"], "pair (a − b)")


def _reference(t: dict[str, Any], table: Table) -> str:
    return (f"`{table.reference}` against each other configuration (a = `{table.reference}`), "
            "paired on the same test images, Holm over these pairs:\n\n"
            + _pairs_rows(t["reference"], "b"))


def _power(t: dict[str, Any], table: Table) -> str:
    p = t["power"]
    if not p or p.get("seeds_needed") is None:
        return ("Power: the winner's lead over the runner-up gives no seed count to size a "
                "study on (no difference or no spread, or over 1,000 seeds).\n")
    diff = f"{100 * p['diff']:+.2f}".replace("-", "−")
    return (f"Power: the winner and the runner-up on validation differ by {diff} points on "
            f"test (`{p['a']}` − `{p['b']}`, seed spreads {100 * p['sd_a']:.2f} and "
            f"{100 * p['sd_b']:.2f} points); resolving that would need {p['seeds_needed']} seeds "
            "per configuration (t-test, α = 0.05, power 80 %).\n")


def _claims(t: dict[str, Any], table: Table) -> str:
    if not t["claims"]:
        return "The seed study's claims are judged only where its five configurations ran.\n"
    lines = ["| claim | verdict | evidence |", "|---|---|---|"]
    for c in t["claims"]:
        lines.append(f"| {c['claim']} | **{c['verdict']}** | {c['evidence']} |")
    return "\n".join(lines) + "\n"


def _target(t: dict[str, Any], table: Table) -> str:
    """The reference's mean test accuracy against the goal, in one sentence."""
    c = next(c for c in t["configs"] if c["run"] == table.reference)
    mean, seeds = c["test_accuracy"]["mean"], c["test_accuracy_seeds"]
    half = 100 * (seeds["ci_high"] - seeds["ci_low"]) / 2
    per_seed = " / ".join(pct(r["test_accuracy"]) for r in t["runs"]
                          if r["run"] == table.reference)
    rank = t["ranking"].index(table.reference) + 1
    verdict = ("**met**" if mean >= table.target else
               f"**not met**, short by {100 * (table.target - mean):.2f} points")
    return (f"`{table.reference}`: mean test accuracy **{pct(mean)} %** (± {half:.2f} over its "
            f"{seeds['n']} seeds; per seed {per_seed}), against the goal of "
            f"{100 * table.target:.1f} %: {verdict}. On validation it ranks {rank} of "
            f"{len(t['ranking'])}; the validation winner is `{t['winner']}`.\n")


RENDERERS = {"source": _source, "summary": _summary, "pairs": _pairs, "reference": _reference,
             "power": _power, "claims": _claims, "target": _target}


# --- the command line ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    other_cpu = "keep it as another CPU's set (results/other-cpus/NAME/KEY.json)"
    for what in ("run", "check"):
        p = sub.add_parser(what)
        p.add_argument("names", nargs="+", choices=sorted(TABLES))
        p.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()))
        if what == "run":
            p.add_argument("--other-cpu", action="store_true", help=other_cpu)
    p = sub.add_parser("collect")
    p.add_argument("name", choices=sorted(TABLES))
    p.add_argument("run_dir", type=Path)
    p.add_argument("--other-cpu", action="store_true", help=other_cpu)
    sub.add_parser("render")
    args = parser.parse_args(argv)
    if args.what == "collect":
        print(write(args.name, collect(args.name, args.run_dir), args.other_cpu))
    elif args.what == "run":
        for name in args.names:
            print(write(name, collect(name, run(name, args.out)), args.other_cpu))
    elif args.what == "check":
        return 1 if any([not _check(name, args.out) for name in args.names]) else 0
    else:
        RESULTS_MD.write_text(render(RESULTS_MD.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


def _check(name: str, out: Path) -> bool:
    """Re-run table `name` and say whether it gives the committed figures bit for bit."""
    fresh = collect(name, run(name, out))
    figures, path = committed(name, fresh["cpu"])
    changed = differences(figures, fresh)
    where = path.relative_to(ROOT)
    if not changed:
        print(f"{name}: identical to {where}")
    else:
        print(f"{name}: DIFFERS from {where} in {', '.join(changed)}")
        if made_on(figures) != fresh["cpu"]["key"]:
            print(f"  {where} was made on {made_on(figures)}, this is {fresh['cpu']['key']}: "
                  "other CPUs give other bits; `python benchmarks/results.py run --other-cpu "
                  f"{name}` keeps this CPU's set beside it")
    return not changed


if __name__ == "__main__":
    sys.exit(main())
