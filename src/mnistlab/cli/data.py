"""`mnistlab data`: download, verify and check data sources (mnistlab.data)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mnistlab.cli.shell import (
    data_app,
    examples,
    say,
    user_errors,
)


@data_app.command("fetch", epilog=examples(
    "mnistlab data fetch mnist", "mnistlab data fetch fashion-mnist --dest data/ -q"))
@user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="A dataset name: see `mnistlab data list`.")],
    dest: Annotated[
        Path | None, typer.Option(help="Folder to download into.", show_default="the cache, or "
                                  "a verified system copy such as Debian's")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Show no download bars.")] = False,
) -> None:
    """Download a named dataset and verify its checksums.

    Files already there and verified are kept; prints the folder that holds them.
    """
    from mnistlab.data.sources import fetch

    say(f"{name}: verified in {fetch(name, dest, progress=not quiet)}")



@data_app.command("check", epilog=examples(
    "mnistlab data check mnist", "mnistlab data check path/to/train.csv",
    "mnistlab data check path/to/mnist/"))
@user_errors
def data_check(
    source: Annotated[str, typer.Argument(help="A dataset name or a path: IDX folder, CSV, NPZ.")],
) -> None:
    """Validate a data source and print its summary.

    Rows, classes, pixel range and nulls; or the first problem, with its file and place (line
    and column, or byte offset).
    """
    from mnistlab.data import load, overview

    say(overview(load(source, download=False)))



@data_app.command("list", epilog=examples("mnistlab data list"))
@user_errors
def data_list() -> None:
    """List the named datasets: classes, train/test sizes, where each comes from, and the
    folder holding it here (the cache or a system copy such as Debian's), or "no".

    A folder is listed when it holds every file; `mnistlab data check NAME` verifies them.
    """
    from mnistlab.data.sources import REGISTRY, cached, origin

    rows = [("name", "classes", "train", "test", "from", "here")]
    for name, info in REGISTRY.items():
        train, test = info.sizes
        rows.append((name, str(len(info.classes)), f"{train:,}", f"{test:,}", origin(info),
                     str(cached(name) or "no")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [c.rjust(w) if 0 < i < 4 else c.ljust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=False))]
        say("  ".join([*cells, row[-1]]))
