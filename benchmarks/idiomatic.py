"""The seed study's one run, written the usual PyTorch way: the yardstick for whole-process timing.

What `mnistlab train --preset baseline --data fashion-mnist` does, as a student script does it:
read the IDX files, a seeded 80/20 split, DataLoader batches of 128, nn.Sequential, Adam,
cross-entropy on the logits, 10 epochs, train and validation metrics every 75 iterations, a log
line every 250, the test set once at the end, and the loss and accuracy curves saved as PNGs.

    mnistlab train --preset baseline --data fashion-mnist -q --out /tmp/runs   # against:
    python benchmarks/idiomatic.py                  # paired, alternating whole-process timings

The seed study's other presets, as the student wrote them (LayerNorm after each hidden layer,
Dropout after the second hidden layer's ReLU and before its LayerNorm), by name:

    python benchmarks/idiomatic.py OUT lr1e-3-p0.2

Five such processes, one per preset, are the yardstick for `mnistlab study --seeds 1`.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

FASHION = Path("/usr/share/datasets/fashion-mnist")
# The seed study's presets: learning rate, LayerNorm, dropout p (mnistlab.config.PRESETS).
PRESETS = {"baseline": (0.01, False, 0.0), "layernorm-dropout": (0.01, True, 0.5),
           "lr1e-3-p0.2": (0.001, True, 0.2), "lr5e-4-p0.4": (0.0005, True, 0.4),
           "lr1e-4-p0.6": (0.0001, True, 0.6)}


def read_idx(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(images) as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 784)
    with gzip.open(labels) as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    return x, y


def network(layernorm: bool, p: float) -> nn.Sequential:
    if not layernorm:
        return nn.Sequential(nn.Linear(784, 150), nn.ReLU(), nn.Linear(150, 150), nn.ReLU(),
                             nn.Linear(150, 10))
    return nn.Sequential(nn.Linear(784, 150), nn.ReLU(), nn.LayerNorm(150),
                         nn.Linear(150, 150), nn.ReLU(), nn.Dropout(p), nn.LayerNorm(150),
                         nn.Linear(150, 10))


def main(out: Path, preset: str = "baseline") -> None:
    lr, layernorm, p = PRESETS[preset]
    torch.manual_seed(0)
    x, y = read_idx(FASHION / "train-images-idx3-ubyte.gz", FASHION / "train-labels-idx1-ubyte.gz")
    tx, ty = read_idx(FASHION / "t10k-images-idx3-ubyte.gz", FASHION / "t10k-labels-idx1-ubyte.gz")
    assert not np.isnan(x).any()  # the null check
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    tensors = lambda a, b: TensorDataset(torch.tensor(a, dtype=torch.float32) / 255,  # noqa: E731
                                         torch.tensor(b, dtype=torch.int64))
    train = DataLoader(tensors(x[order[:cut]], y[order[:cut]]), batch_size=128, shuffle=True)
    val = DataLoader(tensors(x[order[cut:]], y[order[cut:]]), batch_size=1000)
    test = DataLoader(tensors(tx, ty), batch_size=1000)
    model = network(layernorm, p)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    history: dict[str, list[float]] = {k: [] for k in ("loss", "acc", "val_loss", "val_acc")}
    step, running, correct, seen = 0, 0.0, 0, 0
    for epoch in range(10):
        for xb, yb in train:
            model.train()
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            running += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
            step += 1
            if step % 75 == 0:
                val_loss, val_acc = evaluate(model, val, loss_fn)
                for key, value in zip(history, (running / seen, correct / seen, val_loss,
                                                val_acc), strict=True):
                    history[key].append(value)
                running, correct, seen = 0.0, 0, 0
            if step % 250 == 0:
                print(f"epoch {epoch + 1} step {step}: loss {history['loss'][-1]:.4f} "
                      f"val_acc {history['val_acc'][-1]:.4f}")
    test_loss, test_acc = evaluate(model, test, loss_fn)
    print(f"test loss {test_loss:.4f} accuracy {test_acc:.4f}")
    out.mkdir(parents=True, exist_ok=True)
    steps = [75 * (i + 1) for i in range(len(history["loss"]))]
    for kind in ("loss", "acc"):
        fig, ax = plt.subplots()
        ax.plot(steps, history[kind], label="train")
        ax.plot(steps, history[f"val_{kind}"], label="validation")
        ax.set_xlabel("iteration")
        ax.legend()
        fig.savefig(out / f"{kind}.png")
        plt.close(fig)
    torch.save(model.state_dict(), out / "model.pt")


def evaluate(model: nn.Module, loader: DataLoader, loss_fn: nn.Module) -> tuple[float, float]:
    model.eval()
    total, correct, n = 0.0, 0, 0
    with torch.no_grad():
        for xb, yb in loader:
            logits = model(xb)
            total += loss_fn(logits, yb).item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            n += len(yb)
    return total / n, correct / n


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/idiomatic"),
         sys.argv[2] if len(sys.argv) > 2 else "baseline")
