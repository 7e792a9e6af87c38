"""The stacked form of plain models: exact both ways, whatever the dropout placement."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mnistlab.config import PRESETS, RunConfig
from mnistlab.model import build_mlp, stack_models, unstack_model

CONFIGS = [
    PRESETS["baseline"],
    PRESETS["lr1e-3-p0.2"],
    RunConfig(hidden=(64, 32, 16), activation="gelu", layernorm=True, dropout=0.3,
              dropout_after=(1, 3)),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["baseline", "layernorm-dropout", "deep-gelu"])
def test_stack_and_unstack_are_exact_inverses(config):
    models = []
    for seed in (0, 1, 2):
        torch.manual_seed(seed)
        models.append(build_mlp(config))
    stacked = stack_models(models)
    depth = len(config.hidden)
    assert stacked["linear0.weight"].shape == (3, 784, config.hidden[0])
    assert stacked[f"linear{depth}.bias"].shape == (3, 1, 10)
    assert ("norm0.weight" in stacked) == config.layernorm
    for k, model in enumerate(models):
        back = unstack_model(stacked, k, config)
        assert not back.training
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key


def test_models_with_and_without_dropout_share_names():
    """p = 0 has no Dropout module, which shifts Sequential indices; stacked names do not move."""
    with_p, without = PRESETS["lr1e-3-p0.2"], RunConfig(name="p0", layernorm=True)
    torch.manual_seed(0)
    a = build_mlp(with_p)
    torch.manual_seed(0)
    b = build_mlp(without)
    assert list(a.state_dict()) != list(b.state_dict())
    stacked = stack_models([a, b])
    x = torch.rand(4, 784)
    torch.testing.assert_close(unstack_model(stacked, 1, without)(x), a.eval()(x))


def test_unstacked_model_computes_the_stacked_forward():
    torch.manual_seed(3)
    model = build_mlp(PRESETS["baseline"]).eval()
    stacked = stack_models([model])
    x = torch.rand(6, 784)
    h = torch.relu(torch.baddbmm(stacked["linear0.bias"], x[None], stacked["linear0.weight"]))
    h = torch.relu(torch.baddbmm(stacked["linear1.bias"], h, stacked["linear1.weight"]))
    logits = torch.baddbmm(stacked["linear2.bias"], h, stacked["linear2.weight"])
    torch.testing.assert_close(logits[0], model(x), atol=1e-6, rtol=1e-5)


def test_models_with_and_without_layernorm_stack_and_unstack_exactly():
    """A model without LayerNorm gets identity norm rows in the stack and none when unstacked."""
    configs = [PRESETS["baseline"], PRESETS["lr1e-3-p0.2"], PRESETS["baseline"]]
    models = []
    for seed, config in enumerate(configs):
        torch.manual_seed(seed)
        models.append(build_mlp(config))
    with torch.no_grad():  # trained-looking LayerNorms, so their rows are their own
        for norm in (m for m in models[1] if isinstance(m, nn.LayerNorm)):
            norm.weight.uniform_()
            norm.bias.uniform_()
    stacked = stack_models(models)
    assert stacked["norm1.weight"].shape == (3, 1, 150)
    for k in (0, 2):
        assert torch.all(stacked["norm0.weight"][k] == 1)
        assert torch.all(stacked["norm1.bias"][k] == 0)
    for k, (model, config) in enumerate(zip(models, configs, strict=True)):
        back = unstack_model(stacked, k, config)
        assert list(back.state_dict()) == list(model.state_dict())
        for key, value in model.state_dict().items():
            assert torch.equal(back.state_dict()[key], value), key
