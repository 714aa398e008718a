"""LoraLayer maths, checked with hand-set weights on single layers."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.lora.layers import LoraLayer


def _linear(in_f=6, out_f=4, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def test_initial_adapter_changes_nothing():
    base = _linear()
    x = torch.randn(3, 6)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, scaling=2.0)
    layer.active_adapter = "a"
    assert torch.equal(layer(x), base(x))
    assert torch.count_nonzero(layer.lora_A["a"].weight) > 0  # A random, B zero


def test_forward_matches_hand_computed_update():
    base = _linear(bias=False)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=1, scaling=0.5)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_A["a"].weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 2.0]]))
        layer.lora_B["a"].weight.copy_(torch.tensor([[1.0], [0.0], [-1.0], [3.0]]))
    x = torch.zeros(1, 6)
    x[0, 0], x[0, 5] = 1.0, 1.0  # A x = 3
    expected = base(x) + 0.5 * 3 * torch.tensor([[1.0, 0.0, -1.0, 3.0]])
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("make_base", [lambda: _linear(), lambda: Conv1D(4, 6)])
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_idempotent_and_exact(make_base, dora):
    torch.manual_seed(1)
    base = make_base()
    original = base.weight.detach().clone()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, scaling=4 / 3, use_dora=dora)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
        if dora:
            layer.lora_magnitude_vector["a"].mul_(1.3)
    x = torch.randn(5, 6)
    unmerged = layer(x)
    assert not torch.allclose(unmerged, base(x))
    layer.merge()
    layer.merge()  # idempotent: a second merge changes nothing
    assert layer.merged_adapters == ["a"]
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(base(x), unmerged, atol=1e-5, rtol=1e-5)  # weight really changed
    layer.unmerge()
    layer.unmerge()
    torch.testing.assert_close(base.weight, original, atol=1e-6, rtol=0)
    torch.testing.assert_close(layer(x), unmerged, atol=1e-5, rtol=1e-5)


def test_conv1d_matches_equivalent_linear():
    torch.manual_seed(2)
    conv = Conv1D(4, 6)  # weight (in=6, out=4)
    lin = nn.Linear(6, 4)
    with torch.no_grad():
        lin.weight.copy_(conv.weight.T)
        lin.bias.copy_(conv.bias)
    layers = [LoraLayer(conv), LoraLayer(lin)]
    for layer in layers:
        layer.add_adapter("a", r=2, scaling=1.0)
        layer.active_adapter = "a"
    with torch.no_grad():
        a, b = torch.randn(2, 6), torch.randn(4, 2)
        for layer in layers:
            layer.lora_A["a"].weight.copy_(a)
            layer.lora_B["a"].weight.copy_(b)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layers[0](x), layers[1](x))


def test_dora_equals_weight_decomposition():
    """DoRA output equals x @ (m * V / ||V||_row)^T + b with V = W + s B A."""
    torch.manual_seed(3)
    base = _linear()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, scaling=0.7, use_dora=True)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
        layer.lora_magnitude_vector["a"].copy_(torch.rand(4) + 0.5)
    v = base.weight + 0.7 * layer.lora_B["a"].weight @ layer.lora_A["a"].weight
    w = layer.lora_magnitude_vector["a"].unsqueeze(1) * v / v.norm(dim=1, keepdim=True)
    x = torch.randn(3, 6)
    torch.testing.assert_close(layer(x), x @ w.T + base.bias, atol=1e-5, rtol=1e-5)


def test_rank_scaling_values():
    from lorakit.lora.config import LoraConfig

    assert LoraConfig(r=16, lora_alpha=32).scaling_for("q_proj") == 2.0
    assert LoraConfig(r=16, lora_alpha=32, use_rslora=True).scaling_for("q_proj") == 32 / math.sqrt(16)


def test_dropout_only_in_training():
    base = _linear()
    layer = LoraLayer(base)
    layer.add_adapter("a", r=2, scaling=1.0, dropout=0.5)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    x = torch.randn(64, 6)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    y1 = layer(x)
    torch.manual_seed(1)
    y2 = layer(x)
    assert not torch.allclose(y1, y2)
