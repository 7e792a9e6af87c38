"""ONNX export of a checkpoint, verified against PyTorch before it is written.

The graph takes raw pixels and embeds the checkpoint's input normalisation, so a user of the .onnx
file needs nothing from mnistlab: feed images as they come, read the logits.

Exporter: torch.onnx's default torch.export-based ("dynamo") exporter with the weights embedded.
The legacy TorchScript exporter is faster (0.1 s against ~3 s) but deprecated and announced for
removal; the dynamo exporter is the maintained path, produces byte-identical files from the same
checkpoint, and its onnxscript dependency is already in the `onnx` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from mnistlab.atomic import atomic_path
from mnistlab.errors import MnistlabError
from mnistlab.model import Checkpoint
from mnistlab.modules import load_checkpoint

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

TOLERANCE = 1e-3  # max abs logit difference: float32 reordering stays ~1e-6, a bug is far above
INPUT, OUTPUT = "pixels", "logits"


class _RawPixels(nn.Module):
    """(N, H, W) pixels 0..255 → logits: the checkpoint's normalisation, then its MLP."""

    def __init__(self, ckpt: Checkpoint):
        super().__init__()
        self.model, self.mean, self.std = ckpt.model, ckpt.inputs.mean, ckpt.inputs.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model((pixels.flatten(1) / 255.0 - self.mean) / self.std)


def export_onnx(ckpt: Checkpoint, out: Path, *, batch: int = 64) -> float:
    """Write `ckpt` as ONNX at `out` (atomically); return the verified max abs logit difference.

    Input contract: "pixels", float32 (N, H, W) with N dynamic and (H, W) = ckpt.inputs.shape
    (28×28 for MNIST), raw grey levels 0..255 with 0 = background, as in the MNIST files (white ink
    on black; use mnistlab.inference.preprocess_image for photos). Output: "logits", float32
    (N, classes); softmax gives probabilities. The class names are in the model's metadata
    ("classes", a JSON list).

    Before `out` is replaced, onnx.checker validates the file and onnxruntime must agree with
    PyTorch (model + ckpt.inputs.prepare) on seeded batches of 1 and `batch` images within
    TOLERANCE; otherwise a MnistlabError and `out` is left untouched.
    """
    try:
        import onnx
        import onnxruntime
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise MnistlabError(
            f"ONNX export needs the package '{exc.name}'; pip install 'mnistlab[onnx]'"
        ) from None
    if Path(out).is_dir():
        raise MnistlabError(f"{out}: is a directory; pass a file name such as model.onnx")
    height, width = ckpt.inputs.shape
    example = torch.zeros(2, height, width)  # 2, not 1: a size-1 example gets specialised
    wrapper = _RawPixels(ckpt).eval()
    with atomic_path(out) as tmp, _quiet_exporter():
        torch.onnx.export(
            wrapper, (example,), str(tmp), input_names=[INPUT], output_names=[OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, external_data=False,
            verbose=False,
        )
        graph = onnx.load(str(tmp))
        onnx.helper.set_model_props(graph, {"classes": json.dumps(list(ckpt.inputs.classes))})
        onnx.save(graph, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        diff = max(_max_difference(session, ckpt, n) for n in (1, batch))
        if not diff <= TOLERANCE:
            raise MnistlabError(
                f"{out}: the exported graph disagrees with PyTorch (max abs logit difference "
                f"{diff:.3g} > {TOLERANCE}); nothing was written, report this as a bug"
            )
    return diff


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's notes meant for torch developers (e.g. torchvision missing)."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        logger.setLevel(level)


def _max_difference(session: InferenceSession, ckpt: Checkpoint, n: int) -> float:
    """Max abs logit difference, onnxruntime vs PyTorch, on n seeded digit-like images."""
    rng = np.random.default_rng(n)
    # Mostly background with bright strokes, like MNIST, so the numbers cover the real range.
    shape = (n, *ckpt.inputs.shape)
    images = np.where(rng.random(shape) < 0.2, rng.integers(0, 256, shape), 0).astype(np.uint8)
    got = session.run([OUTPUT], {INPUT: images.astype(np.float32)})[0]
    with torch.no_grad():
        want = ckpt.model(ckpt.inputs.prepare(images)).numpy()
    if got.shape != want.shape:
        return float("inf")
    return float(np.abs(got - want).max())


def export_command(checkpoint: Path, onnx: Path) -> str:
    """`mnistlab export CHECKPOINT --onnx FILE`: export, verify, and say what was written."""
    ckpt = load_checkpoint(checkpoint)
    diff = export_onnx(ckpt, onnx)
    height, width = ckpt.inputs.shape
    return (
        f"wrote {onnx}: input '{INPUT}' float32 N×{height}×{width} raw pixels 0..255, output "
        f"'{OUTPUT}' N×{len(ckpt.inputs.classes)}; onnxruntime matches PyTorch "
        f"(max abs difference {diff:.2g})"
    )
