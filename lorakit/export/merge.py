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
from lorakit.models.modules import replace_module


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
    conv1d = type(dense).__name__ == "Conv1D"
    dense.weight.copy_(weight.t() if conv1d else weight)
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
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False


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
    import warnings

    from lorakit.lora.io import base_config_hash, load_adapter, read_adapter_folder
    from lorakit.models.load import load_model

    folder = read_adapter_folder(adapter_dir, strict=True)
    spec = base_spec_for(adapter_dir, model)
    base, tokenizer = load_model(spec, dtype=torch.float32, device="cpu")
    quant = folder.manifest.get("quantization")
    plain_base = copy.deepcopy(base) if quant else None  # quantized below, without adapters
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the hash is checked below, as an error
        load_adapter(base, adapter_dir, tokenizer=tokenizer)  # other shapes fail here
    if not allow_base_mismatch:
        folder.check_base(base_config_hash(base), against=repr(spec),
                          fix="pass the model it was trained on with --model, or --force to "
                              "export anyway")
    quantized = None
    if quant:
        from lorakit.models.quantize import quantize_model

        quantized = quantize_model(plain_base, quant_type=quant.get("type", "nf4"),
                                   double_quant=quant.get("double_quant", True),
                                   block_size=quant.get("block_size", 64),
                                   compute_dtype=torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            load_adapter(quantized, adapter_dir, tokenizer=tokenizer)
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
                    console=None) -> dict:
    """``lorakit merge``: fold an adapter folder into its base, write a standard HF folder and
    gate it on parity with the adapter-on-base.

    The folder is written under a temporary name, read back with plain transformers, and
    compared (``lorakit.export.parity``) with the adapter over the float32 base and, for a
    QLoRA adapter, over the 4-bit base too (the merge folds into the dequantized 4-bit
    weights, so that row is the gate and the float32-base row is reported). Only when the gate
    passes (or ``force``) is it renamed to ``out``; otherwise it is deleted.

    Returns:
        ``{"out", "base", "dtype", "qlora", "parity": {label: report}, "passed", "forced"}``.

    Raises:
        ExportError: ``out`` exists without ``overwrite``; parity worse than the thresholds.
        AdapterError / ModelLoadError: as :func:`load_adapted_base`.
    """
    import shutil

    from rich.console import Console
    from transformers import AutoModelForCausalLM

    from lorakit.errors import ExportError
    from lorakit.export import parity

    console = console or Console(stderr=True)
    tmp = prepare_output(out, overwrite)
    try:
        with console.status("loading the base model and the adapter…"):
            adapted = load_adapted_base(adapter_dir, model, allow_base_mismatch=force)
        with console.status("merging…"):
            merged = merge_adapter_into_base(adapted.merge_source, dtype=dtype)
        with console.status(f"writing {out}…"):
            save_hf_folder(merged, adapted.tokenizer, tmp, max_shard_size=max_shard_size)
        del merged
        with console.status("checking parity (reading the folder back with transformers)…"):
            written = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
            ids = parity.encode_prompts(adapted.tokenizer, prompts)
            rows = []
            if adapted.quantized is not None:
                rows.append(("adapter on 4-bit base", parity.compare(
                    adapted.quantized, written, ids, max_new_tokens), True))
                rows.append(("adapter on float32 base", parity.compare(
                    adapted.model, written, ids, max_new_tokens), False))
            else:
                rows.append(("adapter on base", parity.compare(
                    adapted.model, written, ids, max_new_tokens), True))
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
    return {"out": str(out), "base": adapted.spec, "dtype": parity.dtype_name(dtype),
            "qlora": adapted.quantized is not None,
            "parity": {label: rep for label, rep, _ in rows}, "passed": not bad,
            "forced": bool(bad)}
