"""``lorakit check-adapter`` (one case per rule) and ``lorakit export vllm``."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.cli import main
from lorakit.export.compat import check_adapter

from export.helpers import make_adapter, save_base


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return save_base(tmp_path_factory.mktemp("compat"), "llama")


def _rules(findings, level="error"):
    return {f.rule for f in findings if f.level == level}


def _rewrite(folder, fn):
    """Rewrite the adapter's safetensors through ``fn(dict) -> dict``."""
    path = folder / "adapter_model.safetensors"
    save_file(fn(load_file(path)), path, metadata={"format": "pt"})


def peft_adapter(tmp_path, base, name="peft", resize_to=None, **lora):
    """An adapter written by PEFT itself (get_peft_model + save_pretrained) over ``base``;
    ``resize_to``: grow the vocabulary first, as when tokens are added in training."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    if resize_to:
        model.resize_token_embeddings(resize_to)
    lora = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **lora}
    get_peft_model(model, LoraConfig(**lora)).save_pretrained(tmp_path / name)
    return tmp_path / name


def test_plain_adapter_is_clean_for_every_target(base, tmp_path):
    adapter = make_adapter(tmp_path, base, r=8)
    for target in ("vllm", "llamacpp", "peft"):
        assert not _rules(check_adapter(adapter, target), "error"), target
    # the PEFT verdict is PEFT's own: it loads the folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    # and an adapter PEFT wrote is clean too
    written = peft_adapter(tmp_path, base, target_modules=["q_proj", "k_proj", "v_proj",
                                                           "o_proj", "gate_proj", "up_proj",
                                                           "down_proj"])
    for target in ("vllm", "llamacpp"):
        assert not _rules(check_adapter(written, target), "error"), target


# ---------------------------------------------------------------------- vLLM's rules
# each from vLLM's LoRA loader (docs/export.md cites the files), on adapters PEFT writes

def test_vllm_dora(base, tmp_path, capsys):
    adapter = peft_adapter(tmp_path, base, use_dora=True)
    assert main(["check-adapter", str(adapter), "--target", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "[dora]" in out and "does not yet support DoRA" in out and "lorakit merge" in out
    assert main(["check-adapter", str(adapter), "--target", "peft"]) == 0


def test_vllm_modules_to_save(base, tmp_path):
    adapter = peft_adapter(tmp_path, base, modules_to_save=["lm_head"])
    findings = [f for f in check_adapter(adapter, "vllm") if f.level == "error"]
    assert any(f.rule == "modules_to_save" and "lm_head" in f.message
               and "modules_to_save being None" in f.message for f in findings)
    # the saved full lm_head weight alone (config field cleared) is still refused:
    # parse_fine_tuned_lora_name has no case for it
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["modules_to_save"] = None
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    weights = [f for f in check_adapter(adapter, "vllm") if f.rule == "modules_to_save"]
    assert weights and "unsupported LoRA weight" in weights[0].message


def test_vllm_bias(tmp_path):
    qwen = save_base(tmp_path, "qwen2", tokenizer="smol")  # qwen2's q/k/v have biases
    adapter = peft_adapter(tmp_path, qwen, bias="lora_only")
    assert any(k.endswith("q_proj.base_layer.bias")
               for k in load_file(adapter / "adapter_model.safetensors"))
    errors = [f for f in check_adapter(adapter, "vllm") if f.level == "error"]
    assert any(f.rule == "bias" and "Adapter bias is not supported" in f.message for f in errors)
    assert "bias" in _rules(check_adapter(adapter, "llamacpp"))


def test_vllm_rank_above_max_lora_rank_suggests_the_flag(base, tmp_path, capsys):
    adapter = peft_adapter(tmp_path, base, r=24)
    findings = check_adapter(adapter, "vllm")
    rank = [f for f in findings if f.rule == "rank"]
    assert rank and "--max-lora-rank 32" in rank[0].fix and "24" in rank[0].message
    assert "rank" not in _rules(check_adapter(adapter, "vllm", max_lora_rank=32))
    assert main(["check-adapter", str(adapter), "--target", "vllm", "--max-lora-rank", "32",
                 "--json"]) == 0
    assert all(f["rule"] != "rank" for f in json.loads(capsys.readouterr().out))
    # vLLM's MaxLoRARanks: 24 is no value --max-lora-rank takes
    assert "rank" in _rules(check_adapter(adapter, "vllm", max_lora_rank=24))
    # rank 16 is exactly the default: accepted
    assert "rank" not in _rules(check_adapter(peft_adapter(tmp_path, base, "r16", r=16), "vllm"))


def test_vllm_target_modules_per_architecture(base, tmp_path):
    """Llama's vLLM class has embedding_modules (LoRA on embed_tokens is served); Qwen2's
    has none; GPT-2's class has no LoRA support at all."""
    llama = peft_adapter(tmp_path, base, "llama", target_modules=["embed_tokens", "q_proj"])
    assert "target_modules" not in _rules(check_adapter(llama, "vllm"))
    qwen = save_base(tmp_path, "qwen2", name="qwen-base", tokenizer="smol")
    adapter = peft_adapter(tmp_path, qwen, "qwen", target_modules=["embed_tokens", "q_proj"])
    found = [f for f in check_adapter(adapter, "vllm") if f.rule == "target_modules"]
    assert found and found[0].level == "error" and "embed_tokens" in found[0].message
    assert "target_modules" not in _rules(check_adapter(peft_adapter(tmp_path, qwen, "qwen-qv"),
                                                        "vllm"))
    gpt2 = save_base(tmp_path, "gpt2", name="gpt2-base")
    adapter = peft_adapter(tmp_path, gpt2, "gpt2", target_modules=["c_attn"])
    assert "architecture" in _rules(check_adapter(adapter, "vllm"))
    # a layer name no architecture has
    renamed = make_adapter(tmp_path, base, name="router", target_modules=["q_proj"])
    _rewrite(renamed, lambda s: {k.replace("q_proj", "router"): v for k, v in s.items()})
    assert "target_modules" in _rules(check_adapter(renamed, "vllm"))


