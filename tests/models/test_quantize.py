"""4-bit bases (lorakit.models.quantize) and LoRA adapters over them.

Parity is checked against bitsandbytes itself (codes and constants byte for byte), against a
dense model built from the dequantized weights (logits), and against the float model (an
error bound derived below).

The tiny models are ``tests/tiny_models.py``'s families widened to hidden 64 / MLP 128 /
head_dim 16: at hidden 32 a block of 64 values spans two weight rows, which bitsandbytes' CPU
dequantize kernel gets wrong, so quantize_model refuses it (test_cpu_kernel_limit_is_refused).
"""

import copy
import subprocess
import sys

import pytest
import torch

import lorakit
from lorakit.errors import ConfigError, ModelLoadError
from lorakit.lora.inject import lora_layers
from lorakit.models import quantize as qz
from lorakit.models.quantize import (dequantize_model, estimate_quantized_bytes, quantize_model,
                                     quantizable_layers, quantized_weight_bytes)
from tiny_models import FAMILIES, make_tiny_model, sample_input_ids

from lora.helpers import randomize_adapter

bnb = pytest.importorskip("bitsandbytes")
F = bnb.functional

SETTINGS = [("nf4", True), ("nf4", False), ("fp4", True), ("fp4", False)]
# RMS of (dequantized - original) / RMS of original, per weight, for N(0, 0.02) weights at block
# size 64. Measured over 4 seeds x 6 families: NF4 0.090-0.096, FP4 0.118-0.128 (NF4's levels
# are the normal quantiles, so it is the better code for normal weights: QLoRA, section 3).
WEIGHT_ERROR_BOUND = {"nf4": 0.10, "fp4": 0.135}


