"""bf16 merges that would fail if the adapter were dropped: the written weights differ from
the base's by the adapter's own contribution, as PEFT computes it.

The parity gate alone cannot show this for bf16 (its thresholds are loose, and a small
adapter moves the outputs little), so each test also checks the merge against the base.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.cli import main
from lorakit.export.merge import merge_adapter_into_base
from lorakit.export.parity import parity_report
from lorakit.lora.inject import disable_adapters
from lorakit.models.quantize import quantize_model
from tiny_models import sample_input_ids

from export.helpers import make_adapter, save_base, write_prompts
from lora.helpers import randomize_adapter

BF16_ULP = 2.0 ** -7  # bfloat16 keeps 8 significant bits: one step is 2^-7 of the value


def test_cli_bf16_merge_is_base_plus_peft_delta(tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path, "llama")
    adapter = make_adapter(tmp_path, base, r=4, lora_alpha=8)
    out = tmp_path / "merged"
    rc = main(["merge", "--adapter", str(adapter), "--out", str(out), "--dtype", "bf16",
               "--prompts", str(write_prompts(tmp_path)), "--json"])
    assert rc == 0, capsys.readouterr().err
    json.loads(capsys.readouterr().out)
    ours = load_file(out / "model.safetensors")
    plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                                     adapter).merge_and_unload().state_dict()
    adapted = [k for k in ours if not torch.equal(peft[k], plain[k])]  # what PEFT changed
    assert adapted
    for key in adapted:
        delta = peft[key] - plain[key]  # the adapter's contribution, by PEFT
        assert delta.abs().max() > 100 * BF16_ULP * plain[key].abs().max() / 2 ** 8
        got = ours[key].float() - plain[key]
        # equal to base + delta up to one bf16 rounding of the sum
        assert ((got - delta).abs() <= BF16_ULP * peft[key].abs() + 1e-12).all(), key
        assert (got - delta).norm() < 0.05 * delta.norm(), key
    # untouched tensors are the base's, rounded to bf16
    for key in ours.keys() - set(adapted):
        assert torch.equal(ours[key], plain[key].to(torch.bfloat16)), key


def test_qlora_bf16_merge_moves_the_outputs_by_the_adapter():
    """The in-memory bf16 merge of a QLoRA adapter: close to the adapter on its 4-bit base,
    far from the 4-bit base without the adapter."""
    from export.test_merge import make_model64

    pytest.importorskip("bitsandbytes")
    model = quantize_model(make_model64("qwen2"))
    ids = sample_input_ids()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4))
    randomize_adapter(model, scale=0.3)
    merged = merge_adapter_into_base(model, dtype=torch.bfloat16)
    with_adapter = parity_report(model, merged, ids)
    with disable_adapters(model):
        without = parity_report(model, merged, ids)
    assert with_adapter["mean_kl"] < 1e-3
    assert without["mean_kl"] > 50 * max(with_adapter["mean_kl"], 1e-6), (with_adapter, without)
