r"""LoraLayer: a frozen linear layer plus any number of named low-rank adapters.

For input x (..., in) and a frozen weight W (out, in)::

    y = W x + b  +  scaling * B (A (dropout(x)))        A: (r, in), B: (out, r)
                    \___________ delta ___________/

A starts Kaiming-uniform and B at zero, so an adapter changes nothing until it trains.
``scaling = lora_alpha / r`` (rsLoRA: ``lora_alpha / sqrt(r)``).

DoRA (Liu et al. 2024) splits the adapted weight into a direction and a learned per-row
magnitude m (out,)::

    W' = m * (W + scaling B A) / ||W + scaling B A||_row        (the norm is treated as a constant)
    y  = W' x + b = (W x + b) + [(m/||.|| - 1) W x + (m/||.||) scaling B A x]

We write this layer ourselves rather than use PEFT's because serving needs one layer that
applies a *different* adapter to each row of a batch (``row_adapters``), and training wants
a small, readable module; PEFT's on-disk format is kept exactly (see ``lorakit.lora.io``).

The base layer may be ``nn.Linear``, transformers' ``Conv1D`` (GPT-2: weight stored (in, out))
or a bitsandbytes ``Linear4bit`` (QLoRA, see ``lorakit.models.quantize``); ``base_weight()``
hides the difference. Adapters over a 4-bit base stay float32 (or bf16 when asked) and are
never merged into it: ``lorakit.export.merge`` merges into a dequantized copy.
"""

from __future__ import annotations

import math
import weakref
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.models.modules import is_conv1d

# Keep-mask resolution of LoraDropout: random int16 codes in [0, 2**15) compared with
# round(p * 2**15), so the drop probability is p to within 1/65536 (0.05 -> 0.049988).
_MASK_LEVELS = 1 << 15


