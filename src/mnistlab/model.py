"""The MLP as a plain `nn.Sequential`, and its checkpoint: safetensors + config in the metadata.

A checkpoint alone rebuilds the model: the metadata carries the RunConfig, the input shape, the
class names and the input normalisation. Loading never unpickles anything. Callers save and load
checkpoints through mnistlab.modules (any model's), which uses the MLP's format here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from annotated_types import Ge, Le, MinLen
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from mnistlab.config import RunConfig, to_dict
from mnistlab.errors import CheckpointError, ConfigError
from mnistlab.inputs import open_input
from mnistlab.validation import Count, Real, Seed, Text, validate, validated

CHECKPOINT_FORMAT = "mnistlab-mlp/1"
_ACTIVATION = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def build_mlp(config: RunConfig, input_dim: int = 784, n_classes: int = 10) -> nn.Sequential:
    """Linear → act [→ Dropout] [→ LayerNorm] per hidden layer, then a Linear to the logits.

    Dropout comes before the LayerNorm of the same layer, as in the seed study. Dropout modules are
    present whenever `dropout_after` names the layer and p > 0, so layer indices depend only on
    `config.architecture` and p.
    """
    layers: list[nn.Module] = []
    width = input_dim
    for i, size in enumerate(config.hidden, start=1):
        layers += [nn.Linear(width, size), _ACTIVATION[config.activation]()]
        if config.dropout > 0 and i in config.dropout_after:
            layers.append(nn.Dropout(config.dropout))
        if config.layernorm:
            layers.append(nn.LayerNorm(size))
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


@validated
class InputSpec:
    """What a model expects: image shape, class names, and x = (pixels / 255 - mean) / std.

    Checked like a configuration, so a checkpoint's metadata cannot make the inputs NaN or
    infinite (std 0 or 1e-300, a NaN mean) nor the model huge.
    """

    shape: Annotated[tuple[Count, Count], "must be [height, width], two positive integers"] = (
        28, 28)
    classes: Annotated[tuple[Text, ...], MinLen(1), "must be a list of class names"] = tuple(
        str(d) for d in range(10))
    mean: Annotated[Real, Ge(0), Le(1), "must be in [0, 1] (a mean of pixels / 255)"] = 0.0
    std: Annotated[Real, Ge(1e-12), Le(1), "must be in [1e-12, 1] (a std of pixels / 255)"] = 1.0

    def prepare(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W) images → float32 (N, H*W) model input."""
        x = torch.as_tensor(images).reshape(len(images), -1).to(torch.float32)
        return (x / 255.0 - self.mean) / self.std


@dataclass
class Checkpoint:
    model: nn.Sequential
    config: RunConfig
    inputs: InputSpec
    seed: int | None = None
    # How it was trained (mnistlab.engine.Arithmetic.as_dict(): device kind, CPU step,
    # Triton, CUDA graphs, matmul precision, torch version); None in checkpoints made without.
    arithmetic: dict[str, str | bool | None] | None = None
    origin: str = ""  # the file it was loaded from, for messages ("" when made in memory)


