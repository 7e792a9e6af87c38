"""Use a trained model: digits in image files, folders and glob patterns, test CSVs, Kaggle
submissions, and one command for the CLI.

Photos and scans of digits look nothing like MNIST until they are prepared the way MNIST was made
(LeCun et al.): light ink on a dark background, the digit scaled to fit a 20×20 box keeping its
aspect ratio, pasted into 28×28 with its centre of mass at the centre. `preprocess_image` does
exactly that, so a model trained on MNIST sees the same kind of input it learned from.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mnistlab.atomic import atomic_write_text
from mnistlab.data.csv import read_csv
from mnistlab.errors import DataError, MnistlabError
from mnistlab.inputs import open_input
from mnistlab.model import Checkpoint, finite_outputs
from mnistlab.modules import load_checkpoint

DIGIT_BOX = 20 / 28  # MNIST fits each digit into 20×20 of the 28×28 field
MIN_CONTRAST = 32.0  # ink must differ from the background by this much (0..255) to count
NOISE = 0.15  # after stretching the ink to 0..1, fainter pixels do not extend the bounding box
BATCH = 4096  # rows per forward pass in CSV inference: bounded memory for any file size
MAX_PIXELS = 50_000_000  # an image file's pixels (a 50 MP photo); PIL's own warning is at 89 M
# What a folder's files must end with (any case) to be read as images; the rest are skipped.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm",
                  ".ppm", ".pbm")
CSV_COLUMNS = ("path", "label", "index", "probability", "label2", "index2", "probability2",
               "label3", "index3", "probability3", "error")


@dataclass(frozen=True)
class ImagePrediction:
    """One image's result, or its error.

    `label` is the predicted class as the model names it (for Fashion-MNIST "Sneaker", not 7),
    `index` its position among the model's classes; `top3` the three most probable
    (class, probability), most probable first, and `top3_index` their positions.
    """

    path: str
    label: str | None = None
    top3: tuple[tuple[str, float], ...] = ()
    top3_index: tuple[int, ...] = ()
    error: str | None = None

    @property
    def index(self) -> int | None:
        return self.top3_index[0] if self.top3_index else None

    def record(self) -> dict[str, Any]:
        """The JSON form: every class as named (a string) together with its index (an int)."""
        top3 = [{"label": label, "index": index, "probability": probability}
                for (label, probability), index in zip(self.top3, self.top3_index, strict=True)]
        return {"path": self.path, "label": self.label, "index": self.index, "top3": top3,
                "error": self.error}


def preprocess_image(
    img: Image.Image | np.ndarray, shape: tuple[int, int] = (28, 28)
) -> np.ndarray:
    """Any picture of one digit → uint8 `shape` image in MNIST's form (white ink on black).

    Grayscale with transparency composited on white; inverted when the background (the median of
    the border pixels) is the light end of the image; the ink's bounding box (ignoring faint noise)
    scaled to fit 20/28 of `shape` with antialiasing; pasted with its centre of mass at the centre.
    A uint8 array may be (H, W), (H, W, 3) RGB or (H, W, 4) RGBA. A blank image is a MnistlabError.
    """
    gray = _grayscale(img if isinstance(img, Image.Image) else _from_array(img))
    if gray.size == 0:
        raise MnistlabError(f"an empty image ({'x'.join(map(str, gray.shape))}); pass a picture")
    ink = _ink(gray)
    rows, cols = np.flatnonzero((ink > NOISE).any(1)), np.flatnonzero((ink > NOISE).any(0))
    digit = _fit(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], shape)
    return _centre(digit, shape)


def _from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if (array.dtype != np.uint8 or array.shape[2:] not in ((), (3,), (4,)) or array.ndim < 2
            or array.size == 0):
        raise MnistlabError(
            "image array must be a non-empty uint8 (H, W), (H, W, 3) or (H, W, 4), "
            f"got {array.dtype} {array.shape}"
        )
    return Image.fromarray(array)


def _grayscale(img: Image.Image) -> np.ndarray:
    """float32 luminance in 0..255; transparent parts become white paper."""
    if img.mode.startswith("I"):  # 16-bit grayscale PNG/TIFF: 0..65535
        return np.asarray(img, dtype=np.float32) / 257.0
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return np.asarray(img.convert("L"), dtype=np.float32)


def _ink(gray: np.ndarray) -> np.ndarray:
    """Ink strength 0..1 (1 = darkest stroke on paper or brightest on a dark screen).

    The background level is the median of the border pixels: the mean alone would call a bold digit
    on white paper 'light on dark'. Subtracting it and stretching makes the ink independent of
    lighting and contrast.
    """
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    background = float(np.median(border))
    if background > (gray.min() + gray.max()) / 2:
        gray, background = 255.0 - gray, 255.0 - background
    ink = np.clip(gray - background, 0.0, None)
    if ink.max() < MIN_CONTRAST:
        raise MnistlabError(
            "blank image: no digit stands out from the background; pass a picture of one digit"
        )
    return ink / ink.max()


def _fit(digit: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Scale (antialiased) so the digit fits the 20/28 box of `shape`, keeping its aspect ratio."""
    box_h, box_w = shape[0] * DIGIT_BOX, shape[1] * DIGIT_BOX
    scale = min(box_h / digit.shape[0], box_w / digit.shape[1])
    size = (max(1, round(digit.shape[1] * scale)), max(1, round(digit.shape[0] * scale)))
    resized = Image.fromarray(digit.astype(np.float32)).resize(
        size, Image.Resampling.LANCZOS
    )
    return np.clip(np.asarray(resized), 0.0, 1.0)


