"""Merging adapters into a dequantized base (lorakit.export.merge)."""

import copy

import pytest
import torch

import lorakit
from lorakit.errors import AdapterError
from lorakit.export.merge import merge_adapter_into_base
from lorakit.export.parity import parity_report
from lorakit.lora.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.models.quantize import is_4bit, quantize_model
from tiny_models import make_tiny_model, sample_input_ids

from lora.helpers import randomize_adapter

pytest.importorskip("bitsandbytes")

VARIANTS = {"plain": dict(), "rslora": dict(use_rslora=True), "dora": dict(use_dora=True)}


def make_model64(family: str, seed: int = 0):
    """``tiny_models``' family widened so every in_features is a multiple of the 4-bit block
    (64); see tests/models/test_quantize.py."""
    import tiny_models
    from transformers import AutoModelForCausalLM

    config = tiny_models._config(family)
    wide = {"n_embd": 64} if family == "gpt2" else \
        {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(type(config)(**{**config.to_dict(), **wide}),
                                            attn_implementation="eager").eval()


def _plain(model):
    return not any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) or is_4bit(m)
                   for m in model.modules())


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_qlora_merge_matches_adapter_on_4bit(family, variant, tmp_path):
    ids = sample_input_ids()
    model = quantize_model(make_model64(family))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, **VARIANTS[variant]))
    randomize_adapter(model, seed=5)
    before = _state(model)
    with torch.no_grad():
        ours = model(ids).logits
    merged = merge_adapter_into_base(model)
    assert _plain(merged) and merged.lorakit_quantization is None
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in merged.parameters())
    report = parity_report(model, merged, ids)
    # same maths on the same dequantized weights, only summed in another order
    assert report["max_abs_logit_diff"] < 1e-4, report
    assert report["mean_kl"] < 1e-9 and report["greedy_agreement"] == 1.0, report
    # the adapter matters, and the source model was not touched
    assert (ours - make_model64(family)(ids).logits).abs().max() > 1e-2
    after = _state(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ours)
    # it is a plain transformers model: save_pretrained / from_pretrained reproduce it
    # (GPT-2 gets its Conv1D layers back, so the checkpoint has GPT-2's own layout)
    from transformers import AutoModelForCausalLM

    merged.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert (reloaded(ids).logits - merged(ids).logits).abs().max() < 1e-5


def test_merge_of_dense_adapter_and_modules_to_save():
    ids = sample_input_ids()
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, use_dora=True, modules_to_save=["lm_head"]))
    randomize_adapter(model, seed=2)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2), name="other")
    randomize_adapter(model, name="other", seed=3)
    lorakit.set_adapter(model, "default")
    lorakit.merge_adapter(model)  # merged in place already: merging again must not double it
    merged = merge_adapter_into_base(model, "default")
    assert _plain(merged)
    lorakit.unmerge_adapter(model)
    report = parity_report(model, merged, ids)
    assert report["max_abs_logit_diff"] < 1e-5 and report["greedy_agreement"] == 1.0


def test_merge_in_bf16():
    model = quantize_model(make_model64("qwen2"))
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    randomize_adapter(model)
    merged = merge_adapter_into_base(model, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in merged.parameters())
    report = parity_report(model, merged, sample_input_ids())
    assert report["mean_kl"] < 1e-3 and report["greedy_agreement"] > 0.9


def test_unknown_adapter():
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2))
    with pytest.raises(AdapterError, match="no adapter named 'nope'.*default"):
        merge_adapter_into_base(model, "nope")


def test_parity_report_of_identical_models_and_masks():
    model = make_tiny_model("gpt2")
    ids = sample_input_ids()
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0
    report = parity_report(model, copy.deepcopy(model), ids, attention_mask=mask)
    assert report == {"max_abs_logit_diff": 0.0, "mean_kl": 0.0, "greedy_agreement": 1.0,
                      "positions": ids.numel() - 4}


def _alone(model, ids, n):
    """Greedy decode of one prompt with no cache and no batch: each step reruns the whole
    sequence (the gate's previous procedure), then the teacher-forced logits."""
    tokens = []
    with torch.no_grad():
        for _ in range(n):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(int(nxt))
            ids = torch.cat([ids, nxt], dim=1)
        return tokens, model(input_ids=ids).logits[0]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma", "gpt2"])
def test_gate_outputs_batched_with_cache_equal_each_prompt_alone(family):
    from lorakit.export import parity

    model = make_tiny_model(family)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear"))
    randomize_adapter(model, scale=0.5)
    model.eval()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, model.config.vocab_size, (1, n), generator=g) for n in (2, 9, 5)]
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        got = parity.model_outputs(model, prompts, max_new_tokens=6)
    finally:
        handle.remove()
    assert len(calls) == 6 + 1  # one batch: 6 decode steps + 1 teacher-forced, not 3 x 7
    for ids, out in zip(prompts, got):
        tokens, logits = _alone(model, ids, 6)
        assert out["tokens"] == tokens
        assert out["full"].tolist() == [ids[0].tolist() + tokens]
        assert out["logits"].shape == logits.shape
        assert (out["logits"] - logits).abs().max() < 1e-4


@pytest.mark.slow
def test_smollm2_qlora_merge_parity(smol_model):
    base, _ = smol_model
    model = quantize_model(copy.deepcopy(base))
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16))
    randomize_adapter(model, seed=0, scale=0.02)
    ids = torch.randint(100, 10000, (2, 24), generator=torch.Generator().manual_seed(0))
    merged = merge_adapter_into_base(model)
    report = parity_report(model, merged, ids)
    print("smollm2 qlora merge parity:", report)
    # measured: max |diff| 1.8e-4 on logits up to ~33 (float32 sums in another order through
    # 30 layers; a dense-base merge gives the same 2e-4 to 7e-4), mean KL 5e-11 nats
    assert report["max_abs_logit_diff"] < 2e-3 and report["mean_kl"] < 1e-8
    assert report["greedy_agreement"] == 1.0
