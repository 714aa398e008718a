import json

import pytest
import torch
from tiny_models import make_smol_llama


@pytest.fixture(scope="session")
def eval_base_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template, as a folder."""
    folder = tmp_path_factory.mktemp("eval-base")
    make_smol_llama(smol_tokenizer, hidden_size=32, intermediate_size=64).save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def eval_adapters(tmp_path_factory, eval_base_dir):
    """Two adapters on that base: ``zero`` (fresh, B = 0) and ``rand`` (B random)."""
    from lorakit import LoraConfig, add_adapter, save_adapter
    from lorakit.lora.inject import lora_layers
    from lorakit.models.load import load_model

    folder = tmp_path_factory.mktemp("eval-adapters")
    model, tokenizer = load_model(str(eval_base_dir), dtype=torch.float32)
    torch.manual_seed(1)  # A's init too: the adapters must not depend on which tests ran first
    add_adapter(model, LoraConfig(r=4, lora_alpha=8), name="zero")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), name="rand")
    for _, layer in lora_layers(model):
        if "rand" in layer.lora_B:
            torch.nn.init.normal_(layer.lora_B["rand"].weight, std=0.3)
    save_adapter(model, folder / "zero", name="zero", tokenizer=tokenizer)
    save_adapter(model, folder / "rand", name="rand", tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="session")
def eval_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("eval-data")
    rows = [{"prompt": f"Name the colour number {i}.", "completion": c}
            for i, c in enumerate(["red", "green", "blue", "black", "white", "grün"])]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / "noref.jsonl").write_text(json.dumps({"prompt": "no answer here"}) + "\n")
    return folder
