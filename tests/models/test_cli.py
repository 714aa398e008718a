"""``lorakit info`` and ``lorakit generate`` through lorakit.cli.main."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorakit.cli import main
from tiny_models import make_tiny_model, save_tiny_folder


def test_info_json_reports_parameters_and_target_modules(tmp_path, capsys):
    model = save_tiny_folder(tmp_path)
    assert main(["info", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in model.parameters())
    assert info["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj",
                                      "up_proj", "v_proj"]
    assert info["architecture"] == "LlamaForCausalLM"
    assert info["dtype"] == "float32"
    assert info["spec"] == str(tmp_path.resolve())
    assert set(info["memory_bytes"]) == {"32-bit", "16-bit", "4-bit"}


def test_info_table_names_the_4bit_assumption(tmp_path, capsys):
    save_tiny_folder(tmp_path)
    assert main(["info", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "LlamaForCausalLM" in out and "q_proj" in out
    assert "4.127" in out and "NF4" in out


def test_info_missing_model_exits_2_with_message(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_generate_rejects_unknown_dtype(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--prompt", "x", "--dtype", "float8"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_generate_default_dtype_is_bf16_only_where_native(tmp_path, capsys, monkeypatch):
    import torch

    from lorakit.models import load as load_mod

    base = tmp_path / "base"
    save_tiny_folder(base)
    seen = []
    real = load_mod.load_model
    monkeypatch.setattr(load_mod, "load_model",
                        lambda spec, dtype=None, **kw: seen.append(dtype) or real(spec, dtype, **kw))
    assert main(["generate", "--model", str(base), "--prompt", "w5", "--max-tokens", "2"]) == 0
    assert seen == [torch.bfloat16 if load_mod.native_bf16("cpu") else torch.float32]


def test_generate_applies_the_adapter(tmp_path, capsys):
    """``--adapter`` with the real loader: the completion differs from the base's, and equals
    what transformers generates greedily with the same adapter loaded by PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.helpers import make_adapter

    base = tmp_path / "base"
    save_tiny_folder(base)
    adapter = make_adapter(tmp_path, base, r=8, lora_alpha=32,
                           target_modules=["q_proj", "v_proj", "down_proj"])
    prompt = "w5 w17 w33 w101"
    args = ["generate", "--model", str(base), "--prompt", prompt, "--max-tokens", "12",
            "--dtype", "float32"]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip()
    assert main([*args, "--adapter", str(adapter)]) == 0
    tuned = capsys.readouterr().out.strip()
    assert tuned and tuned != plain

    tokenizer = AutoTokenizer.from_pretrained(base)
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        ids = peft_model.generate(**enc, max_new_tokens=12, do_sample=False)
    reference = tokenizer.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert tuned == reference.strip()


@pytest.mark.slow
def test_generate_prints_the_completion(capsys):
    rc = main(["generate", "--prompt", "What is the capital of France?", "--max-tokens", "24"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "Paris" in out and "<|im_start|>" not in out
