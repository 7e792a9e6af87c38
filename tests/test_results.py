"""Published figures are generated, never typed (issue 20): RESULTS.md's numbers are what
benchmarks/results.py renders from results/*.json, each JSON says which command, data, code
and arithmetic made it, and a re-run of the small regeneration table gives its figures bit for
bit."""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest

from mnistlab.engine import Arithmetic

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import results  # noqa: E402

TABLE_FILES = sorted(results.RESULTS.glob("*.json"))
OTHER_CPU_FILES = sorted(results.OTHER_CPUS.glob("*/*.json"))


def test_every_table_has_its_figures_committed():
    assert sorted(p.stem for p in TABLE_FILES) == sorted(results.TABLES)


def test_results_md_is_exactly_what_render_writes_from_the_figures():
    text = results.RESULTS_MD.read_text(encoding="utf-8")
    blocks = results.BLOCK.findall(text)
    assert {name for _, name, _, _, _ in blocks} == set(results.TABLES) - {"regeneration-check"}
    assert results.render(text) == text, "RESULTS.md differs from its figures: run " \
        "`python benchmarks/results.py render`"
    # a typed-over figure is put back by render
    table = next(body for _, _, kind, body, _ in blocks if kind == "summary")
    edited = text.replace(table, table.replace("| 1 |", "| 1 | 99.99 |", 1), 1)
    assert edited != text and results.render(edited) == text


@pytest.mark.parametrize("path", TABLE_FILES + OTHER_CPU_FILES,
                         ids=[p.stem for p in TABLE_FILES + OTHER_CPU_FILES])
def test_each_table_says_what_made_it(path):
    figures = json.loads(path.read_text(encoding="utf-8"))
    other_cpu = path.parent.parent == results.OTHER_CPUS
    assert figures["table"] == (path.parent.name if other_cpu else path.stem)
    if other_cpu:  # another CPU's set names the CPU that made it, in its file name too
        assert figures["cpu"]["key"] == path.stem
    assert figures["command"] == results.command(figures["table"])
    assert len(figures["git_rev"]) == 40
    Arithmetic.from_dict(figures["arithmetic"], str(path))
    assert figures["runs"] and all(tuple(r) == results.MODEL_FIELDS for r in figures["runs"])
    names = {r["run"] for r in figures["runs"]}
    assert set(figures["ranking"]) == names == {c["run"] for c in figures["configs"]}
    for r in figures["runs"]:
        assert 0 <= r["test_accuracy"] <= 1 or math.isnan(r["test_accuracy"])


def test_a_figure_that_moves_by_one_ulp_is_a_difference():
    committed = results.read("regeneration-check")
    moved = copy.deepcopy(committed)
    moved["runs"][0]["test_loss"] = math.nextafter(moved["runs"][0]["test_loss"], 1.0)
    assert results.differences(committed, moved) == ["runs"]
    timed = copy.deepcopy(committed) | {"seconds": 1.0, "created": "x", "git_rev": "y"}
    assert results.differences(committed, timed) == []


@pytest.mark.slow
def test_the_regeneration_table_reruns_bit_for_bit(fashion_dir, tmp_path):
    """The committed code re-run: every per-model figure and statistic of the small table, as
    committed in results/regeneration-check.json."""
    fresh = results.collect("regeneration-check", results.run("regeneration-check", tmp_path))
    figures, path = results.committed("regeneration-check", fresh["cpu"])
    assert results.differences(figures, fresh) == [], (
        f"{path.name} was made on {results.made_on(figures)}, this is {fresh['cpu']['key']}")


def test_a_rerun_is_held_to_the_set_its_cpu_made(tmp_path, monkeypatch):
    """Other CPUs give other bits: a re-run is compared with the set made on its kind of CPU,
    and with results/NAME.json where no set names its CPU."""
    monkeypatch.setattr(results, "RESULTS", tmp_path)
    monkeypatch.setattr(results, "OTHER_CPUS", tmp_path / "other-cpus")
    primary = {"table": "t", "cpu": None, "runs": [1]}
    zen3 = {"table": "t", "cpu": {"key": "authenticamd-25-1-avx2-2t"}, "runs": [2]}
    (tmp_path / "t.json").write_text(json.dumps(primary))
    assert results.write("t", zen3, other_cpu=True) == \
        tmp_path / "other-cpus" / "t" / "authenticamd-25-1-avx2-2t.json"
    assert results.committed("t", zen3["cpu"])[0] == zen3
    assert results.committed("t", {"key": "genuineintel-6-106-avx512-2t"}) == \
        (primary, tmp_path / "t.json")
    assert results.made_on(primary) == "a CPU it does not record"



def _published_pair(table: dict, missing: list):
    """A table's paired test differences, either way round (a − b or b − a); a pair the table
    does not publish (a recipe table pairs its winner only) is noted in `missing` and has no
    interval."""
    pairs = {(p["a"], p["b"]): p for p in table["pairs"]}

    def pair(a: str, b: str) -> dict:
        if (a, b) in pairs:
            return pairs[a, b]
        if (b, a) in pairs:
            p = pairs[b, a]
            return {**p, "a": a, "b": b, "diff": -p["diff"], "ci_low": -p["ci_high"],
                    "ci_high": -p["ci_low"]}
        missing.append((a, b))
        return {"a": a, "b": b, "diff": math.nan, "ci_low": math.nan, "ci_high": math.nan}

    return pair


@pytest.mark.parametrize("path", [p for p in TABLE_FILES if json.loads(p.read_text())["claims"]],
                         ids=lambda p: p.stem)
def test_published_claims_are_what_the_claims_module_says_today(path):
    """The claims a table publishes, judged again from its own figures by today's rules: the
    first always (it needs the baseline alone), the next two where the table publishes their
    pairs (the seed tables do; the fourth needs the curves, which no JSON keeps). A change to
    the rules or their form fails here, not silently in RESULTS.md."""
    from mnistlab import claims

    table, missing = json.loads(path.read_text()), []
    data = table["data"]
    judged = claims.check(table["configs"], _published_pair(table, missing), {}, data,
                          on_seed_data=data == claims.SEED_DATA)
    compared = 1 if missing else 3
    assert compared == 3 or not path.stem.startswith("seed-")
    assert judged[:compared] == table["claims"][:compared]
