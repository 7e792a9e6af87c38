"""What every `mnistlab` command shares: the Typer apps, the options, printing, and the one
place where a user mistake becomes one `error: ...` line and exit code 2.

Help is plain Click text (rich_markup_mode=None): it renders exactly as written, so `[grid]`
stays `[grid]` (Rich would read it as a style tag and drop it), and `--help` needs no Rich import.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mnistlab.errors import MnistlabError


def examples(*lines: str) -> str:
    """A command's "Examples:" block (its help's epilog); the \\b line tells Click to keep the
    line breaks, where it rewraps every other paragraph."""
    return "\b\nExamples:\n" + "\n".join(f"  {line}" for line in lines)


PLAIN = {"rich_markup_mode": None, "context_settings": {"help_option_names": ["-h", "--help"]}}
app = typer.Typer(
    help="Run, compare and trust small-network experiments on MNIST-format image data.",
    epilog=examples("mnistlab study", "mnistlab study --data fashion-mnist --seeds 5",
                    "mnistlab train --lr 0.001 --dropout 0.2 --layernorm",
                    "mnistlab evaluate runs/seed-study-20250101-120000",
                    "mnistlab compare runs/study-a runs/study-b"),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    **PLAIN,
)
data_app = typer.Typer(
    help="Download, verify and check data sources.",
    epilog=examples("mnistlab data list", "mnistlab data fetch mnist",
                    "mnistlab data check path/to/train.csv"),
    no_args_is_help=True,
    **PLAIN,
)
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])


def _version(value: bool) -> None:
    if value:
        from mnistlab._version import __version__

        say(f"mnistlab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print mnistlab's version and exit.")] = False,
) -> None:
    """The options of `mnistlab` itself, before any command."""


# Characters that move the cursor, recolour or rewrite the terminal, or reorder the text shown:
# C0 and C1 controls but newline and tab, and the Unicode bidirectional/zero-width marks.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """`text` safe to print on a terminal: each unsafe character as its Python escape (`\\x1b`),
    so a class name, file name or message from a file can neither hide nor forge output."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def say(text: str, err: bool = False) -> None:
    """Everything the CLI prints goes through here: `printable`, on stdout or stderr."""
    typer.echo(printable(text), err=err)


def user_errors(func: F) -> F:
    """Turn a MnistlabError into one line on stderr and its exit code; Ctrl-C into exit 130; an
    OSError that no reader or writer worded (a file the OS refused) into one line naming the
    file and the errno's meaning, exit 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except MnistlabError as exc:
            say(f"error: {exc}", err=True)
            raise typer.Exit(exc.exit_code) from None
        except OSError as exc:
            where = exc.filename or func.__name__
            meaning = os.strerror(exc.errno) if exc.errno else str(exc)
            say(f"error: {where}: {meaning}; check the path, its permissions and free space",
                 err=True)
            raise typer.Exit(MnistlabError.exit_code) from None
        except KeyboardInterrupt as exc:
            say(_interrupted(func.__name__, exc), err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _interrupted(command: str, exc: KeyboardInterrupt) -> str:
    """What Ctrl-C leaves behind, truthfully: the training state the engine saved (its
    `Interrupted` carries the path) and the run directory to resume (the pipeline attaches it),
    where these exist."""
    state = getattr(exc, "state_path", None)
    run_dir = getattr(exc, "run_dir", None)
    saved = f"; training state saved in {state}" if state else ""
    if run_dir is None or command not in ("study", "train", "sweep"):
        return f"interrupted{saved}"
    return f"interrupted{saved}; continue with `mnistlab {command} --resume {run_dir}`"


DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data", help="A dataset name (mnist, fashion-mnist) or a path: IDX folder, CSV, NPZ."
    ),
]


DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def _device(value: str) -> str:
    """auto, cpu, cuda, mps, or an indexed device such as cuda:1: a choice Click checks at the
    command line, which a plain Choice could not be for the indexed ones."""
    kind, _, index = value.partition(":")
    if kind in DEVICE_KINDS and (not index or (kind != "auto" and index.isdigit())):
        return value
    from mnistlab.suggest import did_you_mean

    raise typer.BadParameter(f"{value!r} is not a device{did_you_mean(kind, DEVICE_KINDS)}; "
                             "use auto, cpu, cuda, mps or cuda:N")


DeviceOpt = Annotated[
    str | None, typer.Option(parser=_device, metavar="[auto|cpu|cuda|mps|cuda:N]",
                             show_default="auto",
                             help="Where to train: auto (CUDA, then MPS, then CPU), cpu, cuda "
                             "(or cuda:1, ...) or mps.")
]
EpochsOpt = Annotated[int | None, typer.Option(help="Epochs per run.", show_default="10")]
OutOpt = Annotated[Path, typer.Option(help="Folder that receives the run directory.")]
ResumeOpt = Annotated[
    Path | None,
    typer.Option(help="Finish an interrupted run directory; ends with the same numbers."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="Print no progress, only the results.")
]
VERBOSE = ("Also print, per configuration, a Keras-style line at the end of each epoch (loss, "
           "acc, val_loss, val_acc) and the log line every log_every iterations.")
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help=VERBOSE)]
ReportOpt = Annotated[
    bool, typer.Option("--report/--no-report", help="Draw the plots and write report.html; "
                       "`mnistlab report RUN_DIR` draws them later.")
]


def progress(verbose: bool, quiet: bool) -> Any:
    from mnistlab.progress import Progress

    return Progress(verbose=verbose, quiet=quiet)


def drawing(report: bool) -> contextlib.AbstractContextManager[None]:
    """With `report`, the processes that will draw the report's figures (mnistlab.report.workers),
    started before the API is imported: they get ready while this one loads PyTorch and data."""
    if not report:
        return contextlib.nullcontext()
    from mnistlab.report.workers import started

    return started()


def finished(results: Any, text: str, report: bool) -> None:
    """Print the results (`text`) and where they are, then render the report: the results wait
    for no figure, and the report is whole when the command returns."""
    say(text)
    say(f"results: {results.path}" + (f"  report: {results.report_path}" if report else ""))
    if report:
        import mnistlab as ml

        ml.render(results.path)



def main() -> None:
    app(prog_name="mnistlab")
