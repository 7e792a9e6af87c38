"""mnistlab: run, compare and trust small-network experiments on MNIST-format image data.

    import mnistlab as ml
    results = ml.study(data="fashion-mnist", seeds=3)
    results.summary, results.winner, results.model()
    ml.study(runs=["lenet5", ml.Model("mine", my_factory, lr=1e-3)], seeds=3)  # any nn.Module

See mnistlab.api for every function.
"""

from mnistlab._version import __version__

__all__ = [
    "Model", "Results", "__version__", "compare", "evaluate", "load_model", "load_run",
    "predict", "render", "study", "sweep", "train",
]


def __getattr__(name: str) -> object:
    """The API on first use (PEP 562): `import mnistlab` and `mnistlab --help` stay fast because
    PyTorch and matplotlib load only when a function is called."""
    if name == "Results":
        from mnistlab.results import Results

        return Results
    if name == "Model":
        from mnistlab.modules import Model

        return Model
    if name in __all__:
        from mnistlab import api

        return getattr(api, name)
    raise AttributeError(f"module 'mnistlab' has no attribute {name!r}")
