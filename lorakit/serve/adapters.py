"""Adapters for serving: safe paths under ``--adapter-root``, reading and checking an adapter
against the served base *before* it touches the model, and installing it into the model.

Reading (disk, safetensors, checks) runs on any thread; only :func:`install` changes the
model, and the engine calls it between decode steps, so a hot load never stalls a batch for
longer than copying a few small tensors.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "lorakit.json")


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
    from lorakit.lora.inject import _linear_modules
    from lorakit.lora.io import base_config_hash
    from lorakit.lora.layers import linear_features

    shapes = {path: linear_features(module) for path, module in _linear_modules(model)}
    return {"shapes": shapes, "config_sha256": base_config_hash(model),
            "spec": getattr(model, "lorakit_spec", None)}


def prepare(path: Path, signature: dict) -> PreparedAdapter:
    """Read an adapter folder and check that it fits the served base.

    Raises:
        AdapterError: unreadable files; an adapter for another base (layer missing, shapes
            differ, or the lorakit manifest records a different base config); an adapter that
            cannot vary per batch row (``modules_to_save`` or trained biases).
    """
    from lorakit.lora.io import _split_keys, read_adapter_config, read_adapter_weights

    config = read_adapter_config(path)
    manifest_file = path / "lorakit.json"
    if manifest_file.is_file():
        try:
            manifest = json.loads(manifest_file.read_text())
        except json.JSONDecodeError:
            manifest = {}
        want, have = manifest.get("base_config_sha256"), signature.get("config_sha256")
        if want and have and want != have:
            raise AdapterError(
                f"adapter {path} was trained on base {manifest.get('base_model')!r}, whose config "
                f"differs from the served base {signature.get('spec')!r} (base_config_sha256 "
                f"{want[:12]} != {have[:12]}); serve it with its own base model")
    if config.modules_to_save:
        raise AdapterError(f"adapter {path} has modules_to_save {config.modules_to_save}: whole "
                           f"modules cannot differ per batch row; merge it and serve it alone")
    layers, other = _split_keys(read_adapter_weights(path))
    if other:
        raise AdapterError(f"adapter {path} also stores {sorted(other)[:3]} (trained biases or full "
                           f"modules), which cannot differ per batch row; serve it merged")
    if not layers:
        raise AdapterError(f"adapter {path} holds no lora_A/lora_B weights")
    shapes = signature["shapes"]
    for module_path, tensors in layers.items():
        if module_path not in shapes:
            raise AdapterError(f"adapter {path} has weights for layer {module_path}, which the "
                               f"served base {signature.get('spec')!r} does not have: it was "
                               f"trained on another architecture")
        if "A" not in tensors or "B" not in tensors:
            raise AdapterError(f"adapter {path}: layer {module_path} lacks lora_A or lora_B")
        in_f, out_f = shapes[module_path]
        a, b = tensors["A"].shape, tensors["B"].shape
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise AdapterError(
                f"adapter {path} was trained on another base: layer {module_path} has lora_A "
                f"{tuple(a)} and lora_B {tuple(b)}, but the served base's layer maps "
                f"{in_f} -> {out_f} features")
    if config.use_dora != any("m" in t for t in layers.values()):
        raise AdapterError(f"adapter {path}: use_dora={config.use_dora} disagrees with its weights")
    ranks = {p: t["A"].shape[0] for p, t in layers.items()}
    return PreparedAdapter(path=path, config=config, tensors=layers, ranks=ranks)


@torch.no_grad()
def install(model: nn.Module, name: str, prepared: PreparedAdapter, dtype: torch.dtype) -> None:
    """Add a prepared adapter to ``model`` as ``name`` (call only between forwards)."""
    from lorakit.lora.inject import add_adapter

    order = [p for p in prepared.targets]
    add_adapter(model, prepared.config, name, targets=order, ranks=prepared.ranks, dtype=dtype)
    for module_path, tensors in prepared.tensors.items():
        layer = model.get_submodule(module_path)
        layer.lora_A[name].weight.copy_(tensors["A"])
        layer.lora_B[name].weight.copy_(tensors["B"])
        if "m" in tensors:
            layer.lora_magnitude_vector[name].copy_(tensors["m"].reshape(-1))
    for param in model.parameters():  # serving: nothing trains
        param.requires_grad_(False)


def uninstall(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` (call only between forwards)."""
    from lorakit.lora.inject import delete_adapter

    delete_adapter(model, name)
