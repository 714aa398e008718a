r"""Fold a LoRA adapter into its base weights, giving a plain transformers model.

For each adapted layer, with the base weight W dequantized when it is 4-bit::

    W' = W + scaling * B @ A                               plain LoRA / rsLoRA
    W' = m * (W + scaling * B @ A) / ||W + scaling B A||_row     DoRA

The result is written into a *new* dense layer (nn.Linear, or Conv1D for GPT-2), never into
the 4-bit codes: re-quantizing W' would add a second rounding error on top of the one the
adapter was trained to live with. The source model (4-bit or dense, with its adapters) is left
untouched, so it can keep training or serving.

Whether the written folder computes what the adapter on its base computes is checked by the
parity gate (``parity.py``) before the folder is published.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.inject import adapter_configs, lora_layers
from lorakit.lora.layers import LoraLayer, ModulesToSaveWrapper
from lorakit.models.modules import is_conv1d, replace_module


@torch.no_grad()
def _merged_layer(layer: LoraLayer, name: str, dtype: torch.dtype) -> nn.Module:
    """A dense copy of ``layer``'s base with adapter ``name`` folded in (LoraLayer's maths)."""
    from lorakit.models.quantize import dequantized_copy

    layer.unmerge()  # a dense base may hold merged adapters; start from the pure base weight
    dense = dequantized_copy(layer.base_layer, torch.float32)
    weight = layer.base_weight().float()  # (out, in)
    if name in layer.lora_A:
        merged = weight + layer.delta_weight(name)
        if name in layer.lora_magnitude_vector:
            norm = merged.norm(p=2, dim=1)  # (out,)
            merged = merged * (layer.lora_magnitude_vector[name].float() / norm).unsqueeze(1)
        weight = merged
    dense.weight.copy_(weight.t() if is_conv1d(dense) else weight)
    dense.requires_grad_(False)
    return dense.to(dtype)


@torch.no_grad()
def merge_adapter_into_base(model: nn.Module, name: str = "default",
                            dtype: torch.dtype = torch.float32) -> nn.Module:
    """A new plain transformers model: ``model``'s base (dequantized when 4-bit) with adapter
    ``name`` folded into its weights.

    Args:
        model: a model holding adapter ``name`` over a dense or 4-bit base. Not modified.
        name: the adapter to fold in; other adapters on the model are left out.
        dtype: dtype of every floating point weight of the result (float32, bfloat16, ...).

    Returns:
        A new model of the same transformers class with no LoraLayer, no ModulesToSaveWrapper
        and no 4-bit layer (``lorakit_quantization`` None), in eval mode; ``save_pretrained``
        writes a standard checkpoint.

    Raises:
        AdapterError: the model has no adapter ``name``.
    """
    from lorakit.models.quantize import dequantized_copy, is_4bit

    adapters = adapter_configs(model)
    if name not in adapters:
        raise AdapterError(f"no adapter named {name!r} to merge; adapters: "
                           f"{', '.join(adapters) or 'none'}")
    merged = copy.deepcopy(model)  # 4-bit layers copy as codes; dense copies are dropped below
    for path, layer in list(lora_layers(merged)):
        replace_module(merged, path, _merged_layer(layer, name, dtype))
    for path, wrapper in [(p, m) for p, m in merged.named_modules()
                          if isinstance(m, ModulesToSaveWrapper)]:
        chosen = wrapper.modules_to_save[name] if name in wrapper.modules_to_save \
            else wrapper.original_module
        replace_module(merged, path, chosen)
    for path in [p for p, m in merged.named_modules() if is_4bit(m)]:
        replace_module(merged, path, dequantized_copy(merged.get_submodule(path), dtype))
    for attr in ("lorakit_adapters", "lorakit_active_adapter"):
        merged.__dict__.pop(attr, None)
    merged.lorakit_quantization = None
    config = getattr(merged, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    merged.to(dtype)
    merged.requires_grad_(False)
    return merged.eval()


def untie_if_diverged(model: nn.Module) -> None:
    """Set ``tie_word_embeddings`` False when the output head no longer shares the input
    embedding's weight (``modules_to_save=["lm_head"]`` trained a copy): with the flag left
    on, from_pretrained would re-tie the head to the embeddings and drop the trained copy."""
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if get_in is None or get_out is None or get_out() is None:
        return
    if get_out().weight is get_in().weight:
        return
    _untie(model.config)


def _untie(config) -> None:
    """``tie_word_embeddings`` False on ``config`` and its text config (the same for most)."""
    for c in {id(c): c for c in (config, config.get_text_config())}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False


def _quant_kwargs(quant: dict) -> dict:
    """The manifest's ``quantization`` record as the keyword arguments of ``quantize_model``
    and ``linear4bit_from_weight`` (computing in float32, as the merge and its gate do)."""
    return {"quant_type": quant.get("type", "nf4"), "double_quant": quant.get("double_quant", True),
            "block_size": quant.get("block_size", 64), "compute_dtype": torch.float32}


def _load_adapter_unchecked(model: nn.Module, adapter_dir, name: str = "default",
                            tokenizer=None) -> None:
    """``load_adapter`` without its base-mismatch warning: the callers check the base
    themselves, as an error (:func:`_check_base`), or did so already."""
    import warnings

    from lorakit.lora.io import load_adapter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        load_adapter(model, adapter_dir, name, tokenizer=tokenizer)  # other shapes fail here


def _check_base(folder, base: nn.Module, spec: str) -> None:
    """AdapterError when ``folder``'s manifest records another base than ``base``."""
    from lorakit.lora.io import base_config_hash

    folder.check_base(base_config_hash(base), against=repr(spec),
                      fix="pass the model it was trained on with --model, or --force to "
                          "export anyway")


