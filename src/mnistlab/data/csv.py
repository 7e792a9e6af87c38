"""MNIST-style CSV files: read (layout detected from the file itself), validate, write.

Layouts, one image per row, pixels row-major:
- Kaggle Digit Recognizer train.csv: header `label,pixel0,...,pixel783`;
- Kaggle test.csv: header `pixel0,...,pixel783`, no labels;
- "MNIST in CSV" mnist_train.csv / mnist_test.csv: label first, header `label,1x1,...,28x28`
  or no header at all (then a label column is present when the column count is 1 + a square).

Parsing runs in blocks through NumPy's C parser; only a block that fails is re-read cell by cell
to name the first offending line and column.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from mnistlab.atomic import atomic_write_bytes
from mnistlab.data.dataset import DIGITS, MAX_CLASSES, Dataset, inferred_classes
from mnistlab.data.idx import read_bytes
from mnistlab.errors import DataError

LayoutName = Literal["kaggle", "mnist", "plain"]
LAYOUTS: tuple[LayoutName, ...] = ("kaggle", "mnist", "plain")
NULLS = frozenset({"na", "nan", "null", "none", "n/a"})
_INTEGER = re.compile(r"[+-]?[0-9]+")
_HEADER_START = re.compile(r"label|pixel\d+|\d+x\d+")
_BLOCK = 2048  # rows per NumPy parse: big enough to be fast, small enough to re-check cheaply
_SLICE = 1 << 20  # characters split into lines at a time (`_rows`)
LAYOUT_HELP = (
    "use the Kaggle header (label,pixel0,...,pixel783), the MNIST-in-CSV header "
    "(label,1x1,...,28x28) or no header"
)


def pixel_names(layout: LayoutName, side: int) -> list[str]:
    """Header names of the pixel columns of a `side`x`side` image in `layout` (none for plain)."""
    if layout == "kaggle":
        return [f"pixel{i}" for i in range(side * side)]
    if layout == "mnist":
        return [f"{r}x{c}" for r in range(1, side + 1) for c in range(1, side + 1)]
    return []


@dataclass(frozen=True)
class Columns:
    """What the first line of a CSV says about the rest: header or not, label column or not."""

    header: list[str] | None
    labelled: bool
    side: int

    @property
    def columns(self) -> int:
        return int(self.labelled) + self.side * self.side

    @property
    def first_row(self) -> int:
        """Index, among non-blank lines, of the first data row."""
        return int(self.header is not None)

    def column_name(self, col: int) -> str:
        if self.header is not None:
            return self.header[col]
        return "label" if self.labelled and col == 0 else f"pixel{col - self.labelled}"


def _square_side(pixels: int) -> int:
    side = math.isqrt(max(pixels, 0))
    return side if side >= 1 and side * side == pixels else 0


def detect_columns(first_line: str, path: str | Path, lineno: int) -> Columns:
    """The columns announced by the first non-blank line (a header, or the first data row)."""
    cells = [c.strip().strip('"').strip() for c in first_line.split(",")]
    if not _HEADER_START.fullmatch(cells[0].lower()):
        side = _square_side(len(cells) - 1)
        if side:
            return Columns(None, True, side)
        if _square_side(len(cells)):
            return Columns(None, False, _square_side(len(cells)))
        raise DataError(
            path,
            f"{len(cells)} columns are neither a square image (e.g. 784 = 28x28) "
            "nor a label plus a square image (785)",
            LAYOUT_HELP,
            where=f"line {lineno}",
        )
    labelled = cells[0].lower() == "label"
    side = _square_side(len(cells) - labelled)
    if not side:
        raise DataError(
            path,
            f"header has {len(cells) - labelled} pixel columns, not a square "
            "image (e.g. 784 = 28x28)",
            "give every image H*H pixel columns",
            where=f"line {lineno}",
        )
    layout = "kaggle" if cells[labelled].lower().startswith("pixel") else "mnist"
    expected = ["label"] * labelled + pixel_names(layout, side)
    for col, (got, want) in enumerate(zip(cells, expected, strict=True)):
        if got.lower() != want:
            raise DataError(
                path,
                f"header cell '{got}' should be '{want}'",
                LAYOUT_HELP,
                where=f"line {lineno}, column {col + 1}",
            )
    return Columns(expected, labelled, side)


def _shown(text: str) -> str:
    """A cell as quoted in a message: long garbage is cut so the message stays one short line."""
    return text if len(text) <= 20 else text[:17] + "..."


def _cell_problem(cell: str, col: int, columns: Columns,
                  num_classes: int) -> tuple[str, str] | None:
    """(problem, fix) for one cell, or None when the cell is valid."""
    name = columns.column_name(col)
    text = cell.strip()
    if text == "" or text.lower() in NULLS:
        what = "empty cell" if text == "" else f"null value '{_shown(text)}'"
        return f"{what} in column '{name}'", "fill in the value or delete the row"
    is_label = columns.labelled and col == 0
    top = num_classes - 1 if is_label else 255
    if not _INTEGER.fullmatch(text):
        kind = "label" if is_label else "pixel value"
        return (
            f"{kind} '{_shown(text)}' in column '{name}' is not a whole number",
            f"use integers 0..{top}",
        )
    if len(text) > 12 or not 0 <= int(text) <= top:  # the length test spares int() huge inputs
        if is_label:
            return f"label {_shown(text)} is outside 0..{top}", f"use class indices 0..{top}"
        return (
            f"pixel value {_shown(text)} in column '{name}' is outside 0..255",
            "store 8-bit grey levels (0 = background, 255 = ink)",
        )
    return None


def _line_error(
    line: str, lineno: int, columns: Columns, num_classes: int, path: str | Path
) -> DataError | None:
    """The first problem of one data line as a DataError, or None when the line is valid."""
    cells = line.split(",")
    if len(cells) != columns.columns:
        basis = "the header has" if columns.header is not None else "the first row has"
        return DataError(
            path,
            f"{len(cells)} columns where {basis} {columns.columns}",
            f"give every row {columns.columns} columns",
            where=f"line {lineno}",
        )
    for col, cell in enumerate(cells):
        problem = _cell_problem(cell, col, columns, num_classes)
        if problem:
            return DataError(path, problem[0], problem[1], where=f"line {lineno}, column {col + 1}")
    return None


def _fast_parse(texts: list[str], columns: Columns, num_classes: int) -> np.ndarray | str:
    """The block as uint8 (n, columns) via NumPy's C parser, or why it is not valid."""
    if not all(map(str.isascii, texts)):  # NumPy 2.4's loadtxt segfaults on some code points
        return "non-ASCII text"
    try:
        values = np.loadtxt(texts, delimiter=",", dtype=np.uint8, ndmin=2, comments=None)
    except ValueError as exc:
        return str(exc)
    if values.shape[1] != columns.columns:
        return "unexpected column count"
    if columns.labelled and (values[:, 0] >= num_classes).any():
        return "label out of range"
    return values


