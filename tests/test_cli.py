"""The command line: help everywhere, user mistakes as one line on stderr with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from mnistlab.cli import app

COMMANDS = [
    ["study"],
    ["train"],
    ["data"],
    ["data", "fetch"],
    ["data", "check"],
    ["report"],
    ["evaluate"],
    ["predict"],
    ["export"],
    ["sweep"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


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