# ---------------------------------------------------------------------- adapter folder -> HF folder
class AdaptedBase:
    """An adapter folder loaded on its base, ready to merge and to compare against.

    Attributes:
        spec: the base model spec used.
        model: the adapter over the full-precision (float32) base.
        quantized: for a QLoRA adapter, the adapter over the base quantized the way the
            manifest records (the model it was trained on); else None.
        tokenizer: the base's tokenizer.
        config: the adapter's LoraConfig.
        manifest: ``lorakit.json`` (empty for a plain PEFT adapter).
    """

    def __init__(self, spec, model, quantized, tokenizer, config, manifest):
        self.spec, self.model, self.quantized = spec, model, quantized
        self.tokenizer, self.config, self.manifest = tokenizer, config, manifest

    @property
    def merge_source(self) -> nn.Module:
        """What the adapter is folded into: the dequantized 4-bit base for QLoRA (the weights
        the adapter was trained against), else the full-precision base."""
        return self.quantized if self.quantized is not None else self.model


def base_spec_for(adapter_dir, model: str | None = None) -> str:
    """The base model to use: ``model`` when given, else the base the adapter folder records
    (:attr:`lorakit.lora.io.AdapterFolder.base_model`).

    Raises:
        AdapterError: not an adapter folder, an unreadable lorakit.json, or no base named.
    """
    from lorakit.lora.io import read_adapter_folder

    if model:
        return str(model)
    spec = read_adapter_folder(adapter_dir, strict=True).base_model
    if not spec:
        raise AdapterError(f"{adapter_dir} does not say which base model it was trained on "
                           f"(no base_model in lorakit.json or adapter_config.json); pass "
                           f"--model MODEL")
    return str(spec)


def load_adapted_base(adapter_dir, model: str | None = None, *,
                      allow_base_mismatch: bool = False) -> AdaptedBase:
    """Load the base (float32) and the adapter on it; for a QLoRA adapter also the 4-bit base
    with the adapter, quantized with the settings in the manifest.

    Raises:
        AdapterError: not an adapter folder, no base named, or the adapter was trained on
            another base (layer shapes differ; or the manifest's base-config hash differs,
            unless ``allow_base_mismatch``).
        ModelLoadError: the base cannot be loaded.
    """
    from lorakit.lora.io import read_adapter_folder
    from lorakit.models.load import load_model

    folder = read_adapter_folder(adapter_dir, strict=True)
    spec = base_spec_for(adapter_dir, model)
    base, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
    quant = folder.manifest.get("quantization")
    plain_base = copy.deepcopy(base) if quant else None  # quantized below, without adapters
    _load_adapter_unchecked(base, adapter_dir, tokenizer=tokenizer)  # other shapes fail here
    if not allow_base_mismatch:
        _check_base(folder, base, spec)
    quantized = None
    if quant:
        from lorakit.models.quantize import quantize_model

        quantized = quantize_model(plain_base, **_quant_kwargs(quant))
        _load_adapter_unchecked(quantized, adapter_dir, tokenizer=tokenizer)
    return AdaptedBase(spec, base, quantized, tokenizer, folder.config, folder.manifest)