def _parse_block(
    rows: list[tuple[int, str]], columns: Columns, num_classes: int, path: str | Path
) -> np.ndarray:
    """Rows (line number, text) as uint8 (n, columns); the first problem raises DataError."""
    values = _fast_parse([text for _, text in rows], columns, num_classes)
    if not isinstance(values, str):
        return values
    for lineno, text in rows:
        error = _line_error(text, lineno, columns, num_classes, path)
        if error:
            raise error
    # NumPy refused something the cell check accepts (exotic spacing or signs): report its reason.
    raise DataError(
        path,
        f"unreadable rows ({values})",
        "save the file as plain comma-separated integers",
        where=f"lines {rows[0][0]}-{rows[-1][0]}",
    )


def _decode(data: bytes, path: str | Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise DataError(
            path,
            f"not UTF-8 text (byte {exc.start})",
            "pass a CSV file saved as UTF-8",
            where=f"line {line}",
        ) from None


def _rows(text: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of every non-blank line of `text`, split a slice of about _SLICE
    characters at a time: the lines held at once stay few however many the file has (a list
    of every line costs ~100 bytes a line, 50× a file of short lines)."""
    lineno, start = 0, 0
    while start < len(text):
        end = text.find("\n", start + _SLICE)
        end = len(text) if end < 0 else end + 1
        lines = text[start:end].split("\n")
        if text[end - 1] == "\n":
            lines.pop()  # the empty rest after the slice's last newline: no line of its own
        for line in lines:
            lineno += 1
            if line.strip():
                yield lineno, line.rstrip("\r")
        start = end


def read_csv(path: str | Path, classes: tuple[str, ...] | None = DIGITS) -> Dataset:
    """A Dataset from any supported CSV layout, gzipped or not; no label column: labels None.

    `classes` bound the labels; None: nothing names them, so they are "0".."K-1", K the highest
    label + 1 (an unlabelled file then has no classes: its reader's caller gives it some).
    """
    num_classes = MAX_CLASSES if classes is None else len(classes)
    rows = _rows(_decode(read_bytes(path), path))
    first = next(rows, None)
    if first is None:
        raise DataError(path, "file is empty", "pass a CSV with one image per row")
    columns = detect_columns(first[1], path, first[0])
    if not columns.first_row:
        rows = itertools.chain([first], rows)
    blocks = []
    while block := list(itertools.islice(rows, _BLOCK)):
        blocks.append(_parse_block(block, columns, num_classes, path))
    if not blocks:
        raise DataError(
            path, "file has a header but no data rows", "pass a CSV with one image per row"
        )
    values = np.concatenate(blocks)
    labels = values[:, 0].astype(np.int64) if columns.labelled else None
    images = values[:, int(columns.labelled) :].reshape(-1, columns.side, columns.side)
    classes = inferred_classes(labels) if classes is None else classes
    return Dataset(np.ascontiguousarray(images), labels, classes, origin=str(path))


def encode(dataset: Dataset, layout: LayoutName = "kaggle") -> bytes:
    """CSV bytes of `dataset`: one row per image, label first when labelled, header unless plain."""
    n, height, width = dataset.images.shape
    if height != width:
        raise ValueError(f"CSV stores square images, got {height}x{width}")
    columns = [dataset.images.reshape(n, -1)]
    header = pixel_names(layout, height)
    if dataset.labels is not None:
        columns.insert(0, dataset.labels.astype(np.uint8)[:, None])
        header = ["label", *header]
    values = np.concatenate(columns, axis=1)
    # Each cell becomes a fixed 4-byte field ("7,\0\0"); dropping the NUL padding leaves the text.
    cells = np.array([f"{v}," for v in range(256)], dtype="S4")[values]
    cells[:, -1] = np.array([f"{v}\n" for v in range(256)], dtype="S4")[values[:, -1]]
    body = cells.view(np.uint8)
    head = (",".join(header) + "\n").encode() if layout != "plain" else b""
    return head + body[body != 0].tobytes()


def write_csv(path: str | Path, dataset: Dataset, layout: LayoutName = "kaggle") -> None:
    """Write `dataset` atomically as a CSV in `layout`: "kaggle", "mnist" or headerless "plain"."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    atomic_write_bytes(path, encode(dataset, layout))
