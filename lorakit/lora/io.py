"""Adapter files in PEFT's format, plus lorakit's manifest.

An adapter folder holds:

- ``adapter_config.json``: PEFT's LoraConfig fields (``peft_type: LORA``, ``r``, ...);
- ``adapter_model.safetensors``: keys ``base_model.model.<module path>.lora_A.weight``,
  ``.lora_B.weight`` and, for DoRA, ``.lora_magnitude_vector`` (PEFT's names, so PEFT, vLLM
  and llama.cpp's converter read our files and we read theirs);
- ``lorakit.json``: what the adapter was trained on (base model spec, hashes of the base
  config and chat template, quantization, lorakit version), checked when loading.

Every file is written to a temporary name and renamed into place; weights are read with
safetensors only (never pickle).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import _adapters, add_adapter, lora_layers, set_adapter
from lorakit.lora.layers import LoraLayer, ModulesToSaveWrapper, is_linear_like, linear_features

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
MANIFEST_NAME = "lorakit.json"
PREFIX = "base_model.model."

# config keys that describe where a model came from or how it runs, not what it computes
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype",
                         "_attn_implementation", "_attn_implementation_autoset", "use_cache",
                         "quantization_config", "architectures", "_commit_hash", "output_attentions",
                         "output_hidden_states", "return_dict"}


# ---------------------------------------------------------------------- hashes
def base_config_hash(model: nn.Module) -> str | None:
    """sha256 of the base model's architecture config (volatile keys left out)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    data = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if not template:
        return None
    if isinstance(template, dict):
        template = json.dumps(template, sort_keys=True)
    return hashlib.sha256(template.encode()).hexdigest()


# ---------------------------------------------------------------------- atomic writes
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