def wide_config(family: str):
    """``tiny_models``' config of ``family`` with every in_features a multiple of 64."""
    import tiny_models

    config = tiny_models._config(family)
    wide = {"n_embd": 64} if family == "gpt2" else \
        {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    return type(config)(**{**config.to_dict(), **wide})


def make_model64(family: str, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(wide_config(family), attn_implementation="eager").eval()


def _dense_weight(module):  # (out, in)
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _base_snapshot(model):
    """Every base tensor as bytes: dense parameters, 4-bit codes and all quant-state tensors."""
    snap = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        snap[name] = p.detach().clone()
        state = getattr(p, "quant_state", None)
        if state is not None:
            for key, t in state.as_dict(packed=False).items():
                if isinstance(t, torch.Tensor):
                    snap[f"{name}.{key}"] = t.detach().clone()
    return snap


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------- what is stored
@pytest.mark.parametrize("quant_type,double_quant", SETTINGS)
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stored_codes_are_bitsandbytes_quantize_4bit(family, quant_type, double_quant):
    dense = make_model64(family)
    originals = {p: _dense_weight(m).detach().clone() for p, m in quantizable_layers(dense)}
    model = quantize_model(dense, quant_type=quant_type, double_quant=double_quant)
    assert model.lorakit_quantization == {"type": quant_type, "double_quant": double_quant,
                                          "block_size": 64, "compute_dtype": "float32"}
    for path, weight in originals.items():
        layer = model.get_submodule(path)
        assert isinstance(layer, bnb.nn.Linear4bit) and isinstance(layer.weight, bnb.nn.Params4bit)
        codes, ref = F.quantize_4bit(weight.contiguous(), blocksize=64,
                                     compress_statistics=double_quant, quant_type=quant_type)
        state = layer.weight.quant_state
        assert layer.weight.dtype == torch.uint8 and torch.equal(layer.weight.data, codes)
        assert state.absmax.dtype == ref.absmax.dtype and torch.equal(state.absmax, ref.absmax)
        assert torch.equal(state.code, ref.code) and tuple(state.shape) == tuple(weight.shape)
        assert state.nested == double_quant
        if double_quant:
            assert state.absmax.dtype == torch.uint8
            assert torch.equal(state.state2.absmax, ref.state2.absmax)
            assert torch.equal(state.state2.code, ref.state2.code)
            assert torch.equal(state.offset, ref.offset)
        else:
            assert state.absmax.dtype == torch.float32


def test_only_decoder_block_linears_are_quantized():
    dense = make_model64("llama")
    keep = {n: p.detach().clone() for n, p in dense.named_parameters() if ".layers." not in n
            or "norm" in n}
    model = quantize_model(dense, skip_modules=["down_proj"])
    quantized = [n for n, m in model.named_modules() if qz.is_4bit(m)]
    assert len(quantized) == 2 * 6 and not any("down_proj" in n for n in quantized)
    assert type(model.lm_head) is torch.nn.Linear
    for name, p in model.named_parameters():
        if name in keep:  # embeddings, norms, head: untouched, still float32
            assert p.dtype == torch.float32 and torch.equal(p, keep[name]), name
    # no dense copy of a quantized weight is left anywhere in the model
    assert all(p.dtype == torch.uint8 for n, p in model.named_parameters()
               if any(n.startswith(q + ".weight") for q in quantized))


# ---------------------------------------------------------------------- logits
@pytest.mark.parametrize("family,quant_type", [(f, "nf4") for f in FAMILIES]
                         + [("llama", "fp4"), ("gpt2", "fp4")])
def test_logits_equal_dequantized_model_and_error_is_bounded(family, quant_type):
    ids = sample_input_ids()
    original = make_model64(family)
    model = quantize_model(copy.deepcopy(original), quant_type=quant_type)
    dequantized = dequantize_model(copy.deepcopy(model))
    assert not any(qz.is_4bit(m) for m in dequantized.modules())
    with torch.no_grad():
        logits, ref, deq = model(ids).logits, original(ids).logits, dequantized(ids).logits
    # 1. the 4-bit model computes exactly what the dense model of its dequantized weights does
    assert (logits - deq).abs().max() <= 1e-5
    # 2. each weight's error is what NF4/FP4 at block 64 give for normal weights ...
    noisy = copy.deepcopy(original)
    g = torch.Generator().manual_seed(0)
    for path, layer in quantizable_layers(noisy):
        w = _dense_weight(layer)
        err = qz.dequantize_weight(model.get_submodule(path).weight) - w
        rel = (err.norm() / w.norm()).item()
        assert 0.05 < rel <= WEIGHT_ERROR_BOUND[quant_type], (path, rel)
        noise = torch.randn(layer.weight.shape, generator=g)
        layer.weight.data += noise * (err.norm() / noise.norm())
    # ... and it moves the logits about as much as random noise of the same size per weight
    # would (measured ratio 0.82-1.29 over seeds and families): the rounding error acts like
    # noise and adds nothing systematic. Bounds 0.6-1.6 leave room for seed-to-seed variation.
    with torch.no_grad():
        noise_effect = (noisy(ids).logits - ref).norm()
    ratio = ((logits - ref).norm() / noise_effect).item()
    assert 0.6 < ratio < 1.6, ratio
    # the next-token distribution barely moves (measured mean KL <= 4.7e-4 nats)
    assert lorakit_kl(ref, logits) < 1e-3


def lorakit_kl(ref, other):
    lp, lq = ref.log_softmax(-1), other.log_softmax(-1)
    return (lp.exp() * (lp - lq)).sum(-1).mean().item()


def test_cpu_kernel_limit_is_refused():
    # hidden 32 < block 64: bitsandbytes' CPU kernel dequantizes such rows with the wrong absmax
    with pytest.raises(ModelLoadError, match="in_features=32 is not a multiple of block_size=64"):
        quantize_model(make_tiny_model("llama"))
    model = quantize_model(make_tiny_model("llama"), block_size=32)  # a block that fits works
    w = qz.dequantize_weight(model.model.layers[0].self_attn.q_proj.weight)
    ref = make_tiny_model("llama").model.layers[0].self_attn.q_proj.weight
    assert ((w - ref).norm() / ref.norm()).item() < WEIGHT_ERROR_BOUND["nf4"]


# ---------------------------------------------------------------------- bytes
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_estimate_matches_measured_bytes(family, double_quant):
    dense = make_model64(family)
    estimate = estimate_quantized_bytes(dense, double_quant=double_quant)
    measured = quantized_weight_bytes(quantize_model(dense, double_quant=double_quant))
    assert estimate == measured
    assert measured["quantized_params"] == sum(p.numel() for _, m in
                                               quantizable_layers(make_model64(family))
                                               for p in [m.weight])


def test_bits_per_parameter_approach_the_paper():
    # a 7B-like layer shape on the meta device: nothing is allocated
    import transformers as tf

    config = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                            num_attention_heads=32, vocab_size=32000)
    dq = estimate_quantized_bytes(config, double_quant=True)
    plain = estimate_quantized_bytes(config, double_quant=False)
    # QLoRA section 3: 4 + 8/64 + 32/(64*256) = 4.127 bits; 4 + 32/64 = 4.5 without DQ
    assert dq["bits_per_param_without_maps"] == pytest.approx(4.127, abs=1e-3)
    assert plain["bits_per_param_without_maps"] == pytest.approx(4.5, abs=1e-6)
    assert dq["ratio_vs_bf16"] == pytest.approx(4.127 / 16, abs=1e-3)
    assert dq["other_params"] == 2 * 32000 * 4096 + 2 * 2 * 4096 + 4096


# ---------------------------------------------------------------------- LoRA over 4-bit
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_adapters_over_4bit_train_only_adapter_params(family):
    dense = make_model64(family)
    dense_total = lorakit.trainable_parameters(dense)["total"]
    model = quantize_model(copy.deepcopy(dense))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True))
    counts = lorakit.trainable_parameters(model)
    lorakit.add_adapter(dense, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True))
    assert counts == lorakit.trainable_parameters(dense)  # logical sizes of packed weights
    assert counts["total"] - counts["trainable"] == dense_total
    layers = list(lora_layers(model))
    assert layers and all(layer.base_is_4bit() for _, layer in layers)
    for _, layer in layers:
        assert layer.lora_A["default"].weight.dtype == torch.float32
    model.train()
    model(sample_input_ids(), labels=sample_input_ids()).loss.backward()
    for name, p in model.named_parameters():  # (lora_A's gradient is zero while B is zero)
        assert (p.grad is not None) == ("lora_" in name), name
    assert all(layer.lora_B["default"].weight.grad.abs().sum() > 0 for _, layer in layers)
    with pytest.raises(RuntimeError, match="lorakit.export.merge"):
        lorakit.merge_adapter(model)


