"""Adapters and base folders built in the export tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

import lorakit
from lorakit.models.load import load_model
from tiny_models import VOCAB, save_tiny_folder, tiny_bpe_tokenizer

from lora.helpers import randomize_adapter

# prompts of the tiny word-level tokenizer's own words (anything else is <unk>)
TINY_PROMPTS = ["w5 w17 w33 w101", "w200 w3 w9", "w42 w42 w7 w250 w11", "w64 w128"]


def write_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(TINY_PROMPTS) + "\n")
    return path


def save_base(tmp_path: Path, family: str, name: str = "base", tokenizer: str = "word",
              **config_overrides) -> Path:
    """A tiny ``family`` model saved as an HF folder, with the tiny word-level tokenizer
    (``tokenizer="word"``; no chat template) or the embedded SmolLM2 BPE tokenizer with its
    chat template (``"smol"``; vocab_size becomes 49152), or a 320-token byte-level BPE with a
    ChatML template (``"bpe"``: ``tiny_models.tiny_bpe_tokenizer``, for tests where the
    vocabulary's size only costs time). Config fields in
    ``config_overrides`` (e.g. hidden_size=64, tie_word_embeddings=True) are changed first.
    transformers 5 reads the word-level tokenizer of a qwen2 folder as a Qwen2Tokenizer that
    encodes nothing, so qwen2 bases use ``"smol"``."""
    folder = tmp_path / name
    save_tiny_folder(folder, family)
    if tokenizer == "smol":
        from lorakit.models.load import load_tokenizer

        smol = load_tokenizer("smollm2-135m-instruct")
        for file in folder.glob("tokenizer*"):
            file.unlink()
        smol.save_pretrained(folder)
        config_overrides = {"vocab_size": len(smol), "bos_token_id": smol.bos_token_id,
                            "eos_token_id": smol.eos_token_id, "pad_token_id": None,
                            **config_overrides}
    if tokenizer == "bpe":
        bpe = tiny_bpe_tokenizer()
        for file in folder.glob("tokenizer*"):
            file.unlink()
        bpe.save_pretrained(folder)
        config_overrides = {"vocab_size": len(bpe), "bos_token_id": bpe.bos_token_id,
                            "eos_token_id": bpe.eos_token_id, "pad_token_id": None,
                            **config_overrides}
    if config_overrides:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        for file in folder.glob("model*.safetensors"):
            file.unlink()
        model.save_pretrained(folder)
    return folder


def make_adapter(tmp_path: Path, base: Path, *, name: str = "adapter", qlora: bool = False,
                 seed: int = 1, **lora) -> Path:
    """An adapter over ``base`` with non-zero weights, saved as ``tmp_path/name``."""
    model, tokenizer = load_model(str(base), dtype=torch.float32)
    if qlora:
        from lorakit.models.quantize import quantize_model

        quantize_model(model, compute_dtype=torch.float32)
    lorakit.add_adapter(model, lorakit.LoraConfig(**{"r": 4, "lora_alpha": 8, **lora}))
    randomize_adapter(model, seed=seed)
    return lorakit.save_adapter(model, tmp_path / name, tokenizer=tokenizer)


def run_without_lorakit(code: str, cwd: Path) -> dict:
    """Run ``code`` in a fresh interpreter where importing lorakit fails; it must print one
    JSON object as its last line, which is returned."""
    guard = textwrap.dedent("""
        import sys
        class _NoLorakit:
            def find_spec(self, name, path=None, target=None):
                if name == "lorakit" or name.startswith("lorakit."):
                    raise ImportError("lorakit must not be imported here")
        sys.meta_path.insert(0, _NoLorakit())
    """)
    out = subprocess.run([sys.executable, "-c", guard + textwrap.dedent(code)], cwd=cwd,
                         capture_output=True, text=True, timeout=300,
                         env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def prompt_ids() -> torch.Tensor:
    """Token ids of TINY_PROMPTS[0] in the tiny tokenizer (w5 -> 5 ...)."""
    return torch.tensor([[int(w[1:]) for w in TINY_PROMPTS[0].split()]])


assert VOCAB > 250
