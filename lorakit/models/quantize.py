r"""4-bit frozen bases for QLoRA: bitsandbytes NF4/FP4 layers, double quantization, byte counts.

:func:`quantize_model` swaps every linear layer inside the numbered decoder blocks of a stock
transformers model for a ``bitsandbytes.nn.Linear4bit`` (by name, as lorakit adds adapters).
Embeddings, norms and the output head keep their 16/32-bit weights. A weight of n values is
stored as (QLoRA paper, section 3)::

    codes   uint8 (ceil(n/2),)       two 4-bit NF4/FP4 indices per byte
    absmax  one scale per block of 64 values:
              float32 (n/64,)                    without double quantization: 4 + 32/64 = 4.5 bits/param
              uint8 (n/64,) + float32 (n/64/256,) + offset   with it: 4 + 8/64 + 32/(64*256) ~ 4.127
    code    the 16-value quant map (and the 256-value map of the nested absmax quantization)

bitsandbytes does the quantizing and the 4-bit matmuls (CUDA, and CPU since 0.49); the weight is
dequantized block by block inside each forward and again in backward, so no dense copy of it
stays in memory. bitsandbytes is imported lazily: ``import lorakit`` never loads it.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Iterable

import torch
from torch import nn

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models.modules import is_conv1d, replace_module

QUANT_TYPES = ("nf4", "fp4")
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCK_SIZE = 256  # bitsandbytes quantizes the absmax constants in blocks of 256 (8-bit)
INSTALL_HINT = "pip install 'lorakit[qlora]'  (or: pip install 'bitsandbytes>=0.49')"

# a numbered decoder block: model.layers.3.mlp..., transformer.h.0.attn..., blocks.2...
_BLOCK_PATH = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_probed_devices: set[str] = set()


# ---------------------------------------------------------------------- bitsandbytes
def import_bitsandbytes():
    """Import bitsandbytes, turning a missing install into an actionable error.

    Raises:
        ModelLoadError: bitsandbytes is not installed (the message says how to install it).
    """
    # bitsandbytes' CPU backend logs a warning about an optional kernels package on import
    cpu_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    level = cpu_logger.level
    cpu_logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401
        import bitsandbytes.nn  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(f"4-bit quantization needs bitsandbytes, which is not installed "
                             f"({exc}); install it with: {INSTALL_HINT}, or load the model with "
                             f"quantization=None") from None
    finally:
        cpu_logger.setLevel(level)
    return bitsandbytes


def probe_device(device: torch.device) -> None:
    """Quantize and multiply one small block on ``device`` once, so that a CPU lacking the
    instructions bitsandbytes' kernels need fails here, with a clear message, not mid-forward."""
    key = str(device)
    if key in _probed_devices:
        return
    if device.type not in ("cpu", "cuda", "xpu"):
        raise ModelLoadError(f"bitsandbytes has no 4-bit kernels for device {device.type!r}; "
                             f"use a CUDA GPU or the CPU, or load with quantization=None")
    bnb = import_bitsandbytes()
    try:
        w = torch.linspace(-1, 1, 128, device=device).reshape(2, 64)
        codes, state = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4",
                                                    compress_statistics=True)
        bnb.matmul_4bit(torch.ones(3, 64, device=device), codes, quant_state=state)
    except Exception as exc:  # a missing native library or an illegal instruction surfaces here
        where = "this CPU" if device.type == "cpu" else f"device {device}"
        raise ModelLoadError(
            f"bitsandbytes {getattr(bnb, '__version__', '?')} cannot run 4-bit kernels on {where} "
            f"({type(exc).__name__}: {exc}). On CPU it needs an x86-64 CPU with AVX2 (AVX-512 is "
            f"faster) or an ARM64 CPU with NEON, and a bitsandbytes >= 0.49 wheel built for it. "
            f"Load the model with quantization=None to train plain LoRA instead") from None
    _probed_devices.add(key)


