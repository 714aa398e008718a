"""lorakit: LoRA and QLoRA fine-tuning of open language models, end to end.

The public API is re-exported here lazily, so ``import lorakit`` stays fast (torch and
transformers are imported only when a function that needs them is first used).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lorakit.version import __version__

# public name -> module that defines it
_EXPORTS = {
    "LorakitError": "lorakit.errors",
    "load_model": "lorakit.models.load",
    "load_tokenizer": "lorakit.models.load",
    "model_info": "lorakit.models.load",
    "generate": "lorakit.models.load",
    "LoraConfig": "lorakit.lora.config",
    "LoraLayer": "lorakit.lora.layers",
    "add_adapter": "lorakit.lora.inject",
    "set_adapter": "lorakit.lora.inject",
    "delete_adapter": "lorakit.lora.inject",
    "disable_adapters": "lorakit.lora.inject",
    "mixed_batch": "lorakit.lora.inject",
    "merge_adapter": "lorakit.lora.inject",
    "unmerge_adapter": "lorakit.lora.inject",
    "trainable_parameters": "lorakit.lora.inject",
    "save_adapter": "lorakit.lora.io",
    "load_adapter": "lorakit.lora.io",
}

__all__ = ["__version__", *_EXPORTS]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lorakit.errors import LorakitError
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import (add_adapter, delete_adapter, disable_adapters, merge_adapter,
                                     mixed_batch, set_adapter, trainable_parameters, unmerge_adapter)
    from lorakit.lora.io import load_adapter, save_adapter
    from lorakit.lora.layers import LoraLayer
    from lorakit.models.load import generate, load_model, load_tokenizer, model_info


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorakit' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