def test_vllm_embedding_lora_with_added_tokens(base, tmp_path):
    """Tokens added in training: the embedding LoRA no longer matches the base's vocabulary."""
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    grown = peft_adapter(tmp_path, base, "grown", resize_to=vocab + 8,
                         target_modules=["embed_tokens", "q_proj"])
    found = [f for f in check_adapter(grown, "vllm", model=str(base)) if f.rule == "embeddings"]
    assert found and f"({vocab + 8})" in found[0].message and f"({vocab})" in found[0].message
    same = peft_adapter(tmp_path, base, "same", target_modules=["embed_tokens", "q_proj"])
    assert "embeddings" not in _rules(check_adapter(same, "vllm", model=str(base)))


# ---------------------------------------------------------------------- llama.cpp's rules
# judged by llama.cpp's own converter (convert_lora_to_gguf.py of the built llama.cpp):
# check-adapter --target llamacpp reports an error exactly when the converter refuses

@pytest.mark.parametrize("case, lora", [
    ("plain", {}),
    ("all-linear", {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                       "up_proj", "down_proj"]}),
    ("dora", {"use_dora": True}),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}),
])
def test_llamacpp_rules_agree_with_its_converter(case, lora, tmp_path):
    from llamacpp import convert_lora

    base = save_base(tmp_path, "llama", tokenizer="smol", hidden_size=64, intermediate_size=128,
                     head_dim=16)
    adapter = peft_adapter(tmp_path, base, **lora)
    errors = _rules(check_adapter(adapter, "llamacpp"))
    converted = convert_lora(adapter, base, tmp_path / "a.gguf")
    assert (converted.returncode == 0) == (not errors), (case, errors, converted.stderr[-2000:])


def test_llamacpp_bias_refused_by_its_converter(tmp_path):
    from llamacpp import convert_lora

    qwen = save_base(tmp_path, "qwen2", tokenizer="smol")
    adapter = peft_adapter(tmp_path, qwen, bias="lora_only")
    assert "bias" in _rules(check_adapter(adapter, "llamacpp"))
    converted = convert_lora(adapter, qwen, tmp_path / "b.gguf")
    assert converted.returncode != 0 and "Not a lora_A or lora_B tensor" in converted.stderr


