"""Use a trained model: digits in image files, Kaggle test CSVs, one command for the CLI.

Photos and scans of digits look nothing like MNIST until they are prepared the way MNIST was made
(LeCun et al.): light ink on a dark background, the digit scaled to fit a 20×20 box keeping its
aspect ratio, pasted into 28×28 with its centre of mass at the centre. `preprocess_image` does
exactly that, so a model trained on MNIST sees the same kind of input it learned from.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from mnistlab.atomic import atomic_write_text
from mnistlab.data.csv import read_csv
from mnistlab.errors import DataError, MnistlabError
from mnistlab.model import Checkpoint, load_checkpoint

DIGIT_BOX = 20 / 28  # MNIST fits each digit into 20×20 of the 28×28 field
MIN_CONTRAST = 32.0  # ink must differ from the background by this much (0..255) to count
NOISE = 0.15  # after stretching the ink to 0..1, fainter pixels do not extend the bounding box
BATCH = 4096  # rows per forward pass in CSV inference: bounded memory for any file size


@dataclass(frozen=True)
class ImagePrediction:
    """One file's result: the predicted class and the top-3 (class, probability), or an error."""

    path: str
    label: str | None = None
    top3: tuple[tuple[str, float], ...] = ()
    error: str | None = None


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
    ink = _ink(gray)
    rows, cols = np.flatnonzero((ink > NOISE).any(1)), np.flatnonzero((ink > NOISE).any(0))
    digit = _fit(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], shape)
    return _centre(digit, shape)


def _from_array(array: np.ndarray) -> Image.Image:
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.dtype != np.uint8 or array.shape[2:] not in ((), (3,), (4,)) or array.ndim < 2:
        raise MnistlabError(
            "image array must be uint8 (H, W), (H, W, 3) or (H, W, 4), "
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
    return torch.cat(parts)


def _load_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            upright = ImageOps.exif_transpose(img)  # phone photos store rotation in EXIF
            return preprocess_image(upright, shape)
    except FileNotFoundError:
        raise MnistlabError(f"{path}: no such file; check the path") from None
    except UnidentifiedImageError:
        raise MnistlabError(f"{path}: not an image file; pass a PNG, JPEG or BMP") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        detail = str(exc).replace("\n", " ")
        raise MnistlabError(f"{path}: unreadable image ({detail}); re-save it as PNG") from None
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


def predict_images(
    ckpt: Checkpoint, images: Sequence[str | Path | Image.Image | np.ndarray]
) -> list[ImagePrediction]:
    """Predict every readable image; a file that fails gets its one-line error, the rest go on.

    A result's `path` is the file's path, or `[i]` for an in-memory image.
    """
    results: dict[int, ImagePrediction] = {}
    good: list[tuple[int, np.ndarray]] = []
    names = [str(x) if isinstance(x, str | Path) else f"[{i}]" for i, x in enumerate(images)]
    for i, item in enumerate(images):
        try:
            good.append((i, _prepared(item, ckpt.inputs.shape)))
        except MnistlabError as exc:
            results[i] = ImagePrediction(names[i], error=str(exc))
    if good:
        probs = _probabilities(ckpt, np.stack([image for _, image in good]))
        top = torch.topk(probs, k=min(3, probs.shape[1]), dim=1)
        classes = ckpt.inputs.classes
        ranked = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        for (i, _), (index, values) in zip(good, ranked, strict=True):
            top3 = tuple((classes[c], round(p, 6)) for c, p in zip(index, values, strict=True))
            results[i] = ImagePrediction(names[i], top3[0][0], top3)
    return [results[i] for i in range(len(images))]


def predict_csv(ckpt: Checkpoint, csv_path: str | Path, submission_path: str | Path) -> int:
    """Kaggle Digit Recognizer submission (`ImageId,Label`, ImageId from 1, input order).

    Reads any CSV layout the data layer reads (with or without a label column); writes atomically;
    returns the number of rows.
    """
    if Path(submission_path).is_dir():
        raise MnistlabError(f"{submission_path}: is a directory; pass a file like submission.csv")
    images = read_csv(csv_path, ckpt.inputs.classes).images
    if images.shape[1:] != ckpt.inputs.shape:
        raise DataError(
            csv_path,
            f"images are {images.shape[1]}×{images.shape[2]} but the model expects "
            f"{ckpt.inputs.shape[0]}×{ckpt.inputs.shape[1]}",
            "pass a CSV of the size the model was trained on",
        )
    labels = _probabilities(ckpt, images).argmax(dim=1).tolist()
    classes = [_inert(name) for name in ckpt.inputs.classes]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["ImageId", "Label"])
    writer.writerows((i, classes[c]) for i, c in enumerate(labels, start=1))
    atomic_write_text(submission_path, out.getvalue())
    return len(labels)


def _inert(cell: str) -> str:
    """A cell a spreadsheet shows as text: a leading = + - @ (or tab, CR) would start a formula,
    so such a cell gets a leading apostrophe (OWASP's advice on CSV injection)."""
    return f"'{cell}" if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def format_predictions(preds: Sequence[ImagePrediction], as_json: bool = False) -> str:
    """Human lines (`path: 7  (7 0.981, 1 0.012, 9 0.003)`) or a JSON list for machines."""
    if as_json:
        return json.dumps([asdict(p) for p in preds], indent=2)
    lines = []
    for p in preds:
        if p.error:
            lines.append(f"error: {p.error}")
        else:
            top = ", ".join(f"{c} {prob:.3f}" for c, prob in p.top3)
            lines.append(f"{p.path}: {p.label}  ({top})")
    return "\n".join(lines)


def predict_command(
    checkpoint: Path,
    images: list[Path],
    csv: Path | None = None,
    submission: Path | None = None,
    as_json: bool = False,
) -> tuple[str, int]:
    """`mnistlab predict`: (text to print, exit code); 1 when any image failed.

    Either images or `--csv` with `--submission`; anything else is a MnistlabError (exit 2).
    """
    if bool(images) == (csv is not None):
        raise MnistlabError("predict: pass image files or --csv FILE (not both, not neither)")
    if (csv is None) != (submission is None):
        raise MnistlabError("predict: --csv and --submission go together; pass both")
    ckpt = load_checkpoint(checkpoint)
    if csv is not None:
        n = predict_csv(ckpt, csv, submission)
        return f"wrote {n} predictions to {submission}", 0
    preds = predict_images(ckpt, images)
    return format_predictions(preds, as_json), int(any(p.error for p in preds))
