"""The README's examples are real: its sweep TOML loads exactly as printed and means what the
text around it says."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from mnistlab.config import PRESETS
from mnistlab.experiment.sweep import expand, load_sweep, sweep_from_dict

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture
def sweep_toml(tmp_path: Path) -> Path:
    """The first TOML block of the README's "Sweeps" section, written to a file as is."""
    section = README.read_text(encoding="utf-8").split("\n## Sweeps")[1].split("\n## ")[0]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    path = tmp_path / "sweep.toml"
    path.write_text(block, encoding="utf-8")
    return path


def test_the_sweep_example_trains_its_grid(sweep_toml: Path) -> None:
    spec = load_sweep(sweep_toml)
    assert (spec.name, spec.data, spec.seeds) == ("lr-dropout", "mnist", (0, 1, 2))
    assert (spec.samples, spec.halving, spec.stack_size) == (0, False, 0)
    configs, schedules = expand(spec)
    assert [c.name for c in configs] == ["lr3e-3_ln", "lr3e-3_noln", "lr1e-3_ln", "lr1e-3_noln",
                                         "lr3e-4_ln", "lr3e-4_noln"]  # "3 × 2 = 6"
    assert {(c.hidden, c.dropout, c.dropout_after) for c in configs} == {((300, 300), 0.2,
                                                                          (1, 2))}
    assert {(s.epochs, s.batch_size) for s in schedules.values()} == {(9, 128)}
    assert {c.activation for c in configs} == {"relu"}  # [random] is not used without samples


def test_the_sweep_example_draws_from_its_ranges(sweep_toml: Path) -> None:
    """--random N: N draws from the [random] ranges, the [grid] lists counting as choices."""
    configs, _ = expand(load_sweep(sweep_toml, {"samples": 40}))
    assert len(configs) == 40
    assert {c.lr for c in configs} == {0.003, 0.001, 0.0003}
    assert {c.layernorm for c in configs} == {True, False}
    assert {c.activation for c in configs} == {"relu", "gelu"}
    assert all(0.1 <= c.dropout <= 0.5 for c in configs)
    assert all(1e-6 <= c.weight_decay <= 1e-3 for c in configs)
    assert min(c.weight_decay for c in configs) < 1e-5 < 1e-4 < max(c.weight_decay
                                                                    for c in configs)


def test_the_sweep_base_may_be_a_preset_name(sweep_toml: Path) -> None:
    """The other form of `base` the README gives: the preset it names, in place of [base]."""
    (name,) = re.findall(r'`base = "([^"]+)"`', README.read_text(encoding="utf-8"))
    values = {**tomllib.loads(sweep_toml.read_text(encoding="utf-8")), "base": name}
    configs, _ = expand(sweep_from_dict(values))
    assert {(c.hidden, c.dropout) for c in configs} == {(PRESETS[name].hidden,
                                                         PRESETS[name].dropout)}