def test_llamacpp_rslora_scale_is_wrong_through_its_converter(tmp_path):
    """The converter writes the one lora_alpha; llama.cpp scales by alpha / rank
    (llama-adapter.h), not rsLoRA's alpha / sqrt(rank): check-adapter warns, and lorakit's
    own gguf-lora writes the right product."""
    import gguf

    from llamacpp import convert_lora

    base = save_base(tmp_path, "llama", tokenizer="smol", hidden_size=64, intermediate_size=128,
                     head_dim=16)
    adapter = peft_adapter(tmp_path, base, r=4, lora_alpha=8, use_rslora=True)
    assert "scaling" in _rules(check_adapter(adapter, "llamacpp"), "warning")
    assert convert_lora(adapter, base, tmp_path / "rs.gguf").returncode == 0
    reader = gguf.GGUFReader(tmp_path / "rs.gguf")
    alpha = float(reader.fields["adapter.lora.alpha"].parts[-1][0])
    rank = int(next(t for t in reader.tensors if t.name.endswith(".lora_b")).shape[0])
    assert alpha / rank == 2.0 and alpha / rank != 8 / 4 ** 0.5  # what llama.cpp applies vs rsLoRA
    plain = peft_adapter(tmp_path, base, "no-rs", r=4, lora_alpha=8)
    assert "scaling" not in _rules(check_adapter(plain, "llamacpp"), "warning")


def test_unsupported_target_modules_llamacpp(base, tmp_path):
    adapter = make_adapter(tmp_path, base, target_modules=["q_proj"])
    _rewrite(adapter, lambda s: {k.replace("q_proj", "router"): v for k, v in s.items()})
    llama = [f for f in check_adapter(adapter, "llamacpp") if f.rule == "target_modules"]
    assert llama and "router" in llama[0].message


def test_base_model_mismatch(base, tmp_path):
    adapter = make_adapter(tmp_path, base)
    other = save_base(tmp_path, "llama", name="other", rms_norm_eps=1e-3)
    assert "base_model" in _rules(check_adapter(adapter, "vllm", model=str(other)))
    assert "base_model" not in _rules(check_adapter(adapter, "vllm", model=str(base)))


def test_dtype_and_4bit_base(base, tmp_path):
    adapter = make_adapter(tmp_path, base)
    _rewrite(adapter, lambda s: {k: v.to(torch.float64) for k, v in s.items()})
    assert "dtype" in _rules(check_adapter(adapter, "peft"))
    wide = save_base(tmp_path, "llama", name="wide", hidden_size=64, head_dim=16,
                     intermediate_size=128)
    qlora = make_adapter(tmp_path, wide, name="qlora", qlora=True)
    warning = [f for f in check_adapter(qlora, "vllm") if f.rule == "dtype" and f.level == "warning"]
    assert warning and "4-bit" in warning[0].message


def test_export_vllm_command(base, tmp_path, capsys):
    small = make_adapter(tmp_path, base, name="small", r=8)
    big = make_adapter(tmp_path, base, name="big", r=40)
    rc = main(["export", "vllm", "--adapter", f"sql={small}", "--adapter", f"chat={big}",
               "--model", "org/base", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert result["argv"] == ["vllm", "serve", "org/base", "--enable-lora", "--lora-modules",
                              f"sql={small.resolve()}", f"chat={big.resolve()}",
                              "--max-lora-rank", "64", "--max-loras", "2"]
    assert result["load_lora_adapter"] == [
        {"lora_name": "sql", "lora_path": str(small.resolve())},
        {"lora_name": "chat", "lora_path": str(big.resolve())}]
    # a DoRA adapter: the checks fail, no command is printed
    dora = make_adapter(tmp_path, base, name="dora", use_dora=True)
    assert main(["export", "vllm", "--adapter", f"d={dora}"]) == 1
    out = capsys.readouterr().out
    assert "vllm serve" not in out and "[dora]" in out
    assert main(["export", "vllm", "--adapter", "nodir"]) == 2
