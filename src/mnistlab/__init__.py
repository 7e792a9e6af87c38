"""mnistlab: run, compare and trust small-network experiments on MNIST-format image data."""

__version__ = "0.1.0"
