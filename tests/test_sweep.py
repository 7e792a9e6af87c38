"""Sweeps: the sweep file, configuration names, stacking, successive halving, and real runs."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import re
import shutil
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import mnistlab as ml
from mnistlab.cli import app
from mnistlab.config import RunConfig, Schedule
from mnistlab.data.npz import write_npz
from mnistlab.engine import member_bytes
from mnistlab.errors import ConfigError
from mnistlab.experiment.halving import rung_count, rung_schedule
from mnistlab.experiment.plan import auto_stack_size, plan
from mnistlab.experiment.sweep import (
    SweepSpec,
    expand,
    load_sweep,
    sweep_from_dict,
    sweep_to_toml,
)
from mnistlab.experiment.trials import Trial, from_sweep
from mnistlab.progress import Progress
from mnistlab.report.sweep import HEATMAP, top_html, top_text

GRID = """
name = "grid"
seeds = 2
[base]
layernorm = true
[schedule]
epochs = 3
record_every = 5
[grid]
lr = [1e-2, 3e-3, 1e-3, 3e-4]
dropout = [0.0, 0.3]
"""


def named(spec: SweepSpec) -> list[tuple[RunConfig, Schedule]]:
    """Each configuration of the sweep with the schedule it trains with."""
    configs, schedules = expand(spec)
    return [(c, schedules[c.name]) for c in configs]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.toml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("colour = 3", "unknown field(s) colour; known: name"),
        ("[grid]\nlr = 0.001", "grid.lr must be a non-empty list of values, got 0.001"),
        ("[grid]\nlearning_rate = [0.1]", "grid: unknown field(s) learning_rate; known: lr"),
        ("[grid]\nlr = ['fast']", "grid.lr[0] must be > 0 and finite, got 'fast'"),
        ("[grid]\nhidden = [150]", "grid.hidden[0] sizes must be a list of one or more positive "
                                  "integers, got 150"),
        ("[grid]\ndropout = [0.1, 1.0]", "grid.dropout[1] must be in [0, 1), got 1.0"),
        ("[random]\nlr = {log_uniform = [0, 1e-2]}",
         "random.lr.log_uniform must be [lo, hi] with 0 < lo < hi, got 0"),
        ("[random]\nlr = {normal = [0, 1]}", "random.lr: unknown field(s) normal; known: choice, "
                                         "uniform, log_uniform"),
        ("[random]\nhidden = {uniform = [1, 9]}", "random.hidden: unknown field(s) uniform; known: "
                                              "choice"),
        ("[random]\nlr = {choice = []}", "random.lr.choice must be a non-empty list of values, "
                                     "got []"),
        ("[grid]\nlr = [0.1]\n[random]\nlr = {uniform = [0.1, 0.2]}", "lr in both [grid] and"),
        ("[random]\nlr = {uniform = [0.1, 0.2]}", "[random] ranges need --random N"),
        ("[schedule]\nepochs = 0", "schedule.epochs must be an integer >= 1, got 0"),
        ("[base]\nname = 'x'", "base: name is not set here"),
        ("seeds = [1, 1]", "seeds must be a count or a list of distinct integers"),
        ("base = 'best'", "base: unknown preset 'best'; known: baseline"),
        ("[grid\nlr = [1]", "not valid TOML"),
    ],
)
def test_sweep_file_mistakes_are_one_line_naming_file_and_key(tmp_path, text, expected):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_sweep(path)
    message = str(info.value)
    assert message.startswith(str(path)), message
    assert expected in message
    assert "\n" not in message


def test_grid_is_the_full_product_with_readable_unique_names(tmp_path):
    text = GRID + "hidden = [[150, 150], [300, 300]]\nlayernorm = [true, false]\n"
    configs, _ = expand(load_sweep(write(tmp_path, text)))
    assert len(configs) == 4 * 2 * 2 * 2
    names = [c.name for c in configs]
    assert len(set(names)) == len(names)
    assert names[0] == "lr1e-2_p0_h150x150_ln"
    assert "lr3e-4_p0.3_h300x300_noln" in names
    by_name = {c.name: c for c in configs}
    assert by_name["lr3e-4_p0.3_h300x300_noln"] == RunConfig(
        name="lr3e-4_p0.3_h300x300_noln", lr=3e-4, dropout=0.3, hidden=(300, 300), layernorm=False
    )


def test_schedule_fields_vary_per_configuration(tmp_path):
    pairs = named(load_sweep(write(tmp_path, GRID + "batch_size = [64, 128]\n")))
    assert {s.batch_size for _, s in pairs} == {64, 128}
    assert all(s.epochs == 3 and s.record_every == 5 for _, s in pairs)
    assert all(c.name.endswith("_bs64") == (s.batch_size == 64) for c, s in pairs)


def test_random_samples_are_seeded_in_range_and_named_by_their_values(tmp_path):
    ranges = """
