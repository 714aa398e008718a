r"""How a new adapter's A and B start: PEFT's ``init_lora_weights``, computed as PEFT does.

For a layer with frozen weight W (out, in), rank r and scaling s:

* ``True`` (default): A Kaiming-uniform, B = 0 (the model is unchanged).
* ``"gaussian"``: A ~ N(0, 1/r), B = 0.
* ``"pissa"`` (Meng et al. 2024): the top-r singular triplets of W, ``W = U S V^T``:
  ``B = U_r sqrt(S_r / s)``, ``A = sqrt(S_r / s) V_r^T``, and the base becomes the residual
  ``W_res = W - s B A``; ``"pissa_niter_K"`` uses ``torch.svd_lowrank`` with K subspace
  iterations instead of the full SVD (faster, randomised).
* ``"olora"`` (Büyükakyüz 2024): ``W = Q R``; ``B = Q[:, :r]``, ``A = R[:r]``, base
  ``W - s B A``.
* ``"loftq"`` (Li et al. 2023), for a 4-bit base: ``B A`` = the best rank-r approximation
  of ``(W - dequant(Q)) / s``, where Q is the layer's NF4 weight and W the unquantized one,
  so that ``dequant(Q) + s B A`` is closer to W than ``dequant(Q)`` alone. The 4-bit base is
  lorakit's usual one (the same codes ``lorakit merge`` rebuilds), so only A and B change.

PiSSA and OLoRA move part of W into the adapter, so ``W_res + s B A = W`` at the start (to
float32 rounding, tested). An adapter trained that way only fits the residual base; saving
converts it, as PEFT's ``path_initial_model_for_weight_conversion`` does, to a plain LoRA
adapter for the original W: ``s (B A - B_0 A_0) = s' [B, -B_0] [A; A_0]`` with rank 2r and
``lora_alpha`` doubled (times sqrt 2 with rsLoRA) so the scaling is unchanged. The initial
``A_0, B_0`` are kept on the layer (``LoraLayer.initial_weights``) for that.

Differences from PEFT, on purpose: PEFT's LoftQ ignores the scaling (its ``base + s B A``
approximates W only when ``lora_alpha == r``); lorakit divides by s, which is the same when
s = 1. lorakit's LoftQ keeps the base's own 4-bit codes, i.e. PEFT's ``loftq_iter=1`` /
``replace_lora_weights_loftq`` (more iterations would re-quantize the base, and the adapter
would no longer match the base ``lorakit merge`` and ``serve`` rebuild).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorakit.errors import AdapterError, ConfigError
from lorakit.lora.config import _PISSA_NITER, RUN_CONFIG_INITS, check_init  # noqa: F401 (re-exported)

def moves_base(init) -> bool:
    """Whether the initialisation changes the base weight (PiSSA, OLoRA)."""
    return isinstance(init, str) and (init.startswith("pissa") or init == "olora")


# ---------------------------------------------------------------------- per layer
@torch.no_grad()
def pissa(weight: torch.Tensor, r: int, scaling: float, niter: int | None = None):
    """``(A, B, residual)`` of PiSSA for an (out, in) weight, in float32 (PEFT's ops)."""
    weight = weight.to(torch.float32)
    if niter is None:
        V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
        Vr = V[:, :r]
        Sr = S[:r]
        Sr /= scaling
        Uhr = Uh[:r]
    else:
        Vr, Sr, Ur = torch.svd_lowrank(weight.data, r, niter=niter)
        Sr /= scaling
        Uhr = Ur.t()
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr  # (r, in)
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))  # (out, r)
    return lora_A, lora_B, weight.data - scaling * lora_B @ lora_A


@torch.no_grad()
def olora(weight: torch.Tensor, r: int, scaling: float):
    """``(A, B, residual)`` of OLoRA for an (out, in) weight, in float32 (PEFT's ops)."""
    weight = weight.to(torch.float32)
    Q, R = torch.linalg.qr(weight.data)
    lora_A, lora_B = R[:r].contiguous(), Q[:, :r].contiguous()
    return lora_A, lora_B, weight.data - scaling * lora_B @ lora_A