def _centre(digit: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Paste into a black `shape` field with the centre of mass at the middle (integer shift)."""
    rows, cols = np.indices(digit.shape)
    com = ((rows * digit).sum() / digit.sum(), (cols * digit).sum() / digit.sum())
    top, left = (
        int(np.clip(round(shape[a] / 2 - com[a]), 0, shape[a] - digit.shape[a])) for a in (0, 1)
    )
    field = np.zeros(shape, np.float32)
    field[top : top + digit.shape[0], left : left + digit.shape[1]] = digit
    return np.round(field * 255.0).astype(np.uint8)


def _probabilities(ckpt: Checkpoint, images: np.ndarray) -> torch.Tensor:
    """Softmax over classes for uint8 (N, H, W) images, in batches of BATCH rows."""
    with torch.no_grad():
        parts = [
            torch.softmax(ckpt.model(ckpt.inputs.prepare(images[i : i + BATCH])), dim=1)
            for i in range(0, len(images), BATCH)
        ]
    return finite_outputs(ckpt, torch.cat(parts))


def _load_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    if path.is_dir():  # image_files keeps a folder only when it holds no image
        raise MnistlabError(f"{path}: a folder without image files ({', '.join(IMAGE_SUFFIXES)})"
                            "; pass image files or a folder of them")
    try:
        with open_input(path, "an image file") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides
            img = Image.open(f)
            if img.width * img.height > MAX_PIXELS:  # judged from the header, before decoding
                raise MnistlabError(
                    f"{img.width}x{img.height} pixels, more than the {MAX_PIXELS:,} mnistlab "
                    "decodes (a decompression bomb, or a needlessly large scan); scale it down")
            with img:
                img.load()
                upright = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
                return preprocess_image(upright, shape)
    except FileNotFoundError:
        missing = "no file matches this pattern" if _is_pattern(str(path)) else "no such file"
        raise MnistlabError(f"{path}: {missing}; check the path") from None
    except UnidentifiedImageError:
        raise MnistlabError(f"{path}: not an image file; pass a PNG, JPEG or BMP") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).replace("\n", " ")
        raise MnistlabError(f"{path}: unreadable image ({detail}); re-save it as PNG") from None
    except DataError:
        raise  # open_input's: it names the file already
    except MnistlabError as exc:
        raise MnistlabError(f"{path}: {exc}") from None


def _prepared(item: str | Path | Image.Image | np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """An image file, a PIL image or an array in the model's input form. A uint8 array of the
    model's shape is taken as already in MNIST form; anything else is a picture to prepare."""
    if isinstance(item, str | Path):
        return _load_image(Path(item), shape)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.shape == tuple(shape):
        return item
    return preprocess_image(item, shape)


def _is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def image_files(item: str | Path) -> list[Path]:
    """The image files an argument names: a folder's image files (IMAGE_SUFFIXES, sorted, not
    recursive), a glob pattern's matches (sorted; `**` spans folders), else the path itself.

    Patterns are expanded here for shells that do not (quoted, or Windows'); a path that
    exists is never read as a pattern. An argument naming no image is kept as it is, so that
    its result says why (no such file, no match, a folder without images).
    """
    path = Path(item)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        return [p for p in found if p.is_file()] or [path]
    if not path.exists() and _is_pattern(str(item)):
        matches = sorted(glob.glob(str(item), recursive=True))
        return [file for match in matches for file in image_files(match)] or [path]
    return [path]


def _named(images: Sequence[Any]) -> list[tuple[str, Any]]:
    """(name, image) for every image, with paths expanded by `image_files`; an in-memory
    image is named `[i]` after its position in `images`."""
    named: list[tuple[str, Any]] = []
    for i, item in enumerate(images):
        if isinstance(item, str | Path):
            named += [(str(path), path) for path in image_files(item)]
        else:
            named.append((f"[{i}]", item))
    return named


def _ranked(ckpt: Checkpoint, images: np.ndarray, names: Sequence[str]) -> list[ImagePrediction]:
    """The class and the top 3 of each prepared uint8 (N, H, W) image."""
    probs = _probabilities(ckpt, images)
    top = torch.topk(probs, k=min(3, probs.shape[1]), dim=1)
    classes = ckpt.inputs.classes
    results = []
    for name, index, values in zip(names, top.indices.tolist(), top.values.tolist(), strict=True):
        top3 = tuple((classes[c], round(p, 6)) for c, p in zip(index, values, strict=True))
        results.append(ImagePrediction(name, top3[0][0], top3, tuple(index)))
    return results


def predict_images(
    ckpt: Checkpoint, images: Sequence[str | Path | Image.Image | np.ndarray]
) -> list[ImagePrediction]:
    """Predict every readable image; one that fails gets its one-line error, the rest go on.

    A path may be a file, a folder (its image files) or a glob pattern (its matches): see
    `image_files`. A result's `path` is the file's path, or `[i]` for the in-memory image at
    position i of `images`.
    """
    named = _named(images)
    results: dict[int, ImagePrediction] = {}
    good: list[tuple[int, np.ndarray]] = []
    for i, (name, item) in enumerate(named):
        try:
            good.append((i, _prepared(item, ckpt.inputs.shape)))
        except MnistlabError as exc:
            results[i] = ImagePrediction(name, error=str(exc))
    if good:
        stacked = np.stack([image for _, image in good])
        ranked = _ranked(ckpt, stacked, [named[i][0] for i, _ in good])
        results.update(zip((i for i, _ in good), ranked, strict=True))
    return [results[i] for i in range(len(named))]


def predict_rows(ckpt: Checkpoint, csv_path: str | Path) -> list[ImagePrediction]:
    """Every image of a CSV (any layout the data layer reads, with or without a label column),
    named `test.csv[i]` after its position (from 0)."""
    images = read_csv(csv_path, ckpt.inputs.classes).images
    if images.shape[1:] != ckpt.inputs.shape:
        raise DataError(
            csv_path,
            f"images are {images.shape[1]}×{images.shape[2]} but the model expects "
            f"{ckpt.inputs.shape[0]}×{ckpt.inputs.shape[1]}",
            "pass a CSV of the size the model was trained on",
        )
    return _ranked(ckpt, images, [f"{csv_path}[{i}]" for i in range(len(images))])


def predict_csv(ckpt: Checkpoint, csv_path: str | Path, submission_path: str | Path) -> int:
    """Kaggle Digit Recognizer submission (`ImageId,Label`, ImageId from 1, input order).

    Reads any CSV layout the data layer reads (with or without a label column); writes atomically;
    returns the number of rows.
    """
    _check_file(submission_path, "submission.csv")
    preds = predict_rows(ckpt, csv_path)
    _write_csv(submission_path, ("ImageId", "Label"),
               ((i, p.label) for i, p in enumerate(preds, start=1)))
    return len(preds)


def write_predictions(preds: Sequence[ImagePrediction], path: str | Path) -> None:
    """The predictions as a CSV (CSV_COLUMNS: one row per image, the top 3 as class, index,
    probability; an image that failed has only its path and error), written atomically."""
    _check_file(path, "preds.csv")
    _write_csv(path, CSV_COLUMNS, (_csv_row(p) for p in preds))


def _csv_row(p: ImagePrediction) -> list[Any]:
    ranked = [cell for (label, probability), index in zip(p.top3, p.top3_index, strict=True)
              for cell in (label, index, probability)]
    return [p.path, *ranked, *[""] * (9 - len(ranked)), p.error or ""]


def _check_file(path: str | Path, example: str) -> None:
    if Path(path).is_dir():
        raise MnistlabError(f"{path}: is a directory; pass a file like {example}")


def _write_csv(path: str | Path, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A CSV through the csv module (quoting commas, quotes, newlines in names), every text cell
    inert for spreadsheets (`_inert`), written atomically."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([_inert(c) if isinstance(c, str) else c for c in row] for row in rows)
    atomic_write_text(path, out.getvalue())


def _inert(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ (or tab, CR) would start a formula,
    so such a cell gets a leading apostrophe (OWASP's advice on CSV injection)."""
    return f"'{cell}" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def format_predictions(preds: Sequence[ImagePrediction], as_json: bool = False) -> str:
    """Human lines for the predicted images (`path: 7  (7 0.981, 1 0.012, 9 0.003)`; errors are
    the caller's to report), or a JSON list of every result (`ImagePrediction.record`)."""
    if as_json:
        return json.dumps([p.record() for p in preds], indent=2)
    lines = []
    for p in preds:
        if not p.error:
            top = ", ".join(f"{c} {prob:.3f}" for c, prob in p.top3)
            lines.append(f"{p.path}: {p.label}  ({top})")
    return "\n".join(lines)


def predict_command(
    checkpoint: Path,
    images: Sequence[str | Path],
    csv: Path | None = None,
    submission: Path | None = None,
    as_json: bool = False,
    out: Path | None = None,
) -> tuple[str, list[str]]:
    """`mnistlab predict`: (what to print, the error of each image that failed).

    The images are files, folders or glob patterns, or `csv`'s rows; their predictions are
    printed as text or JSON, or written to `out` as a CSV; with `submission`, `csv`'s are written
    as a Kaggle submission instead. A wrong combination is a MnistlabError.
    """
    if bool(images) == (csv is not None):
        raise MnistlabError("predict: pass image files, folders or patterns, or --csv FILE "
                            "(not both, not neither)")
    if submission is not None and csv is None:
        raise MnistlabError("predict: --submission writes --csv's predictions; pass --csv FILE")
    if sum((submission is not None, out is not None, as_json)) > 1:
        raise MnistlabError("predict: --submission, --save and --json are different outputs; "
                            "pass one of them")
    ckpt = load_checkpoint(checkpoint)
    if submission is not None:
        n = predict_csv(ckpt, csv, submission)
        return f"wrote {n} predictions to {submission}", []
    preds = predict_rows(ckpt, csv) if csv is not None else predict_images(ckpt, images)
    errors = [p.error for p in preds if p.error]
    if out is None:
        return format_predictions(preds, as_json), errors
    write_predictions(preds, out)
    failed = f" and {len(errors)} errors" if errors else ""
    return f"wrote {len(preds) - len(errors)} predictions{failed} to {out}", errors