[random]
lr = {log_uniform = [1e-4, 1e-2]}
weight_decay = {uniform = [0.0, 0.001]}
activation = {choice = ["relu", "gelu"]}
"""
    text = GRID.replace("lr = [1e-2, 3e-3, 1e-3, 3e-4]\n", "") + ranges
    spec = dataclasses.replace(load_sweep(write(tmp_path, text)), samples=12)
    configs, _ = expand(spec)
    assert expand(spec)[0] == configs
    assert expand(dataclasses.replace(spec, sample_seed=1))[0] != configs
    lrs = [c.lr for c in configs]
    assert all(1e-4 <= lr <= 1e-2 for lr in lrs)
    assert all(float(f"{lr:.3g}") == lr for lr in lrs)  # names can state the value exactly
    assert min(lrs) < 1e-3 < max(lrs)  # log-uniform: both decades are drawn
    assert {c.activation for c in configs} == {"relu", "gelu"}
    assert {c.dropout for c in configs} <= {0.0, 0.3}  # grid lists act as choices
    assert all(f"lr{_sci(c.lr)}_" in c.name for c in configs)


def _sci(value: float) -> str:
    exponent = math.floor(math.log10(value))
    return f"{value / 10**exponent:.6g}e{exponent}"


def test_sweep_toml_round_trips_exactly(tmp_path):
    text = (
        GRID + "hidden = [[150, 150], [64, 64]]\n[random]\nweight_decay = {uniform = [0.0, 0.5]}\n"
    )
    spec = dataclasses.replace(load_sweep(write(tmp_path, text)), samples=5, halving=True)
    again = sweep_from_dict(tomllib.loads(sweep_to_toml(spec)))
    assert again == spec
    assert expand(again) == expand(spec)


def test_stacks_split_by_architecture_and_schedule_and_size(tmp_path):
    text = GRID + "hidden = [[150, 150], [300, 300]]\nbatch_size = [64, 128]\n"
    experiment = from_sweep(load_sweep(write(tmp_path, text)))
    trials = experiment.trials()
    stacks = plan(trials, size=5)
    members = [(m.config.name, m.seed) for s in stacks for m in s.members]
    assert Counter(members) == Counter((t.config.name, t.seed) for t in trials)
    assert {t.seed for t in trials} == {0, 1}
    assert all(len(s.members) <= 5 for s in stacks)
    for stack in stacks:
        assert len({m.config.architecture for m in stack.members}) == 1
        names = {m.config.name for m in stack.members}
        assert {t.schedule for t in trials if t.config.name in names} == {stack.schedule}
    # 4 groups (2 architectures × 2 batch sizes) of 16 members each, cut into 5+5+5+1
    assert len(stacks) == 4 * 4
    assert len({s.key for s in stacks}) == len(stacks)


def test_stack_size_follows_free_memory(monkeypatch, mnist_t10k_dir):
    splits = _tiny_splits(mnist_t10k_dir)
    trials = [Trial(RunConfig(name=f"c{i}"), Schedule(), s) for i in range(10) for s in range(3)]
    need = member_bytes(trials[0].config, trials[0].schedule, splits)
    data = 4 * sum(d.images.size for d in (splits.train, splits.val, splits.test))
    free = "mnistlab.experiment.plan.free_bytes"
    monkeypatch.setattr(free, lambda device: 2 * (data + 7 * need))
    assert auto_stack_size(trials, splits, "cpu") == 7
    monkeypatch.setattr(free, lambda device: 10**15)
    assert auto_stack_size(trials, splits, "cpu") == 30  # everything in one stack
    monkeypatch.setattr(free, lambda device: 0)
    assert auto_stack_size(trials, splits, "cpu") == 1


def test_member_bytes_counts_adam_state_and_activations(mnist_t10k_dir):
    splits = _tiny_splits(mnist_t10k_dir)
    small = member_bytes(RunConfig(hidden=(10, 10)), Schedule(batch_size=8), splits)
    wide = member_bytes(RunConfig(hidden=(1000, 1000)), Schedule(batch_size=8), splits)
    params = 785 * 1000 + 1001 * 1000 + 1001 * 10
    assert wide > 16 * params > small


@pytest.mark.parametrize(
    ("epochs", "rungs"),
    [(9, [1, 3, 9]), (10, [1, 3, 10]), (3, [1, 3]), (2, [2]), (27, [1, 3, 9, 27])],
)
def test_rungs_are_thirds_of_the_schedule(epochs, rungs):
    count = rung_count(epochs)
    schedule = Schedule(epochs=epochs)
    assert [rung_schedule(schedule, r, count).epochs for r in range(count)] == rungs


# --- real data ------------------------------------------------------------------------------


def _tiny_source(mnist_t10k_dir: Path, folder: Path, n: int = 1200) -> Path:
    """The first `n` images of real MNIST t10k as an NPZ (train part only: test is held out)."""
    from mnistlab.data import load

    t10k = load(str(mnist_t10k_dir), progress=False).train
    path = folder / "mnist-tiny.npz"
    write_npz(path, t10k.subset(np.arange(n)))
    return path


def _tiny_splits(mnist_t10k_dir: Path):
    from mnistlab.data import load, make_splits

    source = load(str(mnist_t10k_dir), progress=False)
    tiny = dataclasses.replace(source, train=source.train.subset(np.arange(600)))
    return make_splits(tiny)


@pytest.fixture(scope="module")
def tiny_data(mnist_t10k_dir, tmp_path_factory) -> Path:
    return _tiny_source(mnist_t10k_dir, tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def grid_spec(tiny_data) -> SweepSpec:
    text = GRID.replace('name = "grid"', f'name = "grid"\ndata = "{tiny_data}"\ndevice = "cpu"')
    text = text.replace("layernorm = true", "layernorm = true\nhidden = [32, 32]")  # fast
    return sweep_from_dict(tomllib.loads(text), "test")


@pytest.fixture(scope="module")
def full_run(grid_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    results = ml.sweep(grid_spec, out=out, progress=False, report=False)
    return results.run_dir, results.raw


@pytest.fixture(scope="module")
def halving_run(grid_spec, tmp_path_factory):
    out = tmp_path_factory.mktemp("halving")
    spec = dataclasses.replace(grid_spec, halving=True, stack_size=4)
    results = ml.sweep(spec, out=out, progress=False, report=False)
    return results.run_dir, results.raw


def comparable(summary: dict) -> dict:
    """The summary without wall-clock figures."""
    runs = [{k: v for k, v in r.items() if k != "seconds"} for r in summary["runs"]]
    configs = [{k: v for k, v in c.items() if k != "seconds"} for c in summary["configs"]]
    return {
        **{k: v for k, v in summary.items() if k != "seconds"},
        "runs": runs,
        "configs": configs,
    }


def test_sweep_run_directory_has_every_configuration_and_seed_once(full_run):
    run_dir, summary = full_run
    names = [c["run"] for c in summary["configs"]]
    assert len(names) == 8 and summary["seeds"] == [0, 1]
    assert Counter((r["run"], r["seed"]) for r in summary["runs"]) == Counter(
        (n, s) for n in names for s in (0, 1)
    )
    rows = run_dir.read_metrics()
    keys = Counter((r["run"], r["seed"], r["step"], r["split"]) for r in rows)
    assert set(keys.values()) == {1}
    assert {(k[0], k[1]) for k in keys} == {(n, s) for n in names for s in (0, 1)}
    for c in summary["configs"]:
        acc = c["test_accuracy"]
        assert acc["n"] == 2 and acc["ci_low"] <= acc["mean"] <= acc["ci_high"]
        assert run_dir.model_path(c["run"], 0).is_file()
    assert load_sweep(run_dir.sweep_path).stack_size == summary["sweep"]["stack_size"]
    assert summary["sweep"]["winner"] in names


def test_halving_keeps_the_best_third_and_matches_the_full_grid(full_run, halving_run):
    _, full = full_run
    run_dir, half = halving_run
    rungs = half["sweep"]["halving"]["rungs"]
    assert [len(r["configs"]) for r in rungs] == [8, 3]
    assert [set(r["epochs"]) for r in rungs] == [{1}, {3}]
    # The best third of rung 0 by mean validation accuracy, read back from its own runs.
    first = {}
    for outcome in _rung_outcomes(run_dir, "r0-"):
        for r in outcome["runs"]:
            first.setdefault(r["run"], []).append(r["final_val_accuracy"])
    best = sorted(first, key=lambda n: -np.mean(first[n]))[:3]
    assert set(rungs[0]["kept"]) == set(best) == set(rungs[1]["configs"])
    # Survivors are retrained from scratch: the same numbers as in the full grid.
    full_runs = {(r["run"], r["seed"]): r for r in full["runs"]}
    for r in half["runs"]:
        if r["run"] in rungs[1]["configs"]:
            mine = {k: v for k, v in r.items() if k != "seconds"}
            assert mine == {
                k: v for k, v in full_runs[r["run"], r["seed"]].items() if k != "seconds"
            }
    assert half["sweep"]["winner"] == full["sweep"]["winner"]
    saved = half["sweep"]["halving"]
    assert saved["model_epochs"] == (8 * 1 + 3 * 3) * 2
    assert saved["full_grid_model_epochs"] == 8 * 3 * 2
    keys = Counter((r["run"], r["seed"], r["step"], r["split"]) for r in run_dir.read_metrics())
    assert set(keys.values()) == {1}


def _rung_outcomes(run_dir, prefix: str) -> list[dict]:
    paths = sorted(run_dir.checkpoints.glob(f"stack-{prefix}*.json"))
    return [json.loads(p.read_text()) for p in paths]


def test_resume_skips_finished_stacks_and_ends_with_the_same_numbers(halving_run, tmp_path):
    run_dir, summary = halving_run
    copy = tmp_path / run_dir.root.name
    shutil.copytree(run_dir.root, copy)
    (copy / "summary.json").unlink()
    cut = json.loads((copy / "checkpoints" / "stack-r1-0.json").read_text())
    (copy / "checkpoints" / "stack-r1-0.json").unlink()  # the last rung was cut short
    finished = (copy / "checkpoints" / "stack-r0-0.json").read_text()
    log = io.StringIO()
    again = ml.sweep(resume=copy, progress=Progress(log, live=False), report=False)
    assert again.path == copy
    assert comparable(again.raw) == comparable(summary)
    assert (copy / "metrics.csv").read_text() == run_dir.metrics_path.read_text()
    assert (copy / "checkpoints" / "stack-r0-0.json").read_text() == finished
    # Only the cut stack trained again: rung 0's four stacks and rung 1's second were done.
    started = [line for line in log.getvalue().splitlines() if line.startswith("training: ")]
    names = list(dict.fromkeys(r["run"] for r in cut["runs"]))
    assert started == [f"training: {len(cut['runs'])} models ({len(names)} configurations × "
                       f"2 seeds): {', '.join(names)}"]


def test_top_table_and_heat_map(full_run):
    run_dir, summary = full_run
    text = top_text(summary, width=120)  # a wide console: one line a row (issue 23: the width
    winner = summary["sweep"]["winner"]  # is the console's; narrower, intervals fold)
    lines = [line for line in text.splitlines() if "│" in line]
    assert len(lines) == 8 and winner in lines[0]
    assert "[" in lines[0] and "winner: " + winner in text
    html = top_html(summary, n=3)
    assert html.count("<tr") == 4
    assert f'<tr class="best"><td>1</td><td>{winner}</td>' in html
    from mnistlab.report.sweep import heatmap

    path = heatmap(summary, run_dir.plots)
    assert path.name == HEATMAP and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_console_summary_heat_map_reading_and_confusion_name_one_winner(full_run):
    """The winner is chosen on validation once, and every view shows that one."""
    from mnistlab.report import render

    run_dir, summary = full_run
    winner = summary["selection"]["winner"]
    assert summary["sweep"]["winner"] == winner == summary["selection"]["ranking"][0]
    best_val = max(summary["configs"], key=lambda c: c["final_val_accuracy"]["mean"])
    assert best_val["run"] == winner
    first_row = next(ln for ln in top_text(summary).splitlines() if "│" in ln)
    assert first_row.split("│")[2].strip() == winner
    page = render(run_dir).read_text(encoding="utf-8")
    reading = re.search(r"<h2>Reading</h2>\s*<ul>(.*?)</ul>", page).group(1)
    assert reading.startswith(f"<li>{winner} has the highest mean final validation accuracy")
    assert f"dropout (winner: {winner})" in page  # the heat map's caption
    assert f"{winner}: confusion matrix on the test set" in page
    assert f'<tr class="best"><td>1</td><td>{winner}</td>' in page


def test_sweep_command_writes_report_with_random_samples(tiny_data, tmp_path):
    text = f"""