def low_rank(residual: torch.Tensor, r: int):
    """``(A, B)`` with ``B A`` the best rank-r approximation of ``residual`` (SVD, the root of
    the singular values on each side: PEFT's ``_low_rank_decomposition``)."""
    U, S, Vh = torch.linalg.svd(residual, full_matrices=False)
    lora_B = U @ (torch.sqrt(torch.diag(S)[:, 0:r]))
    lora_A = torch.sqrt(torch.diag(S)[0:r, :]) @ Vh
    return lora_A, lora_B


@torch.no_grad()
def loftq(weight: torch.Tensor, r: int, scaling: float = 1.0, *, num_iter: int = 1,
          quant_type: str = "nf4", block_size: int = 64, double_quant: bool = False):
    """LoftQ's alternating optimisation (PEFT's ``loftq_init``) for an (out, in) weight W:
    quantize the residual, fit ``s B A`` to what quantization lost, repeat.

    Returns:
        ``(dequantized, A, B)``: the dequantized 4-bit weight of the last iteration and the
        adapter, with ``dequantized + s B A`` close to W.
    """
    from lorakit.models.quantize import import_bitsandbytes

    bnb = import_bitsandbytes()
    weight = weight.to(torch.float32)
    res = weight.clone()
    for i in range(num_iter):
        codes, state = bnb.functional.quantize_4bit(res.contiguous(), blocksize=block_size,
                                                    compress_statistics=double_quant,
                                                    quant_type=quant_type)
        dequantized = bnb.functional.dequantize_4bit(codes, state)
        lora_A, lora_B = low_rank((weight - dequantized) / scaling, r)
        if i + 1 == num_iter:
            break
        res = weight - scaling * torch.mm(lora_B, lora_A)
    return dequantized, lora_A, lora_B


@torch.no_grad()
def init_layer(layer, name: str, init, *, dense_weight: torch.Tensor | None = None) -> None:
    """Initialise adapter ``name`` of a :class:`~lorakit.lora.layers.LoraLayer` in place.

    Args:
        layer: the layer, with the adapter just created (A Kaiming, B zero).
        name: the adapter.
        init: PEFT's ``init_lora_weights`` value.
        dense_weight: for ``"loftq"``, the unquantized (out, in) weight of the 4-bit base.

    Raises:
        AdapterError: PiSSA/OLoRA over a 4-bit base, or LoftQ without a 4-bit base or without
            the unquantized weight.
    """
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    r, scaling = lora_A.shape[0], layer.scaling[name]
    if init is True:
        return
    if init is False:  # PEFT: nn.Linear's own initialisation for both
        nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        return
    if init == "gaussian":
        nn.init.normal_(lora_A, std=1 / r)
        nn.init.zeros_(lora_B)
        return
    if init == "loftq":
        if not layer.base_is_4bit():
            raise AdapterError("lora.init: loftq initialises an adapter over a 4-bit base "
                               "(method: qlora); this base layer is not quantized")
        if dense_weight is None:
            raise AdapterError("lora.init: loftq needs the unquantized weights of the base")
        dense = dense_weight.to(device=lora_A.device, dtype=torch.float32)
        quantized = layer.base_weight().to(torch.float32)
        new_A, new_B = low_rank((dense - quantized) / scaling, r)
        lora_A.copy_(new_A)
        lora_B.copy_(new_B)
        return
    if layer.base_is_4bit():
        raise AdapterError(f"lora.init: {init} computes from the unquantized base weight and "
                           f"rewrites it; over a 4-bit base use lora.init: loftq instead")
    weight = layer.base_weight()
    niter = _PISSA_NITER.fullmatch(init)
    if init == "olora":
        new_A, new_B, residual = olora(weight, r, scaling)
    else:
        new_A, new_B, residual = pissa(weight, r, scaling, int(niter.group(1)) if niter else None)
    lora_A.copy_(new_A)
    lora_B.copy_(new_B)
    layer._write_base_weight(residual.to(weight.dtype))
    layer.initial_weights[name] = (lora_A.detach().clone(), lora_B.detach().clone())


