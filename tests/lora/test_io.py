"""Adapter files: PEFT's format both ways, the manifest, and bad input."""

import json
import warnings

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors import safe_open

import lorakit
from lorakit.errors import AdapterError
from tiny_models import FAMILIES, make_tiny_model, sample_input_ids

from lora.helpers import randomize_adapter

VARIANTS = {
    "plain": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_lorakit_adapter_loads_in_peft_with_same_logits(family, variant, tmp_path):
    ids = sample_input_ids()
    model = make_tiny_model(family)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, **VARIANTS[variant]))
    randomize_adapter(model, seed=7)
    ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make_tiny_model(family), tmp_path).eval()
    theirs = peft_model(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - make_tiny_model(family)(ids).logits).abs().max() > 1e-3  # the adapter matters


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_lorakit_with_same_logits(family, variant, tmp_path):
    ids = sample_input_ids()
    peft_model = get_peft_model(make_tiny_model(family), PeftLoraConfig(
        r=4, lora_alpha=16, target_modules="all-linear", **VARIANTS[variant]))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if "lora_magnitude_vector" in name:
                p.mul_(1.1)
    peft_model.eval()
    theirs = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    model = make_tiny_model(family)
    lorakit.load_adapter(model, tmp_path)
    ours = model(ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    assert (ours - make_tiny_model(family)(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize("extra", [dict(bias="lora_only"), dict(bias="all"),
                                   dict(modules_to_save=["lm_head"]),
                                   dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1])])
def test_bias_modules_to_save_and_layer_selection_round_trip_with_peft(extra, tmp_path):
    ids = sample_input_ids()
    model = make_tiny_model("qwen2")  # qwen2 has q/k/v biases
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, **extra))
    randomize_adapter(model, seed=3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name.endswith("bias"):
                p.add_(0.1)
    ours = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    peft_model = PeftModel.from_pretrained(make_tiny_model("qwen2"), tmp_path).eval()
    assert (ours - peft_model(ids).logits).abs().max() <= 1e-5
    again = make_tiny_model("qwen2")
    lorakit.load_adapter(again, tmp_path)
    assert (ours - again(ids).logits).abs().max() <= 1e-6


def test_saved_files_follow_peft_layout(tmp_path):
    model = make_tiny_model("llama")
    model.lorakit_spec = "tiny-llama"
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                                                  target_modules=["q_proj", "v_proj"]))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["base_model_name_or_path"] == "tiny-llama"
    assert config["target_modules"] == ["q_proj", "v_proj"]
    for key in ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora", "use_dora",
                "modules_to_save", "layers_to_transform"):
        assert key in config
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector" in keys
    assert len(keys) == 2 * 2 * 3
    manifest = json.loads((tmp_path / "lorakit.json").read_text())
    assert manifest["base_model"] == "tiny-llama"
    assert len(manifest["base_config_sha256"]) == 64
    assert manifest["lorakit_version"] == lorakit.__version__
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporaries


def test_named_adapter_saved_and_loaded_under_another_name(tmp_path):
    ids = sample_input_ids()
    model = make_tiny_model("mistral")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2), name="first")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8), name="second")
    randomize_adapter(model, "second", seed=4)
    out = model(ids).logits
    lorakit.save_adapter(model, tmp_path, name="second")
    fresh = make_tiny_model("mistral")
    lorakit.load_adapter(fresh, tmp_path, name="x")
    torch.testing.assert_close(fresh(ids).logits, out)


def test_shape_mismatch_names_layer_and_shapes(tmp_path):
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(model, tmp_path)
    other = make_tiny_model("gemma")  # same names, different shapes (head_dim 8, 1 kv head)
    with pytest.raises(AdapterError) as err:
        lorakit.load_adapter(other, tmp_path)
    msg = str(err.value)
    assert "model.layers.0.self_attn.k_proj" in msg and "(4, 32)" in msg and "32 -> 8" in msg


def test_manifest_mismatch_warns_with_what_differs(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(model, tmp_path)
    cfg = make_tiny_model("llama").config.to_dict()
    cfg["rms_norm_eps"] = 1e-2  # same shapes, different maths
    other = LlamaForCausalLM(LlamaConfig(**cfg))
    with pytest.warns(UserWarning, match="base model config"):
        lorakit.load_adapter(other, tmp_path)
    same = make_tiny_model("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        lorakit.load_adapter(same, tmp_path)


def test_missing_files_are_clear_errors(tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(AdapterError, match="does not exist"):
        lorakit.load_adapter(model, tmp_path / "nope")
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        lorakit.load_adapter(model, tmp_path)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").rename(tmp_path / "a" / "adapter_model.bin")
    with pytest.raises(AdapterError, match="safetensors only"):
        lorakit.load_adapter(make_tiny_model("llama"), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.bin").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        lorakit.load_adapter(make_tiny_model("llama"), tmp_path / "a")


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(model, tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        lorakit.load_adapter(make_tiny_model("llama"), tmp_path)
    weights.write_bytes(b"\x10")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        lorakit.load_adapter(make_tiny_model("llama"), tmp_path)


def test_non_lora_peft_adapter_is_refused(tmp_path):
    model = make_tiny_model("llama")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["peft_type"] = "IA3"
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="LoRA adapters only"):
        lorakit.load_adapter(make_tiny_model("llama"), tmp_path)