# ---------------------------------------------------------------------- save
def adapter_parameters(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live parameters under PEFT's key names (adapter name stripped)."""
    config = _adapters(model).get(name)
    if config is None:
        raise AdapterError(f"model has no adapter named {name!r}")
    params: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name not in layer.lora_A:
            continue
        params[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].weight
        params[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].weight
        if name in layer.lora_magnitude_vector:
            params[f"{PREFIX}{path}.lora_magnitude_vector"] = layer.lora_magnitude_vector[name]
        if config.bias == "lora_only" and layer.bias is not None:
            params[f"{PREFIX}{path}.base_layer.bias"] = layer.bias
    if config.bias == "all":
        for pname, param in model.named_parameters():
            if pname.endswith(".bias") and ".modules_to_save." not in pname:
                params[PREFIX + pname.replace(".original_module.", ".")] = param
    for path, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and name in module.modules_to_save:
            for pname, param in module.modules_to_save[name].named_parameters():
                params[f"{PREFIX}{path}.{pname}"] = param
    return params


def adapter_state_dict(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """A CPU copy of the adapter's tensors under PEFT's key names."""
    return {k: v.detach().contiguous().cpu() for k, v in adapter_parameters(model, name).items()}


@torch.no_grad()
def load_adapter_weights(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Copy the weights of a saved adapter into adapter ``name`` that already exists on
    ``model`` with the same layout (used to resume training from a checkpoint).

    Raises:
        AdapterError: the file's keys or shapes differ from the live adapter's.
    """
    params = adapter_parameters(model, name)
    state = read_adapter_weights(path)
    if set(state) != set(params):
        missing = sorted(set(params) - set(state))[:3]
        extra = sorted(set(state) - set(params))[:3]
        raise AdapterError(f"{path}: adapter layout differs from the model's adapter {name!r} "
                           f"(missing {missing}, unexpected {extra})")
    for key, param in params.items():
        if param.shape != state[key].shape:
            raise AdapterError(f"{path}: {key} has shape {tuple(state[key].shape)}, expected "
                               f"{tuple(param.shape)}")
        param.copy_(state[key])


def _target_modules_for_file(model: nn.Module, config: LoraConfig, name: str):
    """What to write as ``target_modules``: a regex as given, else the distinct layer names
    actually adapted (the short form vLLM and PEFT both accept)."""
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        return config.target_modules
    names = {path.rsplit(".", 1)[-1] for path, layer in lora_layers(model) if name in layer.lora_A}
    return sorted(names)


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 tokenizer=None, extra_manifest: dict | None = None,
                 state: dict[str, torch.Tensor] | None = None) -> Path:
    """Save adapter ``name`` as a PEFT-compatible folder with a lorakit manifest.

    Args:
        model: a model holding the adapter.
        path: the folder to write (created if missing; files in it are replaced atomically).
        name: which adapter.
        tokenizer: when given, its chat template's hash goes into the manifest.
        extra_manifest: more fields for ``lorakit.json`` (e.g. the training run).
        state: the adapter tensors to write, when the model's own are sharded across
            processes (FSDP) and were gathered first; None reads them from ``model``.

    Returns:
        The folder's path.
    """
    from lorakit import __version__

    config = _adapters(model).get(name)
    if config is None:
        raise AdapterError(f"model has no adapter named {name!r}; adapters: "
                           f"{', '.join(_adapters(model)) or 'none'}")
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    state = adapter_state_dict(model, name) if state is None else state
    fan_in_fan_out = any(layer.fan_in_fan_out for _, layer in lora_layers(model) if name in layer.lora_A)
    base_spec = getattr(model, "lorakit_spec", None) or getattr(model.config, "_name_or_path", None)
    peft_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_spec,
        "r": config.r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": _target_modules_for_file(model, config, name),
        "bias": config.bias,
        "use_rslora": config.use_rslora,
        "use_dora": config.use_dora,
        "modules_to_save": config.modules_to_save,
        "layers_to_transform": config.layers_to_transform,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "fan_in_fan_out": fan_in_fan_out,
        "init_lora_weights": True,
        "inference_mode": True,
        "layers_pattern": None,
        "revision": None,
    }
    manifest = {
        "lorakit_version": __version__,
        "adapter_name": name,
        "base_model": base_spec,
        "base_config_sha256": base_config_hash(model),
        "chat_template_sha256": chat_template_hash(tokenizer),
        "quantization": getattr(model, "lorakit_quantization", None),
        "lora_config": config.model_dump(mode="json"),
        **(extra_manifest or {}),
    }
    atomic_save_safetensors(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, peft_config)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return out


# ---------------------------------------------------------------------- load
def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """Parse ``adapter_config.json`` in ``path`` into a :class:`LoraConfig`."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist")
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: not a PEFT/lorakit adapter folder")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{config_file} is not valid JSON: {exc}") from None
    try:
        return LoraConfig.from_peft_dict(data, source=str(config_file))
    except ConfigError as exc:
        raise AdapterError(str(exc)) from None


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never pickle), with a clear error when it is
    missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder} holds only a pickled adapter_model.bin; lorakit reads "
                               f"safetensors only. Re-save it with PEFT's "
                               f"save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise AdapterError(f"{weights} is corrupt or truncated and cannot be read ({exc}); "
                           f"re-save or re-download the adapter") from None


