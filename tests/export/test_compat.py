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


def test_plain_adapter_is_clean_for_every_target(base, tmp_path):
    adapter = make_adapter(tmp_path, base, r=8)
    for target in ("vllm", "llamacpp", "peft"):
        assert not _rules(check_adapter(adapter, target), "error"), target
    # the PEFT verdict is PEFT's own: it loads the folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)


def test_dora_rejected_by_vllm_and_llamacpp(base, tmp_path, capsys):
    adapter = make_adapter(tmp_path, base, use_dora=True)
    assert main(["check-adapter", str(adapter), "--target", "vllm"]) == 1
    out = capsys.readouterr().out
    assert "[dora]" in out and "lorakit merge --adapter" in out
    assert "dora" in _rules(check_adapter(adapter, "llamacpp"))
    assert main(["check-adapter", str(adapter), "--target", "peft"]) == 0


def test_modules_to_save_rejected(base, tmp_path):
    adapter = make_adapter(tmp_path, base, modules_to_save=["lm_head"])
    findings = check_adapter(adapter, "vllm")
    assert "modules_to_save" in _rules(findings)
    assert any("lm_head" in f.message for f in findings)
    assert "modules_to_save" in _rules(check_adapter(adapter, "llamacpp"))


def test_rank_above_vllm_default_suggests_the_flag(base, tmp_path, capsys):
    adapter = make_adapter(tmp_path, base, r=24)
    findings = check_adapter(adapter, "vllm")
    rank = [f for f in findings if f.rule == "rank"]
    assert rank and "--max-lora-rank 32" in rank[0].fix and "24" in rank[0].message
    assert "rank" not in _rules(check_adapter(adapter, "vllm", max_lora_rank=32))
    assert main(["check-adapter", str(adapter), "--target", "vllm", "--max-lora-rank", "32",
                 "--json"]) == 0
    assert all(f["rule"] != "rank" for f in json.loads(capsys.readouterr().out))


def test_unsupported_target_modules(base, tmp_path):
    adapter = make_adapter(tmp_path, base, target_modules=["q_proj"])
    _rewrite(adapter, lambda s: {k.replace("q_proj", "router"): v for k, v in s.items()})
    assert "target_modules" in _rules(check_adapter(adapter, "vllm"))
    llama = [f for f in check_adapter(adapter, "llamacpp") if f.rule == "target_modules"]
    assert llama and "router" in llama[0].message


def test_base_model_mismatch(base, tmp_path):
    adapter = make_adapter(tmp_path, base)
    other = save_base(tmp_path, "llama", name="other", rms_norm_eps=1e-3)
    assert "base_model" in _rules(check_adapter(adapter, "vllm", model=str(other)))
    assert "base_model" not in _rules(check_adapter(adapter, "vllm", model=str(base)))


def test_dtype_and_bias_and_4bit_base(base, tmp_path):
    adapter = make_adapter(tmp_path, base)
    _rewrite(adapter, lambda s: {k: v.to(torch.float64) for k, v in s.items()})
    assert "dtype" in _rules(check_adapter(adapter, "peft"))
    biased = make_adapter(tmp_path, base, name="biased", bias="lora_only")
    assert "bias" in _rules(check_adapter(biased, "llamacpp"))
    assert "bias" in _rules(check_adapter(biased, "vllm"), "warning")
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
