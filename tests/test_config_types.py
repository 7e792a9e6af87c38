"""Configuration files are typed strictly: each mistake is one line naming the file, the key and
the rule (issue 12, causes 1, 7, 9 and 10), and names cannot lead outside the run folder."""

from __future__ import annotations

import tomllib

import pytest

from mnistlab.config import RunConfig, Schedule, run_study_from_dict, study_from_dict
from mnistlab.errors import ConfigError, MnistlabError
from mnistlab.experiment.sweep import sweep_from_dict
from mnistlab.runs import RunDir

RUN = 'runs = ["baseline"]\n'
SEEDS = "seeds must be a count or a list of distinct integers >= 0 (a count is 1..10000)"


def study_error(text: str) -> str:
    """The one-line error a study TOML gets (from file `s.toml`)."""
    with pytest.raises(ConfigError) as info:
        study_from_dict(tomllib.loads(text), "s.toml")
    message = str(info.value)
    assert "\n" not in message and message.startswith("s.toml: "), message
    return message.removeprefix("s.toml: ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (RUN + '[schedule]\nepochs = "abc"', "schedule.epochs must be an integer >= 1, got 'abc'"),
        (RUN + "[schedule]\nepochs = 1.5", "schedule.epochs must be an integer >= 1, got 1.5"),
        (RUN + "[schedule]\nbatch_size = true", "schedule.batch_size must be an integer >= 1, "
                                                "got true"),
        ('runs = [{layernorm = "false"}]', "runs[0].layernorm must be true or false, got 'false'"),
        ('runs = [{hidden = ["a"]}]', "runs[0].hidden sizes must be a list of one or more "
                                      "positive integers, got 'a'"),
        (RUN + "seeds = [1.5]", f"{SEEDS}, got 1.5"),
        (RUN + "seeds = [true]", f"{SEEDS}, got true"),
        (RUN + "seeds = [1, 1]", f"{SEEDS}, got [1, 1]"),
        (RUN + "data = 5", "data must be a dataset name or a path, got 5"),
        (RUN + "schedule = 3", "schedule must be a table of schedule fields, got 3"),
        ("runs = 5", "runs must be a list of preset names or tables of run fields, got 5"),
    ],
)
def test_toml_types_are_checked_strictly(text, expected):
    """Cause 9: no traceback, no silent conversion (1.5 epochs, `true` as batch 1, the string
    "false" as LayerNorm on)."""
    assert study_error(text) == expected


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("lr", "inf", "lr must be > 0 and finite"),
        ("lr", "nan", "lr must be > 0 and finite"),
        ("eps", "inf", "eps must be > 0 and finite"),
        ("weight_decay", "nan", "weight_decay must be >= 0 and finite"),
        ("betas", "[0.9, nan]", "betas must be two numbers in [0, 1)"),
        ("dropout", "-inf", "dropout must be in [0, 1)"),
    ],
)
def test_non_finite_optimiser_settings_are_config_errors(field, value, rule):
    """Cause 7 (config half): lr = inf and weight_decay = NaN were accepted."""
    assert study_error(f"runs = [{{{field} = {value}}}]").startswith(f"runs[0].{rule}, got ")


def test_an_unknown_preset_is_named_with_the_known_ones():
    """Cause 10: "baseline2" was reported as unknown fields 2, a, b, e, i, l, n, s."""
    assert study_error('runs = ["baseline2"]') == (
        "runs[0]: unknown preset 'baseline2' (did you mean 'baseline'?); known: baseline, "
        "layernorm-dropout, lr1e-3-p0.2, lr5e-4-p0.4, lr1e-4-p0.6, tuned, lenet5")


def test_unknown_fields_are_named_once_with_the_known_ones():
    assert study_error(RUN + "colour = 1\nshape = 2").startswith(
        "unknown field(s) colour, shape; known: name, data, runs, seeds")


@pytest.mark.parametrize("name", ["../X", "/abs/path", "", "a/b", "..", ".hidden", "-x", "a b",
                                  "=HYPERLINK(1)", "x" * 101, "tab\there"])
def test_study_and_run_names_are_plain_names(name):
    """Cause 1: a study name becomes the run directory's name; `../X`, an absolute path or ""
    made it land outside --out (or as `-<stamp>`)."""
    assert study_error(RUN + f"name = {name!r}".replace("\t", "\\t")).startswith(
        "name must be 1-100 bytes without spaces, commas, colons or slashes")
    assert study_error(f"runs = [{{name = {name!r}}}]".replace("\t", "\\t")).startswith(
        "runs[0].name must be")
    with pytest.raises(ConfigError, match="sweep: name must be"):
        sweep_from_dict({"name": name})


def test_names_that_are_plain_are_kept(tmp_path):
    study = study_from_dict({"name": "synthetic<study>", "runs": [{"name": "lr1e-3_p0.2"}]})
    run = RunDir.create(tmp_path, study.name)
    assert run.root.parent == tmp_path and run.root.name.startswith("synthetic<study>-")


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", ""])
def test_the_run_directory_never_leaves_out(tmp_path, name):
    """Whatever calls RunDir.create, the name cannot lead outside `out`."""
    out = tmp_path / "out"
    with pytest.raises(MnistlabError, match=r"^run directory name: must be 1-100 bytes"):
        RunDir.create(out, name)
    assert list(tmp_path.rglob("*")) in ([], [out])


def test_a_run_toml_is_checked_like_a_study():
    with pytest.raises(ConfigError, match=r"^r\.toml: lr must be > 0 and finite, got inf$"):
        run_study_from_dict({"lr": float("inf")}, "r.toml")
    with pytest.raises(ConfigError, match=r"^r\.toml: seed must be an integer >= 0, got 1\.5$"):
        run_study_from_dict({"seed": 1.5}, "r.toml")
    with pytest.raises(ConfigError, match=r"known: name, lr, .*, seed, schedule$"):
        run_study_from_dict({"colour": 1}, "r.toml")


def test_configurations_stay_frozen_hashable_values():
    config = RunConfig(name="x", hidden=[300, 100], betas=[0.8, 0.9])
    assert config.hidden == (300, 100) and config.betas == (0.8, 0.9)
    assert hash(config) == hash(RunConfig(name="x", hidden=(300, 100), betas=(0.8, 0.9)))
    assert RunConfig(lr=1).lr == 1.0 and isinstance(RunConfig(lr=1).lr, float)
    with pytest.raises(AttributeError):
        config.lr = 0.1  # type: ignore[misc]
    with pytest.raises(ConfigError, match=r"^Schedule: epochs must be an integer >= 1, got 0$"):
        Schedule(epochs=0)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"seeds": 100_000}, f"{SEEDS}, got 100000"),
        ({"samples": 20_000, "seeds": 1, "random": {"lr": {"uniform": [0.1, 0.2]}}},
         "20000 configurations × 1 seeds are more than the 10000 models"),
        ({"grid": {k: list(range(1, 12)) for k in ("batch_size", "epochs", "record_every",
                                                    "log_every")}},
         "14641 configurations × 3 seeds are more than the 10000 models"),
        ({"random": {"lr": {"uniform": [0.1, float("inf")]}}},
         "random.lr.uniform must be [lo, hi] with lo < hi, got inf"),
    ],
)
def test_a_sweep_file_cannot_ask_for_unbounded_work(values, expected):
    """A count or a grid is checked before anything is built from it: no file makes mnistlab
    hold more than MAX_MODELS trials."""
    with pytest.raises(ConfigError) as info:
        sweep_from_dict(values, "sweep.toml")
    assert str(info.value).startswith(f"sweep.toml: {expected}")