def _split_keys(state: dict[str, torch.Tensor]):
    """Group file keys into per-layer LoRA tensors and other (bias / full-module) tensors."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B",
                ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m"}
    for key, tensor in state.items():
        path = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, kind in suffixes.items():
            if path.endswith(suffix):
                layers.setdefault(path[: -len(suffix)], {})[kind] = tensor
                break
        else:
            other[path] = tensor
    return layers, other


def _check_shapes(model: nn.Module, layers: dict[str, dict[str, torch.Tensor]]) -> None:
    modules = dict(model.named_modules())
    for path, tensors in layers.items():
        module = modules.get(path)
        if module is None:
            raise AdapterError(f"the adapter has weights for layer {path}, which this base model "
                               f"does not have: it was trained on another architecture")
        if not isinstance(module, LoraLayer) and not is_linear_like(module):
            raise AdapterError(f"the adapter targets {path}, which is a {type(module).__name__} "
                               f"here, not a linear layer")
        if "A" not in tensors or "B" not in tensors:
            raise AdapterError(f"layer {path}: the adapter file lacks lora_"
                               f"{'A' if 'A' not in tensors else 'B'}.weight")
        in_f, out_f = (module.in_features, module.out_features) if isinstance(module, LoraLayer) \
            else linear_features(module)
        a, b = tensors["A"].shape, tensors["B"].shape
        if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
            raise AdapterError(
                f"shape mismatch at layer {path}: the adapter has lora_A {tuple(a)} and lora_B "
                f"{tuple(b)} (a layer of {a[1]} -> {b[0]} features), but the base layer maps "
                f"{in_f} -> {out_f}; this adapter was trained on a different base model")


def _check_manifest(model: nn.Module, folder: Path, tokenizer) -> None:
    file = folder / MANIFEST_NAME
    if not file.is_file():
        return
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError:
        warnings.warn(f"{file} is not valid JSON; skipping the base-model check", stacklevel=3)
        return
    differs = []
    want, have = manifest.get("base_config_sha256"), base_config_hash(model)
    if want and have and want != have:
        differs.append(f"the base model config (adapter trained on {manifest.get('base_model')!r}, "
                       f"this model is {getattr(model, 'lorakit_spec', None)!r})")
    want_t, have_t = manifest.get("chat_template_sha256"), chat_template_hash(tokenizer)
    if want_t and have_t and want_t != have_t:
        differs.append("the tokenizer's chat template")
    if differs:
        warnings.warn(f"adapter {folder}: {' and '.join(differs)} differ from what it was trained "
                      f"with; outputs may be wrong", UserWarning, stacklevel=3)


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default", *,
                 tokenizer=None, dtype: torch.dtype = torch.float32) -> LoraConfig:
    """Load a PEFT LoRA adapter folder (ours or PEFT's, plain / rsLoRA / DoRA) into ``model``
    as adapter ``name`` and make it active.

    Raises:
        AdapterError: missing or corrupt files, or an adapter made for another base (the error
            names the first mismatching layer and both shapes).
    Warns:
        UserWarning: the manifest's base-config or chat-template hash differs from this model's.
    """
    folder = Path(path)
    config = read_adapter_config(folder)
    state = read_adapter_weights(folder)
    layers, other = _split_keys(state)
    if not layers:
        raise AdapterError(f"{folder / WEIGHTS_NAME} holds no LoRA weights (no lora_A/lora_B keys)")
    _check_shapes(model, layers)
    _check_manifest(model, folder, tokenizer)
    targets = [p for p, _ in model.named_modules() if p in layers]
    ranks = {p: layers[p]["A"].shape[0] for p in targets}
    if config.use_dora != any("m" in t for t in layers.values()):
        raise AdapterError(f"{folder}: use_dora={config.use_dora} in {CONFIG_NAME} but the weights "
                           f"{'lack' if config.use_dora else 'have'} lora_magnitude_vector tensors")
    if name in _adapters(model):
        raise AdapterError(f"model already has an adapter named {name!r}; pass another name")
    add_adapter(model, config, name, targets=targets, ranks=ranks, dtype=dtype)
    for path in targets:
        layer: LoraLayer = model.get_submodule(path)
        tensors = layers[path]
        layer.lora_A[name].weight.copy_(tensors["A"])
        layer.lora_B[name].weight.copy_(tensors["B"])
        if "m" in tensors:
            layer.lora_magnitude_vector[name].copy_(tensors["m"].reshape(-1))
    params = dict(model.named_parameters())
    for key, tensor in other.items():
        target = _resolve_other_key(key, name, params)
        if target is None:
            raise AdapterError(f"{folder / WEIGHTS_NAME}: tensor {key!r} matches no parameter of "
                               f"this model")
        if target.shape != tensor.shape:
            raise AdapterError(f"shape mismatch for {key}: adapter {tuple(tensor.shape)}, "
                               f"model {tuple(target.shape)}")
        target.copy_(tensor)
    set_adapter(model, name)
    return config


def _resolve_other_key(key: str, name: str, params: dict) -> torch.Tensor | None:
    """Map a saved bias / modules_to_save key to this model's parameter."""
    if key in params:
        return params[key]
    module_path, _, pname = key.rpartition(".")
    for candidate in (f"{module_path}.modules_to_save.{name}.{pname}",
                      f"{module_path}.base_layer.{pname}",
                      f"{module_path}.original_module.{pname}"):
        if candidate in params:
            return params[candidate]
    return None

