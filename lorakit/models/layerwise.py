"""Layer-by-layer forward: run a model whose weights stay in its checkpoint, reading each
decoder block's weights just before the block runs and dropping them right after.

This is how the merge's parity gate checks a model that does not fit in memory in float32 (a
7B model is 27 GB in float32; ``lorakit merge`` promises to need about one layer): the model is
built with ``load_model(..., defer_weights=True)`` (parameters on the meta device, a
:class:`lorakit.models.stream.Deferred` saying where each tensor lives), an adapter may be
added over it (its own weights are real), and inside :func:`layerwise` every forward reads
the base weights unit by unit::

    embed_tokens   read -> run -> drop
    layers.0       read (q, k, v, o, gate, up, down, norms) -> run -> drop
    ...
    norm, lm_head  read -> run -> drop

Peak memory: one unit's weights in the compute dtype (plus the activations of the prompt),
instead of the whole model. The arithmetic is the same operations on the same values, so the
logits are bit-identical to the whole model's (``tests/models/test_layerwise.py``); the cost
is reading the weights again on every forward (from the page cache after the first).

Why not accelerate's disk offload (``device_map`` entries ``"disk"``): it keeps its own
offload index and, for weights it has to convert, writes a copy of them into an offload
folder, and its hooks attach to the modules transformers built, not to the LoRA-wrapped
layers an adapter puts in their place. The deferred model already knows, for each checkpoint
tensor, every (module, attribute) it belongs to, also after wrapping, so the hooks here are a
few lines over it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from lorakit.errors import ModelLoadError


def _units(model: nn.Module) -> dict[int, nn.Module]:
    """id(module) -> the unit it is read with: its decoder block, or itself outside the
    blocks (absent from the map)."""
    from lorakit.models.modules import decoder_blocks

    return {id(inner): block for block in decoder_blocks(model) for inner in block.modules()}


def uncovered(model: nn.Module) -> list[str]:
    """Names of meta-device parameters and buffers of a deferred model that no checkpoint
    tensor fills (e.g. a DoRA magnitude or a ``modules_to_save`` copy made from meta
    weights): a model with any cannot run layer by layer."""
    deferred = getattr(model, "lorakit_deferred", None)
    homes = set()
    if deferred is not None:
        homes = {(id(m), a) for _, _, hs in deferred.slots.values() for m, a in hs}
    left = []
    for mname, module in model.named_modules():
        for attr, t in [*module._parameters.items(), *module._buffers.items()]:
            if t is not None and t.is_meta and (id(module), attr) not in homes:
                left.append(f"{mname}.{attr}" if mname else attr)
    return left


@contextlib.contextmanager
def layerwise(model: nn.Module):
    """Within the block, every forward of ``model`` (built with ``defer_weights=True``) reads
    each unit's weights from the checkpoint just before the unit runs, on
    ``model.lorakit_deferred.device`` in the dtype the model holds them in, and drops them
    after it. Inputs go to that device (``input_device`` says which).

    Raises:
        ModelLoadError: the model was not built deferred, or holds meta tensors no checkpoint
            tensor fills (:func:`uncovered`).
    """
    from lorakit.models.stream import home_tensor, put_homes, read_tensor, release_freed_memory

    deferred = getattr(model, "lorakit_deferred", None)
    if deferred is None:
        raise ModelLoadError("a layer-by-layer forward needs a model loaded with "
                             "defer_weights=True")
    if deferred.quantize:
        raise ModelLoadError("a layer-by-layer forward reads dense weights; this model's base "
                             "is 4-bit (quantized when read): load it whole, it is small")
    left = uncovered(model)
    if left:
        raise ModelLoadError(f"cannot run layer by layer: {left[0]!r} ({len(left)} tensors) is "
                             f"on the meta device and in no checkpoint tensor")
    owner = _units(model)
    plan: dict[int, tuple[nn.Module, list]] = {}
    for name, (_, want, homes) in deferred.slots.items():
        by_unit = defaultdict(list)
        for module, attr in homes:
            unit = owner.get(id(module), module)
            by_unit[id(unit)].append((module, attr))
            plan.setdefault(id(unit), (unit, []))
        for uid, unit_homes in by_unit.items():
            plan[uid][1].append((name, want, unit_homes))

    def read(unit_slots):
        for name, want, unit_homes in unit_slots:
            put_homes(unit_homes, read_tensor(deferred.layout.tensors[name], name, want,
                                              deferred.device))

    def drop(unit_slots):
        for _, _, unit_homes in unit_slots:
            real = home_tensor(*unit_homes[0])
            if not real.is_meta:
                put_homes(unit_homes, torch.empty_like(real, device="meta"))
        # glibc keeps freed blocks of a few MB in its heap (its mmap threshold grows after the
        # first such free): without a trim every unit read would stay resident
        release_freed_memory()

    handles = []
    try:
        for unit, unit_slots in plan.values():
            handles.append(unit.register_forward_pre_hook(
                lambda _m, _a, s=unit_slots: read(s)))
            handles.append(unit.register_forward_hook(
                lambda _m, _a, _o, s=unit_slots: drop(s)))
        yield model
    finally:
        for h in handles:
            h.remove()
        for _, unit_slots in plan.values():  # a forward that raised half way
            drop(unit_slots)


def input_device(model: nn.Module) -> torch.device:
    """Where a model's inputs go: a deferred model's weight device, else its first
    parameter's."""
    deferred = getattr(model, "lorakit_deferred", None)
    if deferred is not None:
        return deferred.device
    return next(model.parameters()).device
