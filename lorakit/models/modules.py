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
