"""``lorakit merge``: adapter folder -> standard HF folder, with the parity gate."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import lorakit.export.merge as merge_module
from lorakit.cli import main
from lorakit.lora.io import load_adapter
from lorakit.models.load import load_model

from export.helpers import (TINY_PROMPTS, make_adapter, prompt_ids, run_without_lorakit,
                            save_base, write_prompts)

pytest.importorskip("bitsandbytes")

# family, LoraConfig fields, base config overrides, qlora
CASES = {
    "llama-lora": ("llama", dict(), {}, False),
    "mistral-rslora": ("mistral", dict(use_rslora=True, r=8), {}, False),
    "qwen2-dora": ("qwen2", dict(use_dora=True), dict(tokenizer="smol"), False),
    # tied embeddings + a trained lm_head copy: the merged config must untie them
    "llama-modules_to_save": ("llama", dict(modules_to_save=["lm_head"]),
                              dict(tie_word_embeddings=True), False),
    "qwen2-qlora": ("qwen2", dict(), dict(tokenizer="smol", hidden_size=64, intermediate_size=128,
                                          head_dim=16), True),
}


def _merge(capsys, *args) -> tuple[int, dict | None, str]:
    """Run ``lorakit merge ... --json``: exit status, the JSON result, stderr."""
    rc = main(["merge", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def _reference_logits(base, adapter, ids, qlora=False):
    """Logits of the adapter over its base, computed here independently of lorakit merge."""
    model, tokenizer = load_model(str(base), dtype=torch.float32)
    if qlora:
        from lorakit.models.quantize import quantize_model

        quantize_model(model, compute_dtype=torch.float32)
    load_adapter(model, adapter, tokenizer=tokenizer)
    with torch.no_grad():
        return model(ids).logits


def test_merge_families_load_in_plain_transformers(tmp_path, capsys):
    prompts = write_prompts(tmp_path)
    ids = prompt_ids()
    folders, expected = {}, {}
    for case, (family, lora, overrides, qlora) in CASES.items():
        base = save_base(tmp_path, family, name=f"base-{case}", **overrides)
        adapter = make_adapter(tmp_path, base, name=f"adapter-{case}", qlora=qlora, **lora)
        out = tmp_path / f"merged-{case}"
        rc, result, err = _merge(capsys, "--adapter", adapter, "--out", out, "--prompts", prompts,
                            "--max-shard-size", "50KB", "--max-new-tokens", "8")
        assert rc == 0 and result["passed"] and result["qlora"] == qlora, case
        gated = result["parity"]["adapter on 4-bit base" if qlora else "adapter on base"]
        assert gated["max_abs_logit_diff"] < 1e-4 and gated["greedy_match"] == 1.0, (case, gated)
        assert gated["prompts"] == len(TINY_PROMPTS) and gated["positions"] > 40
        if qlora:  # the float32-base row is reported: the 4-bit rounding the adapter lived with
            assert result["parity"]["adapter on float32 base"]["max_abs_logit_diff"] > 1e-4
        names = {p.name for p in out.iterdir()}
        assert {"config.json", "generation_config.json", "model.safetensors.index.json",
                "tokenizer.json", "tokenizer_config.json"} <= names, names
        assert sum(n.startswith("model-0") for n in names) >= 2  # sharded at 50KB
        assert "lorakit" not in (out / "config.json").read_text()
        assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp left
        folders[case] = str(out)
        expected[case] = _reference_logits(base, adapter, ids, qlora).tolist()
        if case == "llama-modules_to_save":
            assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    # a fresh interpreter where importing lorakit fails loads each folder with transformers
    got = run_without_lorakit(f"""
        import json, torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        ids = torch.tensor({prompt_ids().tolist()})
        out = {{}}
        for case, folder in {folders!r}.items():
            model = AutoModelForCausalLM.from_pretrained(folder).eval()
            tok = AutoTokenizer.from_pretrained(folder)
            if "qwen2" not in case:
                assert tok("w5 w17")["input_ids"] == [5, 17]
            else:  # the SmolLM2 tokenizer and its chat template came along
                assert "<|im_start|>" in tok.apply_chat_template(
                    [{{"role": "user", "content": "hi"}}], tokenize=False)
            with torch.no_grad():
                out[case] = model(ids).logits.tolist()
        print(json.dumps(out))
    """, cwd=tmp_path)
    for case in CASES:
        diff = (torch.tensor(got[case]) - torch.tensor(expected[case])).abs().max()
        assert diff < 1e-4, (case, diff)


def test_merge_matches_peft_merge_and_unload(tmp_path, capsys):
    """PEFT's own merge of the same DoRA adapter gives the same weights."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base, use_dora=True, r=8, lora_alpha=4)
    rc, _, err = _merge(capsys, "--adapter", adapter, "--out", tmp_path / "ours",
                   "--prompts", write_prompts(tmp_path))
    assert rc == 0
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    theirs = peft.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").state_dict()
    assert ours.keys() == theirs.keys()
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    changed = (ours["model.layers.0.self_attn.q_proj.weight"]
               - AutoModelForCausalLM.from_pretrained(base).state_dict()[
                   "model.layers.0.self_attn.q_proj.weight"]).abs().max()
    assert worst < 1e-6 and changed > 1e-3, (worst, changed)


