"""Batched greedy generation for evaluation: many prompts, left-padded, chat template applied."""

from __future__ import annotations

from typing import Sequence

import torch


def render_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[str]:
    """Each prompt as the model sees it: through the chat template when there is one (after
    ``system``, when given); without a template, the prompt text alone."""
    from lorakit.data.tokenize import has_chat_template, prompt_text

    if not has_chat_template(tokenizer):
        return list(prompts)
    return [prompt_text(tokenizer, prompt, system or None) for prompt in prompts]


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 128,
                   batch_size: int = 16, system: str | None = None, progress=None) -> list[str]:
    """Greedy completions of ``prompts`` (special tokens stripped), in order.

    Prompts are sorted by length and batched with left padding, so little compute is
    spent on padding; generation of a batch stops when every row has produced EOS.

    Args:
        progress: optional callable(done, total) called after each batch.
    """
    from lorakit.data.tokenize import pad_token_id

    texts = render_prompts(tokenizer, prompts, system)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    outputs: list[str] = [""] * len(texts)
    pad_id = pad_token_id(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    eos = {tokenizer.eos_token_id} | set(_end_of_turn_ids(tokenizer))
    eos.discard(None)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        encoded = [tokenizer(texts[i], add_special_tokens=False)["input_ids"] for i in idx]
        width = max(len(e) for e in encoded)
        input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        for row, ids in enumerate(encoded):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False,
                                   pad_token_id=pad_id, eos_token_id=sorted(eos),
                                   temperature=None, top_p=None, top_k=None)
        for row, i in enumerate(idx):
            outputs[i] = tokenizer.decode(generated[row, width:], skip_special_tokens=True).strip()
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    model.train(was_training)
    return outputs


def _end_of_turn_ids(tokenizer) -> list[int]:
    ids = []
    for token in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.append(tid)
    return ids
