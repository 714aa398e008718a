r"""Streaming load: a model is built in its target form (16/32-bit, or 4-bit) while its
safetensors checkpoint is read, one tensor at a time, so the dense model never exists.

How (:func:`load_streaming`)::

    1. layout    the index (model.safetensors.index.json) or model.safetensors, and every
                 shard's header: files present, headers sound, each tensor where the index says,
                 its bytes inside the file, shape = the model's  -> else ModelLoadError naming
                 the file and the tensor, before any weight is read
    2. skeleton  the stock transformers model from its config, parameters on the meta device
                 (no memory), buffers real (RoPE's inv_freq is computed by __init__ as usual)
    3. stream    per tensor: open its shard (safetensors.safe_open), take the tensor, convert it
                 to the target dtype/device (a copy), quantize it to 4-bit when it is a decoder
                 linear weight (``lorakit.models.quantize``: the same function, settings and
                 codes as ``quantize_model``), put it into the model, drop the file view
    4. finish    tied weights share one tensor; nothing may be left on the meta device

Peak memory is the finished model plus one tensor in its checkpoint dtype, its converted copy
and bitsandbytes' temporaries while quantizing. Each tensor gets its own short-lived file
mapping, so the pages read stay in the page cache but not in this process's resident set
(with one mapping per shard they would all count until the shard is done, with transformers'
loader until the whole checkpoint is); the C heap is trimmed after each shard, because glibc
otherwise keeps the freed float32 temporaries mapped.

Why not ``from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True))``:
transformers 5.24 with bitsandbytes 0.50.2 does quantize on CPU, tensor by tensor, with codes
equal to ``quantize_4bit``'s, but measured on a 290 MB bf16 checkpoint (12 layers, hidden 1024,
6 shards) whose 4-bit model is 135 MB, its load peaked at +790 MB RSS and kept +484 MB after:
every shard stays memory-mapped until the whole load ends (+300 MB of file pages resident), and
the float32 temporaries are left in glibc's heap (+350 MB until ``malloc_trim``). It also
converts every ``nn.Linear`` but the head (lorakit quantizes the linears inside the numbered
decoder blocks only), leaves bitsandbytes' AVX512-BF16 repacking on (which rewrites the codes
in place at the first eval forward) and adds ``quantization_config`` to the model config. This
loader measured +190 MB peak on the same checkpoint (``tests/models/test_streaming.py`` checks
the bound).

Dense loads stream the same way: a bf16 base is read into bf16, never float32 first. What this
loader does not do, ``lorakit.models.load`` leaves to ``from_pretrained`` (followed by
``quantize_model``): ``device_map`` placement, ``.bin`` checkpoints, and checkpoints whose
tensor names need transformers' key conversions (legacy names, fused experts).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import ModelLoadError

logger = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_ELEMENT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                  "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
                  "F8_E4M3": 1, "F8_E5M2": 1}
_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                 "BF16": torch.bfloat16}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: its shard, safetensors dtype name, shape and byte size."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Layout:
    """Where every tensor of a safetensors checkpoint is (see :func:`checkpoint_layout`)."""

    folder: Path
    tensors: dict[str, TensorInfo]  # name -> where, in file order within each shard
    shard_bytes: dict[Path, int]    # tensor data bytes per shard file

    @property
    def largest_shard_bytes(self) -> int:
        return max(self.shard_bytes.values(), default=0)

    def float_dtype(self) -> torch.dtype | None:
        """The dtype of the first floating-point tensor (what ``dtype="auto"`` falls back to)."""
        return next((_TORCH_DTYPES[t.dtype] for t in self.tensors.values()
                     if t.dtype in _TORCH_DTYPES), None)


# ---------------------------------------------------------------------- 1. layout
def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size.

    Raises:
        ModelLoadError: the file is too short, its header is not JSON, or a tensor's bytes run
            past the end of the file (the message names that tensor).
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: not a safetensors file ({size} bytes, shorter than "
                                 "the 8-byte header length); re-download or re-save it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8 or n > 100 * 2**20:
            raise ModelLoadError(f"{path}: corrupt safetensors file (header length {n} does not "
                                 f"fit in {size} bytes); re-download or re-save it")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ModelLoadError(f"{path}: corrupt safetensors header ({exc}); re-download or "
                                 "re-save it") from None
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_bytes = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            start, end = meta["data_offsets"]
            shape = [int(d) for d in meta["shape"]]
            dtype = meta["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelLoadError(f"{path}: corrupt safetensors header entry for tensor "
                                 f"{name!r}") from None
        if end > data_bytes:
            raise ModelLoadError(
                f"{path}: truncated or corrupt shard: tensor {name!r} needs bytes {start}-{end} "
                f"of the data section, the file holds {max(data_bytes, 0)}; re-download it")
        want = math.prod(shape) * _ELEMENT_BYTES.get(dtype, 0)
        if dtype in _ELEMENT_BYTES and end - start != want:
            raise ModelLoadError(f"{path}: corrupt shard: tensor {name!r} ({dtype} {shape}) "
                                 f"should take {want} bytes, the header gives it {end - start}")
    return header


def checkpoint_layout(folder: str | os.PathLike) -> Layout | None:
    """Read the index and every shard header of the safetensors checkpoint in ``folder``.

    Returns:
        The :class:`Layout`, or None when ``folder`` holds no safetensors checkpoint (neither
        ``model.safetensors.index.json`` nor ``model.safetensors``).

    Raises:
        ModelLoadError: a shard the index names is missing, a shard is truncated or corrupt,
            or a tensor is not in the shard the index says; the file and tensor are named.
    """
    folder = Path(folder)
    index_path = folder / INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({exc}); "
                                 "re-download it") from None
    elif (folder / SINGLE).is_file():
        weight_map = None
    else:
        return None
    files: dict[str, list[str]] = {}
    if weight_map is None:
        files[SINGLE] = []
    else:
        for name, file in weight_map.items():
            files.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    shard_bytes: dict[Path, int] = {}
    for file, names in files.items():
        path = folder / file
        if not path.is_file():
            raise ModelLoadError(
                f"{path}: shard missing; the index {INDEX} puts {len(names)} tensors in it "
                f"(e.g. {names[0]!r}). Re-download the checkpoint (all shards)")
        try:
            header = read_header(path)
        except ModelLoadError as exc:
            if not names or "tensor '" in str(exc):
                raise
            raise ModelLoadError(f"{exc} (the index puts {len(names)} tensors in it, e.g. "
                                 f"{names[0]!r})") from None
        if names:
            absent = [n for n in names if n not in header]
            if absent:
                raise ModelLoadError(
                    f"{path}: tensor {absent[0]!r} is not in this shard, although {INDEX} says "
                    f"it is ({len(absent)} such tensors); the index and shards do not belong "
                    "together: re-download the checkpoint")
        entries = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        shard_bytes[path] = 0
        for name, meta in entries:
            if weight_map is not None and weight_map.get(name) != file:
                continue  # the index decides which copy of a name counts
            start, end = meta["data_offsets"]
            tensors[name] = TensorInfo(path, meta["dtype"], tuple(meta["shape"]), end - start)
            shard_bytes[path] += end - start
    return Layout(folder, tensors, shard_bytes)


# ---------------------------------------------------------------------- 2. skeleton
@contextlib.contextmanager
def _parameters_on_meta():
    """Every parameter created inside goes to the meta device; buffers are left real.

    (``with torch.device("meta")`` would put non-persistent buffers such as RoPE's inv_freq on
    meta too, and they are not in checkpoints.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build_skeleton(config, dtype: torch.dtype):
    """The causal LM of ``config`` with its parameters (in ``dtype``) on the meta device."""
    from transformers import AutoModelForCausalLM

    with _parameters_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def tied_names(model: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same parameter (tied embeddings and head share one)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    return {name: names for names in groups.values() for name in names}


def match_names(model: nn.Module, layout: Layout) -> dict[str, str] | None:
    """checkpoint name -> model parameter/buffer name for every tensor the model needs, or
    None when the names do not line up (a checkpoint for transformers' key conversions).

    A missing ``base_model_prefix`` (GPT-2's hub files say ``h.0...`` for
    ``transformer.h.0...``) is added; a tied parameter needs only one of its names."""
    expected = dict(model.state_dict(keep_vars=True))
    buffers = {n for n, _ in model.named_buffers()}  # persistent ones keep their init values
    prefix = getattr(model, "base_model_prefix", "")
    mapping: dict[str, str] = {}
    for name in layout.tensors:
        if name in expected:
            mapping[name] = name
        elif prefix and f"{prefix}.{name}" in expected:
            mapping[name] = f"{prefix}.{name}"
    aliases = tied_names(model)
    covered = set()
    for target in mapping.values():
        covered.update(aliases.get(target, [target]))
    missing = [n for n in expected if n not in covered and n not in buffers]
    return None if missing else mapping


# ---------------------------------------------------------------------- 3. stream
@functools.lru_cache(maxsize=1)
def _malloc_trim():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_memory() -> None:
    """Return the C heap's free pages to the OS (glibc keeps them otherwise)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _read(info: TensorInfo, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """The tensor ``name`` (or its rows ``start:stop`` along dim 0) as a view of a short-lived
    mapping of its shard."""
    from safetensors import safe_open

    try:
        with safe_open(str(info.file), framework="pt", device="cpu") as f:
            if rows is not None:
                return f.get_slice(name)[rows[0]:rows[1]]
            return f.get_tensor(name)
    except Exception as exc:  # safetensors raises its own error type; a read may also fail
        raise ModelLoadError(f"{info.file}: cannot read tensor {name!r} ({type(exc).__name__}: "
                             f"{exc}); the shard may be corrupt: re-download it") from None


def read_tensor(info: TensorInfo, name: str, dtype: torch.dtype | None = None,
                device: torch.device | str = "cpu", rows: tuple[int, int] | None = None
                ) -> torch.Tensor:
    """The checkpoint tensor ``name`` (at ``info``) in memory of its own on ``device``, never a
    view of the file mapping; a floating-point tensor cast to ``dtype`` when given (other
    tensors, and all when ``dtype`` is None, keep the checkpoint's dtype). ``rows``: only rows
    ``start:stop`` along dim 0 are read (an FSDP rank's shard).

    Raises:
        ModelLoadError: the shard cannot be read (file and tensor named).
    """
    view = _read(info, name, rows)
    tensor = view.to(device=device,
                     dtype=dtype if dtype is not None and view.is_floating_point() else view.dtype)
    if tensor.data_ptr() == view.data_ptr():
        tensor = view.clone()
    return tensor


def home_tensor(module: nn.Module, attr: str) -> torch.Tensor | None:
    """The parameter or buffer ``attr`` of ``module`` (one home of a checkpoint tensor)."""
    param = module._parameters.get(attr)
    return param if param is not None else module._buffers.get(attr)


def put_homes(homes: list[tuple[nn.Module, str]], tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter (or buffer) at each (module, attribute) of ``homes``;
    parameters share one ``nn.Parameter`` (tied aliases stay one object) that keeps the
    old one's ``requires_grad``."""
    param = None
    for module, attr in homes:
        if attr in module._parameters:
            old = module._parameters[attr]
            if param is None:
                param = nn.Parameter(tensor, requires_grad=old.requires_grad if old is not None
                                     else False)
            module._parameters[attr] = param
        else:
            module._buffers[attr] = tensor


def _put(model: nn.Module, names: list[str], tensor: torch.Tensor) -> None:
    """Make ``tensor`` the parameter (or buffer) at each of ``names`` (aliases share it)."""
    homes = []
    for name in names:
        path, _, attr = name.rpartition(".")
        homes.append((model.get_submodule(path), attr))
    put_homes(homes, tensor)


@dataclass
class Deferred:
    """A model built with ``load_streaming(..., defer=True)``: its parameters are still on the
    meta device and this says where their values are; :func:`read_deferred` reads them.

    Each tensor's home is kept as (module, attribute) pairs, not names, so it is found again
    after the model is rewrapped (LoRA layers wrap the linears, FSDP shards the blocks)."""

    layout: Layout
    device: torch.device  # where the weights (and adapters created meanwhile) go
    # checkpoint name -> (model name, dtype to read it in (None: as stored), [(module, attr)])
    slots: dict[str, tuple[str, torch.dtype | None, list[tuple[nn.Module, str]]]]
    # checkpoint name -> was a GPT-2 Conv1D: the weights of a 4-bit base's linears, whose
    # homes hold the packed codes, quantized when read with ``quantization``'s settings
    quantize: dict[str, bool] = field(default_factory=dict)
    quantization: dict | None = None


def _unique_tensors(model: nn.Module, mapping: dict[str, str]):
    """``(checkpoint name, model name, dtype to read it in (None: as stored), [aliases])`` for
    each tensor the model needs, once (a tied copy stored twice is skipped): the walk both the
    eager load and a deferred one make."""
    expected = dict(model.state_dict(keep_vars=True))
    aliases = tied_names(model)
    done: set[str] = set()
    for name, target in mapping.items():
        if target in done:
            continue
        names = aliases.get(target, [target])
        done.update(names)
        want = expected[target].dtype if expected[target].is_floating_point() else None
        yield name, target, want, names


def _deferred(model: nn.Module, layout: Layout, mapping: dict[str, str], device,
              quantization: dict | None = None, dtype: torch.dtype | None = None) -> Deferred:
    """The :class:`Deferred` of a skeleton; with ``quantization`` the planned decoder linears
    are replaced first by meta 4-bit layers (``quantize.meta_linear4bit``) whose weights are
    read in ``dtype`` and quantized when read (:func:`read_deferred`)."""
    from lorakit.models import quantize as qz
    from lorakit.models.modules import replace_module

    planned: dict[str, bool] = {}  # weight name -> was Conv1D
    if quantization is not None:
        layers = qz.plan_quantization(model, quantization["type"], quantization["block_size"],
                                      quantization.get("skip_modules"), device=device, dtype=dtype)
        qz.probe_device(device)
        for path, module in layers:
            planned[f"{path}.weight"] = qz.is_conv1d(module)
            replace_module(model, path, qz.meta_linear4bit(
                module, quant_type=quantization["type"],
                double_quant=quantization["double_quant"],
                compute_dtype=quantization["compute_dtype"],
                block_size=quantization["block_size"]))
    slots, quantize = {}, {}
    for name, target, want, names in _unique_tensors(model, mapping):
        homes = []
        for n in names:
            path, _, attr = n.rpartition(".")
            homes.append((model.get_submodule(path), attr))
        if target in planned:
            want = dtype  # the codes' home is uint8; the weight is read in the model's dtype
            quantize[name] = planned[target]
        slots[name] = (target, want, homes)
    return Deferred(layout, torch.device(device), slots, quantize, quantization)


def _quantized_codes(deferred: Deferred, name: str, dense: torch.Tensor,
                     homes: list[tuple[nn.Module, str]]) -> torch.Tensor:
    """The packed 4-bit codes of the weight ``name`` read as ``dense``; its quant state is put
    on the 4-bit layer(s) that hold it (``layer.quant_state``: bitsandbytes gives it back to
    the weight at the first forward, also after FSDP replaced the parameter by its shard)."""
    from lorakit.models import quantize as qz

    how = deferred.quantization
    try:
        codes, state = qz.quantize_4bit_codes(dense.t() if deferred.quantize[name] else dense,
                                              quant_type=how["type"],
                                              double_quant=how["double_quant"],
                                              block_size=how["block_size"])
    except (RuntimeError, ValueError) as exc:  # a kernel or shape bitsandbytes refuses
        raise ModelLoadError(f"{deferred.layout.tensors[name].file}: cannot quantize tensor "
                             f"{name!r} ({type(exc).__name__}: {exc})") from None
    for module, attr in homes:
        module.quant_state = state
        param = module._parameters.get(attr)
        if param is not None and hasattr(param, "quant_state"):
            param.quant_state = state
    return codes


def read_deferred(deferred: Deferred, rows=None):
    """``(model name, tensor, [(module, attr)])`` for every tensor of a deferred model's
    checkpoint, one at a time, in checkpoint order, in the dtype the model holds it in (on the
    CPU); tied names share one entry. The caller keeps what it needs and drops the rest.

    ``rows``: ``rows(homes, shape) -> (start, stop) | None``: read only those rows along dim 0
    (an FSDP rank's shard), or the whole tensor for None.

    A weight the model holds in 4 bits (``deferred.quantize``) is read whole and quantized:
    what is yielded is its packed codes ((out * in + 1) // 2, 1) uint8, exactly
    ``quantize_4bit``'s (the caller cuts its rows), and its quant state is put on its layer.

    Raises:
        ModelLoadError: a tensor cannot be read or quantized (file and tensor named).
    """
    for name, (target, want, homes) in deferred.slots.items():
        info = deferred.layout.tensors[name]
        if name in deferred.quantize:
            dense = read_tensor(info, name, want, deferred.device)
            codes = _quantized_codes(deferred, name, dense, homes)
            del dense
            release_freed_memory()  # the dense copy and bitsandbytes' temporaries
            yield target, codes, homes
            continue
        span = rows(homes, info.shape) if rows is not None else None
        yield target, read_tensor(info, name, want, rows=span), homes


@torch.no_grad()
def load_streaming(layout: Layout, config, *, dtype: torch.dtype, device: torch.device,
                   quantization: dict | None = None, mapping: dict[str, str] | None = None,
                   defer: bool = False):
    """Build the model of ``config`` from the checkpoint ``layout`` tensor by tensor.

    Args:
        layout: from :func:`checkpoint_layout`.
        config: the model's transformers config.
        dtype: dtype of the dense weights (and what 4-bit layers are quantized from).
        device: where every tensor goes.
        quantization: None (dense), or ``{"type", "double_quant", "block_size",
            "compute_dtype" (a torch.dtype), "skip_modules"}``: the decoder-block linear layers
            become bitsandbytes 4-bit layers as their weights are read.
        mapping: from :func:`match_names` (computed when None).
        defer: check the checkpoint against the model but read no weight: the parameters stay
            on the meta device and ``model.lorakit_deferred`` (a :class:`Deferred`) says where
            their values are (for FSDP, whose ranks each read their own shard). With
            ``quantization`` the planned linears are already 4-bit layers, their packed codes
            on the meta device, quantized when :func:`read_deferred` reads them.

    Returns:
        The model (train mode as transformers builds it; ``lorakit_quantization`` set), or
        None, before any weight is read, when the checkpoint's tensor names are not the
        model's (checkpoints that need transformers' key conversions).

    Raises:
        ModelLoadError: the checkpoint does not match the model (a shape, a missing tensor) or
            a tensor cannot be read or quantized here; file and tensor are named.
    """
    from lorakit.models import quantize as qz
    from lorakit.models.modules import replace_module

    model = build_skeleton(config, dtype)
    mapping = mapping if mapping is not None else match_names(model, layout)
    if mapping is None:
        logger.info("%s: tensor names need transformers' key conversions; not streamed",
                    layout.folder)
        return None
    expected = dict(model.state_dict(keep_vars=True))
    for name, target in mapping.items():
        info = layout.tensors[name]
        if tuple(info.shape) != tuple(expected[target].shape):
            raise ModelLoadError(f"{info.file}: tensor {name!r} has shape {list(info.shape)}, "
                                 f"{type(model).__name__} expects {list(expected[target].shape)} "
                                 "(config.json and weights do not belong together)")
    if defer:
        model.lorakit_deferred = _deferred(model, layout, mapping, device, quantization, dtype)
        model.lorakit_quantization = None if quantization is None else qz.quantization_record(
            quantization["type"], quantization["double_quant"], quantization["block_size"],
            quantization["compute_dtype"])
        return model
    quantized: dict[str, tuple[str, bool]] = {}  # weight name -> (layer path, was Conv1D)
    if quantization is not None:
        layers = qz.plan_quantization(model, quantization["type"], quantization["block_size"],
                                      quantization.get("skip_modules"), device=device, dtype=dtype)
        qz.probe_device(device)
        quantized = {f"{path}.weight": (path, qz.is_conv1d(m)) for path, m in layers}
    for name, target, want, names in _unique_tensors(model, mapping):
        info = layout.tensors[name]
        tensor = read_tensor(info, name, want, device)
        if target in quantized:
            path, conv1d = quantized[target]
            old = model.get_submodule(path)
            try:
                layer = qz.linear4bit_from_weight(
                    tensor.t() if conv1d else tensor, old.bias, quant_type=quantization["type"],
                    double_quant=quantization["double_quant"],
                    compute_dtype=quantization["compute_dtype"],
                    block_size=quantization["block_size"], conv1d=conv1d, training=old.training)
            except (RuntimeError, ValueError) as exc:  # a kernel or shape bitsandbytes refuses
                raise ModelLoadError(f"{info.file}: cannot quantize tensor {name!r} "
                                     f"({type(exc).__name__}: {exc})") from None
            replace_module(model, path, layer)
            del tensor
            release_freed_memory()  # the float32 copy and bitsandbytes' temporaries
        else:
            _put(model, names, tensor)
    release_freed_memory()
    for module in model.modules():  # buffers were built on the CPU by __init__
        for key, buf in module._buffers.items():
            if buf is not None and buf.device != device:
                module._buffers[key] = buf.to(device)
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
            if p.device.type == "meta"]
    if left:
        raise ModelLoadError(f"{layout.folder}: the checkpoint holds no tensor {left[0]!r} "
                             f"({len(left)} missing); re-download it")
    model.lorakit_quantization = None if quantization is None else qz.quantization_record(
        quantization["type"], quantization["double_quant"], quantization["block_size"],
        quantization["compute_dtype"])
    return model
