"""The command line: help everywhere, user mistakes as one line on stderr with exit code 2."""

from __future__ import annotations

import importlib.metadata
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from mnistlab._version import __version__
from mnistlab.cli import app

COMMANDS = [
    ["study"],
    ["train"],
    ["data"],
    ["data", "fetch"],
    ["data", "check"],
    ["data", "list"],
    ["report"],
    ["evaluate"],
    ["predict"],
    ["export"],
    ["sweep"],
    ["compare"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def _tree(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and group of the CLI with its path of names, the root first."""
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _tree(sub, (*path, name))


TREE = dict(_tree(typer.main.get_command(app)))


def _bare(text: str) -> str:
    """Text without its whitespace: help is rewrapped to the terminal's width (and may break a
    line after a hyphen), but every other character must survive."""
    return "".join(text.split())


def test_the_tree_is_the_tested_commands():
    assert sorted(TREE) == sorted([(), *map(tuple, COMMANDS)])


@pytest.mark.parametrize("path", TREE, ids=lambda path: " ".join(path) or "mnistlab")
def test_help_renders_every_text_as_written(path):
    """Each help text and option help, as written: Rich markup would have swallowed `[grid]`
    or `[schedule]`. The examples keep their line breaks. `-h` is `--help`."""
    command = TREE[path]
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    shown = _bare(result.output)
    texts = [command.help, *(param.help for param in command.params)]
    for text in filter(None, texts):
        assert _bare(text) in shown, text
    lines = [line.strip() for line in result.output.splitlines()]
    examples = command.epilog.splitlines()
    assert examples[:2] == ["\b", "Examples:"] and len(examples) > 2
    assert all(example.strip() in lines for example in examples[1:])
    assert CliRunner().invoke(app, [*path, "-h"]).output == result.output


@pytest.mark.parametrize(("path", "words"), [
    (("sweep",), ["[schedule]", "[grid]", "[random]"]),
    (("train",), ["[schedule]"]),
    (("study",), ["[schedule]"]),
    (("predict",), ["test.csv[0]", "'scans/*.png'"]),
])
def test_bracketed_words_are_shown(path, words):
    output = CliRunner().invoke(app, [*path, "--help"]).output
    assert all(word in output for word in words), output


@pytest.mark.parametrize("path", TREE, ids=lambda path: " ".join(path) or "mnistlab")
def test_every_example_is_a_valid_command_line(path):
    """Examples cannot rot: each names real commands and options with values of their types."""
    for example in TREE[path].epilog.splitlines()[2:]:
        program, *words = shlex.split(example)
        assert program == "mnistlab"
        command = TREE[()]
        while hasattr(command, "commands"):
            command = command.commands[words.pop(0)]
        command.make_context(command.name, words)  # a UsageError names what is wrong


def test_version():
    result = _mnistlab("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"mnistlab {__version__}\n"
    assert __version__ == importlib.metadata.version("mnistlab")


def test_help_loads_no_heavy_module():
    """`mnistlab --help` stays fast: commands import PyTorch, numpy, matplotlib and Rich when
    they run, not when the CLI is built."""
    code = ("import sys\nfrom mnistlab.cli import app\n"
            "for args in (['--help'], ['train', '--help'], ['predict', '--help']):\n"
            "    try:\n        app(args, prog_name='mnistlab')\n"
            "    except SystemExit:\n        pass\n"
            "heavy = ('torch', 'numpy', 'matplotlib', 'rich', 'pandas', 'PIL')\n"
            "print('loaded:', *[m for m in heavy if m in sys.modules], file=sys.stderr)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.stderr.strip() == "loaded:"


@pytest.mark.parametrize("path", [("study",), ("train",), ("sweep",), ("data", "fetch")],
                         ids=" ".join)
def test_every_command_that_shows_progress_has_quiet(path):
    names = {opt for param in TREE[path].params for opt in getattr(param, "opts", ())}
    assert {"-q", "--quiet"} <= names


def test_data_fetch_quiet_hides_the_download_bars(monkeypatch, tmp_path):
    from mnistlab.data import sources

    calls = []
    monkeypatch.setattr(sources, "fetch", lambda name, dest, progress: calls.append(progress)
                        or tmp_path)
    for args, progress in ((["-q"], False), ([], True), (["--quiet"], False)):
        result = CliRunner().invoke(app, ["data", "fetch", "mnist", "--dest", str(tmp_path),
                                          *args])
        assert result.exit_code == 0 and result.stdout == f"mnist: verified in {tmp_path}\n"
        assert calls.pop() is progress


def test_train_is_verbose_unless_told_otherwise(idx_dir: Path, tmp_path: Path):
    """`train` prints a Keras-style line per epoch by default; --no-verbose keeps the progress
    without them, -q prints no progress at all; the model's final losses and accuracies and its
    checkpoint come either way (as `fit` + `evaluate` end, issue 23: no study table)."""
    args = ["train", "--data", str(idx_dir), "--hidden", "16", "--dropout-after", "",
            "--epochs", "2", "--record-every", "1", "--device", "cpu", "--out", str(tmp_path)]
    runner = CliRunner()
    shown = {flag: runner.invoke(app, [*args, *flag]) for flag in ((), ("--no-verbose",),
                                                                   ("-q",), ("-v",))}
    assert all(r.exit_code == 0 and "checkpoint: " in r.stdout and "final val acc" not in r.stdout
               for r in shown.values())
    keras = [line for line in shown[()].stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in keras] == ["epoch 1 h16_da", "epoch 2 h16_da"]
    assert all(" - val_acc " in line for line in keras)
    assert "training: 1 model" in shown[("--no-verbose",)].stderr
    assert "\nepoch " not in shown[("--no-verbose",)].stderr
    assert shown[("-q",)].stderr == ""
    assert "\nepoch 2 h16_da: loss " in shown[("-v",)].stderr


def test_train_starts_from_a_preset_and_flags_override_it(idx_dir: Path, tmp_path: Path):
    import tomllib

    args = ["train", "--preset", "tuned", "--data", str(idx_dir), "--hidden", "16,16",
            "--epochs", "1", "--label-smoothing", "0.2", "--translate", "1", "--restore-best",
            "--device", "cpu", "--out", str(tmp_path / "runs"), "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    (run_dir,) = (tmp_path / "runs").iterdir()
    (run,) = tomllib.loads((run_dir / "study.toml").read_text())["runs"]
    assert (run["name"], run["lr_schedule"], run["input_norm"]) == ("tuned", "onecycle",
                                                                    "standardize")
    assert (run["hidden"], run["label_smoothing"], run["translate"], run["restore_best"]) == (
        [16, 16], 0.2, 1, True)


def _mnistlab(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mnistlab.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["study", "--data", "/no/such/place"], "/no/such/place"),
        (["train", "--hidden", "150,x"], "--hidden"),
        (["train", "--lr", "-1", "--data", "/no/such/place"], "lr must be > 0"),
        (["study", "--config", "/no/such.toml"], "/no/such.toml"),
        (["report", "/tmp"], "not a run directory"),
        (["data", "check", "nonsense-dataset"], "nonsense-dataset"),
        (["train", "--preset", "tuned2"], "unknown preset 'tuned2'"),
        (["train", "--rotate", "200"], "rotate must be in [0, 180]"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, needle, tmp_path):
    result = _mnistlab(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_the_report_footer_says_how_the_run_was_made(idx_dir, tmp_path):
    """env.json keeps the command line, and the report ends with it and with the command that
    reproduces the run from its own file."""
    import json

    result = _mnistlab("train", "--data", str(idx_dir), "--hidden", "16", "--dropout-after", "",
                       "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "runs"), "-q")
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    command = json.loads((run / "env.json").read_text())["command"]
    assert command.startswith("mnistlab train --data ") and command.endswith("-q")
    footer = (run / "report.html").read_text().split("<footer>")[1]
    assert "It was run as <code>mnistlab train --data" in footer
    assert f"mnistlab study --config {run / 'study.toml'}" in footer


def test_train_offers_every_configuration_and_schedule_field():
    """`mnistlab train`'s options are written out for their help text; this keeps them in step
    with the classes (mnistlab.config's CONFIG_FIELDS and SCHEDULE_FIELDS): a new RunConfig or
    Schedule field gets an option, or this fails. --beta1/--beta2 set `betas`; split_seed and
    stack_size are a study file's, not a single run's."""
    import inspect

    from mnistlab import cli
    from mnistlab.config import CONFIG_FIELDS, SCHEDULE_FIELDS, STUDY_KEYS

    options = set(inspect.signature(cli.train).parameters)
    options = options - {"beta1", "beta2"} | {"betas"}
    own = {"config", "preset", "seed", "out", "resume", "verbose", "quiet", "report"}
    fields = set(CONFIG_FIELDS) | set(SCHEDULE_FIELDS) | set(STUDY_KEYS)
    assert options - own == fields - {"split_seed", "stack_size"}


def test_train_imports_what_it_uses_and_its_report_is_whole_when_it_returns(idx_dir, tmp_path):
    """`mnistlab train` as a whole process (issue 22): PyTorch, but not SciPy (one seed has no
    interval to compute), pandas (no DataFrame is made), matplotlib (the report's figures are
    drawn by worker processes, none here) or TensorBoard's writer modules (their TensorFlow
    stand-in pulls boto3 in); and the results are printed, the report complete, when it ends."""
    import json

    args = ["train", "--data", str(idx_dir), "--hidden", "16", "--dropout-after", "",
            "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "runs"), "-q"]
    code = (
        "import json, sys\nfrom mnistlab.cli import app\nfrom mnistlab.report import workers\n"
        "here = []\nworkers._here = lambda call: here.append(call[0])  # drawn here: none\n"
        f"try:\n    app({args!r}, prog_name='mnistlab')\n"
        "except SystemExit as end:\n    assert not end.code, end.code\n"
        "heavy = ('scipy', 'pandas', 'matplotlib', 'tensorboard.summary', 'boto3')\n"
        "print(json.dumps({'loaded': [m for m in heavy if m in sys.modules], 'here': here}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    *printed, last = result.stdout.strip().splitlines()
    assert json.loads(last) == {"loaded": [], "here": []}
    (run,) = (tmp_path / "runs").iterdir()
    assert printed[-1] == f"results: {run}  report: {run / 'report.html'}"
    assert (run / "report.html").read_text().count("data:image/png") == 4
    assert sorted(p.name for p in (run / "plots").iterdir()) == [
        "confusion_h16_da.png", "h16_da_accuracy.png", "h16_da_loss.png",
        "misclassified_h16_da.png"]


def test_no_report_draws_nothing(idx_dir, tmp_path):
    result = CliRunner().invoke(app, ["train", "--data", str(idx_dir), "--hidden", "16",
                                      "--dropout-after", "", "--epochs", "1", "--device", "cpu",
                                      "--out", str(tmp_path / "runs"), "-q", "--no-report"])
    assert result.exit_code == 0, result.output
    (run,) = (tmp_path / "runs").iterdir()
    assert result.stdout.rstrip().endswith(f"results: {run}")
    assert not (run / "report.html").exists() and not (run / "plots").exists()
    assert (run / "summary.json").is_file() and any((run / "tb").iterdir())