def save_hf_folder(model: nn.Module, tokenizer, out, max_shard_size: str | int = "2GB") -> None:
    """Write ``model`` + ``tokenizer`` as a standard Hugging Face folder: config.json,
    model.safetensors (or shards + model.safetensors.index.json), generation_config.json,
    tokenizer files and chat template."""
    untie_if_diverged(model)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, max_shard_size=max_shard_size)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)


def prepare_output(out, overwrite: bool):
    """The temporary folder to write into, next to ``out``.

    Raises:
        ExportError: ``out`` exists and ``overwrite`` is False.
    """
    import os
    import uuid
    from pathlib import Path

    from lorakit.errors import ExportError

    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"output {out} already exists; choose another --out or pass "
                          f"--overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    return out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def publish(tmp, out) -> None:
    """Move the finished ``tmp`` into place as ``out`` (replacing what was there)."""
    import os
    import shutil
    from pathlib import Path

    out = Path(out)
    if out.is_dir() and not out.is_symlink():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    os.replace(tmp, out)


def merge_to_folder(adapter_dir, out, model: str | None = None, *,
                    dtype: torch.dtype = torch.float32, force: bool = False,
                    overwrite: bool = False, prompts: list[str] | None = None,
                    max_new_tokens: int = 16, max_shard_size: str | int = "2GB",
                    by_layer: bool | None = None, console=None) -> dict:
    """``lorakit merge``: fold an adapter folder into its base, write a standard HF folder and
    gate it on parity with the adapter-on-base.

    The merge runs layer by layer (:class:`LeanMerge`: one tensor read from the base's
    safetensors, folded, written and freed at a time) whenever the base is a safetensors
    checkpoint on disk; other bases (``.bin`` weights, names needing transformers'
    conversions) are merged in memory as before. The folder is written under a temporary
    name, read back with plain transformers, and compared (``lorakit.export.parity``) with the
    adapter over the float32 base and, for a QLoRA adapter, over the 4-bit base too (the merge
    folds into the dequantized 4-bit weights, so that row is the gate and the float32-base row
    is reported). The models of the gate are loaded one at a time. Only when the gate passes
    (or ``force``) is it renamed to ``out``; otherwise it is deleted.

    ``by_layer``: run the gate's float32 models layer by layer (``lorakit.models.layerwise``:
    each block's weights read from the checkpoint just before it runs, so the gate needs about
    one layer in float32, not the model; same logits). None: when the float32 model would take
    more than half of the memory available now (a 7B model is 27 GB in float32). The 4-bit
    reference of a QLoRA adapter is loaded whole (it is 4-bit). Models that cannot run layer by
    layer (DoRA, ``modules_to_save``, trained biases, bases that do not stream) load whole.

    Returns:
        ``{"out", "base", "dtype", "qlora", "parity": {label: report}, "passed", "forced",
        "parity_by_layer"}``.

    Raises:
        ExportError: ``out`` exists without ``overwrite``; parity worse than the thresholds.
        AdapterError / ModelLoadError: as :func:`load_adapted_base`.
    """
    import gc
    import shutil

    from rich.console import Console

    from lorakit.errors import ExportError
    from lorakit.export import parity

    console = console or Console(stderr=True)
    tmp = prepare_output(out, overwrite)
    try:
        try:
            with console.status("reading the adapter and the base's checkpoint layout…"):
                lean = LeanMerge(adapter_dir, model, dtype=dtype, allow_base_mismatch=force)
        except NotStreamable:
            lean = None
        if lean is not None:
            with console.status(f"merging layer by layer into {out}…"):
                lean.write_folder(tmp, max_shard_size=max_shard_size)
            spec, tokenizer, qlora, quant = lean.spec, lean.tokenizer, lean.qlora, lean.quant
            fp32_bytes = lean.float32_bytes()
            del lean
        else:
            with console.status("loading the base model and the adapter…"):
                adapted = load_adapted_base(adapter_dir, model, allow_base_mismatch=force)
            with console.status("merging…"):
                merged = merge_adapter_into_base(adapted.merge_source, dtype=dtype)
            with console.status(f"writing {out}…"):
                save_hf_folder(merged, adapted.tokenizer, tmp, max_shard_size=max_shard_size)
            spec, tokenizer = adapted.spec, adapted.tokenizer
            qlora, quant = adapted.quantized is not None, adapted.manifest.get("quantization")
            fp32_bytes = None  # a base that does not stream: whole loads only
            del merged, adapted
        gc.collect()
        by_layer = _gate_by_layer(by_layer, fp32_bytes)
        if by_layer:
            console.print("parity gate: float32 models run layer by layer (one block's weights "
                          "in memory at a time)", style="dim", highlight=False)
        with console.status("checking parity (reading the folder back with transformers)…"):
            ids = parity.encode_prompts(tokenizer, prompts)
            references = []
            if qlora:
                references.append(("adapter on 4-bit base", _adapter_on_base(
                    adapter_dir, spec, quant), True))
            references.append(("adapter on float32 base" if qlora else "adapter on base",
                               _adapter_on_base(adapter_dir, spec, None, by_layer), not qlora))
            outputs = []
            for label, load, gated in references:
                reference = load()
                with _running(reference):
                    outputs.append((label, parity.model_outputs(reference, ids, max_new_tokens),
                                    gated))
                del reference
                gc.collect()
            written = _written_model(tmp, by_layer)
            with _running(written):
                rows = [(label, parity.compare_outputs(ref, parity.model_outputs(
                    written, ids, max_new_tokens, follow=ref)), gated)
                    for label, ref, gated in outputs]
            del written
        parity.print_table(rows, dtype, console)
        bad = [f"{label}: {'; '.join(parity.failures(rep, dtype))}"
               for label, rep, gated in rows if gated and parity.failures(rep, dtype)]
        if bad and not force:
            raise ExportError(f"parity gate failed ({' | '.join(bad)}); the merged model was "
                              f"not written. Thresholds are in docs/export.md; pass --force to "
                              f"keep it anyway")
        if bad:
            console.print("[yellow]parity gate failed; kept because of --force[/yellow]")
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "base": spec, "dtype": parity.dtype_name(dtype),
            "qlora": qlora, "parity": {label: rep for label, rep, _ in rows}, "passed": not bad,
            "forced": bool(bad), "parity_by_layer": by_layer}


