"""The project's own exceptions: a user mistake becomes one line on stderr and exit code 2."""

from __future__ import annotations

from pathlib import Path


class MnistlabError(Exception):
    """A problem the user can fix. The CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = 2


class DataError(MnistlabError):
    """Bad input data: names the file, where in it (row/column/byte offset) and what to do.

    The message is always one line: `<path>[:<where>]: <problem>; <fix>`.
    """

    def __init__(self, path: str | Path, problem: str, fix: str, where: str | None = None):
        self.path = str(path)
        self.where = where
        self.problem = problem
        self.fix = fix
        location = f"{self.path}:{where}" if where else self.path
        super().__init__(f"{location}: {problem}; {fix}".replace("\n", " "))


class ConfigError(MnistlabError):
    """An invalid configuration value or file."""


class CheckpointError(MnistlabError):
    """Not a usable mnistlab checkpoint: wrong file, truncated, or another architecture."""