def test_bf16_weights_written_and_gated_with_bf16_thresholds(tmp_path, capsys):
    base = save_base(tmp_path, "mistral")
    adapter = make_adapter(tmp_path, base)
    out = tmp_path / "merged"
    rc, result, err = _merge(capsys, "--adapter", adapter, "--out", out, "--dtype", "bf16",
                        "--prompts", write_prompts(tmp_path))
    assert rc == 0 and result["dtype"] == "bfloat16"
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    report = result["parity"]["adapter on base"]
    assert 0 < report["max_abs_logit_diff"] and report["mean_kl"] < 1e-2


def test_parity_gate_rejects_a_wrong_merge(tmp_path, capsys, monkeypatch):
    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base)
    real = merge_module.LeanMerge.tensor

    def broken(self, name):  # a merge that scales one adapted weight by 1.5
        tensor = real(self, name)
        return tensor * 1.5 if name == "model.layers.0.self_attn.q_proj.weight" else tensor

    monkeypatch.setattr(merge_module.LeanMerge, "tensor", broken)
    out = tmp_path / "merged"
    args = ["--adapter", adapter, "--out", out, "--prompts", write_prompts(tmp_path)]
    rc, _, err = _merge(capsys, *args)
    assert rc == 2 and not out.exists()
    assert "parity gate failed" in err and "FAIL" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]
    rc, result, err = _merge(capsys, *args, "--force")
    assert rc == 0 and out.is_dir() and result["forced"] and not result["passed"]


def test_existing_output_needs_overwrite(tmp_path, capsys):
    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base)
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--adapter", adapter, "--out", out, "--prompts", write_prompts(tmp_path)]
    rc, _, err = _merge(capsys, *args)
    assert rc == 2 and "already exists" in err
    assert (out / "keep.txt").read_text() == "mine"
    rc, _, err = _merge(capsys, *args, "--overwrite")
    assert rc == 0 and not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_adapter_for_another_base(tmp_path, capsys):
    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base)
    prompts = write_prompts(tmp_path)
    # other shapes: load_adapter names the layer and both shapes
    wide = save_base(tmp_path, "llama", name="wide", hidden_size=64, head_dim=16)
    rc, _, err = _merge(capsys, "--adapter", adapter, "--model", wide, "--out", tmp_path / "a",
                   "--prompts", prompts)
    assert rc == 2 and "shape mismatch" in err and "different base model" in err
    # same shapes, another config: the manifest's hash catches it; --force exports anyway
    other = save_base(tmp_path, "llama", name="other", rms_norm_eps=1e-3)
    rc, _, err = _merge(capsys, "--adapter", adapter, "--model", other, "--out", tmp_path / "b",
                   "--prompts", prompts)
    assert rc == 2 and "trained on" in err and "--model" in err and not (tmp_path / "b").exists()
    rc, result, err = _merge(capsys, "--adapter", adapter, "--model", other, "--out", tmp_path / "b",
                        "--prompts", prompts, "--force")
    assert rc == 0 and result["base"] == str(other)
