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


@pytest.mark.parametrize("path", TABLE_FILES, ids=[p.stem for p in TABLE_FILES])
def test_each_table_says_what_made_it(path):
    figures = json.loads(path.read_text(encoding="utf-8"))
    assert figures["table"] == path.stem
    assert figures["command"] == results.command(path.stem)
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
    assert results.differences(results.read("regeneration-check"), fresh) == []
