"""Random-weight Llama checkpoints on disk, written shard by shard (never the whole model).

``write_llama_checkpoint(path, ...)`` writes what ``save_pretrained`` + ``hf download`` give:
``config.json``, ``model-0000K-of-0000N.safetensors`` shards of at most ``shard_bytes`` each
(a tensor larger than that gets a shard of its own), ``model.safetensors.index.json`` and a
word-level tokenizer. Tensor names and shapes come from the stock transformers model built on
the meta device, so any ``LlamaConfig`` works, from a 2-layer test model to Llama-2-7B shapes.
Only one shard's tensors are in memory at a time; each is generated from its own seed, so the
checkpoint is the same whatever the shard size.

Also a command: ``python tests/checkpoints.py DIR --preset tinyllama-1.1b`` (used by
``bench/big_models.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path

import torch

# public config.json hyperparameters of the shapes the benchmarks use
PRESETS = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
}
INIT_STD = 0.02  # LlamaConfig.initializer_range


def _fsync_replace(tmp: Path, final: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    _fsync_replace(tmp, path)


def _tensor(name: str, shape, dtype, seed: int) -> torch.Tensor:
    """The tensor ``name``: norms are ones (as initialised), everything else N(0, INIT_STD)."""
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return (torch.randn(shape, generator=g, dtype=dtype) * INIT_STD).to(dtype)


def save_word_tokenizer(path, vocab_size: int) -> None:
    """A word-level tokenizer ``<unk> <s> </s> w3 w4 ...`` of ``vocab_size`` entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(path)


def llama_config(**overrides):
    """A ``LlamaConfig`` (bf16, untied head); ``overrides`` or a PRESETS entry set the sizes."""
    from transformers import LlamaConfig

    base = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                tie_word_embeddings=False)
    config = LlamaConfig(**{**base, **overrides})
    config.dtype = "bfloat16"
    return config


def write_llama_checkpoint(path, config=None, *, shard_bytes: int = 100 * 2**20,
                           dtype=torch.bfloat16, seed: int = 0, tokenizer: bool = True) -> dict:
    """Write a random-weight Llama checkpoint folder, one shard at a time.

    Args:
        path: the folder (created).
        config: a ``LlamaConfig`` (default: :func:`llama_config`'s small one).
        shard_bytes: most bytes of tensor data in one shard.
        dtype: dtype of the stored weights.
        seed: weights are a function of (seed, tensor name) only.
        tokenizer: also write a word-level tokenizer of the config's vocabulary size.

    Returns:
        ``{"path", "shards": [file names], "weight_map", "total_bytes", "largest_shard_bytes",
        "parameters"}``.
    """
    import safetensors.torch
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = config if config is not None else llama_config()
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(config)
    # state_dict keys in model order; a tied head is stored once (as the embedding)
    specs = [(name, tuple(tensor.shape)) for name, tensor in meta.state_dict().items()
             if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    del meta
    size = torch.empty((), dtype=dtype).element_size()
    groups, current, current_bytes = [], [], 0
    for name, shape in specs:
        nbytes = size * int(torch.Size(shape).numel())
        if current and current_bytes + nbytes > shard_bytes:
            groups.append(current)
            current, current_bytes = [], 0
        current.append((name, shape))
        current_bytes += nbytes
    if current:
        groups.append(current)

    shards, weight_map, total, largest = [], {}, 0, 0
    for k, group in enumerate(groups, start=1):
        file = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors = {name: _tensor(name, shape, dtype, seed) for name, shape in group}
        tmp = path / f".{file}.tmp"
        safetensors.torch.save_file(tensors, str(tmp), metadata={"format": "pt"})
        _fsync_replace(tmp, path / file)
        shard_data = sum(t.numel() * t.element_size() for t in tensors.values())
        total += shard_data
        largest = max(largest, shard_data)
        weight_map.update({name: file for name in tensors})
        shards.append(file)
        del tensors
    _write_json(path / "model.safetensors.index.json",
                {"metadata": {"total_size": total}, "weight_map": weight_map})
    config.save_pretrained(path)
    if tokenizer:
        save_word_tokenizer(path, config.vocab_size)
    params = sum(int(torch.Size(s).numel()) for _, s in specs)
    return {"path": path, "shards": shards, "weight_map": weight_map, "total_bytes": total,
            "largest_shard_bytes": largest, "parameters": params}


def _main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tinyllama-1.1b")
    parser.add_argument("--shard-mib", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    info = write_llama_checkpoint(args.path, llama_config(**PRESETS[args.preset]),
                                  shard_bytes=args.shard_mib * 2**20, seed=args.seed)
    print(json.dumps({"path": str(info["path"]), "shards": len(info["shards"]),
                      "total_bytes": info["total_bytes"], "parameters": info["parameters"],
                      "largest_shard_bytes": info["largest_shard_bytes"]}))


if __name__ == "__main__":
    _main()