def _gate_by_layer(by_layer: bool | None, fp32_bytes: int | None) -> bool:
    """Whether the gate's float32 models run layer by layer (see :func:`merge_to_folder`)."""
    if fp32_bytes is None:
        return False
    if by_layer is not None:
        return by_layer
    from lorakit.plan.preflight import available_memory_bytes

    free = available_memory_bytes(torch.device("cpu"))
    return free is not None and fp32_bytes > free / 2


def _running(model):
    """The context a gate model runs in: layer by layer when it was loaded deferred."""
    import contextlib

    from lorakit.models.layerwise import layerwise

    return layerwise(model) if getattr(model, "lorakit_deferred", None) is not None \
        else contextlib.nullcontext()


def _written_model(folder, by_layer: bool) -> nn.Module:
    """The merged folder read back in float32: with plain transformers, or (``by_layer``)
    deferred, its weights read block by block during each forward."""
    from transformers import AutoModelForCausalLM

    if by_layer:
        from lorakit.models.load import load_model

        model, _ = load_model(folder, dtype=torch.float32, device="cpu", defer_weights=True)
        if getattr(model, "lorakit_deferred", None) is not None:
            return model.eval()
        del model  # did not stream: read it whole
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _deferred_adapted(adapter_dir, spec: str):
    """The adapter over the float32 base with the base's weights left in the checkpoint (for
    a layer-by-layer forward), or None when this adapter cannot run so: its config trains
    base biases, or it leaves tensors no checkpoint fills (DoRA magnitudes, modules_to_save
    copies), or the base does not stream."""
    from lorakit.lora.inject import adapter_configs
    from lorakit.models.layerwise import uncovered
    from lorakit.models.load import load_model

    base, tokenizer = load_model(spec, dtype=torch.float32, device="cpu", defer_weights=True)
    if getattr(base, "lorakit_deferred", None) is None:
        return None
    _load_adapter_unchecked(base, adapter_dir, tokenizer=tokenizer)
    config = adapter_configs(base)["default"]
    if config.bias != "none" or uncovered(base):
        return None
    return base.eval()


