"""Adapters for serving: safe paths under ``--adapter-root``, reading and checking an adapter
against the served base *before* it touches the model, and installing it into the model.

Reading (disk, safetensors, checks) runs on any thread; only :func:`install` changes the
model, and the engine calls it between decode steps, so a hot load never stalls a batch for
longer than copying a few small tensors.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.io import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME)


def resolve_under_root(root: str | os.PathLike | None, path: str | os.PathLike) -> Path:
    """Resolve ``path`` (relative to ``root``, or absolute) and require it to stay inside ``root``.

    Symlinks are followed before the check, so a link pointing out of the root is refused, and
    so are ``..`` components that climb out of it. The adapter files inside the folder are
    checked the same way (a folder inside the root holding a link to a file outside is refused).

    Raises:
        AdapterError: no root configured, the path escapes the root, or it does not exist.
    """
    if root is None:
        raise AdapterError("loading adapters at runtime is disabled: start the server with "
                           "--adapter-root DIR and pass paths inside DIR")
    base = Path(root).resolve()
    raw = Path(os.fspath(path)).expanduser()
    candidate = raw if raw.is_absolute() else base / raw
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise AdapterError(f"adapter path {os.fspath(path)!r} does not exist under the adapter "
                           f"root {base}") from None
    if not resolved.is_relative_to(base):
        raise AdapterError(f"adapter path {os.fspath(path)!r} resolves to {resolved}, outside the "
                           f"adapter root {base} (path traversal or a symlink out of the root)")
    for name in ADAPTER_FILES:
        file = resolved / name
        if file.exists() and not file.resolve().is_relative_to(base):
            raise AdapterError(f"{file} is a link to {file.resolve()}, outside the adapter root "
                               f"{base}")
    return resolved


@dataclass
class PreparedAdapter:
    """An adapter read from disk and checked against the base; ready for :func:`install`."""

    path: Path
    config: object  # lorakit.lora.config.LoraConfig
    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> {"A", "B"[, "m"]}
    ranks: dict[str, int] = field(default_factory=dict)

    @property
    def targets(self) -> list[str]:
        return list(self.tensors)


def base_signature(model: nn.Module) -> dict:
    """A snapshot of what an adapter must match, taken once before serving starts, so adapter
    checks on other threads never walk the live model: base linear shapes and config hash."""
    from lorakit.lora.inject import linear_modules
    from lorakit.lora.io import base_config_hash
    from lorakit.lora.layers import linear_features

    shapes = {path: linear_features(module) for path, module in linear_modules(model)}
    return {"shapes": shapes, "config_sha256": base_config_hash(model),
            "spec": getattr(model, "lorakit_spec", None)}


def prepare(path: Path, signature: dict) -> PreparedAdapter:
    """Read an adapter folder and check that it fits the served base.

    Raises:
        AdapterError: unreadable files; an adapter for another base (layer missing, shapes
            differ, or the lorakit manifest records a different base config); an adapter that
            cannot vary per batch row (``modules_to_save`` or trained biases).
    """
    from lorakit.lora.io import read_adapter_folder, split_keys

    folder = read_adapter_folder(path)
    config = folder.config
    served = f"the served base {signature.get('spec')!r}"
    folder.check_base(signature.get("config_sha256"), against=served,
                      fix="serve it with its own base model")
    if config.modules_to_save:
        raise AdapterError(f"adapter {path} has modules_to_save {config.modules_to_save}: whole "
                           f"modules cannot differ per batch row; merge it and serve it alone")
    layers, other = split_keys(folder.tensors())
    if other:
        raise AdapterError(f"adapter {path} also stores {sorted(other)[:3]} (trained biases or full "
                           f"modules), which cannot differ per batch row; serve it merged")
    ranks = folder.check_layers(layers, signature["shapes"], base=served)
    return PreparedAdapter(path=path, config=config, tensors=layers, ranks=ranks)


@torch.no_grad()
def install(model: nn.Module, name: str, prepared: PreparedAdapter, dtype: torch.dtype) -> None:
    """Add a prepared adapter to ``model`` as ``name`` (call only between forwards)."""
    from lorakit.lora.inject import add_adapter
    from lorakit.lora.io import copy_lora_weights

    add_adapter(model, prepared.config, name, targets=prepared.targets, ranks=prepared.ranks,
                dtype=dtype)
    copy_lora_weights(model, name, prepared.tensors)
    for param in model.parameters():  # serving: nothing trains
        param.requires_grad_(False)


def uninstall(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` (call only between forwards)."""
    from lorakit.lora.inject import delete_adapter

    delete_adapter(model, name)
