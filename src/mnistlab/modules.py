"""Networks other than the MLP, as models: LeNet-5, factories users name, and checkpoints.

A model other than the MLP is what its factory returns (`RunConfig.model`: "lenet5", or a
factory's import path "package.module:function"), built for the data's image shape and classes.
Its checkpoint holds the module's state dict (safetensors) and, in the metadata, its
configuration, the factory's path, the input spec, the seed and the arithmetic; loading imports
the factory and never unpickles. `checkpoint_bytes`, `save_checkpoint` and `load_checkpoint`
here take any model's checkpoint, the MLP's (mnistlab.model's format) too: every caller that
saves or loads a checkpoint goes through them. mnistlab.engine trains these models as stacks.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import Tensor, nn

from mnistlab import model as mlp
from mnistlab.atomic import atomic_write_bytes
from mnistlab.config import RunConfig, to_dict
from mnistlab.errors import CheckpointError, ConfigError
from mnistlab.model import Checkpoint, InputSpec, json_field, read_safetensors
from mnistlab.validation import Seed, validate

CHECKPOINT_FORMAT = "mnistlab-module/1"
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


# --- models -------------------------------------------------------------------------------------


def lenet5(shape: tuple[int, int] = (28, 28), classes: int = 10) -> nn.Sequential:
    """LeNet-5 as it is trained today: 2 convolutions with max-pooling, 3 dense layers, ReLU.

    How it differs from LeCun et al. (1998): ReLU in place of the scaled tanh; max-pooling in
    place of the trainable subsampling (average × coefficient + bias, then a sigmoid); C3 sees
    all six S2 maps (the paper's connection table gave each map a subset); softmax and
    cross-entropy in place of the Euclidean RBF output units; and the 28×28 input is padded by
    2 pixels inside the first convolution in place of the paper's 32×32 images.
    """
    height, width = shape
    side = lambda n: (n // 2 - 4) // 2  # noqa: E731  (conv 5 padded: n; pool: n/2; conv 5: -4; pool)
    if min(side(height), side(width)) < 1:
        raise ConfigError(f"lenet5: images of {height}×{width} are too small (it needs at "
                          "least 12×12); use another model for them")
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * side(height) * side(width), 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(), nn.Linear(84, classes),
    )


# Built-in models: (import path, builder given the input shape and the number of classes).
BUILT_IN: dict[str, tuple[str, Callable[[tuple[int, int], int], nn.Module]]] = {
    "lenet5": ("mnistlab.modules:lenet5", lenet5),
}
_FACTORIES: dict[str, Callable[[], nn.Module]] = {}  # factories handed to Model(), by path


def factory_path(factory: Callable[[], nn.Module] | str) -> str:
    """The `module:function` path that finds `factory` again (a checkpoint stores it).

    A lambda, a function defined inside another one or a callable without a name cannot be
    found again from a checkpoint: refused. A function of a script or notebook (`__main__`)
    is remembered for this process, so it trains; its checkpoints load where the same name is
    defined in `__main__` again.
    """
    if isinstance(factory, str):
        return validate(RunConfig, {"model": factory}, "model").model
    module = getattr(factory, "__module__", None)
    name = getattr(factory, "__qualname__", None)
    if not callable(factory) or not module or not name or "<" in name:
        raise ConfigError(
            f"model factory {_named(factory)}: a lambda, a local function or a callable "
            "without a name cannot be found again to load its checkpoints; define it at the "
            "top level of an importable module and pass it (or its path 'module:function')")
    path = f"{module}:{name}"
    _FACTORIES[path] = factory
    return path


def _named(factory: object) -> str:
    return getattr(factory, "__qualname__", None) or type(factory).__name__


def Model(name: str, factory: Callable[[], nn.Module] | str, **fields: Any) -> RunConfig:
    """A run of any small network: `factory()` returns a fresh torch.nn.Module taking images
    (B, 1, H, W) to logits (B, classes); `fields` are RunConfig's optimiser and recipe fields
    (lr, betas, lr_schedule, label_smoothing, ...). Pass it among a study's runs:
    `ml.study(runs=[ml.Model("mine", small_cnn, lr=1e-3), "lenet5"])`."""
    return RunConfig(name=name, model=factory_path(factory), **fields)


def resolve(model: str) -> Callable[[tuple[int, int], int], nn.Module]:
    """A builder (shape, classes) → fresh module for `RunConfig.model` (not "mlp"): a built-in
    model, a factory handed to `Model` in this process, or one imported by its path."""
    if model in BUILT_IN:
        return BUILT_IN[model][1]
    factory = _FACTORIES.get(model) or _imported(model)
    return lambda shape, classes: factory()


def _imported(path: str) -> Callable[[], nn.Module]:
    module_name, _, name = path.partition(":")
    fix = ("put its package on the Python path (PYTHONPATH, or install it), or name an "
           "importable 'module:function'")
    try:
        found: Any = importlib.import_module(module_name)
        for part in name.split("."):
            found = getattr(found, part)
    except Exception as exc:  # the user's module may raise anything while it is imported
        raise ConfigError(f"model '{path}': cannot import it ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0] if str(exc) else ''}); {fix}") from None
    if not callable(found):
        raise ConfigError(f"model '{path}': {name} is not callable; name a function that "
                          "returns a torch.nn.Module")
    return found


def build(model: str, inputs: InputSpec) -> nn.Module:
    """A fresh module of `model` for images of `inputs.shape` and its classes (drawing its
    initial weights from torch's global generator)."""
    module = resolve(model)(tuple(inputs.shape), len(inputs.classes))
    if not isinstance(module, nn.Module):
        raise ConfigError(f"model '{model}': its factory returned {type(module).__name__}, not "
                          "a torch.nn.Module; return a fresh module from it")
    return module


@dataclass(frozen=True)
class Probe:
    """What one forward pass of a model says about it."""

    dropouts: dict[str, tuple[float, tuple[int, ...]]]  # name -> p, per-image mask shape
    activations: int  # floats of every module's output per image (for memory and eval blocks)
    params: int  # parameter and buffer floats


def probe(module: nn.Module, model: str, inputs: InputSpec) -> Probe:
    """Run `module` on two blank images: its logits must be (2, classes); note each Dropout's
    input shape and how many floats its layers produce per image."""
    shapes: dict[str, tuple[int, ...]] = {}
    floats = [0]
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.dropout._DropoutNd) and not isinstance(layer, _DROPOUTS):
            raise ConfigError(f"model '{model}': {type(layer).__name__} at '{name}' is not "
                              "supported; use nn.Dropout (or Dropout1d/2d/3d)")

        def seen(layer: nn.Module, args: tuple, out: Any, name: str = name) -> None:
            if isinstance(layer, _DROPOUTS):
                shapes[name] = tuple(args[0].shape[1:])
            if isinstance(out, Tensor) and not list(layer.children()):
                floats[0] += out[0].numel()

        hooks.append(layer.register_forward_hook(seen))
    height, width = inputs.shape
    try:
        with torch.no_grad():
            logits = module.eval()(torch.zeros(2, 1, height, width))
    except Exception as exc:  # the user's forward pass may raise anything
        problem = f"{type(exc).__name__}: {exc}".replace("\n", " ")
        raise ConfigError(f"model '{model}': its forward pass fails on a batch of (2, 1, "
                          f"{height}, {width}) images ({problem}); make it take images of "
                          "that shape") from None
    finally:
        for hook in hooks:
            hook.remove()
    classes = len(inputs.classes)
    if not isinstance(logits, Tensor) or tuple(logits.shape) != (2, classes):
        got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ConfigError(f"model '{model}': returns {got} for 2 images; it must return "
                          f"logits of shape (batch, {classes}) for this data's {classes} classes")
    dropouts = {}
    for name, layer in module.named_modules():
        if isinstance(layer, _DROPOUTS) and layer.p > 0:
            per_image = shapes[name]
            if not isinstance(layer, nn.Dropout):  # a whole channel at a time
                per_image = per_image[:1] + (1,) * (len(per_image) - 1)
            dropouts[name] = (float(layer.p), per_image)
    size = sum(t.numel() for t in (*module.parameters(), *module.buffers()))
    return Probe(dropouts, floats[0], size)


def on_images(net: nn.Module, shape: tuple[int, int]) -> nn.Sequential:
    """`net` taking flat rows of pixels, as an MLP checkpoint's model does, so evaluation,
    prediction and ONNX export treat every model alike."""
    return nn.Sequential(nn.Unflatten(1, (1, *shape)), net).eval()


# --- checkpoints --------------------------------------------------------------------------------


def _module_bytes(ckpt: Checkpoint) -> bytes:
    """A module checkpoint's bytes: the module's state dict (safetensors), and in the metadata
    its configuration (`model` names the built-in or the factory's path), the factory's
    import path, the input spec, the seed and the arithmetic."""
    net = ckpt.model[1]
    path = BUILT_IN[ckpt.config.model][0] if ckpt.config.model in BUILT_IN else ckpt.config.model
    meta = {
        "format": CHECKPOINT_FORMAT, "factory": path,
        "config": json.dumps(to_dict(ckpt.config)), "inputs": json.dumps(to_dict(ckpt.inputs)),
        "seed": json.dumps(ckpt.seed),
        **({"arithmetic": json.dumps(ckpt.arithmetic)} if ckpt.arithmetic is not None else {}),
    }
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save(tensors, metadata=meta)


def _load_module(path: Path) -> Checkpoint:
    """A module checkpoint's model, rebuilt by its factory (imported by its path; nothing is
    unpickled); anything unusable is a one-line CheckpointError."""
    fix = "pass a .safetensors checkpoint written by mnistlab (runs/<study>/checkpoints/)"
    tensors, meta = read_safetensors(path, CHECKPOINT_FORMAT, "model checkpoint", fix)
    try:
        config = validate(RunConfig, json_field(meta, "config"), "config")
        inputs = validate(InputSpec, json_field(meta, "inputs"), "inputs")
        seed = validate(Seed | None, json_field(meta, "seed"), "seed")
        arithmetic = validate(dict[str, str | bool | None] | None,
                              json_field(meta, "arithmetic") if "arithmetic" in meta else None,
                              "arithmetic")
        if config.model == "mlp":
            raise ValueError("an MLP's configuration in a module checkpoint")
    except (ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint metadata ({exc}); {fix}") from None
    try:
        net = build(config.model, inputs)
    except ConfigError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in net.state_dict().items()}
    found = {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items()}
    if found != expected:
        wrong = sorted(set(found.items()) ^ set(expected.items()), key=str)[:2]
        raise CheckpointError(f"{path}: weights do not match the model {config.model} builds "
                              f"({wrong} differ); {fix}")
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(f"{path}: weights {', '.join(bad[:3])} are not finite; {fix}")
    net.load_state_dict(tensors, strict=True)
    return Checkpoint(on_images(net, inputs.shape), config, inputs, seed, arithmetic,
                      origin=str(path))


# --- any model's checkpoint ---------------------------------------------------------------------


def checkpoint_bytes(ckpt: Checkpoint) -> bytes:
    """The checkpoint file's exact bytes, in the MLP's format or a module's (so a remote worker
    can ship a model without a disk)."""
    return mlp.mlp_checkpoint_bytes(ckpt) if ckpt.config.model == "mlp" else _module_bytes(ckpt)


def save_checkpoint(path: str | Path, ckpt: Checkpoint) -> None:
    """Write atomically (temp + rename) so a crash never leaves a half-written checkpoint."""
    atomic_write_bytes(path, checkpoint_bytes(ckpt))


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Any mnistlab checkpoint's model, by the format its metadata names; anything else is a
    one-line CheckpointError."""
    path = Path(path)
    if path.is_file() and mlp.file_format(path) == CHECKPOINT_FORMAT:
        return _load_module(path)
    return mlp.load_mlp_checkpoint(path)