def _adapter_on_base(adapter_dir, spec: str, quant: dict | None, by_layer: bool = False):
    """A loader (called when needed) of the adapter over the float32 base (``by_layer``: with
    the base's weights left in its checkpoint when the adapter allows), or over the 4-bit base
    quantized with the manifest's settings ``quant`` (as the QLoRA run trained)."""
    def load():
        from lorakit.models.load import load_model

        if by_layer and not quant:
            model = _deferred_adapted(adapter_dir, spec)
            if model is not None:
                return model
        if quant and quant.get("block_size", 64) == 64:  # streamed straight to 4-bit
            base, tokenizer = load_model(spec, dtype=torch.float32, device="cpu",
                                         quantization=quant.get("type", "nf4"),
                                         double_quant=quant.get("double_quant", True),
                                         compute_dtype=torch.float32)
        else:
            base, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
            if quant:
                from lorakit.models.quantize import quantize_model

                quantize_model(base, **_quant_kwargs(quant))
        _load_adapter_unchecked(base, adapter_dir, tokenizer=tokenizer)  # checked by the merge
        return base.eval()
    return load


# ---------------------------------------------------------------------- layer-by-layer merge
class NotStreamable(Exception):
    """The base is not a safetensors checkpoint whose names match the model (``.bin`` weights,
    a hub id not in the local cache, names needing transformers' conversions): the in-memory
    merge is used instead."""


def _plain_name(key: str, name: str) -> str:
    """A saved bias / modules_to_save key as the merged model's parameter name."""
    for part in (".base_layer.", ".original_module.", f".modules_to_save.{name}."):
        key = key.replace(part, ".")
    return key


