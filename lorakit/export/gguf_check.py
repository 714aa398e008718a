"""Does llama.cpp compute what the merged transformers model computes?

The written GGUF is loaded with ``llama-cpp-python`` (the ``llamacpp`` extra; it compiles
llama.cpp when installed from source) and greedily decodes the parity prompts, given as token
ids so that tokenization is compared separately. When llama-cpp-python is not installed the
file is read back with transformers (``gguf_file=``, which undoes the q/k permutation and
dequantizes) instead, and the report says which backend was used.
"""

from __future__ import annotations

from pathlib import Path

import torch


def llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def llama_cpp_greedy(path, prompt_ids: list[torch.Tensor], max_new_tokens: int,
                     lora_path=None) -> list[list[int]]:
    """Greedy tokens from llama.cpp for each prompt (1, T), no stop at EOS."""
    from llama_cpp import Llama

    longest = max(int(ids.shape[1]) for ids in prompt_ids) + max_new_tokens
    llm = Llama(model_path=str(path), lora_path=str(lora_path) if lora_path else None,
                n_ctx=max(64, longest + 8), n_threads=2, seed=0, verbose=False)
    try:
        out = []
        for ids in prompt_ids:
            llm.reset()
            tokens = []
            for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, repeat_penalty=1.0):
                tokens.append(int(token))
                if len(tokens) == max_new_tokens:
                    break
            out.append(tokens)
        return out
    finally:
        llm.close()


def llama_cpp_tokenize(path, text: str) -> list[int]:
    """How llama.cpp tokenizes ``text`` (special tokens parsed, no BOS added)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=True)
    finally:
        llm.close()


def transformers_greedy(path, prompt_ids: list[torch.Tensor], max_new_tokens: int):
    """Greedy tokens of the GGUF file read back (dequantized) by transformers."""
    from transformers import AutoModelForCausalLM

    from lorakit.export.parity import greedy_tokens

    path = Path(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32).eval()
    return [greedy_tokens(model, ids, max_new_tokens) for ids in prompt_ids]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> dict:
    """``{"greedy_match", "greedy_token_agreement"}`` as in ``parity.compare``."""
    matches, prefix = 0, 0.0
    for ref, cand in zip(reference, candidate):
        matches += ref == cand
        common = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), len(ref))
        prefix += common / max(1, len(ref))
    n = max(1, len(reference))
    return {"greedy_match": matches / n, "greedy_token_agreement": prefix / n}


def check_gguf(path, reference_model, prompt_ids: list[torch.Tensor], max_new_tokens: int = 16,
               *, lora_path=None, backend: str = "auto") -> dict:
    """Greedy completions of the GGUF file (optionally with a LoRA GGUF) against
    ``reference_model``'s.

    Returns:
        ``{"backend", "greedy_match", "greedy_token_agreement", "prompts", "reference",
        "gguf"}`` (the last two: the token lists).
    """
    from lorakit.errors import ExportError
    from lorakit.export.parity import greedy_tokens

    if backend == "auto":
        backend = "llama.cpp" if llama_cpp_available() else "transformers"
    if backend == "transformers" and lora_path is not None:
        raise ExportError("checking a LoRA GGUF needs llama-cpp-python: pip install "
                          "'lorakit[llamacpp]' (compiles llama.cpp), or pass --no-check")
    reference = [greedy_tokens(reference_model, ids, max_new_tokens) for ids in prompt_ids]
    got = (llama_cpp_greedy(path, prompt_ids, max_new_tokens, lora_path)
           if backend == "llama.cpp" else transformers_greedy(path, prompt_ids, max_new_tokens))
    return {"backend": backend, **agreement(reference, got), "prompts": len(prompt_ids),
            "reference": reference, "gguf": got}