name = "rnd"
data = "{tiny_data}"
device = "cpu"
[schedule]
epochs = 1
record_every = 5
[random]
lr = {{log_uniform = [1e-4, 1e-2]}}
dropout = {{uniform = [0.0, 0.5]}}
"""
    path = write(tmp_path, text)
    result = CliRunner().invoke(app, ["sweep", "--grid", str(path), "--random", "3", "--seeds",
                                      "1", "--stack-size", "2", "--out", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    printed = result.stdout
    (root,) = (tmp_path / "runs").iterdir()
    summary = json.loads((root / "summary.json").read_text())
    assert len(summary["configs"]) == 3 and summary["seeds"] == [0]
    assert summary["sweep"]["samples"] == 3 and summary["sweep"]["stacks"] == 2
    assert (root / "plots" / HEATMAP).is_file() and (root / "report.html").is_file()
    assert f"results: {root}" in printed and summary["sweep"]["winner"] in printed
    rerun = load_sweep(root / "sweep.toml")
    assert [c.name for c in expand(rerun)[0]] == [c["run"] for c in summary["configs"]]


def test_command_line_options_are_validated_with_the_file(tmp_path):
    path = write(tmp_path, GRID)
    spec = load_sweep(path, {"samples": 4, "seeds": 5, "epochs": 7, "halving": True})
    assert (spec.samples, spec.seeds, spec.schedule.epochs, spec.halving) == (
        4,
        (0, 1, 2, 3, 4),
        7,
        True,
    )
    assert spec.schedule.record_every == 5  # the file's other schedule fields stay
    with pytest.raises(
        ConfigError, match=r"sweep\.toml: schedule\.epochs must be an integer >= 1, got 0"
    ):
        load_sweep(path, {"epochs": 0})
    with pytest.raises(ConfigError, match=r"sweep\.toml: seeds must be a count"):
        load_sweep(path, {"seeds": 0})


def test_every_configuration_and_schedule_field_can_be_swept():
    """NAME_PARTS (how a field shows in a configuration's name) is the sweep's list of axes; it
    follows the classes: every RunConfig and Schedule field but `name` (made from the others)
    and `model` (a network's layers are not an axis: sweep one model at a time)."""
    from mnistlab.config import CONFIG_FIELDS, SCHEDULE_FIELDS
    from mnistlab.experiment.sweep import NAME_PARTS

    assert set(NAME_PARTS) == (set(CONFIG_FIELDS) - {"name", "model"}) | set(SCHEDULE_FIELDS)