class LeanMerge:
    """Fold an adapter folder into its base one tensor at a time, reading the base from its
    safetensors checkpoint (a folder, the GGUF conversion cache, a hub snapshot).

    Per tensor of the merged model, in model order: the base tensor is read from its shard
    (float32), for a QLoRA adapter quantized with the manifest's settings by the function the
    training load uses (``lorakit.models.quantize.linear4bit_from_weight``) and dequantized,
    the adapter is folded in by :func:`_merged_layer` (the same code as the in-memory merge,
    on a LoraLayer whose base holds just this one layer), and the result, cast to ``dtype``,
    is handed to the writer and dropped. The model itself exists only on the meta device, so
    memory is one layer's float32 temporaries plus the adapter.

    Attributes:
        spec, config, tokenizer, manifest, lora_config, qlora: what was merged.
        plan: ``[(name, shape, dtype)]`` of every output tensor, in write order.
        untied: the merged head no longer shares the embedding (tie_word_embeddings False).
    """

    def __init__(self, adapter_dir, model: str | None = None, *, dtype=torch.float32,
                 allow_base_mismatch: bool = False, name: str = "default"):
        from lorakit.lora.io import read_adapter_folder, split_keys
        from lorakit.models import stream
        from lorakit.models.load import (from_pretrained, load_tokenizer, local_checkpoint,
                                         resolve_spec)
        from transformers import AutoConfig

        folder = read_adapter_folder(adapter_dir, strict=True)
        self.spec = base_spec_for(adapter_dir, model)
        resolved = resolve_spec(self.spec)
        found = local_checkpoint(resolved)
        if found is None:
            raise NotStreamable(f"{self.spec}: no safetensors checkpoint on disk")
        self.base_folder, layout = found
        self.config = from_pretrained(AutoConfig, resolved, str(self.base_folder))
        self.tokenizer = load_tokenizer(self.spec)
        plain = stream.build_skeleton(self.config, torch.float32)
        mapping = stream.match_names(plain, layout)
        if mapping is None:
            raise NotStreamable(f"{self.spec}: tensor names need transformers' conversions")
        self.layout, self.name, self.dtype = layout, name, dtype
        self.manifest, self.lora_config = folder.manifest, folder.config
        self.quant = folder.manifest.get("quantization") or None
        self.qlora = self.quant is not None
        self.lora = stream.build_skeleton(self.config, torch.float32)
        _load_adapter_unchecked(self.lora, adapter_dir, name)  # shapes; weights stay on meta
        if not allow_base_mismatch:
            _check_base(folder, plain, self.spec)
        layers, other = split_keys(folder.tensors())
        self.adapted = {}
        for path, layer in lora_layers(self.lora):
            if name not in layer.lora_A:
                continue
            for module in (layer.lora_A[name], layer.lora_B[name]):
                module.to_empty(device="cpu")
            if name in layer.lora_magnitude_vector:
                layer.lora_magnitude_vector[name] = nn.Parameter(
                    torch.empty_like(layer.lora_magnitude_vector[name], device="cpu"),
                    requires_grad=False)
            self.adapted[path] = layer
        from lorakit.lora.io import copy_lora_weights

        copy_lora_weights(self.lora, name, {p: t for p, t in layers.items() if p in self.adapted})
        expected = plain.state_dict(keep_vars=True)
        self.overrides = {}
        for key, tensor in other.items():  # trained biases, modules_to_save copies
            target = _plain_name(key, name)
            if target not in expected:
                raise AdapterError(f"{folder.weights_file}: tensor {key!r} matches no "
                                   f"parameter of the base model")
            self.overrides[target] = tensor
        self.quantized = set()
        if self.qlora:
            from lorakit.models.quantize import quantizable_layers

            self.quantized = {p for p, _ in quantizable_layers(plain)}
        self.source = {}  # merged tensor name -> checkpoint name
        aliases = stream.tied_names(plain)
        for ckpt, target in mapping.items():
            for alias in aliases.get(target, [target]):
                self.source.setdefault(alias, ckpt)
        self.buffers = dict(plain.named_buffers())
        # tied parameters are written once, unless the merge made their values differ
        plan, self.untied, written = [], False, set()
        for pname, tensor in expected.items():
            group = aliases.get(pname, [pname])
            if len(group) > 1 and any(self._changed(n) for n in group):
                self.untied = True
            elif any(n in written for n in group):
                continue
            written.add(pname)
            out_dtype = dtype if tensor.is_floating_point() else tensor.dtype
            plan.append((pname, tuple(tensor.shape), out_dtype))
        self.plan = plan
        self._dtypes = {n: d for n, _, d in plan}  # output dtype per tensor
        self.conv1d = {p for p, m in plain.named_modules() if is_conv1d(m)}
        del plain

    def float32_bytes(self) -> int:
        """The base's floating-point tensors in float32 (what a whole float32 load holds)."""
        import math

        return sum(4 * math.prod(info.shape) for info in self.layout.tensors.values()
                   if info.dtype in ("F32", "F16", "BF16", "F64"))

    def _changed(self, pname: str) -> bool:
        path, _, attr = pname.rpartition(".")
        return pname in self.overrides or (attr == "weight" and path in self.adapted)

    def _read(self, pname: str) -> torch.Tensor:
        from lorakit.models import stream

        if pname not in self.source:  # a persistent buffer the checkpoint does not hold
            return self.buffers[pname].detach().clone()
        ckpt = self.source[pname]
        return stream.read_tensor(self.layout.tensors[ckpt], ckpt, torch.float32)

    def _quantized(self, weight: torch.Tensor, conv1d: bool):
        """The Linear4bit the QLoRA run trained on, from the dense float32 ``weight``."""
        from lorakit.models.quantize import linear4bit_from_weight

        return linear4bit_from_weight(weight.t() if conv1d else weight, None, conv1d=conv1d,
                                      **_quant_kwargs(self.quant))

    @torch.no_grad()
    def tensor(self, pname: str) -> torch.Tensor:
        """The merged model's tensor ``pname`` in the output dtype (computed now)."""
        from lorakit.models.quantize import dequantize_weight

        path, _, attr = pname.rpartition(".")
        out_dtype = self._dtypes.get(pname, self.dtype)
        if pname in self.overrides:
            return self.overrides[pname].to(out_dtype)
        conv1d = path in self.conv1d
        quantized = attr == "weight" and path in self.quantized
        if attr == "weight" and path in self.adapted:
            layer = self.adapted[path]
            meta_base, meta_fan = layer.base_layer, layer.fan_in_fan_out
            weight = self._read(pname)
            if quantized:
                base = self._quantized(weight, conv1d)
                layer.fan_in_fan_out = False
            else:
                base = _dense_layer(weight, conv1d)
            del weight
            layer.base_layer = base
            try:
                merged = _merged_layer(layer, self.name, out_dtype).weight.detach()
            finally:
                layer.base_layer, layer.fan_in_fan_out = meta_base, meta_fan
            del base
            return merged
        tensor = self._read(pname)
        if quantized:
            dense = dequantize_weight(self._quantized(tensor, conv1d).weight)  # (out, in)
            tensor = dense.t() if conv1d else dense
        return tensor.to(out_dtype) if tensor.is_floating_point() else tensor

    def tensors(self):
        """``(name, tensor)`` of every output tensor in :attr:`plan` order, one at a time."""
        from lorakit.models.stream import release_freed_memory

        for count, (pname, _, _) in enumerate(self.plan):
            yield pname, self.tensor(pname)
            if count % 8 == 7:
                release_freed_memory()

    def output_config(self):
        """The merged model's config: architectures set, untied when the head diverged, dtype
        of the written weights, no quantization_config."""
        import copy as copy_module

        from transformers import AutoModelForCausalLM  # noqa: F401  (registers auto classes)

        config = copy_module.deepcopy(self.config)
        if self.untied:
            _untie(config)
        arch = getattr(self.config, "architectures", None)
        if not arch:
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            arch = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
        config.architectures = list(arch)[:1]
        config.dtype = self.dtype
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        return config

    def write_folder(self, out, max_shard_size: str | int = "2GB") -> None:
        """Write the merged model as a Hugging Face folder (safetensors shards of at most
        ``max_shard_size`` + index, config, generation config, tokenizer) tensor by tensor."""
        from pathlib import Path

        from transformers import GenerationConfig

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        write_safetensors_shards(out, self.plan, self.tensors(), max_shard_size)
        self.output_config().save_pretrained(out)
        generation = None
        if (self.base_folder / "generation_config.json").is_file():
            generation = GenerationConfig.from_pretrained(self.base_folder)
        else:
            generation = GenerationConfig.from_model_config(self.config)
        generation.save_pretrained(out)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(out)