def _dense_reader(model: nn.Module):
    """``path -> (out, in) float32 weight`` of the model's unquantized checkpoint (its
    safetensors files, as ``lorakit.models.stream`` reads them), for LoftQ over a 4-bit base.

    Raises:
        AdapterError: the model does not record where it came from, or that has no
            safetensors checkpoint.
    """
    from lorakit.models import load, stream

    spec = getattr(model, "lorakit_spec", None)
    if spec is None:
        raise AdapterError("lora.init: loftq reads the unquantized weights from the model's "
                           "checkpoint, but this model records none (load it with "
                           "lorakit.models.load.load_model)")
    found = load.local_checkpoint(load.resolve_spec(spec))
    if found is None:
        raise AdapterError(f"lora.init: loftq needs the safetensors checkpoint of {spec!r}, "
                           f"which is not on this machine")
    layout = found[1]
    prefix = getattr(model, "base_model_prefix", "") + "."

    def read(path: str, conv1d: bool) -> torch.Tensor:
        for key in (f"{path}.weight", f"{path}.weight".removeprefix(prefix)):
            info = layout.tensors.get(key)
            if info is not None:
                weight = stream.read_tensor(info, key, torch.float32)
                return weight.t() if conv1d else weight
        raise AdapterError(f"lora.init: loftq: {spec!r} has no tensor {path}.weight")

    return read


def initialize(model: nn.Module, name: str, config, paths: list[str]) -> None:
    """Apply ``config.init_lora_weights`` to adapter ``name`` on the layers at ``paths`` (called
    by :func:`lorakit.lora.inject.add_adapter` once the adapter exists)."""
    init = config.init_lora_weights
    if init is True:
        return
    if init == "loftq":
        bits = config.loftq_config.get("loftq_bits", 4)
        iters = config.loftq_config.get("loftq_iter", 1)
        if bits != 4 or iters != 1:
            raise ConfigError(f"lora.init: loftq: lorakit keeps the 4-bit NF4 base it trains on "
                              f"(loftq_bits=4, loftq_iter=1); got loftq_config={config.loftq_config}")
    read = _dense_reader(model) if init == "loftq" else None
    for path in paths:
        layer = model.get_submodule(path)
        dense = None
        if read is not None:
            dense = read(path, getattr(layer.base_layer, "lorakit_conv1d", False))
        init_layer(layer, name, init, dense_weight=dense)


# ---------------------------------------------------------------------- saving
def convert_for_saving(model: nn.Module, name: str, state: dict[str, torch.Tensor],
                       peft_config: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """For an adapter whose initialisation moved the base (PiSSA, OLoRA): the equivalent plain
    LoRA adapter for the *original* base (see the module docstring); others unchanged.

    Args:
        model: the model holding the adapter (its layers keep the initial A_0, B_0).
        name: the adapter.
        state: its tensors under PEFT's keys (``base_model.model.<path>.lora_A.weight`` ...).
        peft_config: the ``adapter_config.json`` dict to write.

    Returns:
        ``(state, peft_config)`` to write.
    """
    from lorakit.lora.layers import lora_layers

    initial = {path: layer.initial_weights[name] for path, layer in lora_layers(model)
               if name in layer.initial_weights}
    if not initial:
        return state, peft_config
    state = dict(state)
    for path, (a0, b0) in initial.items():
        key = f"base_model.model.{path}"
        a, b = state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"]
        state[f"{key}.lora_A.weight"] = torch.cat([a, a0.to(a)], dim=0).contiguous()
        state[f"{key}.lora_B.weight"] = torch.cat([b, -b0.to(b)], dim=1).contiguous()
    factor = math.sqrt(2) if peft_config.get("use_rslora") else 2
    peft_config = {**peft_config, "r": 2 * peft_config["r"],
                   "lora_alpha": peft_config["lora_alpha"] * factor, "init_lora_weights": True,
                   "rank_pattern": {k: 2 * v for k, v in (peft_config.get("rank_pattern") or {}).items()},
                   "alpha_pattern": {k: v * factor
                                     for k, v in (peft_config.get("alpha_pattern") or {}).items()}}
    return state, peft_config


def trained_part(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> dict:
    """The inverse for resuming: from a converted file (rank 2r), the trained A and B (the
    first r rows / columns) of the live PiSSA/OLoRA adapter ``name``; others unchanged."""
    from lorakit.lora.layers import lora_layers

    state = dict(state)
    for path, layer in lora_layers(model):
        if name not in layer.initial_weights:
            continue
        r = layer.lora_A[name].out_features
        key = f"base_model.model.{path}"
        a, b = state.get(f"{key}.lora_A.weight"), state.get(f"{key}.lora_B.weight")
        if a is not None and b is not None and a.shape[0] == 2 * r:
            state[f"{key}.lora_A.weight"], state[f"{key}.lora_B.weight"] = a[:r], b[:, :r]
    return state
