"""Comparing runs across devices: bit for bit on the CPU, to float32 rounding on CUDA."""

from __future__ import annotations

import torch
from torch import Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def assert_same(a, b) -> None:
    """Two TrainResults with the same rows, test metrics, divergence and weights, bit for bit."""
    assert a.rows == b.rows and a.test == b.test and a.diverged == b.diverged
    for key, value in a.weights.items():
        assert torch.equal(value, b.weights[key]), key


def assert_rows_agree(a: list[dict], b: list[dict]) -> None:
    """Bit for bit on the CPU; to float32 rounding on CUDA (see test_cuda)."""
    if DEVICE.type == "cpu":
        assert a == b
        return
    assert [{**r, "loss": 0, "accuracy": 0} for r in a] == [{**r, "loss": 0, "accuracy": 0}
                                                            for r in b]
    for key in ("loss", "accuracy"):
        torch.testing.assert_close(torch.tensor([r[key] for r in a]),
                                   torch.tensor([r[key] for r in b]), atol=0.005, rtol=1e-3)


def assert_mostly_close(ours: Tensor, ref: Tensor, max_move: float) -> None:
    """All but a few coordinates within float32 tolerance, and none beyond `max_move`.

    Adam divides by sqrt(v) + eps: where v is below eps² any rounding difference flips the
    step's sign, so a handful of coordinates legitimately differ by up to lr per step; a wrong
    update rule moves most of them.
    """
    close = torch.isclose(ours, ref, atol=1e-5, rtol=1e-4)
    assert close.float().mean().item() > 0.999
    assert (ours - ref).abs().max().item() <= max_move


def assert_backends_agree(result, reference) -> None:
    """Two backends' runs of one recipe stack (without dropout, whose streams differ): the same
    records to float32 drift, weights as `assert_mostly_close` says, the same stops and restores."""
    assert [{**r, "loss": 0, "accuracy": 0} for r in result.rows] == [
        {**r, "loss": 0, "accuracy": 0} for r in reference.rows]
    for key in ("loss", "accuracy"):
        torch.testing.assert_close(torch.tensor([r[key] for r in result.rows]),
                                   torch.tensor([r[key] for r in reference.rows]),
                                   atol=0.01, rtol=1e-3)
    for k, member in enumerate(result.members):
        for name, value in reference.weights.items():
            assert_mostly_close(result.weights[name][k], value[k], 20 * member.config.lr)
    assert (result.stopped, result.restored) == (reference.stopped, reference.restored)
