"""Adapter files in PEFT's format, plus lorakit's manifest.

An adapter folder holds:

- ``adapter_config.json``: PEFT's LoraConfig fields (``peft_type: LORA``, ``r``, ...);
- ``adapter_model.safetensors``: keys ``base_model.model.<module path>.lora_A.weight``,
  ``.lora_B.weight`` and, for DoRA, ``.lora_magnitude_vector`` (PEFT's names, so PEFT, vLLM
  and llama.cpp's converter read our files and we read theirs);
- ``lorakit.json``: what the adapter was trained on (base model spec, hashes of the base
  config and chat template, quantization, lorakit version), checked when loading.

Every file is written to a temporary name and renamed into place; weights are read with
safetensors only (never pickle). :func:`read_adapter_folder` is the one reader of a folder
(config, manifest, recorded base and its check, layer shapes): loading, eval, export, the
adapter lint and the server all go through it.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.config import LoraConfig
from lorakit.lora.inject import adapter_configs, add_adapter, lora_layers, set_adapter
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
    """Write ``data`` to ``path`` durably: a temporary file in the same folder, fsync, rename,
    fsync of the folder (:func:`lorakit.fileio.atomic_write_bytes`; an ``OSError`` names
    ``path``)."""
    from lorakit import fileio

    fileio.atomic_write_bytes(Path(path), data)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path,
                            metadata: dict | None = None) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save(tensors, metadata=metadata))


# ---------------------------------------------------------------------- save
def adapter_parameters(model: nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's live parameters under PEFT's key names (adapter name stripped)."""
    config = adapter_configs(model).get(name)
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
    from lorakit.lora.init import trained_part  # a converted PiSSA/OLoRA file: its trained half

    params = adapter_parameters(model, name)
    state = trained_part(model, name, read_adapter_weights(path))
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
    from lorakit.version import __version__

    config = adapter_configs(model).get(name)
    if config is None:
        raise AdapterError(f"model has no adapter named {name!r}; adapters: "
                           f"{', '.join(adapter_configs(model)) or 'none'}")
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
    from lorakit.lora.init import convert_for_saving  # PiSSA/OLoRA: a LoRA for the original base

    state, peft_config = convert_for_saving(model, name, state, peft_config)
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


# ---------------------------------------------------------------------- reading a folder
def _read_config(folder: Path) -> tuple[LoraConfig, dict]:
    """``adapter_config.json`` of ``folder`` as a LoraConfig and as written.

    Raises:
        AdapterError: the folder or the file is missing, not JSON, or not a LoRA config.
    """
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
        return LoraConfig.from_peft_dict(data, source=str(config_file)), data
    except ConfigError as exc:
        raise AdapterError(str(exc)) from None


def read_manifest(path: str | os.PathLike) -> dict:
    """``lorakit.json`` of an adapter folder; {} when there is none (a plain PEFT adapter).

    Raises:
        AdapterError: the file is not valid JSON (the message names it).
    """
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        return {}
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterError(f"{file} is not valid JSON ({exc}); fix or delete it") from None
    if not isinstance(manifest, dict):
        raise AdapterError(f"{file} holds a JSON {type(manifest).__name__}, not an object; "
                           f"fix or delete it")
    return manifest


def _weights_file(folder: Path) -> Path:
    """``adapter_model.safetensors`` of ``folder``, with a clear error when it is missing."""
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        if (folder / "adapter_model.bin").is_file():
            raise AdapterError(f"{folder} holds only a pickled adapter_model.bin; lorakit reads "
                               f"safetensors only. Re-save it with PEFT's "
                               f"save_pretrained(..., safe_serialization=True)")
        raise AdapterError(f"{folder} has no {WEIGHTS_NAME}")
    return weights


def _corrupt(weights: Path, exc: Exception) -> AdapterError:
    return AdapterError(f"{weights} is corrupt or truncated and cannot be read ({exc}); "
                        f"re-save or re-download the adapter")


def read_adapter_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read ``adapter_model.safetensors`` (never pickle), with a clear error when it is
    missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = _weights_file(Path(path))
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _corrupt(weights, exc) from None


def split_keys(state: dict[str, torch.Tensor]):
    """Group file keys into per-layer LoRA tensors and other (bias / full-module) tensors.

    Returns:
        ``(layers, other)``: ``{module path: {"A": lora_A, "B": lora_B[, "m": magnitude]}}``
        and ``{path: tensor}`` for everything else, both with PEFT's prefix removed.
    """
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


