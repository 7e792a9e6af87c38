"""ONNX export: same logits as PyTorch for any batch size, raw pixels in, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from typer.testing import CliRunner

from mnistlab.cli import app
from mnistlab.config import RunConfig
from mnistlab.data.idx import read_images
from mnistlab.errors import CheckpointError, MnistlabError
from mnistlab.export import TOLERANCE, export_command, export_onnx
from mnistlab.model import Checkpoint, InputSpec, build_mlp
from mnistlab.modules import save_checkpoint

ARCHITECTURES = {
    "baseline": (RunConfig(), InputSpec()),
    # Every layer kind at once, and a normalisation the graph must carry.
    "gelu-layernorm-dropout-standardize": (
        RunConfig(activation="gelu", layernorm=True, dropout=0.4, input_norm="standardize",
                  hidden=(64, 32), dropout_after=(1, 2)),
        InputSpec(mean=0.1307, std=0.3081),
    ),
}


def _checkpoint(name: str, seed: int = 0) -> Checkpoint:
    config, inputs = ARCHITECTURES[name]
    torch.manual_seed(seed)
    return Checkpoint(build_mlp(config).eval(), config, inputs, seed)


def _torch_logits(ckpt: Checkpoint, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return ckpt.model(ckpt.inputs.prepare(images)).numpy()


def _onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixels": images.astype(np.float32)})[0]


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_onnx_matches_pytorch_for_any_batch_size(name: str, tmp_path: Path) -> None:
    ckpt, out = _checkpoint(name), tmp_path / "model.onnx"
    diff = export_onnx(ckpt, out)
    assert 0 <= diff < 1e-4
    onnx.checker.check_model(str(out), full_check=True)
    model = onnx.load(str(out))
    (pixels,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in pixels.type.tensor_type.shape.dim]
    assert pixels.name == "pixels" and isinstance(dims[0], str) and dims[1:] == [28, 28]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert json.loads(metadata["classes"]) == list("0123456789")
    rng = np.random.default_rng(1)
    for n in (1, 7, 300):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        got = _onnx_logits(out, images)
        assert got.shape == (n, 10)
        np.testing.assert_allclose(got, _torch_logits(ckpt, images), atol=1e-4)


def test_onnx_on_real_digits_gives_the_same_classes(mnist_dir: Path, tmp_path: Path) -> None:
    images = read_images(mnist_dir / "t10k-images-idx3-ubyte.gz")[:1000]
    ckpt, out = _checkpoint("gelu-layernorm-dropout-standardize"), tmp_path / "model.onnx"
    export_onnx(ckpt, out, batch=256)
    got, want = _onnx_logits(out, images), _torch_logits(ckpt, images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_export_is_deterministic(tmp_path: Path) -> None:
    for path in (tmp_path / "a.onnx", tmp_path / "b.onnx"):
        export_onnx(_checkpoint("baseline"), path)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no side files


def test_disagreeing_graph_is_refused_and_the_old_file_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "model.onnx"
    out.write_bytes(b"previous export")
    # PyTorch's side of the check normalises differently from the graph: a real mismatch.
    shifted = InputSpec.prepare
    monkeypatch.setattr(InputSpec, "prepare", lambda self, images: shifted(self, images) + 0.5)
    with pytest.raises(MnistlabError, match=f"max abs logit difference .* > {TOLERANCE}"):
        export_onnx(_checkpoint("baseline"), out)
    assert out.read_bytes() == b"previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_export_to_a_directory_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(MnistlabError, match="is a directory"):
        export_onnx(_checkpoint("baseline"), tmp_path)


def test_export_command_and_cli(tmp_path: Path) -> None:
    checkpoint, out = tmp_path / "mlp.safetensors", tmp_path / "onnx" / "model.onnx"
    save_checkpoint(checkpoint, _checkpoint("gelu-layernorm-dropout-standardize", seed=3))
    message = export_command(checkpoint, out)
    assert message.startswith(f"wrote {out}: input 'pixels' float32 N×28×28")
    assert "max abs difference" in message and out.is_file()
    result = CliRunner().invoke(app, ["export", str(checkpoint), "--onnx", str(out)])
    assert result.exit_code == 0 and result.stdout.startswith(f"wrote {out}"), result.output
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    with pytest.raises(CheckpointError):
        export_command(not_a_checkpoint, tmp_path / "x.onnx")
    result = CliRunner().invoke(app, ["export", str(not_a_checkpoint), "--onnx", str(out)])
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {not_a_checkpoint}: ")