def default_compute_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """bfloat16 on a CUDA device that supports it, float32 elsewhere (CPU bf16 matmuls are slow
    on most CPUs and float32 keeps CPU results exactly those of the dequantized model)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_compute_dtype(compute_dtype, device: torch.device) -> torch.dtype:
    if compute_dtype is None:
        return default_compute_dtype(device)
    if isinstance(compute_dtype, torch.dtype):
        chosen = compute_dtype
    else:
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        key = str(compute_dtype).lower().removeprefix("torch.")
        if key not in names:
            raise ConfigError(f"unknown compute_dtype {compute_dtype!r}; valid: {', '.join(names)}")
        chosen = names[key]
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise ConfigError(f"compute_dtype must be float32, bfloat16 or float16, got {chosen}")
    return chosen


def _check_settings(quant_type: str, block_size: int) -> None:
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"unknown quantization {quant_type!r}; lorakit supports "
                          f"{', '.join(QUANT_TYPES)} (or None for no quantization)")
    if block_size not in BLOCK_SIZES:
        raise ConfigError(f"block_size must be one of {BLOCK_SIZES}, got {block_size}")


# ---------------------------------------------------------------------- which layers
def is_4bit(module: nn.Module) -> bool:
    """A linear layer whose weight is packed 4-bit (bitsandbytes Params4bit with a quant state)."""
    return getattr(getattr(module, "weight", None), "quant_state", None) is not None


def quantizable_layers(model: nn.Module, skip_modules: Iterable[str] | None = None
                       ) -> list[tuple[str, nn.Module]]:
    """(path, layer) of the dense linear layers :func:`quantize_model` would replace: every
    ``nn.Linear`` / GPT-2 ``Conv1D`` inside a numbered decoder block, except the output head and
    any layer whose path or last name component is in ``skip_modules``."""
    skip = set(skip_modules or ())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    chosen = []
    for path, module in model.named_modules():
        if module is head or not (type(module) is nn.Linear or is_conv1d(module)):
            continue
        if not _BLOCK_PATH.search(path):
            continue
        if path in skip or path.rsplit(".", 1)[-1] in skip:
            continue
        chosen.append((path, module))
    return chosen


def _unquantizable_reason(path: str, module: nn.Module, block_size: int,
                          device: torch.device | None = None,
                          dtype: torch.dtype | None = None) -> str | None:
    """Why ``module`` cannot become 4-bit, or None. ``device``/``dtype``: where and in what
    dtype its weight will be quantized, when that is not where it is now (streaming load)."""
    weight = module.weight
    device = device if device is not None else weight.device
    dtype = dtype if dtype is not None else weight.dtype
    if device.type == "meta":
        return f"{path}: its weight is on the meta device (not loaded)"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{path}: weight dtype {dtype} (bitsandbytes quantizes float16/bfloat16/float32)"
    in_features = weight.shape[0] if is_conv1d(module) else weight.shape[1]
    if device.type == "cpu" and in_features % block_size and in_features % 2 == 0:
        # bitsandbytes' native CPU dequantize kernel (0.49-0.50) indexes absmax per row, so a
        # block spanning two rows is dequantized with the wrong constant (measured: 0.37
        # relative error instead of 0.09 for a 32x32 weight); odd widths take a correct fallback
        return (f"{path}: in_features={in_features} is not a multiple of block_size={block_size}, "
                f"and bitsandbytes' CPU kernel dequantizes such weights wrongly (use a block_size "
                f"that divides {in_features}, skip_modules, or a CUDA device)")
    return None


def plan_quantization(model: nn.Module, quant_type: str = "nf4", block_size: int = 64,
                      skip_modules: Iterable[str] | None = None, *,
                      device: torch.device | None = None, dtype: torch.dtype | None = None
                      ) -> list[tuple[str, nn.Module]]:
    """The layers :func:`quantize_model` (or the streaming loader) will make 4-bit, after
    checking that every one of them can be; nothing is changed.

    Args:
        model: a dense model, loaded or on the meta device (then give ``device`` and ``dtype``:
            where and in what dtype its weights will be quantized).
        quant_type, block_size, skip_modules: as for :func:`quantize_model`.

    Raises:
        ConfigError: unknown quant_type or block_size.
        ModelLoadError: the model already holds 4-bit layers or adapters, has no layer to
            quantize, or a layer cannot be quantized (the first three are named).
    """
    _check_settings(quant_type, block_size)
    if any(is_4bit(m) for m in model.modules()):
        raise ModelLoadError("the model is already quantized to 4 bits (quantize_model was "
                             "called twice, or it was loaded pre-quantized)")
    if getattr(model, "lorakit_adapters", None):
        raise ModelLoadError("quantize the base model before adding LoRA adapters: the model "
                             f"already holds adapters {sorted(model.lorakit_adapters)}")
    layers = quantizable_layers(model, skip_modules)
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules() if len(list(m.children())) == 0})
        raise ModelLoadError(
            f"{type(model).__name__} has no nn.Linear or Conv1D layer inside numbered decoder "
            f"blocks (paths like model.layers.0.self_attn.q_proj) to quantize; its leaf layer "
            f"types are {', '.join(kinds)}. Load it with quantization=None")
    problems = [r for p, m in layers
                if (r := _unquantizable_reason(p, m, block_size, device, dtype))]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelLoadError("cannot quantize these layers to 4 bits: " + "; ".join(problems[:3])
                             + more + ". Load the model's real weights in float32/bfloat16/"
                             "float16 first, or use quantization=None")
    return layers


def quantization_record(quant_type: str, double_quant: bool, block_size: int,
                        compute_dtype: torch.dtype) -> dict:
    """What ``model.lorakit_quantization`` holds (and adapter manifests record)."""
    return {"type": quant_type, "double_quant": bool(double_quant), "block_size": block_size,
            "compute_dtype": str(compute_dtype).removeprefix("torch.")}


# ---------------------------------------------------------------------- quantize
def linear4bit_from_dense(module: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                          compute_dtype: torch.dtype = torch.float32, block_size: int = 64):
    """A ``bitsandbytes.nn.Linear4bit`` holding the 4-bit codes of ``module``'s weight.

    ``module`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` (its (in, out) weight is transposed to
    Linear's (out, in) first; ``lorakit_conv1d`` on the result remembers it for dequantizing).
    The codes and absmax constants are exactly ``bitsandbytes.functional.quantize_4bit`` of the
    (out, in) weight with these settings. The dense weight is not kept.
    """
    conv1d = is_conv1d(module)
    weight = module.weight.detach()
    bias = getattr(module, "bias", None)
    return linear4bit_from_weight(weight.t() if conv1d else weight,
                                  None if bias is None else bias.detach().clone(),
                                  quant_type=quant_type, double_quant=double_quant,
                                  compute_dtype=compute_dtype, block_size=block_size,
                                  conv1d=conv1d, training=module.training)


def linear4bit_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, *,
                           quant_type: str = "nf4", double_quant: bool = True,
                           compute_dtype: torch.dtype = torch.float32, block_size: int = 64,
                           conv1d: bool = False, training: bool = False):
    """A ``bitsandbytes.nn.Linear4bit`` of the (out, in) ``weight``: its codes and constants are
    ``bitsandbytes.functional.quantize_4bit(weight)``, on ``weight``'s device.

    ``bias``: a tensor (kept as given; a meta tensor is filled in later by the streaming
    loader) or None. ``conv1d`` marks a layer quantized from a GPT-2 ``Conv1D``.
    """
    bnb = import_bitsandbytes()
    out_features, in_features = weight.shape
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
    codes, state = quantize_4bit_codes(weight, quant_type=quant_type, double_quant=double_quant,
                                       block_size=block_size)
    layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=state,
                                     blocksize=block_size, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=torch.uint8,
                                     module=layer, bnb_quantized=True)
    layer.quant_state = state
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    # On AVX512-BF16 CPUs bitsandbytes repacks the weight in place at the first no-grad eval
    # forward (new layout, absmax cast to bf16): the stored codes would no longer be
    # quantize_4bit's, dequantized merges would change, and it needs out_features % 32 == 0.
    layer.support_avx512bf16_for_cpu = False
    layer.lorakit_conv1d = conv1d
    layer.train(training)
    return layer


def meta_linear4bit(module: nn.Module, *, quant_type: str = "nf4", double_quant: bool = True,
                    compute_dtype: torch.dtype = torch.float32, block_size: int = 64):
    """The ``Linear4bit`` that :func:`linear4bit_from_weight` will make of ``module`` (an
    ``nn.Linear`` / ``Conv1D`` on the meta device), with its packed weight still on the meta
    device: the shape of the codes ((out * in + 1) // 2, 1) uint8, no quant state yet
    (:func:`quantize_4bit_codes` computes both when the weight is read; FSDP's sharded load
    shards the codes first). ``lorakit_shape`` on the weight is the logical (out, in) shape,
    for parameter counts before the state exists. The bias stays the module's (meta) bias.
    """
    bnb = import_bitsandbytes()
    conv1d = is_conv1d(module)
    out_features, in_features = (module.weight.shape[::-1] if conv1d else module.weight.shape)
    bias = getattr(module, "bias", None)
    layer = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                              compute_dtype=compute_dtype, compress_statistics=double_quant,
                              quant_type=quant_type, device="meta")
    codes = torch.empty(((out_features * in_features + 1) // 2, 1), dtype=torch.uint8,
                        device="meta")
    layer.weight = bnb.nn.Params4bit(codes, requires_grad=False, quant_state=None,
                                     blocksize=block_size, compress_statistics=double_quant,
                                     quant_type=quant_type, quant_storage=torch.uint8,
                                     module=layer, bnb_quantized=True)
    layer.weight.lorakit_shape = torch.Size([out_features, in_features])
    layer.quant_state = None
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    layer.support_avx512bf16_for_cpu = False  # as linear4bit_from_weight
    layer.lorakit_conv1d = conv1d
    layer.train(module.training)
    return layer


def quantize_4bit_codes(weight: torch.Tensor, *, quant_type: str = "nf4",
                        double_quant: bool = True, block_size: int = 64):
    """``(codes, quant_state)`` of an (out, in) weight: ``bitsandbytes.functional.quantize_4bit``
    with the settings :func:`linear4bit_from_weight` uses (the same bytes)."""
    bnb = import_bitsandbytes()
    return bnb.functional.quantize_4bit(weight.contiguous(), blocksize=block_size,
                                        compress_statistics=double_quant, quant_type=quant_type,
                                        quant_storage=torch.uint8)


@torch.no_grad()
def quantize_model(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                   compute_dtype=None, block_size: int = 64,
                   skip_modules: Iterable[str] | None = None) -> nn.Module:
    """Replace the linear layers inside the decoder blocks with 4-bit bitsandbytes layers.

    In place, one layer at a time (each dense weight is dropped as soon as its 4-bit copy
    exists). Embeddings, norms, the output head and layers outside the numbered decoder blocks
    stay as they are. GPT-2 ``Conv1D`` layers are transposed into ``Linear4bit``. (Loading a
    checkpoint straight to 4-bit, without a dense model first, is
    ``lorakit.models.load.load_model(..., quantization="nf4")``: ``lorakit.models.stream``.)

    Args:
        model: a transformers causal LM with its weights loaded, without adapters yet.
        quant_type: "nf4" (QLoRA's NormalFloat) or "fp4".
        double_quant: also quantize the per-block absmax constants (8-bit, blocks of 256).
        compute_dtype: dtype of the dequantized weight in each matmul; None = bf16 on a CUDA
            device that supports it, else float32. A torch.dtype or a name ("bf16", ...).
        block_size: values per absmax constant (64 as in QLoRA).
        skip_modules: layer paths or names (e.g. ``["down_proj"]``) to keep dense.

    Returns:
        ``model``, with ``model.lorakit_quantization = {"type", "double_quant", "block_size",
        "compute_dtype"}``.

    Raises:
        ConfigError: unknown quant_type, block_size or compute_dtype.
        ModelLoadError: bitsandbytes missing or unable to run here; the model already holds
            4-bit layers or LoRA adapters; no layer (or an unsuitable layer) to quantize.
    """
    layers = plan_quantization(model, quant_type, block_size, skip_modules)
    device = layers[0][1].weight.device
    probe_device(device)
    compute = resolve_compute_dtype(compute_dtype, device)
    while layers:  # pop, so each dense layer is freed as soon as its 4-bit copy replaces it
        path, module = layers.pop(0)
        replace_module(model, path, linear4bit_from_dense(module, quant_type, double_quant, compute,
                                                          block_size))
        del module
    _unshare_from_checkpoint(model)
    model.lorakit_quantization = quantization_record(quant_type, double_quant, block_size, compute)
    return model


def _unshare_from_checkpoint(model: nn.Module) -> None:
    """Give the CPU tensors that stay dense (embeddings, norms, head) their own memory.

    transformers memory-maps safetensors checkpoints on CPU: every weight is a view of one
    file mapping, which stays alive (with each page quantize_model read still resident) as
    long as any weight points into it. Copying the remaining weights lets the mapping, the
    last dense copy of the quantized weights, go (measured on SmolLM2-135M: -400 MiB RSS).
    """
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen or tensor.device.type != "cpu" or is_4bit_tensor(tensor):
            continue
        seen.add(id(tensor))
        tensor.data = tensor.data.clone()


def is_4bit_tensor(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "quant_state", None) is not None


# ---------------------------------------------------------------------- dequantize
def dequantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """The dense (out, in) tensor of a bitsandbytes 4-bit weight, in the dtype it was quantized
    from (bitsandbytes' own ``dequantize_4bit``)."""
    bnb = import_bitsandbytes()
    state = weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):  # undo bitsandbytes' CPU repacking
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

        weight.data, state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
        weight.quant_state = state
    return bnb.functional.dequantize_4bit(weight.data, state)


@torch.no_grad()
def dequantized_copy(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A dense copy of a 4-bit layer: ``nn.Linear`` (or ``Conv1D`` when it was quantized from
    one), weights in ``dtype`` (default: the dtype it was quantized from). The 4-bit layer is
    left untouched. A dense layer is simply deep-copied (and cast)."""
    import copy

    if not is_4bit(module):
        dense = copy.deepcopy(module)
        return dense.to(dtype) if dtype is not None else dense
    weight = dequantize_weight(module.weight)  # (out, in)
    dtype = dtype or weight.dtype
    bias = module.bias
    if getattr(module, "lorakit_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        dense = Conv1D(weight.shape[0], weight.shape[1]).to(device=weight.device, dtype=dtype)
        dense.weight.copy_(weight.t())
        if bias is not None:
            dense.bias.copy_(bias)
        else:
            dense.bias = None
    else:
        dense = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                          device=weight.device, dtype=dtype)
        dense.weight.copy_(weight)
        if bias is not None:
            dense.bias.copy_(bias)
    dense.requires_grad_(False)
    return dense.train(module.training)


@torch.no_grad()
def dequantize_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every 4-bit layer of ``model`` (in place) with its dense dequantized copy, so the
    model computes what the 4-bit model computes, at 16/32-bit. Returns ``model``."""
    for path in [p for p, m in model.named_modules() if is_4bit(m)]:
        replace_module(model, path, dequantized_copy(model.get_submodule(path), dtype))
    model.lorakit_quantization = None
    return model


# ---------------------------------------------------------------------- bytes
def _state_bytes(state) -> dict[str, int]:
    """Bytes of a QuantState's absmax, nested constants and quant maps."""
    out = {"absmax": state.absmax.numel() * state.absmax.element_size(),
           "nested": 0, "quant_map": state.code.numel() * state.code.element_size()}
    if getattr(state, "state2", None) is not None:
        s2 = state.state2
        out["nested"] = s2.absmax.numel() * s2.absmax.element_size() + 4  # + the float32 offset
        out["quant_map"] += s2.code.numel() * s2.code.element_size()
    return out


def _summary(parts: dict[str, int], params: int, other_bytes: int, other_params: int) -> dict:
    quantized = sum(parts.values())
    return {
        "quantized_bytes": quantized,
        "quantized_params": params,
        "codes_bytes": parts["codes"],
        "absmax_bytes": parts["absmax"],
        "nested_absmax_bytes": parts["nested"],
        "quant_map_bytes": parts["quant_map"],
        "bits_per_param": 8 * quantized / params if params else 0.0,
        # what the paper counts: codes + constants, without the per-layer 16/256-entry maps
        "bits_per_param_without_maps": 8 * (quantized - parts["quant_map"]) / params if params else 0.0,
        "bf16_bytes_of_quantized": 2 * params,
        "ratio_vs_bf16": quantized / (2 * params) if params else 0.0,
        "other_bytes": other_bytes,
        "other_params": other_params,
        "total_bytes": quantized + other_bytes,
    }


def quantized_weight_bytes(model: nn.Module) -> dict:
    """What a (possibly 4-bit) model's weights occupy, as stored.

    Returns:
        A dict: ``quantized_bytes`` (codes + absmax + nested constants + quant maps of the 4-bit
        layers) with that breakdown (``codes_bytes``, ``absmax_bytes``, ``nested_absmax_bytes``,
        ``quant_map_bytes``), ``quantized_params`` (their logical parameter count),
        ``bits_per_param`` (with the maps) and ``bits_per_param_without_maps`` (the paper's
        4.127 / 4.5 figure), ``bf16_bytes_of_quantized`` and ``ratio_vs_bf16``, and
        ``other_bytes`` / ``other_params`` of every other parameter (tied weights once),
        ``total_bytes``.
    """
    parts = {"codes": 0, "absmax": 0, "nested": 0, "quant_map": 0}
    params = other_bytes = other_params = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        state = getattr(p, "quant_state", None)
        if state is None:
            other_bytes += p.numel() * p.element_size()
            other_params += p.numel()
            continue
        parts["codes"] += p.numel() * p.element_size()
        for key, n in _state_bytes(state).items():
            parts[key] += n
        params += math.prod(state.shape)
    return _summary(parts, params, other_bytes, other_params)


def _layer_bytes(n: int, double_quant: bool, block_size: int) -> dict[str, int]:
    """Bytes bitsandbytes stores for one weight of ``n`` values (mirrors quantize_4bit)."""
    blocks = -(-n // block_size)
    parts = {"codes": -(-n // 2), "quant_map": 16 * 4}
    if double_quant:
        parts["absmax"] = blocks  # uint8
        parts["nested"] = -(-blocks // NESTED_BLOCK_SIZE) * 4 + 4  # float32 absmax + offset
        parts["quant_map"] += 256 * 4  # the 8-bit dynamic map of the nested quantization
    else:
        parts["absmax"] = blocks * 4
        parts["nested"] = 0
    return parts


def estimate_quantized_bytes(model_or_config, quant_type: str = "nf4", double_quant: bool = True,
                             block_size: int = 64, other_dtype: torch.dtype | None = None,
                             skip_modules: Iterable[str] | None = None) -> dict:
    """What :func:`quantized_weight_bytes` would report after :func:`quantize_model`, computed
    without quantizing (or even allocating) anything.

    Args:
        model_or_config: a dense model (the meta device is fine) or a transformers config (a
            model is built from it on the meta device).
        quant_type, double_quant, block_size, skip_modules: as for :func:`quantize_model`
            (NF4 and FP4 take the same space).
        other_dtype: dtype assumed for the weights that stay dense (default: their own dtype).

    Returns:
        The same keys as :func:`quantized_weight_bytes`.
    """
    _check_settings(quant_type, block_size)
    model = model_or_config
    if not isinstance(model, nn.Module):
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_or_config)
    quantized = {id(m.weight) for _, m in quantizable_layers(model, skip_modules)}
    parts = {"codes": 0, "absmax": 0, "nested": 0, "quant_map": 0}
    params = other_bytes = other_params = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in quantized:
            for key, n in _layer_bytes(p.numel(), double_quant, block_size).items():
                parts[key] += n
            params += p.numel()
        else:
            size = torch.empty((), dtype=other_dtype).element_size() if other_dtype else p.element_size()
            other_bytes += p.numel() * size
            other_params += p.numel()
    return _summary(parts, params, other_bytes, other_params)