def test_bf16_adapters_over_4bit():
    model = quantize_model(make_model64("llama"))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4), dtype=torch.bfloat16)
    randomize_adapter(model, seed=1)
    out = model(sample_input_ids()).logits
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert all(layer.lora_B["default"].weight.dtype == torch.bfloat16 for _, layer in lora_layers(model))


@pytest.mark.parametrize("use_dora", [False, True])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_qlora_adapter_round_trip(family, use_dora, tmp_path):
    ids = sample_input_ids()
    model = quantize_model(make_model64(family))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=use_dora))
    randomize_adapter(model, seed=3)
    with torch.no_grad():
        ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    fresh = quantize_model(make_model64(family))
    lorakit.load_adapter(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, ours)
    dense = make_model64(family)
    lorakit.load_adapter(dense, tmp_path)
    with torch.no_grad():
        on_dense = dense(ids).logits
        base_effect = (make_model64(family)(ids).logits - quantize_model(make_model64(family))(ids).logits).norm()
    # on the dense base the only difference left is the base's quantization error
    assert (on_dense - ours).norm() <= 1.5 * base_effect
    assert lorakit_kl(ours, on_dense) < 1e-3


def test_qlora_steps_lower_loss_and_keep_base_bytes():
    torch.manual_seed(0)
    model = quantize_model(make_model64("llama"))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16))
    before = _base_snapshot(model)
    ids = sample_input_ids(batch=2, length=16)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    assert _same(before, _base_snapshot(model))


# ---------------------------------------------------------------------- bad input
def test_bad_settings():
    with pytest.raises(ConfigError, match="unknown quantization 'int3'"):
        quantize_model(make_model64("llama"), quant_type="int3")
    with pytest.raises(ConfigError, match="block_size"):
        quantize_model(make_model64("llama"), block_size=48)
    with pytest.raises(ConfigError, match="compute_dtype"):
        quantize_model(make_model64("llama"), compute_dtype="int8")
    model = quantize_model(make_model64("llama"), compute_dtype="bf16")
    assert model.lorakit_quantization["compute_dtype"] == "bfloat16"
    assert torch.isfinite(model(sample_input_ids()).logits).all()
    with pytest.raises(ModelLoadError, match="already quantized"):
        quantize_model(model)


def test_model_without_block_linears_is_explained():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 64), torch.nn.LayerNorm(64))
    with pytest.raises(ModelLoadError, match="no nn.Linear or Conv1D layer inside numbered "
                                             "decoder blocks.*Embedding, LayerNorm"):
        quantize_model(model)


def test_unloaded_or_adapted_models_are_refused():
    import transformers as tf

    with torch.device("meta"):
        meta = tf.AutoModelForCausalLM.from_config(wide_config("llama"))
    with pytest.raises(ModelLoadError, match="meta device"):
        quantize_model(meta)
    adapted = make_model64("llama")
    lorakit.add_adapter(adapted, lorakit.LoraConfig(r=2))
    with pytest.raises(ModelLoadError, match="before adding LoRA adapters"):
        quantize_model(adapted)


def test_missing_bitsandbytes_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import now raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'lorakit\[qlora\]'"):
        quantize_model(make_model64("llama"))


def test_cpu_without_kernels_is_explained(monkeypatch):
    def illegal(*args, **kwargs):
        raise RuntimeError("Illegal instruction in cquantize_blockwise_cpu_fp32")

    monkeypatch.setattr(qz, "_probed_devices", set())
    monkeypatch.setattr(F, "quantize_4bit", illegal)
    with pytest.raises(ModelLoadError, match="cannot run 4-bit kernels on this CPU.*"
                                             "quantization=None"):
        quantize_model(make_model64("llama"))


def test_import_lorakit_does_not_import_bitsandbytes():
    code = ("import sys, lorakit, lorakit.models.quantize, lorakit.export.merge, "
            "lorakit.lora.layers; assert 'bitsandbytes' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------------------------- the embedded default
@pytest.mark.slow
def test_smollm2_qlora_bytes_and_training(smol_model):
    base, _ = smol_model
    model = quantize_model(copy.deepcopy(base))
    stats = quantized_weight_bytes(model)
    assert stats == estimate_quantized_bytes(base)
    # per block: q, o 576x576; k, v 192x576; gate, up, down 576x1536
    assert stats["quantized_params"] == 30 * (2 * 576 * 576 + 2 * 192 * 576 + 3 * 576 * 1536)
    # the per-layer 256-entry map of the nested quantization costs a little on 135M layers
    assert 4.127 <= stats["bits_per_param_without_maps"] < 4.135
    assert stats["ratio_vs_bf16"] < 0.27
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16))
    before = _base_snapshot(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 10000, (2, 32), generator=g)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    losses = []
    for _ in range(20):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert _same(before, _base_snapshot(model))
