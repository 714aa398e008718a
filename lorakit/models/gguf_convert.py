"""GGUF -> Hugging Face folder for the architectures lorakit exports (llama, qwen2), read once.

Why lorakit does this itself: transformers' GGUF loader parses the whole file three times for
one conversion (once for the config, once for the tokenizer's config, once for the weights),
each time turning every one of the ~100,000 vocabulary and merge strings into a Python value
element by element, and rebuilds gguf's ``TensorNameMap`` for every tensor. For the embedded
SmolLM2-135M that is ~45 s of a ~50 s first load (measured on 2 cores; docs/benchmarks.md),
paid by every new user and twice per test session.

This path reads the file with ``gguf.GGUFReader`` once, dequantizes each tensor with
``gguf.quants.dequantize`` (the function transformers calls), names tensors with one
``gguf.get_tensor_name_map`` (the map lorakit's exporter writes with), undoes the q/k row
permutation of the llama arch (:func:`unpermute_rows`, the inverse of
``lorakit.export.gguf.permute_rows``, which the exporter applies as llama.cpp's converter does), and builds the config from the same GGUF keys
transformers reads. The tokenizer is still built by transformers from the file (the class
``AutoTokenizer`` would pick, see :func:`tokenizer_class`): it is the one piece that knows every
tokenizer family.

The result is the folder transformers' own conversion writes, file for file
(tests/models/test_gguf_convert.py compares both on llama and qwen2 files in f32 and q8_0). A
file this path does not fully understand (another architecture, a tensor it cannot name, a
shape that does not fit the config) raises :class:`Unsupported`, and the caller falls back to
transformers' loader rather than guess.
"""

from __future__ import annotations

import json
from pathlib import Path

# GGUF metadata key (after "<arch>.") -> transformers config field, as transformers maps them
_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "rope.dimension_count": "head_dim",
    "rope.freq_base": "rope_theta",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "vocab_size": "vocab_size",
}
_TOKEN_IDS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
              "unknown_token_id": "unk_token_id", "padding_token_id": "pad_token_id"}
# per architecture: the config keys transformers does not take from the file
_SKIPPED = {"llama": set(), "qwen2": {"rope.dimension_count"}}


class Unsupported(Exception):
    """The file is outside what this converter reproduces exactly; use transformers'."""


def config_dict(reader) -> dict:
    """The transformers config fields of a llama / qwen2 GGUF, as transformers derives them."""
    fields = reader.fields
    if "general.architecture" not in fields:
        raise Unsupported("no general.architecture")
    arch = fields["general.architecture"].contents()
    if arch not in _SKIPPED:
        raise Unsupported(f"architecture {arch!r}")
    name = fields["general.name"].contents() if "general.name" in fields else None
    if arch == "llama" and name == "mistral":
        raise Unsupported("transformers reads this llama file as mistral")
    config = {"tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
              "model_type": arch}
    if name is not None:
        config["_model_name_or_path"] = name
    for key, target in _CONFIG_KEYS.items():
        if key in _SKIPPED[arch] or f"{arch}.{key}" not in fields:
            continue
        config[target] = fields[f"{arch}.{key}"].contents()
    for key, target in _TOKEN_IDS.items():
        if f"tokenizer.ggml.{key}" in fields:
            config[target] = fields[f"tokenizer.ggml.{key}"].contents()
    if "vocab_size" not in config:
        if "tokenizer.ggml.tokens" not in fields:
            raise Unsupported("no vocab_size and no token list")
        config["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    return config


def unpermute_rows(weight, n_head: int):
    """llama.cpp's interleaved rotary rows of a q/k projection (n_head * d, ...) back to the
    half-split layout transformers computes with: the inverse of ``export.gguf.permute_rows``."""
    rest = weight.shape[1:]
    d = weight.shape[0] // n_head
    return weight.reshape(n_head, d // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _dequantized(tensor):
    import numpy as np
    import torch
    from gguf.quants import dequantize

    # a float32 tensor comes back as a view of the read-only memory map: copy it
    array = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, order="C")
    return torch.from_numpy(array)


def convert(gguf_path: Path, out: Path) -> None:
    """Write ``gguf_path`` as a float32 Hugging Face folder into ``out``.

    Raises:
        Unsupported: the file needs transformers' general loader.
    """
    import gguf
    import safetensors.torch
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    reader = gguf.GGUFReader(str(gguf_path))
    fields = config_dict(reader)
    model_field = reader.fields.get("tokenizer.ggml.model")
    tokenizer_model = model_field.contents() if model_field is not None else None
    arch = fields["model_type"]
    config = AutoConfig.for_model(**fields)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    wanted = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if config.tie_word_embeddings:
        wanted.pop("lm_head.weight", None)
    names = gguf.get_tensor_name_map(
        {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch],
        config.num_hidden_layers)
    to_hf = {}
    for key in wanted:
        gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise Unsupported(f"no GGUF name for {key}")
        to_hf[gguf_name] = key
    have = {t.name for t in reader.tensors}
    if have != set(to_hf):
        extra, missing = sorted(have - set(to_hf)), sorted(set(to_hf) - have)
        raise Unsupported(f"tensors differ from the config's model (extra {extra[:3]}, "
                          f"missing {missing[:3]})")
    heads = {".attn_q.": config.num_attention_heads,
             ".attn_k.": config.num_key_value_heads or config.num_attention_heads}
    state = {}
    for tensor in reader.tensors:
        key = to_hf[tensor.name]
        weight = _dequantized(tensor)
        if tuple(weight.shape) != wanted[key]:
            raise Unsupported(f"{tensor.name} has shape {tuple(weight.shape)}, the config's "
                              f"model wants {wanted[key]}")
        if arch == "llama":
            for part, n_head in heads.items():
                if part in tensor.name:
                    weight = unpermute_rows(weight, n_head)
        state[key] = weight.contiguous()
    del reader
    safetensors.torch.save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    saved = config.to_dict()
    for key in ("quantization_config", "_name_or_path"):
        saved.pop(key, None)
    saved["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(saved, indent=2, sort_keys=True))
    GenerationConfig.from_model_config(config).save_pretrained(out)
    tokenizer_class(arch, tokenizer_model).from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name).save_pretrained(out)


def tokenizer_class(arch: str, tokenizer_model: str | None):
    """The tokenizer class ``AutoTokenizer`` picks for a GGUF of ``arch`` whose
    ``tokenizer.ggml.model`` is ``tokenizer_model``, without its second full parse of the
    file (it derives the whole config again to decide). Byte-level BPE ("gpt2") vocabularies:
    llama -> ``TokenizersBackend`` (``LlamaTokenizer`` would force a sentencepiece
    pre-tokenizer), qwen2 -> ``Qwen2Tokenizer``. Anything else -> ``AutoTokenizer`` itself."""
    from transformers import AutoTokenizer

    if tokenizer_model == "gpt2":
        if arch == "llama":
            from transformers.tokenization_utils_tokenizers import TokenizersBackend

            return TokenizersBackend
        if arch == "qwen2":
            from transformers import Qwen2Tokenizer

            return Qwen2Tokenizer
    return AutoTokenizer