class LoraDropout(nn.Dropout):
    """Dropout on an adapter's input whose mask is shared by the adapters that read the *same*
    input tensor, and drawn about 10x cheaper than ``nn.Dropout``'s Bernoulli mask.

    PEFT gives every adapted module its own independent mask. In a decoder block q/k/v read one
    tensor (the attention norm's output) and gate/up another: here the first of them draws the
    mask and the others reuse the dropped tensor, so a Llama block draws 4 masks instead of 7
    (docs/lora.md, "Dropout"). Each adapter still sees each input feature dropped with
    probability p and kept ones scaled by 1/(1-p); only the correlation between sibling
    adapters' masks differs. Masks come from ``random_`` on int16 (one cheap integer fill and a
    compare) instead of ``bernoulli_`` on floats.

    ``p`` may be changed after construction (DPO sets it to 0); p == 0 and eval mode are the
    identity. A subclass of ``nn.Dropout``, so code that finds dropout modules finds these.
    """

    # (weakref to the input, its _version, p, grad mode, the masked input, ids of the modules
    # that used it): the last mask drawn, reused when *another* adapter reads the very same
    # tensor object, unchanged; a module that reads it a second time draws a fresh mask
    _shared: tuple | None = None

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(x with dropped features zeroed, 1/(1-p))``: the caller applies the scale (the LoRA
        layer folds it into its (..., r) scaling, a much smaller tensor than x)."""
        p = float(self.p)
        if not self.training or p <= 0.0:
            return x, 1.0
        if p >= 1.0:
            return torch.zeros_like(x), 0.0
        grad = torch.is_grad_enabled()
        last = LoraDropout._shared
        if (last is not None and last[0]() is x and last[1] == x._version and last[2] == p
                and last[3] == grad and id(self) not in last[5]):
            last[5].add(id(self))
            return last[4], 1.0 / (1.0 - p)
        codes = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_(0, _MASK_LEVELS)
        out = x.masked_fill(codes < round(p * _MASK_LEVELS), 0)
        LoraDropout._shared = (weakref.ref(x), x._version, p, grad, out, {id(self)})
        return out, 1.0 / (1.0 - p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, scale = self.masked(x)
        return out if scale == 1.0 else out * scale

    @staticmethod
    def forget() -> None:
        """Drop the remembered mask (the next adapter draws a fresh one)."""
        LoraDropout._shared = None


def is_linear_like(module: nn.Module) -> bool:
    """Layers lorakit can wrap: nn.Linear (and subclasses such as bitsandbytes' Linear4bit), Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a linear-like layer."""
    if is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


class LoraLayer(nn.Module):
    """A frozen base layer with named LoRA adapters; one is active at a time.

    Attributes:
        base_layer: the wrapped frozen layer (its parameters keep their names under
            ``base_layer.``, as in PEFT).
        lora_A / lora_B: ``nn.ModuleDict`` of adapter name -> ``nn.Linear`` without bias.
        lora_magnitude_vector: adapter name -> DoRA magnitude (out,), only for DoRA adapters.
        scaling: adapter name -> float.
        active_adapter: the adapter applied by ``forward`` (None: none).
        disabled: when True the layer is exactly its base layer.
        row_adapters: when set (a list with one adapter name or None per batch row), each row
            of the batch uses its own adapter; see ``lorakit.mixed_batch``.
    """

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.fan_in_fan_out = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.active_adapter: str | None = None
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.row_adapters: list[str | None] | None = None
        self._dora_norms: dict[str, torch.Tensor] = {}  # row norms used when merging DoRA
        # (A_0, B_0) of adapters whose initialisation moved part of the base into them (PiSSA,
        # OLoRA; lorakit.lora.init): saving turns such an adapter into one for the original base
        self.initial_weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # ------------------------------------------------------------------ adapters
    def add_adapter(self, name: str, r: int, scaling: float, dropout: float = 0.0,
                    use_dora: bool = False, dtype: torch.dtype = torch.float32,
                    device: torch.device | None = None) -> None:
        """Create adapter ``name``: A Kaiming-uniform, B zero (the layer's output is unchanged).

        The adapter lives on the base weight's device (or ``device``: where a base still on the
        meta device will be materialised) in ``dtype`` (float32 by default), whatever the base's
        storage: a 4-bit base stores uint8 codes, which is no dtype for an adapter.
        """
        if not dtype.is_floating_point:
            raise ValueError(f"adapter dtype must be a floating point dtype, got {dtype}")
        device = device if device is not None else self.base_device()
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = LoraDropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling[name] = float(scaling)
        if use_dora:
            with torch.no_grad():
                norm = self.base_weight().float().norm(p=2, dim=1)  # (out,)
            self.lora_magnitude_vector[name] = nn.Parameter(norm.to(dtype))
        self._stack_cache = None

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            self.unmerge()
        for store in (self.lora_A, self.lora_B, self.lora_dropout, self.lora_magnitude_vector):
            if name in store:
                del store[name]
        self.scaling.pop(name, None)
        self.initial_weights.pop(name, None)
        self._stack_cache = None
        if self.active_adapter == name:
            self.active_adapter = None

    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    # ------------------------------------------------------------------ base weight access
    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that inspects ``layer.weight`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def base_device(self) -> torch.device:
        return self.base_layer.weight.device

    def base_is_4bit(self) -> bool:
        """True when the base weight is packed 4-bit (a bitsandbytes ``Params4bit``)."""
        return getattr(self.base_layer.weight, "quant_state", None) is not None

    def base_weight(self) -> torch.Tensor:
        """The frozen weight as a dense (out, in) tensor; a 4-bit weight is dequantized into a
        temporary (``bitsandbytes.functional.dequantize_4bit``), never kept."""
        weight = self.base_layer.weight
        if self.base_is_4bit():
            from lorakit.models.quantize import dequantize_weight

            return dequantize_weight(weight)
        return weight.T if self.fan_in_fan_out else weight

    def _write_base_weight(self, dense: torch.Tensor) -> None:
        if self.base_is_4bit():
            raise RuntimeError("refusing to merge into 4-bit weights: re-quantizing would add a "
                               "second rounding error. Merge into a dequantized 16/32-bit copy "
                               "with lorakit.export.merge.merge_adapter_into_base(model)")
        weight = self.base_layer.weight
        weight.data.copy_(dense.T if self.fan_in_fan_out else dense)

    # ------------------------------------------------------------------ maths
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scaling * B @ A`` as an (out, in) float32 tensor."""
        a = self.lora_A[name].weight.float()  # (r, in)
        b = self.lora_B[name].weight.float()  # (out, r)
        return (b @ a) * self.scaling[name]

    def _delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter ``name`` adds to ``base_out = base_layer(x)``; same shape as base_out."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        x_lora = dropout(x).to(lora_A.weight.dtype)  # dropout first: siblings share its mask
        # scale the (..., r) intermediate, not the (..., out) update: r is much smaller
        update = lora_B(lora_A(x_lora) * self.scaling[name])  # (..., out)
        if name in self.lora_magnitude_vector:
            update = self._dora_delta(name, x_lora, base_out, update,
                                      fresh_base=not isinstance(dropout, nn.Identity) and self.training)
        return update.to(base_out.dtype)

    def _dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor,
                    update: torch.Tensor, fresh_base: bool) -> torch.Tensor:
        weight = self.base_weight().to(x.dtype)  # (out, in)
        with torch.no_grad():  # the norm is a constant (DoRA paper, section 4.3)
            norm = (weight + self.delta_weight(name).to(x.dtype)).norm(p=2, dim=1)  # (out,)
        scale = self.lora_magnitude_vector[name] / norm  # (out,)
        if fresh_base:
            # dropout changed the adapter's input, so the base term uses the same dropped x
            wx = F.linear(x, weight)
        else:
            bias = getattr(self.base_layer, "bias", None)
            wx = (base_out - bias if bias is not None else base_out).to(x.dtype)
        return (scale - 1) * wx + scale * update

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        if self.row_adapters is not None:
            return self._mixed_batch_forward(x, result)
        name = self.active_adapter
        if name is None or name in self.merged_adapters or name not in self.lora_A:
            return result
        if name in self.lora_magnitude_vector:
            return result + self._delta(name, x, result)
        return self._add_lora(result, name, x)

    def _add_lora(self, result: torch.Tensor, name: str, x: torch.Tensor) -> torch.Tensor:
        """``result + scaling * B A dropout(x)`` with one fused ``addmm`` for the B product
        (no separate (..., out) temporary; this is the hot path in training)."""
        lora_A, lora_B = self.lora_A[name], self.lora_B[name]
        dropout = self.lora_dropout[name]
        scale = self.scaling[name]
        if isinstance(dropout, LoraDropout):  # shared mask; 1/(1-p) folded into the (..., r) scale
            x, keep_scale = dropout.masked(x)
            scale = scale * keep_scale
        else:
            x = dropout(x)
        h = lora_A(x.to(lora_A.weight.dtype)) * scale  # (..., r)
        out = torch.addmm(result.reshape(-1, result.shape[-1]), h.reshape(-1, h.shape[-1]).to(result.dtype),
                          lora_B.weight.t().to(result.dtype))  # (N, out)
        return out.view(result.shape)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i of the batch gets adapter ``row_adapters[i]`` (None = base only).

        Plain LoRA adapters (no DoRA, no active dropout) take the gathered path: every row's
        ``scaling * A`` and ``B`` are gathered from stacks (ranks zero-padded to the largest),
        so a batch costs two batched matmuls per layer however many adapters it mixes
        (Punica's BGMV idea). DoRA or training-time dropout fall back to one pass per adapter.
        """
        if len(self.row_adapters) != x.shape[0]:
            raise ValueError(f"mixed batch: {len(self.row_adapters)} adapter names for a batch of "
                             f"{x.shape[0]} rows (input shape {tuple(x.shape)})")
        names = [n for n in dict.fromkeys(self.row_adapters) if n is not None and n in self.lora_A]
        if not names:
            return result
        if not any(n in self.lora_magnitude_vector or (self.training and not isinstance(
                self.lora_dropout[n], nn.Identity)) for n in names):
            return self._gathered_forward(x, result, names)
        return self._per_adapter(x, result, names)

    def _per_adapter(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """One pass per adapter over its rows (DoRA, training-time dropout, or an adapter whose
        weights do not fit the stacks: it raises here, for its own rows only)."""
        for name in names:
            if name is None or name not in self.lora_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(self.row_adapters) if n == name],
                                device=x.device)
            delta = self._delta(name, x.index_select(0, rows), result.index_select(0, rows))
            result = result.index_add(0, rows, delta)
        return result

    def _stacks(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int], int]:
        """Every plain (non-DoRA) adapter of this layer, side by side in one fixed layout:
        ``(n R, in)`` scaled A rows and ``(out, n R)`` B columns (ranks zero-padded to the
        largest, R), each adapter's index into them, and R. Cached until an adapter is added
        or deleted, or a weight changes (tensor ``_version``), so a serving batch gathers
        nothing per step; the layout does not depend on which adapters a batch mixes, so a
        row computes the same in any batch."""
        cached = getattr(self, "_stack_cache", None)
        if cached is not None and all(m._parameters["weight"] is t and t._version == v
                                      for m, t, v in cached[0]) \
                and cached[1] == tuple(self.scaling.get(n) for n in cached[2]):
            return cached[3]
        def fits(n):  # a broken adapter stays out, so it cannot break the others' rows
            a_w, b_w = self.lora_A[n].weight, self.lora_B[n].weight
            return (a_w.dim() == 2 and a_w.shape[1] == self.in_features
                    and tuple(b_w.shape) == (self.out_features, a_w.shape[0])
                    and a_w.dtype == b_w.dtype)

        names = [n for n in self.lora_A if n not in self.lora_magnitude_vector and fits(n)]
        rank = max([self.lora_A[n].weight.shape[0] for n in names] or [1])
        ref = self.lora_A[names[0]].weight if names else self.base_weight()
        a = torch.zeros(len(names) * rank, self.in_features, dtype=ref.dtype, device=ref.device)
        b = torch.zeros(self.out_features, len(names) * rank, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                r = self.lora_A[n].weight.shape[0]
                a[i * rank:i * rank + r] = self.lora_A[n].weight * self.scaling[n]
                b[:, i * rank:i * rank + r] = self.lora_B[n].weight
        modules = [m for n in self.lora_A for m in (self.lora_A[n], self.lora_B[n])]
        out = (a, b, {n: i for i, n in enumerate(names)}, rank)
        self._stack_cache = ([(m, m.weight, m.weight._version) for m in modules],
                             tuple(self.scaling[n] for n in names), names, out)
        return out

    def _gathered_forward(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Each row's own adapter, as two dense products over the layer's stacked adapters:
        ``h = x A_all^T`` (every adapter's rank-R features), the columns of the row's adapter
        kept (a 0/1 mask, all 0 for a base row), then ``delta = h B_all^T``. Reading each
        adapter's weights once per layer whatever the batch holds costs less than gathering a
        copy of A and B for every row (the BGMV way) once a batch has more rows than adapters;
        a batch on one adapter takes only its slice. Masked-out columns add exact zeros."""
        if torch.is_grad_enabled() and any(self.lora_A[n].weight.requires_grad for n in names):
            return self._gathered_with_grad(x, result, names)
        a, b, index, rank = self._stacks()
        if any(n not in index for n in names):
            return self._per_adapter(x, result, names)
        x2 = x.reshape(-1, self.in_features).to(a.dtype)  # (B T, in)
        if len(names) == 1 and None not in self.row_adapters:  # every row on one adapter
            i = index[names[0]]
            h = x2 @ a[i * rank:(i + 1) * rank].t()  # (B T, R)
            delta = h @ b[:, i * rank:(i + 1) * rank].t()
            return result + delta.view(result.shape).to(result.dtype)
        keep = self._row_mask(index, rank, x.device, a.dtype)  # (B, n R)
        rows = x.shape[0]
        h = (x2 @ a.t()).view(rows, -1, keep.shape[1]) * keep.unsqueeze(1)  # (B, T, n R)
        delta = h.view(-1, keep.shape[1]) @ b.t()  # (B T, out)
        return result + delta.view(result.shape).to(result.dtype)

    def _row_mask(self, index: dict[str, int], rank: int, device, dtype) -> torch.Tensor:
        """(B, n R) 0/1: the columns of each row's adapter (none for a base row), cached while
        the rows' adapters and the layer's layout stay the same (from one decode step to the
        next, a serving batch keeps them)."""
        key = (self.row_adapters, tuple(index), rank, device, dtype)
        cached = getattr(self, "_mask_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        keep = torch.zeros(len(self.row_adapters), len(index) * rank, dtype=dtype)
        for row, n in enumerate(self.row_adapters):
            if n in index:
                keep[row, index[n] * rank:(index[n] + 1) * rank] = 1
        keep = keep.to(device)
        self._mask_cache = (key, keep)
        return keep

    def _gathered_with_grad(self, x: torch.Tensor, result: torch.Tensor, names: list[str]) -> torch.Tensor:
        """Training through a mixed batch: stacks built inside autograd (no cache), rows
        gathered (B, R, in) / (B, out, R), two batched matmuls."""
        rank = max(self.lora_A[n].out_features for n in names)
        pad = lambda w, dim: F.pad(w, (0, rank - w.shape[dim]) if dim == 1 else (0, 0, 0, rank - w.shape[0]))
        zero_a = x.new_zeros(rank, self.in_features, dtype=self.lora_A[names[0]].weight.dtype)
        a = torch.stack([zero_a] + [pad(self.lora_A[n].weight * self.scaling[n], 0) for n in names])
        b = torch.stack([zero_a.new_zeros(self.out_features, rank)]
                        + [pad(self.lora_B[n].weight, 1) for n in names])
        slot = {n: i for i, n in enumerate(names, start=1)}
        idx = torch.tensor([slot.get(n, 0) for n in self.row_adapters], device=x.device)
        xs = x.reshape(x.shape[0], -1, self.in_features).to(a.dtype)  # (B, T, in)
        h = torch.bmm(xs, a.index_select(0, idx).transpose(1, 2))  # (B, T, R)
        delta = torch.bmm(h, b.index_select(0, idx).transpose(1, 2))  # (B, T, out)
        return result + delta.view(result.shape).to(result.dtype)

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge(self, name: str | None = None) -> None:
        """Fold adapter ``name`` (default: the active one) into the base weight. Idempotent."""
        name = name or self.active_adapter
        if name is None or name in self.merged_adapters or name not in self.lora_A:
            return
        weight = self.base_weight()
        merged = weight.float() + self.delta_weight(name)
        if name in self.lora_magnitude_vector:
            norm = merged.norm(p=2, dim=1)
            self._dora_norms[name] = norm
            merged = merged * (self.lora_magnitude_vector[name].float() / norm).unsqueeze(1)
        self._write_base_weight(merged.to(weight.dtype))
        self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo every merge (in reverse order), restoring the base weight. Idempotent."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight = self.base_weight()
            dense = weight.float()
            if name in self.lora_magnitude_vector:
                norm = self._dora_norms.pop(name)
                dense = dense / (self.lora_magnitude_vector[name].float() / norm).unsqueeze(1)
            self._write_base_weight((dense - self.delta_weight(name)).to(weight.dtype))

    def extra_repr(self) -> str:
        ranks = {n: self.lora_A[n].out_features for n in self.lora_A}
        return f"adapters={ranks}, active={self.active_adapter!r}, merged={self.merged_adapters}"


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full for an adapter (``modules_to_save``), e.g. the output head.

    ``original_module`` stays frozen; each adapter gets its own trainable copy in
    ``modules_to_save[name]`` (PEFT's layout, so saved keys match PEFT's).
    """

    def __init__(self, module: nn.Module):
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False

    def add_adapter(self, name: str) -> None:
        import copy

        copy_ = copy.deepcopy(self.original_module)
        for p in copy_.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy_

    def delete_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            del self.modules_to_save[name]
        if self.active_adapter == name:
            self.active_adapter = None

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        return self.active_module()(*args, **kwargs)

    def __getattr__(self, name: str):
        # transformers reads attributes such as .weight off the output head (tied embeddings)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.active_module(), name)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(path, layer) of every LoraLayer of ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module
