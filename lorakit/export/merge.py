r"""Fold a LoRA adapter into its base weights, giving a plain transformers model.

For each adapted layer, with the base weight W dequantized when it is 4-bit::

    W' = W + scaling * B @ A                               plain LoRA / rsLoRA
    W' = m * (W + scaling * B @ A) / ||W + scaling B A||_row     DoRA

The result is written into a *new* dense layer (nn.Linear, or Conv1D for GPT-2), never into
the 4-bit codes: re-quantizing W' would add a second rounding error on top of the one the
adapter was trained to live with. The source model (4-bit or dense, with its adapters) is left
untouched, so it can keep training or serving.

``parity_report`` says how close two models' next-token distributions are; the export
commands print it for merged vs adapter-on-base.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.inject import _adapters, lora_layers
from lorakit.lora.layers import LoraLayer, ModulesToSaveWrapper


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, new)


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

    adapters = _adapters(model)
    if name not in adapters:
        raise AdapterError(f"no adapter named {name!r} to merge; adapters: "
                           f"{', '.join(adapters) or 'none'}")
    merged = copy.deepcopy(model)  # 4-bit layers copy as codes; dense copies are dropped below
    for path, layer in list(lora_layers(merged)):
        _replace(merged, path, _merged_layer(layer, name, dtype))
    for path, wrapper in [(p, m) for p, m in merged.named_modules()
                          if isinstance(m, ModulesToSaveWrapper)]:
        chosen = wrapper.modules_to_save[name] if name in wrapper.modules_to_save \
            else wrapper.original_module
        _replace(merged, path, chosen)
    for path in [p for p, m in merged.named_modules() if is_4bit(m)]:
        _replace(merged, path, dequantized_copy(merged.get_submodule(path), dtype))
    for attr in ("lorakit_adapters", "lorakit_active_adapter"):
        merged.__dict__.pop(attr, None)
    merged.lorakit_quantization = None
    config = getattr(merged, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    merged.to(dtype)
    merged.requires_grad_(False)
    return merged.eval()


@torch.no_grad()
def parity_report(model_a: nn.Module, model_b: nn.Module, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> dict:
    """Compare two causal LMs' next-token predictions on the same tokens.

    Args:
        model_a: the reference (e.g. the adapter over its 4-bit base).
        model_b: the candidate (e.g. the merged model).
        input_ids: (batch, seq) token ids.
        attention_mask: (batch, seq); positions where it is 0 are left out.

    Returns:
        ``{"max_abs_logit_diff", "mean_kl", "greedy_agreement", "positions"}``: the largest
        |logit_a - logit_b|, the mean KL(p_a || p_b) in nats per position, and the fraction of
        positions whose argmax token agrees.
    """
    device_a = next(model_a.parameters()).device
    device_b = next(model_b.parameters()).device
    kwargs = {} if attention_mask is None else {"attention_mask": attention_mask}
    logits_a = model_a(input_ids=input_ids.to(device_a),
                       **{k: v.to(device_a) for k, v in kwargs.items()}).logits.float().cpu()
    logits_b = model_b(input_ids=input_ids.to(device_b),
                       **{k: v.to(device_b) for k, v in kwargs.items()}).logits.float().cpu()
    keep = torch.ones(input_ids.shape, dtype=torch.bool) if attention_mask is None \
        else attention_mask.bool().cpu()
    a, b = logits_a[keep].double(), logits_b[keep].double()  # (positions, vocab)
    logp_a, logp_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (logp_a.exp() * (logp_a - logp_b)).sum(-1)  # (positions,)
    return {
        "max_abs_logit_diff": (a - b).abs().max().item(),
        "mean_kl": kl.mean().item(),
        "greedy_agreement": (a.argmax(-1) == b.argmax(-1)).float().mean().item(),
        "positions": int(keep.sum()),
    }
