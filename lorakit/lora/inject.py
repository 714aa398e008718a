"""Putting adapters into a stock transformers model, choosing them, and taking them out.

Adapters are added by replacing linear modules *by name* with :class:`LoraLayer` wrappers
(the model's own classes are never forked). The model remembers its adapters' configs in
``model.lorakit_adapters`` (name -> LoraConfig) and the active one in
``model.lorakit_active_adapter``.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from lorakit.errors import AdapterError, did_you_mean
from lorakit.lora.config import ALL_LINEAR, LoraConfig
from lorakit.lora.layers import LoraLayer, ModulesToSaveWrapper, is_linear_like, lora_layers  # noqa: F401
from lorakit.models.modules import replace_module

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)(?:\.|$)")


# ---------------------------------------------------------------------- discovery
def _output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head (never an ``all-linear`` target, as in PEFT)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = {n for n, m in model.named_modules() if head is not None and m is head}
    names.add("lm_head")
    return names


def linear_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, module) of every base linear layer (inside a LoraLayer: the path of the wrapper)."""
    wrapped: list[str] = []  # lorakit's own wrappers: their insides are not base layers
    for name, module in model.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, LoraLayer):
            wrapped.append(name)
            yield name, module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            wrapped.append(name)
        elif is_linear_like(module):
            yield name, module


def linear_layer_names(model: nn.Module) -> list[str]:
    """The distinct names a user can put in ``target_modules`` (e.g. ``q_proj``), sorted.

    The output head is listed separately by PEFT convention and left out here.
    """
    heads = _output_head_names(model)
    return sorted({path.rsplit(".", 1)[-1] for path, _ in linear_modules(model) if path not in heads})


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Module paths that ``config.target_modules`` / ``layers_to_transform`` select.

    Raises:
        AdapterError: a target name matches no linear layer, or matches a non-linear module.
    """
    heads = _output_head_names(model)
    linear_paths = [p for p, _ in linear_modules(model)]
    spec = config.target_modules
    if spec == ALL_LINEAR:
        chosen = [p for p in linear_paths if p not in heads]
    elif isinstance(spec, str):
        chosen = [p for p in linear_paths if re.fullmatch(spec, p)]
        if not chosen:
            raise AdapterError(f"target_modules regex {spec!r} matches no linear layer; linear "
                               f"layers in this model: {', '.join(linear_layer_names(model))}")
    else:
        chosen = []
        all_paths = dict(model.named_modules())
        for key in spec:
            hits = [p for p in linear_paths if p == key or p.endswith("." + key)]
            if not hits:
                other = [p for p in all_paths if p == key or p.endswith("." + key)]
                available = linear_layer_names(model)
                if other:
                    kind = type(all_paths[other[0]]).__name__
                    raise AdapterError(
                        f"target module {key!r} is a {kind}, not a linear layer; lorakit adapts "
                        f"Linear and Conv1D layers: {', '.join(available)}")
                raise AdapterError(f"target module {key!r} matches no linear layer in this model"
                                   f"{did_you_mean(key, available)}; linear layers: "
                                   f"{', '.join(available)}")
            chosen.extend(hits)
        chosen = sorted(set(chosen), key=linear_paths.index)
    if config.layers_to_transform is not None:
        wanted = set(config.layers_to_transform)
        chosen = [p for p in chosen if (m := _LAYER_INDEX.search(p)) and int(m.group(1)) in wanted]
        if not chosen:
            raise AdapterError(f"layers_to_transform={config.layers_to_transform} selects no layer")
    return chosen


def _wrappers(model: nn.Module) -> Iterator[ModulesToSaveWrapper]:
    return (m for m in model.modules() if isinstance(m, ModulesToSaveWrapper))


def _structure_changed(model: nn.Module) -> None:
    """add_adapter / delete_adapter replaced modules: the cached layer lists are stale."""
    model.__dict__["lorakit_structure"] = model.__dict__.get("lorakit_structure", 0) + 1
    model.__dict__.pop("lorakit_layer_cache", None)


def _adapter_modules(model: nn.Module) -> tuple[list[LoraLayer], list[ModulesToSaveWrapper]]:
    """Every LoraLayer and ModulesToSaveWrapper of ``model``, cached until an adapter is added
    or deleted. A serving engine enters :func:`mixed_batch` once per forward; walking the
    module tree there (thousands of modules with a few adapters loaded) cost it more than
    the adapters' own matmuls."""
    version = model.__dict__.get("lorakit_structure", 0)
    cached = model.__dict__.get("lorakit_layer_cache")
    if cached is None or cached[0] != version:
        cached = (version, [layer for _, layer in lora_layers(model)], list(_wrappers(model)))
        model.__dict__["lorakit_layer_cache"] = cached
    return cached[1], cached[2]


