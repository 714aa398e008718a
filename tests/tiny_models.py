"""Tiny randomly initialised models of each family the tests cover (no downloads).

Each is a stock transformers model built from its config, small enough that a forward pass
takes milliseconds, but with the real module layout (fused ``qkv_proj`` in Phi-3, Conv1D in
GPT-2, tied embeddings in Gemma) so LoRA injection meets what it meets in the wild.
"""

from __future__ import annotations

import torch

VOCAB = 256

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=128,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **_COMMON)
    if family == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **_COMMON)
    if family == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, **_COMMON)
    if family == "phi3":
        return tf.Phi3Config(num_key_value_heads=4, **_COMMON)
    if family == "gemma":
        return tf.GemmaConfig(num_key_value_heads=1, head_dim=8, **_COMMON)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2)
    raise ValueError(family)


FAMILIES = ["llama", "mistral", "qwen2", "phi3", "gemma", "gpt2"]


def make_tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    """A freshly initialised tiny causal LM of ``family``, in eval mode."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="eager")
    return model.eval()


def sample_input_ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def save_tiny_folder(path, family: str = "llama"):
    """A tiny model + a word-level tokenizer (no pad token, no chat template) saved in ``path``
    as a Hugging Face folder; returns the model."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    model = make_tiny_model(family)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model


BPE_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BPE_TEXTS = ["SELECT name FROM users WHERE id = 7;", "Hello, world! 1234 rows.", " two  spaces",
             "the quick brown fox jumps over the lazy dog"]


def tiny_bpe_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer (GPT-2 style, like SmolLM2's; what GGUF export writes) of
    ``vocab_size`` tokens trained here on a few sentences, with ChatML special tokens and chat
    template: the small stand-in for SmolLM2's 49,152-token vocabulary where the vocabulary
    size only costs time (transformers' GGUF reader parses it string by string)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    backend.train_from_iterator(BPE_TEXTS * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<|endoftext|>",
                                   bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   chat_template=BPE_CHAT_TEMPLATE)


def make_smol_llama(tokenizer, *, hidden_size: int = 64, intermediate_size: int = 128, seed: int = 0):
    """A tiny random Llama sized for ``tokenizer`` (the real SmolLM2 one, with its chat
    template: ``smol_tokenizer``): 2 layers, 4 heads (2 KV), tied embeddings, its BOS/EOS."""
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size,
                            intermediate_size=intermediate_size, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=512, tie_word_embeddings=True,
                            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return tf.AutoModelForCausalLM.from_config(config)
