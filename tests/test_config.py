"""Configuration values: presets, validation, exact TOML round trips."""

import dataclasses

import pytest

from mnistlab.config import (
    PRESETS,
    RunConfig,
    Schedule,
    load_study,
    read_toml,
    run_study_from_dict,
    seed_study,
    study_to_toml,
    with_overrides,
)
from mnistlab.errors import ConfigError


def test_seed_study_has_the_five_configurations():
    study = seed_study()
    assert [(r.name, r.lr, r.dropout, r.layernorm) for r in study.runs] == [
        ("baseline", 0.01, 0.0, False),
        ("layernorm-dropout", 0.01, 0.5, True),
        ("lr1e-3-p0.2", 0.001, 0.2, True),
        ("lr5e-4-p0.4", 0.0005, 0.4, True),
        ("lr1e-4-p0.6", 0.0001, 0.6, True),
    ]
    assert study.schedule == Schedule(128, 10, 75, 250, False)
    assert study.seeds == (0, 1, 2) and study.val_fraction == 0.2


def test_study_round_trips_through_toml(tmp_path):
    study = dataclasses.replace(seed_study(), data="fashion-mnist", seeds=(4, 7))
    path = tmp_path / "study.toml"
    path.write_text(study_to_toml(study))
    assert load_study(path) == study


def test_presets_by_name_and_custom_runs(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(
        'name = "mine"\nruns = ["baseline", {name = "wide", lr = 0.002, hidden = [300, 100]}]\n'
        "seeds = [0]\n[schedule]\nepochs = 2\n"
    )
    study = load_study(path)
    assert study.runs[0] == PRESETS["baseline"]
    assert study.runs[1].hidden == (300, 100) and study.schedule.epochs == 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr": 0.0}, "lr must be > 0"),
        ({"dropout": 1.0}, "dropout must be in"),
        ({"activation": "swish"}, "activation must be one of"),
        ({"hidden": (150, 0)}, "hidden sizes"),
        ({"dropout_after": (3,)}, "dropout_after"),
        ({"name": "a b"}, "name must be"),
        ({"input_norm": "whiten"}, "input_norm"),
    ],
)
def test_invalid_run_configs_say_what_is_wrong(fields, message):
    with pytest.raises(ConfigError, match=message):
        RunConfig(**fields)


def test_unknown_toml_field_is_named(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('runs = [{name = "x", learning_rate = 0.1}]\n')
    expected = r"bad\.toml: runs\[0\]: unknown field\(s\) learning_rate; known: name, lr"
    with pytest.raises(ConfigError, match=expected):
        load_study(path)


def test_malformed_toml_names_the_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("runs = [\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: not valid TOML"):
        load_study(path)


def test_run_toml_becomes_a_one_run_study(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('name = "mine"\nlr = 0.003\nlayernorm = true\n[schedule]\nepochs = 3\n')
    flags = {"data": "fashion-mnist", "seed": 5, "device": "cpu"}
    study = run_study_from_dict(with_overrides(read_toml(path, "run"), flags), str(path))
    assert study.runs[0].lr == 0.003 and study.runs[0].layernorm
    assert study.seeds == (5,) and study.schedule.epochs == 3 and study.data == "fashion-mnist"


def test_flags_override_the_files_values(tmp_path):
    """Schedule fields land in [schedule], the rest at the top, as if the file said them."""
    path = tmp_path / "run.toml"
    path.write_text('name = "mine"\nlr = 0.003\n[schedule]\nepochs = 3\nbatch_size = 64\n')
    values = with_overrides(read_toml(path, "run"), {"lr": 0.1, "epochs": 2, "seed": 1})
    study = run_study_from_dict(values, str(path))
    assert study.runs[0].lr == 0.1 and study.schedule.epochs == 2 and study.seeds == (1,)
    assert study.schedule.batch_size == 64  # the file's other schedule fields stay
    path.write_text(study_to_toml(seed_study()))
    study = load_study(path, {"seeds": 5, "epochs": 1, "data": "fashion-mnist"})
    assert study.seeds == (0, 1, 2, 3, 4) and study.schedule.epochs == 1
    assert study.data == "fashion-mnist" and study.runs == seed_study().runs
    with pytest.raises(ConfigError, match="seeds must be a count or a list"):
        load_study(path, {"seeds": [1, 1]})


def test_architecture_groups_what_can_share_a_stack():
    a = RunConfig(name="a", lr=0.1, dropout=0.2, layernorm=True)
    b = RunConfig(name="b", lr=0.001, dropout=0.5, layernorm=False)
    assert a.architecture == b.architecture
    assert a.architecture != RunConfig(name="c", hidden=(100, 100)).architecture
