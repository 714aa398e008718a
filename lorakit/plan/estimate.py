r"""Plan before you spend: memory, GPU fit, training time and cost of a fine-tuning run.

Everything is computed from the model's architecture: the model is built from its config on
PyTorch's meta device (no weights, no memory), lorakit's own target matching
(``lorakit.lora.inject``) adds the adapter to it, and the counts come from the real module
shapes. So a preset, any Hugging Face ``config.json`` or a model folder all go through the same
code as ``lorakit train``.

Memory per GPU, in bytes (``P`` all parameters, ``A`` adapter parameters, ``e`` bytes per
activation element: 2 in bf16/fp16, 4 in fp32):

* **weights** — full: ``4 P`` (lorakit keeps fp32 master weights and autocasts matmuls);
  LoRA: ``e P`` (the frozen base in the compute dtype); QLoRA: the exact bitsandbytes layout of
  the decoder-block linear layers (NF4 codes + double-quantized constants, 4.127 bits/param,
  QLoRA paper section 3; ``lorakit.models.quantize.estimate_quantized_bytes``) plus the other
  weights at ``e``.
* **adapter** — ``4 A`` (adapters are fp32, whatever the base).
* **gradients** — one fp32 gradient per trainable parameter: ``4 A``, or ``4 P`` for full.
* **optimizer** — AdamW: two fp32 moments, ``8`` bytes per trainable parameter; 8-bit AdamW
  (bitsandbytes, block-wise, Dettmers et al. 2022): ``2 x (1 + 4/256)`` bytes; SGD without
  momentum: 0. (EleutherAI, "Transformer Math 101", 2023, for the same accounting.)
* **activations** — what autograd keeps for backward, per layer and token, counted tensor by
  tensor the way Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", section 4.1) do for GPT, but for the block this model really has. With fused
  attention (SDPA / FlashAttention, no ``s x s`` score matrix kept) a decoder layer keeps, in
  elements per token: ``4h`` (the inputs and outputs of its two norms) ``+ q + 2kv`` (query, key,
  value after RoPE) ``+ 2q`` (attention output and the output projection's input) ``+ 4I``
  (gated MLP: gate, activation, up, product; ``2I`` for a plain GELU MLP) ``+ r`` per adapted
  layer (the ``A x`` that ``B`` needs). LoRA dropout ``p > 0`` adds a 1-byte mask per distinct
  adapter input (q/k/v share one, gate/up another: lorakit's adapters that read one tensor share
  its mask) and ``e`` bytes for the dropped copy of the attention output (the other dropped
  copies replace inputs that nothing else keeps): measured with saved-tensor hooks.
  Eager attention adds Korthikanti's ``5 a s`` term (scores, softmax, dropout mask) per token.
  The output head at the supervised positions (worst case: every token) keeps fp32 log-probs
  and, while its backward runs, two more fp32 ``V``-wide buffers: ``12 V`` bytes per token;
  ``16 V`` with ``data.replay.loss=kl`` (``distill``), whose rows also keep the base's fp32
  log-probs as the KL target (worst case again: every row a replay row).
  Gradient checkpointing keeps only each layer's input (``e h`` per token) plus one layer's
  full set while it is recomputed. The sum is multiplied by the allocator factor of the device
  (measured, see :data:`ALLOCATOR_FACTOR`). QLoRA adds the dense temporary a 4-bit layer is
  dequantized into for each matmul (``e x`` the largest decoder linear, one at a time).
* **overhead** — GPU: the CUDA context and kernels (:data:`CUDA_CONTEXT_GIB`) plus 5% of the
  rest for the caching allocator; CPU: the modules and tokenizer loading a model pulls in
  (measured: :data:`CPU_OVERHEAD_GIB`).

**Load peak** (``Estimate.load_bytes``, not in the total): lorakit streams the checkpoint
(``lorakit.models.stream``), so loading holds the final weights plus one tensor in flight: the
dense copy a 4-bit layer is quantized from (``e x`` the largest decoder linear, QLoRA) and, on
CPU, that tensor's 16-bit checkpoint pages (``2 x`` the largest tensor); plus the overhead.

Multi-GPU setups assume FSDP / ZeRO-3 sharding: weights, adapter, gradients and optimizer state
split ``n`` ways; each GPU still holds the activations of its own micro-batch.

Time: training FLOPs per token are ``2 N`` per forward (``N`` = parameters in matmuls: every
linear layer and the output head, not the embedding lookup) plus attention's ``4 L s q``
forward (PaLM appendix B: ``6N + 12 L H Q T`` for a full training step). Frozen weights need
no weight gradients, so LoRA/QLoRA cost ``4 N`` + the adapter's ``6 A``; full fine-tuning
``6 N``; gradient checkpointing adds one more forward. Hours = FLOPs / (GPUs x bf16 peak x
MFU), with MFU defaults in :data:`DEFAULT_MFU`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from lorakit.errors import ConfigError, did_you_mean
from lorakit.plan.presets import (ALIAS_PRESETS, GPUS, PRESETS, PRICES_DATE, PRICES_SOURCE,
                                  TABLE_PRESETS, GPU, gpu_by_name)

GIB = 2**30
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit", "sgd")
OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2 * (1 + 4 / 256),
                   "paged_adamw8bit": 2 * (1 + 4 / 256), "sgd": 0.0}
PRECISIONS = ("bf16", "fp16", "fp32")
CUDA_CONTEXT_GIB = 0.75  # CUDA context + cuBLAS/cuDNN workspaces + kernels, typical 0.5-1 GiB
CPU_OVERHEAD_GIB = 0.13  # measured: a 2-layer hidden-32 model's whole run on CPU (docs/estimate.md)
# Activations as counted above times this. CUDA's caching allocator hands back exactly what
# is asked (rounded to 512 B); on CPU, glibc's heap keeps freed forward temporaries and backward
# buffers mapped, so the resident peak is higher. CPU: 1.8 was fitted on SmolLM2-135M on a CPU
# without AVX512; on an AVX512-BF16 EPYC the same runs keep less (LoRA at 256 tokens 1.33 GiB
# against 1.49), so 1.5 sits between the two machines (docs/estimate.md).
ALLOCATOR_FACTOR = {"cuda": 1.0, "cpu": 1.5}
DEFAULT_MFU = {"full": 0.40, "lora": 0.35, "qlora": 0.25}
GPU_COUNTS = (1, 2, 4, 8)


@dataclass
class Estimate:
    """The result of :func:`estimate`; :meth:`to_json` gives the ``--json`` object."""

    model: str
    method: str
    parameters: int
    trainable_parameters: int
    adapter_parameters: int
    adapter_bytes: int
    memory_bytes: dict[str, float]  # weights, adapter, gradients, optimizer, activations, overhead, total
    fits: list[str]
    settings: dict[str, Any]
    tokens: int | None = None
    flops: float | None = None
    hours: float | None = None
    cost_usd: float | None = None
    time_gpu: str | None = None
    notes: list[str] = field(default_factory=list)
    load_bytes: float | None = None  # peak while loading the base (streaming: weights + one tensor)

    def memory_gib(self) -> dict[str, float]:
        return {k: round(v / GIB, 3) for k, v in self.memory_bytes.items()}

    def to_json(self) -> dict:
        return {
            "model": self.model, "method": self.method, "parameters": self.parameters,
            "trainable_parameters": self.trainable_parameters,
            "adapter_parameters": self.adapter_parameters, "adapter_bytes": self.adapter_bytes,
            "memory_gib": self.memory_gib(), "fits": self.fits, "tokens": self.tokens,
            "flops": self.flops, "hours": self.hours, "cost_usd": self.cost_usd,
            "time_gpu": self.time_gpu, "settings": self.settings, "notes": self.notes,
            "load_gib": None if self.load_bytes is None else round(self.load_bytes / GIB, 3),
        }


# ---------------------------------------------------------------------- configs
_REQUIRED = [("hidden_size", "n_embd", "d_model"), ("num_hidden_layers", "n_layer", "num_layers"),
             ("num_attention_heads", "n_head"), ("vocab_size",)]


def config_from_json(path: str | os.PathLike):
    """A transformers config from a Hugging Face ``config.json``.

    Raises:
        ConfigError: unreadable file, no ``model_type``, an architecture transformers does not
            know, or a size field missing (transformers would silently use its default).
    """
    from transformers import AutoConfig

    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{path}: no 'model_type' field, so this is not a Hugging Face model "
                          f"config.json (it names the architecture, e.g. \"llama\")")
    for names in _REQUIRED:
        if not any(n in data for n in names):
            raise ConfigError(f"{path}: missing field {names[0]!r}"
                              + (f" (or {', '.join(repr(n) for n in names[1:])})" if names[1:] else "")
                              + "; the estimate needs the model's real sizes")
    kind = data.pop("model_type")
    try:
        return AutoConfig.for_model(kind, **data)
    except (ValueError, KeyError) as exc:
        raise ConfigError(f"{path}: model_type {kind!r} is not an architecture this transformers "
                          f"knows ({exc})") from None


def resolve_model_config(model: str):
    """``(label, transformers config)`` for a preset name, a lorakit model spec (alias, HF
    folder, hub id in the local cache) or a ``config.json`` path.

    Raises:
        ConfigError: none of those; the message lists the presets.
    """
    key = model.lower()
    if key in PRESETS:
        return key, PRESETS[key].make_config()
    if key in ALIAS_PRESETS:
        return model, PRESETS[ALIAS_PRESETS[key]].make_config()
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return model, config_from_json(path)
    if path.is_dir() and (path / "config.json").is_file():
        return model, config_from_json(path / "config.json")
    if path.is_file() and path.suffix.lower() == ".gguf":
        from transformers import AutoConfig

        from lorakit.errors import LorakitError
        from lorakit.models.load import from_pretrained, resolve_spec

        try:
            return model, from_pretrained(AutoConfig, resolve_spec(model))
        except LorakitError as exc:
            raise ConfigError(str(exc)) from None
    if "/" in model and not path.exists():
        from transformers import AutoConfig

        try:
            return model, AutoConfig.from_pretrained(model, local_files_only=True)
        except (OSError, ValueError):
            pass
    raise ConfigError(f"unknown model or preset {model!r}{did_you_mean(key, PRESETS)}; presets: "
                      f"{', '.join(PRESETS)}; or give a Hugging Face model folder, a config.json "
                      f"(--from-config), a .gguf file or a hub id in the local cache")


@lru_cache(maxsize=16)
def _meta_model_cached(config_json: str, model_type: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **json.loads(config_json))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def meta_model(config):
    """The model of ``config`` on the meta device (cached; callers must leave it as found)."""
    data = config.to_dict()
    kind = data.pop("model_type")
    return _meta_model_cached(json.dumps(data, sort_keys=True, default=str), kind)


# ---------------------------------------------------------------------- adapter
def safetensors_size(tensors: dict[str, tuple[str, tuple[int, ...]]],
                     metadata: dict[str, str] | None = None) -> int:
    """Exact byte size of the file ``safetensors`` writes for tensors of these names, dtypes
    (safetensors names: ``"F32"``, ``"BF16"``...) and shapes, without any data.

    The format: an 8-byte little-endian header length, a compact JSON header (``__metadata__``
    and, per tensor in the order safetensors lays them out, dtype, shape and byte offsets),
    padded with spaces to a multiple of 8, then the raw data.
    """
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "BF16": 2, "F16": 2, "I16": 2,
             "U8": 1, "I8": 1, "BOOL": 1}
    # safetensors orders by dtype size, largest first, then by name
    order = sorted(tensors, key=lambda n: (-sizes[tensors[n][0]], n))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name in order:
        dtype, shape = tensors[name]
        nbytes = math.prod(shape) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    padded = len(text) + (-len(text)) % 8
    return 8 + padded + offset


def adapter_layout(config, r: int, target_modules, *, lora_dropout: float = 0.0,
                   use_dora: bool = False, lora_alpha: float | None = None) -> dict:
    """The adapter lorakit would add to this model, from the real module shapes.

    Returns:
        ``{"tensors": {file key: shape}, "targets": [(path, in, out)], "parameters": int,
        "bytes": exact size of adapter_model.safetensors as save_adapter writes it}``.

    Raises:
        ConfigError: ``target_modules`` matches nothing, or ``r`` is larger than a target's
            smaller dimension (the update could not have rank r).
    """
    from lorakit.errors import AdapterError
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import add_adapter, delete_adapter
    from lorakit.lora.io import PREFIX, adapter_parameters

    model = meta_model(config)
    try:
        lcfg = LoraConfig.create(r=r, lora_alpha=lora_alpha or 2 * r, lora_dropout=lora_dropout,
                                 target_modules=target_modules, use_dora=use_dora)
    except ConfigError:
        raise
    try:
        paths = add_adapter(model, lcfg, name="_lorakit_estimate")
    except AdapterError as exc:
        raise ConfigError(f"target_modules: {exc}") from None
    try:
        targets = []
        for path in paths:
            layer = model.get_submodule(path)
            targets.append((path, layer.in_features, layer.out_features))
        tensors = {k: (tuple(v.shape), v.dtype) for k, v in
                   adapter_parameters(model, "_lorakit_estimate").items()}
    finally:
        delete_adapter(model, "_lorakit_estimate")
    too_small = [(p, i, o) for p, i, o in targets if r > min(i, o)]
    if too_small:
        p, i, o = too_small[0]
        raise ConfigError(f"r={r} is larger than layer {p} allows ({i} -> {o} features: rank at "
                          f"most {min(i, o)}); choose r <= {min(min(i, o) for _, i, o in too_small)}"
                          f" or leave that layer out of target_modules")
    names = {"torch.float32": "F32", "torch.bfloat16": "BF16", "torch.float16": "F16"}
    file = {k: (names[str(dt)], shape) for k, (shape, dt) in tensors.items()}
    return {"tensors": {k: v[1] for k, v in file.items()}, "targets": targets,
            "parameters": sum(math.prod(s) for s, _ in tensors.values()),
            "bytes": safetensors_size(file, metadata={"format": "pt"}), "prefix": PREFIX}


# ---------------------------------------------------------------------- architecture facts
def _facts(config) -> dict:
    """Sizes the activation and FLOP formulas need, read from the meta model."""
    from lorakit.lora.layers import is_linear_like, linear_features

    model = meta_model(config)
    params = {id(p): p for p in model.parameters()}.values()
    total = sum(p.numel() for p in params)
    largest = max((p.numel() for p in params), default=0)
    matmul = largest_linear = 0
    names = set()
    head = model.get_output_embeddings()
    for name, module in model.named_modules():
        if is_linear_like(module):
            i, o = linear_features(module)
            matmul += i * o
            names.add(name.rsplit(".", 1)[-1])
            if module is not head:
                largest_linear = max(largest_linear, i * o)
    get = lambda *keys, default=None: next((getattr(config, k) for k in keys
                                            if getattr(config, k, None) is not None), default)
    h = get("hidden_size", "n_embd", "d_model")
    layers = get("num_hidden_layers", "n_layer", "num_layers")
    heads = get("num_attention_heads", "n_head")
    head_dim = get("head_dim", default=h // heads)
    kv_heads = get("num_key_value_heads", "n_head_kv", default=heads)
    inter = get("intermediate_size", "n_inner", "ffn_dim") or 4 * h
    gated = bool(names & {"gate_proj", "gate_up_proj", "w1", "w3"})
    vocab = head.weight.shape[0] if head is not None else get("vocab_size")
    return {"parameters": total, "matmul_params": matmul, "largest_param": largest,
            "largest_linear": largest_linear,
            "hidden": h, "layers": layers, "heads": heads, "q_dim": heads * head_dim,
            "kv_dim": kv_heads * head_dim, "intermediate": inter, "gated_mlp": gated,
            "vocab": vocab}


# linear layers that read one and the same input tensor inside their parent module
_SIBLING_INPUTS = {"q_proj": "qkv-in", "k_proj": "qkv-in", "v_proj": "qkv-in",
                   "query": "qkv-in", "key": "qkv-in", "value": "qkv-in",
                   "gate_proj": "mlp-in", "up_proj": "mlp-in", "w1": "mlp-in", "w3": "mlp-in"}
_ATTENTION_OUTPUTS = {"o_proj", "out_proj", "wo"}  # (GPT-2: attn.c_proj)


def activation_bytes(facts: dict, targets: list, *, tokens: int, seq_len: int, e: int,
                     lora_dropout: float, r: int, grad_checkpointing: bool,
                     eager_attention: bool = False, distill: bool = False) -> float:
    """Bytes autograd keeps for one micro-batch of ``tokens`` tokens (see module docstring)."""
    h, q, kv, inter = facts["hidden"], facts["q_dim"], facts["kv_dim"], facts["intermediate"]
    layers = facts["layers"]
    n_adapted = len(targets) / max(layers, 1)  # adapted layers per block, on average
    # LoRA dropout: adapters that read the same tensor (q/k/v, gate/up) share one mask
    # (lorakit.lora.layers.LoraDropout), and A then keeps the dropped copy *instead of* the
    # input, which nothing else keeps -- except the attention output, which attention's backward
    # keeps too. So: a 1-byte mask per distinct input, plus e bytes per attention-output input.
    inputs, attn_out = {}, 0
    for path, i, _ in targets:
        parent, _, name = path.rpartition(".")
        inputs[(parent, _SIBLING_INPUTS.get(name, name))] = i
        if name in _ATTENTION_OUTPUTS or (name == "c_proj" and "attn" in parent):
            attn_out += i
    dropout = (sum(inputs.values()) + e * attn_out) / max(layers, 1) if lora_dropout > 0 else 0
    elems = 4 * h + q + 2 * kv + 2 * q + (4 if facts["gated_mlp"] else 2) * inter + r * n_adapted
    per_token = e * elems + dropout
    if eager_attention:
        per_token += 5 * facts["heads"] * seq_len
    # fp32 log-probs kept + two fp32 buffers in its backward (+ the base's log-probs, for KL)
    head = (16 if distill else 12) * facts["vocab"]
    if grad_checkpointing:
        return tokens * (layers * e * h + per_token + head)
    return tokens * (layers * per_token + head)


# ---------------------------------------------------------------------- the estimate
def estimate(model: str = "smollm2-135m", *, config=None, method: str = "lora", r: int = 16,
             target_modules="all-linear", seq_len: int = 2048, batch_size: int = 1,
             grad_checkpointing: bool = False, optimizer: str = "adamw",
             precision: str = "bf16", lora_dropout: float = 0.05, use_dora: bool = False,
             device: str = "cuda", examples: int | None = None,
             avg_tokens: float | None = None, epochs: float = 1.0, gpu: str | None = None,
             price_per_hour: float | None = None, mfu: float | None = None,
             eager_attention: bool = False, distill: bool = False) -> Estimate:
    """Memory per GPU, the GPU setups that fit, time and cost of one training configuration.

    Args:
        model: a preset (``lorakit.plan.presets.PRESETS``), a lorakit model spec or a
            ``config.json`` path; only a label when ``config`` is given.
        config: a transformers config to use instead of resolving ``model``.
        method: "full", "lora" or "qlora".
        r, target_modules, lora_dropout, use_dora: the adapter (as in a run config).
        seq_len, batch_size: tokens per row and rows per micro-batch (per GPU).
        grad_checkpointing: recompute activations in backward.
        optimizer: "adamw", "adamw8bit", "paged_adamw8bit" or "sgd".
        precision: compute dtype of the frozen base and activations: "bf16", "fp16", "fp32"
            (lorakit on CPU trains in fp32).
        device: "cuda" (GPU overhead, fits) or "cpu" (for checking against CPU runs).
        examples, avg_tokens, epochs: the data, for time and cost (all tokens are trained on).
        gpu: a card name for time and cost (default: the cheapest setup that fits).
        price_per_hour: $/GPU-hour instead of the built-in table.
        mfu: model FLOPs utilisation instead of :data:`DEFAULT_MFU`.
        eager_attention: the model keeps ``s x s`` attention scores (no SDPA/flash).
        distill: replay rows matched to the base's distribution (``data.replay.loss=kl``).

    Raises:
        ConfigError: unknown model/preset, method, optimizer or GPU; impossible settings.
    """
    if method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if optimizer not in OPTIMIZERS:
        raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}"
                          f"{did_you_mean(optimizer, OPTIMIZERS)}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if device not in ("cuda", "cpu"):
        raise ConfigError(f"device must be cuda or cpu, got {device!r}")
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("r", r)):
        if value is None or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if mfu is not None and not 0 < mfu <= 1:
        raise ConfigError(f"mfu is a fraction of the card's peak, 0 < mfu <= 1, got {mfu}")
    label = model
    if config is None:
        label, config = resolve_model_config(model)
    max_pos = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    notes = []
    if max_pos and seq_len > max_pos:
        notes.append(f"seq_len {seq_len} is longer than the model's max_position_embeddings "
                     f"{max_pos}")
    facts = _facts(config)
    e = 4 if precision == "fp32" else 2
    params = facts["parameters"]

    if method == "full":
        layout = {"parameters": 0, "bytes": 0, "targets": []}
        trainable = params
        weights = 4.0 * params
    else:
        layout = adapter_layout(config, r, target_modules, lora_dropout=lora_dropout,
                                use_dora=use_dora)
        trainable = layout["parameters"]
        if method == "lora":
            weights = float(e * params)
        else:
            import torch

            from lorakit.models.quantize import estimate_quantized_bytes

            dtype = torch.float32 if e == 4 else torch.bfloat16
            weights = float(estimate_quantized_bytes(meta_model(config),
                                                     other_dtype=dtype)["total_bytes"])
    adapter = 4.0 * layout["parameters"]
    gradients = 4.0 * trainable
    optim = OPTIMIZER_BYTES[optimizer] * trainable
    act = ALLOCATOR_FACTOR[device] * activation_bytes(
        facts, layout["targets"], tokens=seq_len * batch_size, seq_len=seq_len, e=e,
        lora_dropout=lora_dropout if method != "full" else 0.0,
        r=r if method != "full" else 0, grad_checkpointing=grad_checkpointing,
        eager_attention=eager_attention, distill=distill)
    if method == "qlora":
        # bitsandbytes dequantizes a 4-bit weight into a dense temporary for each forward and
        # backward matmul, one layer at a time (measured: a 11008 x 4096 layer's forward +
        # backward peaks at 1.1-1.2x its 180 MB float32 weight)
        act += e * facts["largest_linear"]
    state = weights + adapter + gradients + optim

    def overhead(rest: float) -> float:
        return CUDA_CONTEXT_GIB * GIB + 0.05 * rest if device == "cuda" else CPU_OVERHEAD_GIB * GIB

    memory = {"weights": weights, "adapter": adapter, "gradients": gradients, "optimizer": optim,
              "activations": act, "overhead": overhead(state + act)}
    memory["total"] = sum(memory.values())
    # lorakit.models.stream builds the base in its final form tensor by tensor: the load peaks
    # at the weights plus one tensor in flight: the dense copy a 4-bit layer is quantized from
    # and, on CPU, the tensor's 16-bit pages of the checkpoint file while they are read
    in_flight = (e * facts["largest_linear"] if method == "qlora" else 0) + \
        (2 * facts["largest_param"] if device == "cpu" else 0)
    load = weights + in_flight + overhead(weights)

    fits, setups = [], []
    for card in GPUS:
        for n in GPU_COUNTS:
            rest = state / n + act
            if rest + overhead(rest) <= card.memory_gib * GIB:
                fits.append(f"{n}x {card.label}")
                setups.append((card, n))
                break

    result = Estimate(model=label, method=method, parameters=params, trainable_parameters=trainable,
                      adapter_parameters=layout["parameters"], adapter_bytes=layout["bytes"],
                      memory_bytes=memory, fits=fits, notes=notes, load_bytes=load, settings={
                          "r": r if method != "full" else None,
                          "target_modules": target_modules if method != "full" else None,
                          "seq_len": seq_len, "batch_size": batch_size,
                          "grad_checkpointing": grad_checkpointing, "optimizer": optimizer,
                          "precision": precision, "lora_dropout": lora_dropout,
                          "device": device, "mfu": mfu or DEFAULT_MFU[method],
                          "prices": f"{PRICES_DATE}: {PRICES_SOURCE}"})
    if examples is not None or avg_tokens is not None:
        if not examples or not avg_tokens or examples < 1 or avg_tokens <= 0:
            raise ConfigError("time and cost need both --examples N (>= 1) and --avg-tokens T (> 0)")
        if epochs is None or epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {epochs}")
        _add_time(result, facts, setups, method=method, seq_len=seq_len,
                  tokens=examples * avg_tokens * epochs, gpu=gpu, price=price_per_hour,
                  mfu=mfu or DEFAULT_MFU[method], grad_checkpointing=grad_checkpointing)
    elif gpu is not None:
        gpu_by_name(gpu)  # still report a bad name
    return result


def training_flops_per_token(facts: dict, method: str, seq_len: int, adapter_params: int,
                             grad_checkpointing: bool) -> float:
    """FLOPs to train on one token (see the module docstring)."""
    n = facts["matmul_params"]
    attn_forward = 4 * facts["layers"] * seq_len * facts["q_dim"] / 2  # causal: half the pairs
    forward = 2 * n + attn_forward
    if method == "full":
        flops = 3 * forward
    else:
        flops = 2 * (2 * n) + 3 * attn_forward + 6 * adapter_params
    if grad_checkpointing:
        flops += forward
    return flops


def _add_time(result: Estimate, facts: dict, setups: list, *, method, seq_len, tokens, gpu,
              price, mfu, grad_checkpointing) -> None:
    per_token = training_flops_per_token(facts, method, seq_len, result.adapter_parameters,
                                         grad_checkpointing)
    result.tokens = int(round(tokens))
    result.flops = float(per_token * tokens)
    if gpu is not None:
        card = gpu_by_name(gpu)
        count = next((n for c, n in setups if c == card), None)
        if count is None:
            result.notes.append(f"{card.label} does not fit this run even as 8 cards; time shown "
                                f"for 8")
            count = 8
    elif setups:
        card, count = min(setups, key=lambda s: _setup_cost(s, per_token * tokens, mfu, price))
    else:
        result.notes.append("no known GPU setup of up to 8 cards fits this run")
        return
    hours = per_token * tokens / (count * card.bf16_tflops * 1e12 * mfu) / 3600
    result.hours = round(hours, 6)
    result.time_gpu = f"{count}x {card.label}"
    result.cost_usd = round(hours * count * (price if price is not None else card.usd_per_hour), 2)


def _setup_cost(setup: tuple[GPU, int], flops: float, mfu: float, price) -> float:
    card, count = setup
    hours = flops / (count * card.bf16_tflops * 1e12 * mfu) / 3600
    return hours * count * (price if price is not None else card.usd_per_hour)


# ---------------------------------------------------------------------- hardware table
TABLE_ASSUMPTIONS = ("r=16 on all linear layers, dropout 0.05, seq_len 2048, batch size 1, "
                     "gradient checkpointing on, AdamW (LoRA) / paged 8-bit AdamW (QLoRA), bf16; "
                     "multi-GPU counts assume FSDP sharding")


def hardware_table(presets: list[str] | None = None, *, seq_len: int = 2048, r: int = 16) -> list[dict]:
    """The smallest fitting GPU setup for LoRA and QLoRA per preset (``lorakit estimate --table``).

    "Smallest" = least total GPU memory, then the cheaper card.
    """
    rows = []
    for name in presets or TABLE_PRESETS:
        row = {"model": name, "parameters": PRESETS[name].params}
        for method, opt in (("lora", "adamw"), ("qlora", "paged_adamw8bit")):
            est = estimate(name, method=method, r=r, seq_len=seq_len, grad_checkpointing=True,
                           optimizer=opt)
            setups = []
            for label in est.fits:
                n, card_label = label.split("x ", 1)
                card = next(g for g in GPUS if g.label == card_label)
                setups.append((int(n) * card.memory_gib, card.usd_per_hour * int(n), label))
            row[method] = {"total_gib": est.memory_gib()["total"],
                           "smallest": min(setups)[2] if setups else None,
                           "adapter_mib": round(est.adapter_bytes / 2**20, 1)}
        rows.append(row)
    return rows