@dataclass
class AdapterFolder:
    """An adapter folder as read from disk, and its checks against a base model.

    Reading it parses the two JSON files; the weights are read only when asked for
    (:meth:`tensors`, or :meth:`tensor_header` for names, shapes and dtypes without the data).

    Attributes:
        path: the folder.
        config: ``adapter_config.json`` as a :class:`LoraConfig`.
        peft_config: ``adapter_config.json`` as written (PEFT's field names).
        manifest: ``lorakit.json``; {} for a plain PEFT adapter, or when it is unreadable and
            the folder was read with ``strict=False`` (then ``manifest_error`` says why).
        manifest_error: why ``lorakit.json`` could not be read, else None.
    """

    path: Path
    config: LoraConfig
    peft_config: dict
    manifest: dict
    manifest_error: str | None = None

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_NAME

    @property
    def base_model(self) -> str | None:
        """The base model the adapter records: ``base_model`` of ``lorakit.json``, else
        ``base_model_name_or_path`` of ``adapter_config.json`` (None when neither says)."""
        return self.manifest.get("base_model") or self.peft_config.get("base_model_name_or_path")

    def tensors(self) -> dict[str, torch.Tensor]:
        """The weights (safetensors, never pickle) under their file keys."""
        return read_adapter_weights(self.path)

    def tensor_header(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """``{file key: (shape, safetensors dtype such as "F32")}`` from the file's header
        alone (no tensor data is read)."""
        from safetensors import SafetensorError, safe_open

        weights = _weights_file(self.path)
        try:
            header = {}
            with safe_open(str(weights), "pt") as f:
                for key in f.keys():
                    piece = f.get_slice(key)
                    header[key] = (tuple(piece.get_shape()), str(piece.get_dtype()))
            return header
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise _corrupt(weights, exc) from None

    def base_matches(self, config_sha256: str | None) -> bool:
        """False when the manifest records a base-config hash and ``config_sha256`` (of the
        base at hand, :func:`base_config_hash`) differs; True when they agree or either is
        unknown (a PEFT adapter has no manifest; only layer shapes can tell then)."""
        want = self.manifest.get("base_config_sha256")
        return not (want and config_sha256 and want != config_sha256)

    def check_base(self, config_sha256: str | None, *, against: str, fix: str) -> None:
        """Raise when the manifest says the adapter was trained on another base.

        Args:
            config_sha256: :func:`base_config_hash` of the base it is about to be used with.
            against: that base, in words (e.g. ``"the served base 'smollm2-135m'"``).
            fix: what the user should do instead.

        Raises:
            AdapterError: the recorded base-config hash differs.
        """
        if self.base_matches(config_sha256):
            return
        want = self.manifest["base_config_sha256"]
        raise AdapterError(
            f"adapter {self.path} was made for a different base model: it was trained on "
            f"{self.manifest.get('base_model')!r}, whose config differs from {against} "
            f"({MANIFEST_NAME} base_config_sha256 {want[:12]} != {config_sha256[:12]}); {fix}")

    def check_layers(self, layers: dict[str, dict[str, torch.Tensor]],
                     shapes: dict[str, tuple[int, int]], *, base: str = "this base model",
                     modules: dict[str, nn.Module] | None = None) -> dict[str, int]:
        """Check the LoRA tensors (:func:`split_keys`) against the base's linear layers.

        Args:
            layers: per-layer tensors of this folder.
            shapes: ``{module path: (in_features, out_features)}`` of the base's linear
                layers.
            base: the base, in words, for the messages.
            modules: the base's modules by path, to name the kind of a targeted non-linear one.

        Returns:
            The rank of each adapted layer.

        Raises:
            AdapterError: no LoRA weights, a layer the base lacks or that is not linear, a
                missing lora_A / lora_B, shapes that differ (the error names the first such
                layer and both shapes), or ``use_dora`` disagreeing with the weights.
        """
        if not layers:
            raise AdapterError(f"{self.weights_file} holds no LoRA weights (no lora_A/lora_B keys)")
        for path, tensors in layers.items():
            if path not in shapes:
                if modules is not None and path in modules:
                    raise AdapterError(f"adapter {self.path} targets {path}, which is a "
                                       f"{type(modules[path]).__name__} in {base}, not a linear "
                                       f"layer")
                raise AdapterError(f"adapter {self.path} has weights for layer {path}, which "
                                   f"{base} does not have: it was trained on another "
                                   f"architecture")
            if "A" not in tensors or "B" not in tensors:
                raise AdapterError(f"adapter {self.path}: layer {path}: the adapter file lacks "
                                   f"lora_{'A' if 'A' not in tensors else 'B'}.weight")
            in_f, out_f = shapes[path]
            a, b = tensors["A"].shape, tensors["B"].shape
            if a[1] != in_f or b[0] != out_f or a[0] != b[1]:
                raise AdapterError(
                    f"adapter {self.path}: shape mismatch at layer {path}: the adapter has lora_A "
                    f"{tuple(a)} and lora_B {tuple(b)} (a layer of {a[1]} -> {b[0]} features), "
                    f"but the layer of {base} maps {in_f} -> {out_f}: the adapter was trained "
                    f"on another base (a different base model)")
        if self.config.use_dora != any("m" in t for t in layers.values()):
            raise AdapterError(f"{self.path}: use_dora={self.config.use_dora} in {CONFIG_NAME} but "
                               f"the weights {'lack' if self.config.use_dora else 'have'} "
                               f"lora_magnitude_vector tensors")
        return {path: tensors["A"].shape[0] for path, tensors in layers.items()}


def read_adapter_folder(path: str | os.PathLike, *, strict: bool = False) -> AdapterFolder:
    """Read an adapter folder's config and manifest (the weights on demand).

    Args:
        path: a PEFT / lorakit adapter folder.
        strict: an unreadable ``lorakit.json`` is an error; otherwise it reads as {} and
            ``manifest_error`` says why.

    Raises:
        AdapterError: the folder or ``adapter_config.json`` is missing or invalid (or, when
            ``strict``, ``lorakit.json`` is).
    """
    folder = Path(path)
    config, peft_config = _read_config(folder)
    try:
        manifest, error = read_manifest(folder), None
    except AdapterError as exc:
        if strict:
            raise
        manifest, error = {}, str(exc)
    return AdapterFolder(folder, config, peft_config, manifest, error)


# ---------------------------------------------------------------------- load
def _layer_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) features of every linear-like module and LoraLayer of ``model``."""
    return {path: (module.in_features, module.out_features) if isinstance(module, LoraLayer)
            else linear_features(module)
            for path, module in model.named_modules()
            if isinstance(module, LoraLayer) or is_linear_like(module)}


def _warn_on_other_base(model: nn.Module, folder: AdapterFolder, tokenizer) -> None:
    if folder.manifest_error:
        warnings.warn(f"skipping the base-model check: {folder.manifest_error}", stacklevel=3)
        return
    differs = []
    if not folder.base_matches(base_config_hash(model)):
        differs.append(f"the base model config (adapter trained on "
                       f"{folder.manifest.get('base_model')!r}, this model is "
                       f"{getattr(model, 'lorakit_spec', None)!r})")
    want_t, have_t = folder.manifest.get("chat_template_sha256"), chat_template_hash(tokenizer)
    if want_t and have_t and want_t != have_t:
        differs.append("the tokenizer's chat template")
    if differs:
        warnings.warn(f"adapter {folder.path}: {' and '.join(differs)} differ from what it was "
                      f"trained with; outputs may be wrong", UserWarning, stacklevel=3)


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
    folder = read_adapter_folder(path)
    config = folder.config
    layers, other = split_keys(folder.tensors())
    ranks = folder.check_layers(layers, _layer_shapes(model), modules=dict(model.named_modules()))
    _warn_on_other_base(model, folder, tokenizer)
    targets = [p for p, _ in model.named_modules() if p in layers]
    if name in adapter_configs(model):
        raise AdapterError(f"model already has an adapter named {name!r}; pass another name")
    add_adapter(model, config, name, targets=targets, ranks=ranks, dtype=dtype)
    copy_lora_weights(model, name, layers)
    params = dict(model.named_parameters())
    for key, tensor in other.items():
        target = _resolve_other_key(key, name, params)
        if target is None:
            raise AdapterError(f"{folder.weights_file}: tensor {key!r} matches no parameter of "
                               f"this model")
        if target.shape != tensor.shape:
            raise AdapterError(f"shape mismatch for {key}: adapter {tuple(tensor.shape)}, "
                               f"model {tuple(target.shape)}")
        target.copy_(tensor)
    set_adapter(model, name)
    return config


@torch.no_grad()
def copy_lora_weights(model: nn.Module, name: str,
                      layers: dict[str, dict[str, torch.Tensor]]) -> None:
    """Copy per-layer tensors (as :func:`split_keys` groups them) into adapter ``name``,
    which must already exist on those layers of ``model`` with the same ranks."""
    for path, tensors in layers.items():
        layer: LoraLayer = model.get_submodule(path)
        layer.lora_A[name].weight.copy_(tensors["A"])
        layer.lora_B[name].weight.copy_(tensors["B"])
        if "m" in tensors:
            layer.lora_magnitude_vector[name].copy_(tensors["m"].reshape(-1))


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

