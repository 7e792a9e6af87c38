"""The plain-PyTorch loop (reference_loop.py) against the engine, record for record, and against
docs/training-loop.md, which shows it: the doc's code is the tested code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from reference_loop import one_thread, reference
from test_engine import fashion_splits  # noqa: F401

from mnistlab.config import RunConfig, Schedule
from mnistlab.engine import Member, train

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "training-loop.md"


def test_the_doc_shows_the_tested_loop():
    """Every Python block of docs/training-loop.md is a verbatim part of reference_loop.py."""
    source = (ROOT / "tests" / "reference_loop.py").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    assert blocks and all(block in source for block in blocks)


def test_the_doc_names_files_that_exist():
    """The map's paths (src/mnistlab/..., tests/...) are files or folders of this checkout."""
    paths = set(re.findall(r"`((?:src/mnistlab|tests)/[\w/.]+?)`", DOC.read_text("utf-8")))
    assert paths and [p for p in paths if not (ROOT / p).exists()] == []


def test_records_log_lines_and_the_test_pass_match_the_engine(fashion_splits):  # noqa: F811
    """One model of the seed study's kind (no dropout: PyTorch's mask stream is not the
    engine's), 100 steps with a record every 25 and a log line every 5: the same records, log
    lines and test figures as the engine's."""
    config, schedule = RunConfig(lr=1e-3), Schedule(epochs=10, record_every=25, log_every=5)
    lines: list[str] = []
    result = train(fashion_splits, [Member(config, 0)], schedule, device="cpu",
                   on_log=lines.append)
    with one_thread():
        ref = reference(fashion_splits, config, 0, schedule)
    assert [(r["step"], r["epoch"], r["split"]) for r in result.rows] == \
        [(r["step"], r["epoch"], r["split"]) for r in ref.rows]
    for ours, theirs in zip(result.rows, ref.rows, strict=True):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=1e-4)
        assert ours["accuracy"] == pytest.approx(theirs["accuracy"], abs=0.01)
    cut = [line.rpartition(" loss ") for line in lines]
    assert [c[0] for c in cut] == [line.rpartition(" loss ")[0] for line in ref.log]
    assert [float(c[2]) for c in cut] == pytest.approx(
        [float(line.rpartition(" ")[2]) for line in ref.log], abs=2e-4)
    assert result.test[0]["loss"] == pytest.approx(ref.test["loss"], rel=1e-4)
    assert result.test[0]["accuracy"] == pytest.approx(ref.test["accuracy"], abs=0.01)
    weights = result.checkpoint(0).model.state_dict()
    for key, value in ref.model.state_dict().items():
        torch.testing.assert_close(weights[key], value, atol=1e-5, rtol=1e-4, msg=key)
