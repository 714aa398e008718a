"""Small helpers on ``nn.Module`` trees that models/, lora/ and export/ all use."""

from __future__ import annotations

from torch import nn


def is_conv1d(module: nn.Module) -> bool:
    """transformers' GPT-2 style Conv1D (a linear layer with a transposed weight)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put ``new`` at dotted ``path`` inside ``model`` (``"model.layers.0.mlp.up_proj"``)."""
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks: its modules whose class transformers names in
    ``model._no_split_modules`` (outermost only), in model order; empty when it names none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks, inside = [], set()
    for module in model.modules():
        if id(module) in inside or type(module).__name__ not in names:
            continue
        blocks.append(module)
        inside.update(id(m) for m in module.modules())
    return blocks


def kv_cache_argument(model: nn.Module) -> str:
    """The name of the KV-cache argument of ``model.forward`` (and of the output field that
    carries the cache back): transformers >= 5.2x names it ``cache``, earlier releases
    ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters \
        else "past_key_values"


def left_padded(rows) -> tuple:
    """Token rows of different lengths (sequences of ints) as one (B, T) batch padded on the
    left with token 0, its attention mask (1 = real token) and position ids counted from each
    row's first real token (so a row computes what it computes alone)."""
    import torch

    rows = [list(r) for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r):] = 1
    return ids, mask, positions_from_mask(mask)


def positions_from_mask(mask):
    """Position ids of a left-padded (B, T) attention mask: real tokens count 0, 1, ...;
    padding gets 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
