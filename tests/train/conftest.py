import pytest
import torch
from tiny_data import write_digit_data


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
    return write_digit_data(tmp_path_factory.mktemp("data"))
