"""``lorakit export gguf`` / ``gguf-lora``: files llama.cpp loads and decodes like transformers.

The llama.cpp checks need llama-cpp-python (the ``llamacpp`` extra, compiled from source:
~10 CPU-minutes); without it they are skipped, and the read-back by transformers still runs.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export import gguf_check, parity
from lorakit.export.gguf import permute_rows, write_model_gguf
from lorakit.models.load import load_model

from export.helpers import make_adapter, save_base
from lora.helpers import randomize_adapter

WIDE = dict(tokenizer="smol", hidden_size=64, intermediate_size=128, head_dim=16)


def _export(capsys, *args):
    rc = main(["export", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_permute_rows_pairs_the_halves_of_each_head():
    # one head of 4 dims: transformers rotates (x0, x2) and (x1, x3); llama.cpp adjacent pairs
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_rows(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    two_heads = torch.arange(8.0).reshape(8, 1)
    assert permute_rows(two_heads, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # mistral: the same GGUF arch as llama
def test_gguf_read_back_by_transformers(family, tmp_path, capsys):
    """transformers' GGUF reader (which undoes the q/k permutation) gets the merged model."""
    base = save_base(tmp_path, family, **WIDE)
    adapter = make_adapter(tmp_path, base, r=4)
    out = tmp_path / "m.gguf"
    rc, result, _ = _export(capsys, "gguf", "--adapter", adapter, "--out", out, "--type", "f32",
                            "--no-check")
    assert rc == 0 and out.is_file() and result["check"] is None
    model, tokenizer = load_model(str(base), dtype=torch.float32)
    lorakit.load_adapter(model, adapter)
    ids = parity.encode_prompts(tokenizer)
    report = gguf_check.check_gguf(out, model, ids, 8, backend="transformers")
    assert report["greedy_match"] == 1.0, report
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = (back(ids[0]).logits - model(ids[0]).logits).abs().max()
    assert diff < 1e-4, diff
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tok.chat_template == tokenizer.chat_template
    assert tok("SELECT name FROM t;")["input_ids"] == tokenizer("SELECT name FROM t;")["input_ids"]


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gguf_types_with_llama_cpp(family, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    base = save_base(tmp_path, family, **WIDE)
    adapter = make_adapter(tmp_path, base, r=4)
    for gtype in ("f32", "f16", "q8_0"):
        rc, result, err = _export(capsys, "gguf", "--adapter", adapter, "--out",
                                  tmp_path / f"{gtype}.gguf", "--type", gtype)
        assert rc == 0, err
        check = result["check"]
        assert check["backend"] == "llama.cpp" and check["prompts"] == 4
        if gtype in ("f32", "f16"):  # gated: token for token
            assert check["greedy_match"] == 1.0 and result["passed"], check
        else:
            assert "not gated" in err and check["greedy_token_agreement"] >= 0.5, check
    sizes = {t: (tmp_path / f"{t}.gguf").stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_unsupported_architecture(tmp_path, capsys):
    base = save_base(tmp_path, "phi3")
    adapter = make_adapter(tmp_path, base)
    rc, _, err = _export(capsys, "gguf", "--adapter", adapter, "--out", tmp_path / "x.gguf")
    assert rc == 2 and "'phi3'" in err and "llama, mistral, qwen2" in err
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_lora_refuses_dora_and_existing_output(tmp_path, capsys):
    base = save_base(tmp_path, "llama", **WIDE)
    dora = make_adapter(tmp_path, base, use_dora=True)
    rc, _, err = _export(capsys, "gguf-lora", "--adapter", dora, "--out", tmp_path / "l.gguf")
    assert rc == 2 and "DoRA" in err and "lorakit export gguf" in err
    (tmp_path / "l.gguf").write_text("keep")
    rc, _, err = _export(capsys, "gguf-lora", "--adapter", dora, "--out", tmp_path / "l.gguf")
    assert rc == 2 and "already exists" in err and (tmp_path / "l.gguf").read_text() == "keep"


def test_gguf_check_failure_deletes_the_file(tmp_path, capsys, monkeypatch):
    """A GGUF whose weights are wrong (a writer that scrambles the output head) fails the
    f32 gate. (Leaving q/k unpermuted is too subtle for a random tiny model's greedy tokens;
    the SmolLM2 test covers the permutation.)"""
    import lorakit.export.gguf as gguf_module

    base = save_base(tmp_path, "llama", **WIDE)
    adapter = make_adapter(tmp_path, base)
    real = gguf_module._maybe_permute

    def scrambled(name, tensor, arch, config):
        tensor = real(name, tensor, arch, config)
        return tensor.flip(0) if name == "lm_head.weight" else tensor

    monkeypatch.setattr(gguf_module, "_maybe_permute", scrambled)
    out = tmp_path / "bad.gguf"
    rc, _, err = _export(capsys, "gguf", "--adapter", adapter, "--out", out, "--type", "f32")
    assert rc == 2 and "differ from the merged model" in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.gguf")]


@pytest.mark.slow
def test_smollm2_gguf_round_trip_with_llama_cpp(smol_model, tmp_path, capsys):
    """The embedded default: merged GGUF decodes like transformers; the LoRA GGUF on the base
    GGUF decodes like the merged GGUF; llama.cpp tokenizes the chat prompt like transformers."""
    pytest.importorskip("llama_cpp")
    model, tokenizer = smol_model
    model = copy.deepcopy(model)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    randomize_adapter(model, scale=0.02)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    merged_gguf, base_gguf, lora_gguf = (tmp_path / n for n in ("m.gguf", "b.gguf", "l.gguf"))
    rc, merged, err = _export(capsys, "gguf", "--adapter", adapter, "--out", merged_gguf,
                              "--type", "f32")
    assert rc == 0 and merged["check"]["greedy_match"] == 1.0, err
    rc, _, err = _export(capsys, "gguf", "--model", "smollm2-135m-instruct", "--out", base_gguf,
                         "--type", "f32", "--no-check")
    assert rc == 0, err
    rc, lora, err = _export(capsys, "gguf-lora", "--adapter", adapter, "--out", lora_gguf,
                            "--base-gguf", base_gguf)
    assert rc == 0 and lora["check"]["greedy_match"] == 1.0, err
    ids = parity.encode_prompts(tokenizer)
    assert gguf_check.llama_cpp_greedy(base_gguf, ids, 16, lora_path=lora_gguf) == \
        merged["check"]["gguf"]
    # the adapter matters: the base alone decodes something else
    assert gguf_check.llama_cpp_greedy(base_gguf, ids, 16) != merged["check"]["gguf"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Count 1234 rows!"}],
                                         tokenize=False, add_generation_prompt=True)
    assert gguf_check.llama_cpp_tokenize(merged_gguf, text) == \
        tokenizer(text, add_special_tokens=False)["input_ids"]


def test_write_model_gguf_rejects_unknown_type(tmp_path):
    model, tokenizer = load_model(str(save_base(tmp_path, "llama", **WIDE)))
    with pytest.raises(ExportError, match="f32, f16, bf16, q8_0"):
        write_model_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_k")
