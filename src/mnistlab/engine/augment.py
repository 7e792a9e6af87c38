"""Augmentation on the device: each training image shifted, rotated and zoomed at random.

A model augments with `RunConfig.translate` (a shift of up to that many whole pixels along each
axis), `rotate` (up to that many degrees either way) and `zoom` (a factor in [1 - zoom,
1 + zoom]), about the image's centre; pixels from outside the image are black (pixel value 0,
normalised as the inputs are) and the rest are sampled bilinearly, so a pure shift moves whole
pixels exactly.

A stream is a seed and its settings: the models of one seed that augment alike share one (and
so the same images, as they share batches). Its draws are a pure function of the seed, the
settings, the epoch, the step within it and the image's place in the batch: one generator per
stream and epoch, seeded from those, draws the epoch's transforms on the host (a few hundred kB),
so a resumed run needs nothing saved and a model's images do not depend on its stack. The
images themselves are transformed on the device, with elementwise operations and gathers only:
each image's pixels come out the same whatever else is in the batch, and the step stays one
CUDA graph (the step's transforms are one of its inputs). With the fused CPU step, one C++ call
(csrc/step.cpp's `affine_images`, AVX2 gathers where the CPU has them) does the ~20 operators'
work in the same roundings, so an image's pixels are the same bits either way
(tests/test_cpu_kernels.py): five streams of 128 images take 0.95 ms a step instead of 2.1 ms,
one stream 0.22 ms instead of 0.54 (2 cores, AMD EPYC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from mnistlab.config import RunConfig
from mnistlab.engine.backends import cpu_kernels_for
from mnistlab.engine.backends.arithmetic import Arithmetic
from mnistlab.engine.seeds import derived_seed
from mnistlab.errors import ConfigError

Settings = tuple[int, float, float]  # translate, rotate, zoom
PARAMS = 6  # per image: the inverse map's matrix a, b, c, d and offset tx, ty


def settings(config: RunConfig) -> Settings | None:
    """A configuration's augmentation, or None where it has none."""
    values = (config.translate, config.rotate, config.zoom)
    return values if any(values) else None


def check_fits(config: RunConfig, shape: tuple[int, ...]) -> None:
    """Refuse a shift that can move an image wholly out of sight (every pixel black): the model
    would train on blanks, to chance, and say nothing."""
    side = min(shape)
    if config.translate >= side:
        raise ConfigError(
            f"run '{config.name}': translate = {config.translate} can shift the "
            f"{'x'.join(map(str, shape))} images out of the picture; use translate < {side} "
            "(a few pixels: 2 or 3 for 28x28 digits)")


def stream_seed(seed: int, values: Settings, epoch: int) -> int:
    """The generator seed of a stream's draws in one epoch."""
    return derived_seed("augment", seed, list(values), epoch)


class Augmenter:
    """Random affine transforms of the images of some streams, one batch at a time.

    `streams` are (seed, settings) pairs; images are (height, width) = `shape`, flattened, and
    `fill` is the input value of a black pixel. `epoch(e)` draws every step's transforms of
    epoch e, `apply` transforms one step's images with one step's draws: in one fused call
    where `arithmetic` has the fused CPU step, else as PyTorch operators.
    """

    def __init__(self, streams: Sequence[tuple[int, Settings]], shape: tuple[int, int],
                 fill: float, steps_per_epoch: int, batch: int, device: torch.device,
                 arithmetic: Arithmetic | None = None):
        self.streams, self.shape, self.fill = list(streams), shape, fill
        self.steps, self.batch, self.device = steps_per_epoch, batch, device
        on_cpu = arithmetic is not None and device.type == "cpu"
        self.kernels = cpu_kernels_for(arithmetic) if on_cpu else None
        height, width = shape
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        # Output pixel coordinates relative to the centre, the inverse map's inputs.
        self.u = (cols.flatten() - (width - 1) / 2).to(torch.float32).to(device)
        self.v = (rows.flatten() - (height - 1) / 2).to(torch.float32).to(device)

    def epoch(self, epoch: int) -> Tensor:
        """(streams, steps, batch, PARAMS) float32 on the device: each image's inverse map for
        every step of `epoch` (0-based)."""
        maps = [self._draw(seed, values, epoch) for seed, values in self.streams]
        return torch.stack(maps).to(self.device)

    def _draw(self, seed: int, values: Settings, epoch: int) -> Tensor:
        """One stream's transforms for one epoch, in float64 on the host, then float32.

        Each image is rotated by θ and zoomed by s about the centre, then shifted by (dx, dy);
        sampling needs the inverse: source = R(-θ) (output - shift) / s, in pixel coordinates
        of the image padded by one fill pixel before it (see `apply`).
        """
        translate, rotate, zoom = values
        generator = torch.Generator().manual_seed(stream_seed(seed, values, epoch))
        u = torch.rand(self.steps, self.batch, 4, generator=generator, dtype=torch.float64)
        dx, dy = (torch.floor(u[..., i] * (2 * translate + 1)).clamp_(max=2 * translate)
                  - translate for i in (0, 1))
        theta = (2 * u[..., 2] - 1) * math.radians(rotate)
        scale = 1 + (2 * u[..., 3] - 1) * zoom
        cos, sin = torch.cos(theta) / scale, torch.sin(theta) / scale
        height, width = self.shape
        tx = (width - 1) / 2 + 1 - (cos * dx + sin * dy)
        ty = (height - 1) / 2 + 1 - (-sin * dx + cos * dy)
        return torch.stack([cos, sin, -sin, cos, tx, ty], -1).to(torch.float32)

    def apply(self, x: Tensor, maps: Tensor) -> Tensor:
        """`x` (streams, B, height × width) transformed by `maps` (streams, ≥ B, PARAMS)."""
        batch, width = x.shape[1], self.shape[1]
        a, b, c, d, tx, ty = maps[:, :batch, :, None].unbind(2)
        # Source coordinates in the padded image (one fill pixel before, two after each axis).
        # The map is affine, so each is a column term plus a row term.
        col_x, row_x = a * self.u[:width], torch.addcmul(tx, b, self.v[::width])
        col_y, row_y = c * self.u[:width], torch.addcmul(ty, d, self.v[::width])
        if self.kernels is not None:
            return self.kernels.affine_images(x, (col_x, row_x), (col_y, row_y), self.shape,
                                              self.fill)
        return self._sample(x, col_x.unsqueeze(2) + row_x[..., None],
                            col_y.unsqueeze(2) + row_y[..., None])

    def _sample(self, x: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
        """Bilinear samples of the padded images at (sx, sy) (streams, B, height, width),
        clamped to where a sample reads fill only."""
        streams, batch, _ = x.shape
        height, width = self.shape
        sx = sx.view(streams, batch, -1).clamp_(0, width + 1)
        sy = sy.view(streams, batch, -1).clamp_(0, height + 1)
        x0, y0 = sx.floor(), sy.floor()
        fx, fy = sx.sub_(x0), sy.sub_(y0)
        stride = width + 3
        at = y0.mul_(stride).add_(x0).to(torch.int64).view(streams * batch, -1)
        image = x.reshape(streams * batch, height, width)
        padded = torch.nn.functional.pad(image, (1, 2, 1, 2), value=self.fill).flatten(1)
        corner = lambda offset: padded[:, offset:].gather(1, at).view(streams, batch, -1)  # noqa: E731
        top = torch.lerp(corner(0), corner(1), fx)
        bottom = torch.lerp(corner(stride), corner(stride + 1), fx)
        return torch.lerp(top, bottom, fy)
