"""Model presets, GPU cards and $/GPU-hour prices the estimator knows by name.

Presets are the published hyperparameters of each model's ``config.json`` on the Hugging Face
Hub, written out as transformers config objects so nothing is downloaded. ``params`` is the
parameter count the model card states (exact counts; ``tests/plan`` checks that a model built
from the config on the meta device has exactly that many).

GPU memory is what the card is sold with (GB as vendors write it, which for these cards is
GiB of usable-by-CUDA memory minus a little; the estimator keeps a reserve, see
``estimate.CUDA_CONTEXT_GIB``). ``bf16_tflops`` is the dense (not 2:4 sparse) bf16 tensor-core
peak with fp32 accumulation from the vendor's data sheet or architecture whitepaper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

PRICES_DATE = "2025-06"
PRICES_SOURCE = ("approximate on-demand list prices per GPU-hour of common clouds and GPU "
                 "rental marketplaces (Lambda, RunPod, Google Cloud) as of 2025-06; prices "
                 "move, so pass --price-per-hour for a quote you hold")


@dataclass(frozen=True)
class Preset:
    name: str
    hub_id: str
    params: int | None  # exact count published for the model (card / safetensors index)
    make_config: Callable


def _llama(**kw):
    from transformers import LlamaConfig

    return LlamaConfig(**kw)


def _mistral(**kw):
    from transformers import MistralConfig

    return MistralConfig(**kw)


def _qwen2(**kw):
    from transformers import Qwen2Config

    return Qwen2Config(**kw)


def _phi3(**kw):
    from transformers import Phi3Config

    return Phi3Config(**kw)


def _gpt2(**kw):
    from transformers import GPT2Config

    return GPT2Config(**kw)


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("llama3-8b", "meta-llama/Meta-Llama-3-8B", 8_030_261_248, lambda: _llama(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False)),
    Preset("llama3-70b", "meta-llama/Meta-Llama-3-70B", 70_553_706_496, lambda: _llama(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
        rope_theta=500000.0, tie_word_embeddings=False)),
    Preset("mistral-7b", "mistralai/Mistral-7B-v0.1", 7_241_732_096, lambda: _mistral(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768,
        sliding_window=4096, tie_word_embeddings=False)),
    Preset("phi3-mini", "microsoft/Phi-3-mini-4k-instruct", 3_821_079_552, lambda: _phi3(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        tie_word_embeddings=False, pad_token_id=32000)),
    Preset("qwen2.5-7b", "Qwen/Qwen2.5-7B", 7_615_616_512, lambda: _qwen2(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072,
        tie_word_embeddings=False)),
    Preset("smollm2-135m", "HuggingFaceTB/SmolLM2-135M", 134_515_008, lambda: _llama(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True)),
    # for the comparisons with published figures in docs/hardware.md
    Preset("llama2-7b", "meta-llama/Llama-2-7b-hf", 6_738_415_616, lambda: _llama(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        tie_word_embeddings=False)),
    Preset("llama1-65b", "huggyllama/llama-65b", 65_285_660_672, lambda: _llama(
        vocab_size=32000, hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=64, max_position_embeddings=2048,
        tie_word_embeddings=False)),
    # GPT-3 has no config.json: GPT-2's architecture at the paper's sizes (table 2.1); the
    # paper gives no exact count ("175.0B"), so params is None
    Preset("gpt3-175b", "(GPT-3 paper, Brown et al. 2020, table 2.1)", None,
           lambda: _gpt2(vocab_size=50257, n_embd=12288, n_layer=96, n_head=96,
                         n_positions=2048)),
]}

# the presets of the hardware table (the others exist for docs/hardware.md)
TABLE_PRESETS = ["smollm2-135m", "phi3-mini", "mistral-7b", "qwen2.5-7b", "llama3-8b",
                 "llama3-70b"]

# model specs lorakit loads by alias -> the preset with the same architecture
ALIAS_PRESETS = {"smollm2-135m-instruct": "smollm2-135m"}


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    bf16_tflops: float  # dense peak
    usd_per_hour: float

    @property
    def label(self) -> str:
        return f"{self.name} {self.memory_gib:g}GB"


GPUS: list[GPU] = [
    GPU("RTX 4060 Ti", 16, 44, 0.20),          # AD106, Ada whitepaper scaling
    GPU("RTX 4070 Ti Super", 16, 88, 0.25),    # AD103
    GPU("RTX 3090", 24, 71, 0.22),             # GA102 whitepaper: 71 TFLOPS fp16/fp32-acc
    GPU("RTX 4090", 24, 165, 0.69),            # Ada whitepaper: 165.2 TFLOPS fp16/fp32-acc
    GPU("L4", 24, 121, 0.71),                  # NVIDIA L4 data sheet
    GPU("A10", 24, 125, 0.75),                 # NVIDIA A10 data sheet
    GPU("A100", 40, 312, 1.29),                # A100 data sheet
    GPU("A100", 80, 312, 1.79),
    GPU("H100", 80, 989, 2.99),                # H100 SXM data sheet
    GPU("H200", 141, 989, 3.79),               # H200 data sheet
]


def gpu_by_name(name: str) -> GPU:
    """Find a card by a loose name: "4090", "rtx 4090", "A100 80GB", "a100-40", "H100".

    Raises:
        ConfigError: no card matches, or the name is ambiguous (both A100s).
    """
    from lorakit.errors import ConfigError

    def norm(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch.isalnum()).replace("gb", "")

    key = norm(name)
    exact = [g for g in GPUS if norm(g.label) == key or norm(g.label.replace("RTX ", "")) == key]
    if exact:
        return exact[0]
    hits = [g for g in GPUS if key and key in norm(g.label)]
    if len(hits) == 1:
        return hits[0]
    labels = ", ".join(g.label for g in GPUS)
    if hits:
        raise ConfigError(f"GPU {name!r} is ambiguous: {', '.join(g.label for g in hits)}; "
                          f"add the memory, e.g. '{hits[0].label}'")
    raise ConfigError(f"unknown GPU {name!r}; known cards: {labels}")
