import json

import pytest
import torch


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smol_tokenizer):
    """A tiny random Llama with the real SmolLM2 tokenizer and chat template, saved as a
    Hugging Face folder (what `model:` points at in a run config)."""
    import transformers as tf

    folder = tmp_path_factory.mktemp("tiny-llama")
    config = tf.LlamaConfig(vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, tie_word_embeddings=True,
                            bos_token_id=smol_tokenizer.bos_token_id,
                            eos_token_id=smol_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    smol_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def arithmetic_data(tmp_path_factory):
    """A small learnable prompt/completion file and a held-out one."""
    folder = tmp_path_factory.mktemp("data")
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = [{"prompt": f"Spell the digit {i % 10} ({n})", "completion": words[i % 10]}
            for n, i in enumerate(range(60))]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return folder