def _dense_layer(weight: torch.Tensor, conv1d: bool) -> nn.Module:
    """An nn.Linear (weight (out, in)) or GPT-2 Conv1D (weight (in, out)) holding ``weight``,
    without a bias (the merge reads only the weight)."""
    if conv1d:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(weight.shape[1], weight.shape[0]).to("meta")
        layer.bias = None
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.float64: "F64", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
              torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def write_safetensors_shards(folder, plan, tensors, max_shard_size: str | int = "2GB") -> list:
    """Write tensors as safetensors shards without holding a shard in memory.

    The shards are planned from ``plan`` (``[(name, shape, dtype)]``: sizes are known before
    any tensor is computed), so each shard's header is written first and every tensor's bytes
    are appended as ``tensors`` (an iterator of ``(name, tensor)`` in plan order) yields them.
    The files are what ``save_pretrained`` writes: ``model.safetensors``, or
    ``model-0000K-of-0000N.safetensors`` + ``model.safetensors.index.json`` when the tensors
    exceed ``max_shard_size`` (a tensor larger than that gets a shard of its own).

    Returns:
        The shard file names.
    """
    import json
    import math
    import os
    from pathlib import Path

    from transformers.utils.hub import convert_file_size_to_int

    folder = Path(folder)
    limit = convert_file_size_to_int(max_shard_size) if isinstance(max_shard_size, str) \
        else int(max_shard_size)
    sizes = [(n, s, d, math.prod(s) * torch.empty((), dtype=d).element_size())
             for n, s, d in plan]
    groups, current, used = [], [], 0
    for entry in sizes:
        if current and used + entry[3] > limit:
            groups.append(current)
            current, used = [], 0
        current.append(entry)
        used += entry[3]
    if current or not groups:
        groups.append(current)
    files = ["model.safetensors"] if len(groups) == 1 else \
        [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
    weight_map, total = {}, 0
    iterator = iter(tensors)
    for file, group in zip(files, groups):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype, nbytes in group:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writes it
        path = folder / file
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for name, shape, dtype, nbytes in group:
                got_name, tensor = next(iterator)
                if got_name != name or tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise RuntimeError(f"merge produced {got_name} {tuple(tensor.shape)} "
                                       f"{tensor.dtype}, expected {name} {shape} {dtype}")
                data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
                f.write(memoryview(data.numpy()))
                del tensor, data
            f.flush()
            os.fsync(f.fileno())
    if len(files) > 1:
        from lorakit.lora.io import atomic_write_json

        atomic_write_json(folder / "model.safetensors.index.json",
                          {"metadata": {"total_size": total}, "weight_map": weight_map})
    return files