# ---------------------------------------------------------------------- add / set / delete
def add_adapter(model: nn.Module, config: LoraConfig, name: str = "default", *,
                targets: Sequence[str] | None = None, ranks: dict[str, int] | None = None,
                dtype: torch.dtype = torch.float32) -> list[str]:
    """Add a LoRA adapter called ``name`` to ``model`` in place and make it the active one.

    Args:
        model: a transformers model (possibly already holding other adapters).
        config: the adapter's settings.
        name: adapter name; several adapters can live on one model.
        targets: explicit module paths (used when loading a file); default: from ``config``.
        ranks: per-path rank overrides (used when loading a file with ``rank_pattern``).
        dtype: dtype of the adapter weights (float32 by default, whatever the base's dtype).

    Returns:
        The module paths that were adapted.

    Raises:
        AdapterError: the name is taken, or the targets are invalid.
    """
    if not isinstance(config, LoraConfig):
        raise AdapterError(f"config must be a lorakit.LoraConfig, got {type(config).__name__}")
    adapters: dict = model.__dict__.setdefault("lorakit_adapters", {})
    if name in adapters:
        raise AdapterError(f"model already has an adapter named {name!r}; delete_adapter() it "
                           f"first or choose another name")
    paths = list(targets) if targets is not None else find_targets(model, config)
    # a base built on the meta device, its weights read later (FSDP's per-rank sharded load,
    # lorakit.models.stream.Deferred): the adapter is created for real where they will go
    deferred = getattr(model, "lorakit_deferred", None)
    device = deferred.device if deferred is not None else None
    for path in paths:
        module = model.get_submodule(path)
        if not isinstance(module, LoraLayer):
            if not is_linear_like(module):
                raise AdapterError(f"cannot adapt {path}: {type(module).__name__} is not a linear layer")
            module = LoraLayer(module)
            replace_module(model, path, module)
        r = (ranks or {}).get(path) or config.rank_for(path)
        module.add_adapter(name, r=r, scaling=config.scaling_for(path, r), dropout=config.lora_dropout,
                           use_dora=config.use_dora, dtype=dtype, device=device)
    if config.init_lora_weights is not True:  # gaussian, PiSSA, OLoRA, LoftQ: lorakit.lora.init
        from lorakit.lora.init import initialize

        initialize(model, name, config, paths)
    for key in config.modules_to_save or []:
        hits = [p for p, _ in model.named_modules() if p == key or p.endswith("." + key)]
        if not hits:
            raise AdapterError(f"modules_to_save entry {key!r} matches no module in this model")
        for path in hits:
            module = model.get_submodule(path)
            if not isinstance(module, ModulesToSaveWrapper):
                module = ModulesToSaveWrapper(module)
                replace_module(model, path, module)
            module.add_adapter(name)
    adapters[name] = config
    _structure_changed(model)
    set_adapter(model, name)
    return paths


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter ``name`` the active one; only its parameters (and, per its ``bias``
    setting, biases) require gradients. Everything else is frozen."""
    adapters = adapter_configs(model)
    if name not in adapters:
        raise AdapterError(f"no adapter named {name!r}{did_you_mean(name, adapters)}; "
                           f"adapters: {', '.join(adapters) or 'none'}")
    for param in model.parameters():
        param.requires_grad_(False)
    for _, layer in lora_layers(model):
        layer.active_adapter = name if name in layer.lora_A else None
        if name in layer.lora_A:
            for store in (layer.lora_A[name], layer.lora_B[name]):
                store.weight.requires_grad_(True)
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name].requires_grad_(True)
            if adapters[name].bias == "lora_only" and getattr(layer.base_layer, "bias", None) is not None:
                layer.base_layer.bias.requires_grad_(True)
    if adapters[name].bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".modules_to_save." not in pname:
                param.requires_grad_(True)
    for wrapper in _wrappers(model):
        wrapper.active_adapter = name
        if name in wrapper.modules_to_save:
            for param in wrapper.modules_to_save[name].parameters():
                param.requires_grad_(True)
    model.lorakit_active_adapter = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name``; layers left with no adapter go back to their plain base layer."""
    adapters = adapter_configs(model)
    if name not in adapters:
        raise AdapterError(f"no adapter named {name!r}; adapters: {', '.join(adapters) or 'none'}")
    for path, layer in list(lora_layers(model)):
        layer.delete_adapter(name)
        if not layer.lora_A:
            replace_module(model, path, layer.base_layer)
    for path, module in list(model.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            module.delete_adapter(name)
            if not module.modules_to_save:
                replace_module(model, path, module.original_module)
    del adapters[name]
    _structure_changed(model)
    if getattr(model, "lorakit_active_adapter", None) == name:
        model.lorakit_active_adapter = None
        if adapters:
            set_adapter(model, next(iter(adapters)))


def adapter_configs(model: nn.Module) -> dict[str, LoraConfig]:
    """The adapters on ``model``: name -> LoraConfig, in the order they were added (the live
    dict: do not modify it)."""
    return model.__dict__.get("lorakit_adapters", {})


def active_adapter(model: nn.Module) -> str | None:
    """The name of the active adapter (None when there is none)."""
    return getattr(model, "lorakit_active_adapter", None)


# ---------------------------------------------------------------------- modes
@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within this block ``model`` is exactly its base model (merged adapters are unmerged
    for the duration). Used for base-vs-tuned evaluation and as the DPO reference."""
    merged = _unmerge_all(model)
    layers = [layer for _, layer in lora_layers(model)] + list(_wrappers(model))
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
        _remerge(model, merged)


@contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str | None]) -> Iterator[nn.Module]:
    """Within this block row ``i`` of every batch uses adapter ``adapter_names[i]``
    (None = the base model). One forward serves requests for different adapters.

    Raises:
        AdapterError: an unknown adapter name, or one with ``modules_to_save``
            (a whole module per row cannot be batched).
    """
    adapters = adapter_configs(model)
    for name in adapter_names:
        if name is not None and name not in adapters:
            raise AdapterError(f"mixed batch: no adapter named {name!r}; adapters: "
                               f"{', '.join(adapters) or 'none'}")
        if name is not None and adapters[name].modules_to_save:
            raise AdapterError(f"mixed batch: adapter {name!r} has modules_to_save, which cannot "
                               f"vary per row; merge it or serve it alone")
    layers, wrappers = _adapter_modules(model)
    merged = [(layer, list(layer.merged_adapters)) for layer in layers if layer.merged_adapters]
    for layer, _ in merged:
        layer.unmerge()
    rows = tuple(adapter_names)
    for layer in layers:
        layer.row_adapters = rows
    for wrapper in wrappers:  # rows never see another adapter's full modules
        wrapper.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.row_adapters = None
        for wrapper in wrappers:
            wrapper.disabled = False
        for layer, names in merged:
            for name in names:
                layer.merge(name)


def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """Fold adapter ``name`` (default: active) into the base weights; forwards are unchanged
    (to float tolerance) and faster. Idempotent; undo with :func:`unmerge_adapter`."""
    name = name or active_adapter(model)
    if name not in adapter_configs(model):
        raise AdapterError(f"no adapter named {name!r} to merge")
    for _, layer in lora_layers(model):
        layer.merge(name)


def unmerge_adapter(model: nn.Module) -> None:
    """Restore the base weights of every layer with merged adapters. Idempotent."""
    _unmerge_all(model)


def _unmerge_all(model: nn.Module) -> dict[str, list[str]]:
    merged = {}
    for path, layer in lora_layers(model):
        if layer.merged_adapters:
            merged[path] = list(layer.merged_adapters)
            layer.unmerge()
    return merged


def _remerge(model: nn.Module, merged: dict[str, list[str]]) -> None:
    for path, names in merged.items():
        layer = model.get_submodule(path)
        for name in names:
            layer.merge(name)


# ---------------------------------------------------------------------- counting
def _logical_numel(param: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts its unpacked shape."""
    quant_state = getattr(param, "quant_state", None)
    # a 4-bit weight still on the meta device (FSDP's sharded load) has no state yet
    shape = getattr(quant_state, "shape", None) or getattr(param, "lorakit_shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return param.numel()


def trainable_parameters(model: nn.Module) -> dict:
    """Count trainable and total parameters.

    Returns:
        ``{"trainable": int, "total": int, "percent": float}``; tied weights count once and
        packed 4-bit weights count their logical (unpacked) size.
    """
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        n = _logical_numel(param)
        total += n
        if param.requires_grad:
            trainable += n
    return {"trainable": trainable, "total": total,
            "percent": 100.0 * trainable / total if total else 0.0}