def mlp_checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """An MLP checkpoint file's exact bytes, so a remote worker can ship a model without a disk."""
    meta = {
        "format": CHECKPOINT_FORMAT,
        "config": json.dumps(to_dict(ckpt.config)),
        "inputs": json.dumps(to_dict(ckpt.inputs)),
        "seed": json.dumps(ckpt.seed),
        **({"arithmetic": json.dumps(ckpt.arithmetic)} if ckpt.arithmetic is not None else {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in ckpt.model.state_dict().items()}
    return save(tensors, metadata=meta)


def json_field(meta: Mapping[str, str], key: str) -> Any:
    """The JSON value under `key` in a safetensors file's metadata; ValueError when the entry is
    missing or not JSON."""
    if key not in meta:
        raise ValueError(f"no '{key}' entry")
    try:
        return json.loads(meta[key])
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"'{key}' is not JSON ({exc})") from None


@contextlib.contextmanager
def panics_as_errors(path: str | Path, fix: str) -> Iterator[None]:
    """safetensors is Rust: where it panics (an allocation that fails for a large file when
    memory is short, say), pyo3 raises its PanicException, which derives from BaseException
    alone, so no `except Exception` sees it. Here it is one CheckpointError line naming the
    file (matched by name: pyo3 does not export the class)."""
    try:
        yield
    except BaseException as exc:
        if type(exc).__name__ != "PanicException":
            raise
        detail = str(exc).replace("\n", " ")[:200]
        raise CheckpointError(f"{path}: safetensors failed while loading it ({detail}), e.g. "
                              f"for want of memory; free memory and retry, or {fix}") from None


def finite_outputs(ckpt: Checkpoint, probabilities: torch.Tensor) -> torch.Tensor:
    """`probabilities`, once checked to be finite: finite but huge weights overflow to inf
    logits and NaN probabilities, which no answer may be read from."""
    bad = int((~torch.isfinite(probabilities)).any(dim=-1).sum()) if probabilities.numel() else 0
    if bad:
        raise CheckpointError(
            f"{ckpt.origin or 'model'}: the model's outputs are not finite (NaN or inf) for "
            f"{bad} of {len(probabilities)} images: its weights are too large to compute with; "
            "retrain it (a lower learning rate), or pass another checkpoint")
    return probabilities


def read_safetensors(
    path: Path, fmt: str, what: str, fix: str, unreadable: str = "safetensors file"
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file whose metadata says `format = fmt`.

    Never unpickles. Unreadable, truncated or foreign files are one-line CheckpointErrors:
    "not a readable <unreadable>" and "not an mnistlab <what>".
    """
    try:
        with open_input(path, f"a {what} file"):  # a FIFO or device: refused, never waited on
            pass
        with panics_as_errors(path, fix):
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable {unreadable} ({exc}); {fix}") from None
    if meta.get("format") != fmt:
        raise CheckpointError(f"{path}: not an mnistlab {what} (no '{fmt}' metadata); {fix}")
    return tensors, meta


def load_mlp_checkpoint(path: str | Path) -> Checkpoint:
    """Rebuild an MLP from its checkpoint; anything else is a one-line CheckpointError."""
    path = Path(path)
    fix = "pass a .safetensors checkpoint written by mnistlab (runs/<study>/checkpoints/)"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; {fix}")
    tensors, meta = read_safetensors(path, CHECKPOINT_FORMAT, "model checkpoint", fix)
    try:
        config = validate(RunConfig, json_field(meta, "config"), "config")
        inputs = validate(InputSpec, json_field(meta, "inputs"), "inputs")
        seed = validate(Seed | None, json_field(meta, "seed") if "seed" in meta else None, "seed")
        arithmetic = validate(dict[str, str | bool | None] | None,
                              json_field(meta, "arithmetic") if "arithmetic" in meta else None,
                              "arithmetic")
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({exc}); {fix}") from None
    problem = _weights_problem(tensors, config, inputs)
    if problem:
        raise CheckpointError(f"{path}: {problem}; {fix}")
    model = build_mlp(config, inputs.shape[0] * inputs.shape[1], len(inputs.classes))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return Checkpoint(model, config, inputs, seed, arithmetic, origin=str(path))


def file_format(path: Path) -> str | None:
    """The format a safetensors file's metadata names, or None (read_safetensors then says
    what is wrong with the file)."""
    try:
        with open_input(path, "a checkpoint file"), panics_as_errors(path, "pass another file"), \
                safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format")
    except (SafetensorError, OSError, ValueError):
        return None


def _weights_problem(tensors: Mapping[str, torch.Tensor], config: RunConfig,
                     inputs: InputSpec) -> str | None:
    """Why `tensors` cannot be the weights of the model the metadata describes, or None.

    Compared with a model built on the meta device (shapes only, no memory), so metadata that
    claims a huge model is refused before anything of that size is allocated: the tensors
    themselves are no bigger than the file.
    """
    layers = len(config.hidden)
    if len(tensors) != 2 * (layers + 1) + 2 * layers * config.layernorm:  # checked first: cheap
        return f"weights do not match the stored architecture ({len(tensors)} tensors)"
    try:
        with torch.device("meta"):
            expected = build_mlp(config, inputs.shape[0] * inputs.shape[1], len(inputs.classes))
    except RuntimeError:  # sizes whose product overflows: no file holds such weights
        return "weights do not match the stored architecture (too large to exist)"
    shapes = {k: tuple(v.shape) for k, v in expected.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if found != shapes:
        wrong = sorted(set(found.items()) ^ set(shapes.items()))[:2]
        return f"weights do not match the stored architecture ({wrong} differ)"
    bad = [k for k, v in tensors.items() if not v.is_floating_point() or not v.isfinite().all()]
    if bad:
        return f"weights {', '.join(bad[:3])} are not finite floating-point numbers"
    return None


# --- the stacked form the engine trains ---------------------------------------------------------
# Parameters of N models of one layer shape (config.architecture) as tensors with a leading model
# dimension, named by position among their kind (linear0, norm0, linear1, ...), so a model with
# Dropout modules and one without map to the same names. Linear weights are stored transposed,
# (N, in, out), which is the layout torch.baddbmm multiplies by; vectors are (N, 1, size) so they
# broadcast over a batch. Models may differ in LayerNorm: see stack_models.


def _named_layers(model: nn.Sequential) -> Iterator[tuple[str, nn.Linear | nn.LayerNorm]]:
    counts = {"linear": 0, "norm": 0}
    for module in model:
        kind = {nn.Linear: "linear", nn.LayerNorm: "norm"}.get(type(module))
        if kind:
            yield f"{kind}{counts[kind]}", module
            counts[kind] += 1


def _member_views(model: nn.Sequential) -> dict[str, torch.Tensor]:
    """One model's parameters as views in the stacked member layout (writes go through)."""
    views = {}
    for name, module in _named_layers(model):
        weight = module.weight.detach()
        views[f"{name}.weight"] = weight.T if isinstance(module, nn.Linear) else weight[None]
        views[f"{name}.bias"] = module.bias.detach()[None]
    return views


def stack_models(models: Sequence[nn.Sequential]) -> dict[str, torch.Tensor]:
    """Plain models of one layer shape → stacked tensors (exact copies).

    Where some models have LayerNorm and others not, a model without gets the identity LayerNorm
    parameters (weight 1, bias 0) under the norm names, so every key has all N rows; its own
    forward never uses them and `unstack_model` leaves them out.
    """
    views = [_member_views(m) for m in models]
    shapes = {key: v.shape for view in views for key, v in view.items()}

    def row(view: dict[str, torch.Tensor], key: str) -> torch.Tensor:
        if key in view or not key.startswith("norm"):
            return view[key]
        return (torch.ones if key.endswith(".weight") else torch.zeros)(shapes[key])

    return {key: torch.stack([row(v, key) for v in views]).contiguous() for key in shapes}


def unstack_model(
    stacked: Mapping[str, torch.Tensor], k: int, config: RunConfig,
    input_dim: int = 784, n_classes: int = 10,
) -> nn.Sequential:
    """Model k of a stack as the plain `build_mlp(config)` model (exact copy, eval mode)."""
    model = build_mlp(config, input_dim, n_classes)
    with torch.no_grad():
        for key, view in _member_views(model).items():
            view.copy_(stacked[key][k])
    return model.eval()
