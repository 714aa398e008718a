"""LoRA dropout (lorakit.lora.layers.LoraDropout): the mask is shared only by adapters that read
the same input tensor (q/k/v; gate/up), never reused by the same adapter, off in eval mode; the
gradient through a fixed mask equals autograd's on the written-out formula; and training with
the shared mask matches PEFT's independent masks statistically (several seeds)."""

import statistics

import pytest
import torch
from torch import nn

from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import add_adapter
from lorakit.lora.layers import LoraDropout, LoraLayer, lora_layers
from tests.tiny_models import make_tiny_model, sample_input_ids


def _adapted(p=0.5, seed=0):
    model = make_tiny_model("llama", seed=seed)
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules="all-linear"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    return model


def _adapter_inputs(model):
    """Record the (dropped) input each adapter's A matrix receives, by module path."""
    seen = {}
    hooks = [layer.lora_A["default"].register_forward_hook(
        lambda mod, args, out, path=path: seen.__setitem__(path, args[0].detach().clone()))
        for path, layer in lora_layers(model)]
    return seen, hooks


def test_mask_shared_by_siblings_only():
    model = _adapted(p=0.5).train()
    seen, hooks = _adapter_inputs(model)
    torch.manual_seed(0)
    model(sample_input_ids(2, 12))
    for h in hooks:
        h.remove()
    zeros = {path.split("model.layers.")[1]: x == 0 for path, x in seen.items()}
    block = "0.self_attn."
    # q, k and v read one tensor: one mask; gate and up another
    assert torch.equal(zeros[block + "q_proj"], zeros[block + "k_proj"])
    assert torch.equal(zeros[block + "q_proj"], zeros[block + "v_proj"])
    assert torch.equal(zeros["0.mlp.gate_proj"], zeros["0.mlp.up_proj"])
    # about half dropped, and different inputs get different masks
    frac = zeros[block + "q_proj"].float().mean()
    assert 0.4 < frac < 0.6
    assert not torch.equal(zeros[block + "q_proj"], zeros["1.self_attn.q_proj"])
    assert not torch.equal(zeros["0.mlp.gate_proj"], zeros["1.mlp.gate_proj"])
    assert zeros[block + "q_proj"].shape != zeros["0.mlp.down_proj"].shape  # down reads its own


def test_same_module_twice_on_one_tensor_draws_fresh_masks():
    drop = LoraDropout(0.5).train()
    x = torch.randn(64, 32)
    a, b = drop(x), drop(x)
    assert not torch.equal(a == 0, b == 0)
    other = LoraDropout(0.5).train()
    assert torch.equal(other(x) == 0, b == 0)  # a sibling reuses the last mask drawn on x
    x.add_(1.0)  # an in-place change is a new input: fresh mask
    assert not torch.equal(LoraDropout(0.5).train()(x) == 0, b == 0)


def test_drop_rate_and_scale():
    drop = LoraDropout(0.05).train()
    x = torch.ones(400, 1000)
    y = drop(x)
    dropped = float((y == 0).float().mean())
    assert abs(dropped - 0.05) < 0.003  # 400k draws: 5 sigma is 0.0017
    torch.testing.assert_close(y[y != 0], torch.full_like(y[y != 0], 1 / 0.95))


def test_eval_mode_and_p_zero_are_identity():
    model = _adapted(p=0.5)
    ids = sample_input_ids(2, 12)
    model.eval()
    with torch.no_grad():
        a, b = model(ids).logits, model(ids).logits
    reference = _adapted(p=0.0).eval()
    with torch.no_grad():
        ref = reference(ids).logits
    assert torch.equal(a, b)
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    for module in model.modules():  # what DPO does (p = 0) is the identity in training too
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_gradient_with_fixed_mask_equals_autograd_reference():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoraLayer(base)
    layer.add_adapter("a", r=3, scaling=2.0, dropout=0.3)
    layer.active_adapter = "a"
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_()
    layer.train()
    x = torch.randn(7, 6, requires_grad=True)
    seen = {}
    layer.lora_A["a"].register_forward_hook(lambda m, args, out: seen.update(x=args[0].detach()))
    y = layer(x)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    keep = (seen["x"] != 0).double()  # the mask this forward drew (x has no exact zeros)

    # the written-out formula in float64: y = W x + b + s * B A (x * keep / (1 - p))
    W, bias = base.weight.detach().double(), base.bias.detach().double()
    A = layer.lora_A["a"].weight.detach().double().requires_grad_()
    B = layer.lora_B["a"].weight.detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    ref = x64 @ W.T + bias + 2.0 * ((x64 * keep / 0.7) @ A.T) @ B.T
    (ref * weights.double()).sum().backward()
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_A["a"].weight.grad.double(), A.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.lora_B["a"].weight.grad.double(), B.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)


def _final_losses(kind: str, seeds, steps=15):
    """Train the tiny llama's LoRA (dropout 0.3) on a fixed batch; final loss per seed."""
    ids = sample_input_ids(4, 16, seed=3)
    finals = []
    for seed in seeds:
        model = make_tiny_model("llama", seed=0)
        add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules="all-linear"))
        if kind == "peft":  # one independent Bernoulli mask per module, as PEFT does
            for _, layer in lora_layers(model):
                layer.lora_dropout["default"] = nn.Dropout(0.3)
        model.train()
        torch.manual_seed(seed)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        model.eval()
        with torch.no_grad():
            finals.append(float(model(input_ids=ids, labels=ids).loss))
    return finals


def test_shared_mask_trains_like_independent_masks():
    seeds = range(4)
    ours, peft = _final_losses("lorakit", seeds), _final_losses("peft", seeds)
    start = float(make_tiny_model("llama", seed=0)(input_ids=sample_input_ids(4, 16, seed=3),
                                                  labels=sample_input_ids(4, 16, seed=3)).loss)
    # both learn, and the mean final losses agree within the seed-to-seed spread
    assert max(ours) < start - 0.2 and max(peft) < start - 0.2
    spread = (statistics.stdev(ours) ** 2 / len(ours) + statistics.stdev(peft) ** 2 / len(peft)) ** 0.5
    assert abs(statistics.mean(ours) - statistics.mean(peft)) < 3 * spread + 0.02
