r"""Combining LoRA adapters into one: PEFT's ``add_weighted_adapter``, from adapter folders.

For adapters i with weights w_i and scalings s_i (``lora_alpha / r``), per adapted layer:

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]`` (rows), ``B = [B_1, B_2, ...]`` (columns):
  rank ``sum r_i``, and ``B A = sum_i w_i s_i B_i A_i`` exactly.
* ``linear`` / ``ties`` / ``dare_linear`` / ``dare_ties``: the A matrices and the B matrices
  are combined *separately*, A_i weighted by ``sign(w_i s_i) sqrt|w_i s_i|`` and B_i by
  ``sqrt|w_i s_i|`` (so a negative weight flips the update once), with

  - ``linear``: a plain weighted sum (task arithmetic);
  - ``ties`` (Yadav et al. 2023): keep the ``density`` share of largest-magnitude entries of
    each tensor, elect the sign per entry (sign of the sum), average the entries that agree;
  - ``dare_linear`` / ``dare_ties`` (Yu et al. 2023): drop entries at random (keep each with
    probability ``density``, rescale by ``1/density``), then a weighted sum / the TIES merge.

  All adapters must have the same rank; the result has that rank. As PEFT says, this is a
  rough approximation of ``sum_i w_i s_i B_i A_i`` (``(sum B)(sum A)`` has cross terms).

The result is written as a PEFT adapter folder whose config is the first adapter's with
``r = lora_alpha = new rank`` (scaling 1: the input scalings are already folded in), the union
of the target modules and empty rank/alpha patterns, as ``add_weighted_adapter`` makes it.
One deliberate difference: ``use_rslora`` is written false (PEFT keeps the first adapter's
value, which would scale the combined update by ``sqrt(r)`` a second time).

Random draws (the dare methods) follow PEFT's order exactly: ``add_weighted_adapter`` first
creates the new adapter on every target layer (``nn.Linear`` initialisations consume torch's
global generator), then walks the layers in the model's module order, A tensors then B, one
``torch.bernoulli`` per adapter. So ``torch.manual_seed(S); peft_model.add_weighted_adapter(...)``
and ``merge_adapters(..., seed=S)`` draw the same masks; the model's module order is read from
the base's config (built on the meta device, no weights).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from lorakit.errors import AdapterError, ConfigError

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")
_DENSITY_METHODS = ("ties", "dare_linear", "dare_ties")


@dataclass
class _Input:
    """One adapter folder, read."""

    name: str
    folder: Path
    config: object  # LoraConfig
    raw: dict  # adapter_config.json as written
    layers: dict[str, dict[str, torch.Tensor]]  # path -> {"A": (r, in), "B": (out, r)}
    manifest: dict = field(default_factory=dict)
    base_model: str | None = None  # as the folder records it

    def rank(self) -> int:
        """PEFT's rank of the adapter: the largest of r and its rank_pattern values."""
        return max([self.config.r, *self.config.rank_pattern.values()])

    def scaling(self, path: str) -> float:
        return self.config.scaling_for(path, self.layers[path]["A"].shape[0])


# ---------------------------------------------------------------------- reading and checks
def _read(name: str, folder) -> _Input:
    from lorakit.lora.io import read_adapter_folder, split_keys

    adapter = read_adapter_folder(folder, strict=True)
    config = adapter.config
    layers, other = split_keys(adapter.tensors())
    where = f"adapter {name!r} ({adapter.path})"
    if config.use_dora or any("m" in t for t in layers.values()):
        raise AdapterError(f"{where} is a DoRA adapter: its magnitude vectors cannot be "
                           f"combined (PEFT's add_weighted_adapter does not either); merge it "
                           f"into the base instead (lorakit merge)")
    if config.modules_to_save or other:
        what = config.modules_to_save or sorted(other)[:3]
        raise AdapterError(f"{where} holds full weights besides LoRA ({what}: modules_to_save "
                           f"or trained biases), which cannot be combined; retrain without them")
    if not layers:
        raise AdapterError(f"{where} holds no LoRA weights")
    for path, t in layers.items():
        if "A" not in t or "B" not in t:
            raise AdapterError(f"{where}: layer {path} lacks lora_{'A' if 'A' not in t else 'B'}")
    return _Input(name, adapter.path, config, adapter.peft_config, layers, adapter.manifest,
                  adapter.base_model)


def _check_same_base(items: list[_Input]) -> None:
    """Adapters of different bases cannot be combined: compare lorakit's base-config hashes
    when both adapters have one, else the recorded base names; and the layer shapes always."""
    first = items[0]
    for other in items[1:]:
        h1, h2 = first.manifest.get("base_config_sha256"), other.manifest.get("base_config_sha256")
        if h1 and h2:
            if h1 != h2:
                raise AdapterError(
                    f"adapters {first.name!r} and {other.name!r} were trained on different base "
                    f"models ({first.base_model!r} and {other.base_model!r}: the base configs' "
                    f"sha256 in lorakit.json differ); only adapters of one base can be combined")
        elif first.base_model and other.base_model and first.base_model != other.base_model:
            raise AdapterError(
                f"adapters {first.name!r} and {other.name!r} name different base models "
                f"({first.base_model!r} and {other.base_model!r} in adapter_config.json); only "
                f"adapters of one base can be combined")
        for path in first.layers.keys() & other.layers.keys():
            a, b = first.layers[path], other.layers[path]
            fa, fb = (a["A"].shape[1], a["B"].shape[0]), (b["A"].shape[1], b["B"].shape[0])
            if fa != fb:
                raise AdapterError(
                    f"adapters {first.name!r} and {other.name!r} adapt layer {path} with "
                    f"different shapes ({fa[0]} -> {fa[1]} and {fb[0]} -> {fb[1]} features): "
                    f"they were trained on different base models")
        if first.config.layers_to_transform != other.config.layers_to_transform:
            raise AdapterError(
                f"adapters {first.name!r} and {other.name!r} have different layers_to_transform "
                f"({first.config.layers_to_transform} and {other.config.layers_to_transform}); "
                f"PEFT would keep only the first adapter's, dropping layers of the others")


def _check_arguments(names: list[str], method: str, weights, density) -> None:
    if method not in METHODS:
        from lorakit.errors import did_you_mean

        raise ConfigError(f"unknown merge method {method!r}{did_you_mean(method, METHODS)}; "
                          f"choose one of {', '.join(METHODS)}")
    if len(names) < 2:
        raise ConfigError(f"give at least two adapters to combine (got {len(names)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"adapter names must be distinct, got {names}")
    if len(weights) != len(names):
        raise ConfigError(f"{len(weights)} weight(s) for {len(names)} adapters; give one weight "
                          f"per adapter, in the order of the adapters (e.g. --weights 0.6,0.4)")
    for w in weights:
        if not math.isfinite(w):
            raise ConfigError(f"weights must be finite numbers, got {w}")
    if method in _DENSITY_METHODS:
        if density is None:
            raise ConfigError(f"method {method!r} needs a density (the share of entries kept, "
                              f"0 < density <= 1; e.g. --density 0.5)")
        if not 0 < density <= 1:
            raise ConfigError(f"density must be in (0, 1] (the share of entries kept), got "
                              f"{density}")
    elif density is not None:
        raise ConfigError(f"density applies to ties, dare_linear and dare_ties, not {method!r}")


def _ranks(items: list[_Input], method: str) -> int:
    ranks = [i.rank() for i in items]
    if method == "cat":
        return sum(ranks)
    if len(set(ranks)) != 1:
        raise AdapterError(
            f"method {method!r} needs adapters of one rank, got "
            f"{', '.join(f'{i.name}: r={r}' for i, r in zip(items, ranks))}; use --method cat "
            f"(rank = the sum)")
    for item in items:
        odd = [p for p, t in item.layers.items() if t["A"].shape[0] != ranks[0]]
        if odd:
            raise AdapterError(f"method {method!r}: adapter {item.name!r} has rank "
                               f"{item.layers[odd[0]]['A'].shape[0]} at {odd[0]} (rank_pattern) "
                               f"but r={ranks[0]} elsewhere; use --method cat")
    return ranks[0]


def _target_modules(items: list[_Input]):
    """PEFT's union: a set of names (written sorted), or the regexes joined with ``|``."""
    kinds = {isinstance(i.config.target_modules, str) for i in items}
    if len(kinds) > 1:
        raise AdapterError("cannot combine adapters whose target_modules are a list of names "
                           "and a regex (PEFT refuses this mix too)")
    if kinds == {True}:
        return "|".join(f"({i.config.target_modules})" for i in items)
    return sorted(set().union(*(i.config.target_modules for i in items)))


# ---------------------------------------------------------------------- module order
def _natural_key(path: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _module_order(items: list[_Input], model: str | None) -> tuple[list[str], str]:
    """The adapted layer paths in the base model's module order (PEFT's traversal order),
    and where that order came from. Falls back to a numeric-aware sort when the base's config
    cannot be read; only the dare methods' random draws depend on the order."""
    paths = set().union(*(i.layers.keys() for i in items))
    spec = model or items[0].base_model
    if spec:
        try:
            from lorakit.plan.estimate import meta_model, resolve_model_config

            _, config = resolve_model_config(str(spec))
            order = [n for n, _ in meta_model(config).named_modules() if n in paths]
            if set(order) == paths:
                return order, str(spec)
        except Exception:  # noqa: BLE001 - any failure means: no module order from the base
            pass
    return sorted(paths, key=_natural_key), "sorted"


# ---------------------------------------------------------------------- the maths
def _dare_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _magnitude_prune(t: torch.Tensor, density: float) -> torch.Tensor:
    if density >= 1:
        return t
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=t.dtype)
    mask[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * mask.reshape(t.shape)


def _sign_consensus(stacked: torch.Tensor, weighted: torch.Tensor) -> torch.Tensor:
    """TIES: per entry, the sign of the (unweighted, pruned) sum wins; average the agreeing."""
    sign = stacked.sign()
    majority = torch.where(stacked.sum(dim=0) >= 0, 1, -1)
    agree = sign == majority
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _combine(tensors: list[torch.Tensor], weights: torch.Tensor, method: str,
             density: float | None) -> torch.Tensor:
    """Combine same-shape tensors (all A's, or all B's of one layer) with per-tensor weights."""
    if method in ("ties",):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        tensors = [_dare_prune(t, density) for t in tensors]
    stacked = torch.stack(tensors)  # (n, ...)
    weighted = stacked * weights.view((-1,) + (1,) * (stacked.dim() - 1))
    if method in ("ties", "dare_ties"):
        return _sign_consensus(stacked, weighted)
    return weighted.sum(dim=0)


def _simulate_new_adapter_init(order: list[str], shapes: dict[str, tuple[int, int]], r: int,
                               init) -> None:
    """Consume torch's global generator exactly as PEFT's creation of the new adapter does:
    ``nn.Linear(in, r)`` and ``nn.Linear(r, out)`` (Kaiming-uniform each), then the config's
    initialisation of A (Kaiming-uniform again, or normal for "gaussian")."""
    for path in order:
        in_f, out_f = shapes[path]
        torch.empty(r, in_f).uniform_()
        torch.empty(out_f, r).uniform_()
        if init is True:
            torch.empty(r, in_f).uniform_()
        elif isinstance(init, str) and init.lower() == "gaussian":
            torch.empty(r, in_f).normal_()


def combine_layers(items: list[_Input], weights: Sequence[float], method: str,
                   density: float | None, order: list[str], new_rank: int
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """path -> (A (new_rank, in), B (out, new_rank)) of the combined adapter (float32)."""
    shapes = {}
    for item in items:
        for path, t in item.layers.items():
            shapes[path] = (t["A"].shape[1], t["B"].shape[0])
    _simulate_new_adapter_init(order, shapes, new_rank, items[0].raw.get("init_lora_weights", True))
    out = {}
    for path in order:
        present = [(item, w) for item, w in zip(items, weights) if path in item.layers]
        in_f, out_f = shapes[path]
        if method == "cat":
            a = torch.zeros(new_rank, in_f)
            b = torch.zeros(out_f, new_rank)
            a_parts = [item.layers[path]["A"].float() * w * item.scaling(path) for item, w in present]
            b_parts = [item.layers[path]["B"].float() for item, _ in present]
            a_cat, b_cat = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
            a[: a_cat.shape[0]] = a_cat
            b[:, : b_cat.shape[1]] = b_cat
        else:
            ws = [w * item.scaling(path) for item, w in present]
            w_a = torch.tensor([math.sqrt(abs(x)) * (1 if x >= 0 else -1) for x in ws])
            w_b = torch.tensor([math.sqrt(abs(x)) for x in ws])
            a = _combine([item.layers[path]["A"].float() for item, _ in present], w_a, method, density)
            b = _combine([item.layers[path]["B"].float() for item, _ in present], w_b, method, density)
        out[path] = (a.contiguous(), b.contiguous())
    return out


# ---------------------------------------------------------------------- the API
def merge_adapters(adapters, out, *, method: str, weights: Sequence[float],
                   density: float | None = None, seed: int | None = None,
                   model: str | None = None, overwrite: bool = False) -> dict:
    """Combine LoRA adapter folders into one PEFT adapter folder, as PEFT's
    ``add_weighted_adapter`` would (see the module docstring for the maths).

    Args:
        adapters: ``{name: folder}`` or ``[(name, folder), ...]``, in order (at least two).
        out: the folder to write (``adapter_config.json``, ``adapter_model.safetensors``,
            ``lorakit.json`` with the merge recorded).
        method: "linear", "cat", "ties", "dare_linear" or "dare_ties".
        weights: one weight per adapter, in order (may be negative).
        density: share of entries kept, in (0, 1]; required by ties and the dare methods.
        seed: seeds torch's generator for the dare draws (restored afterwards); None uses
            its current state, as PEFT does.
        model: the base model, for its module order (default: the first adapter's recorded
            base); only the dare methods' draws depend on it.
        overwrite: replace ``out`` when it exists.

    Returns:
        ``{"out", "method", "r", "lora_alpha", "target_modules", "layers", "module_order"}``.

    Raises:
        ConfigError: an unknown method, a weight count that differs from the adapter count,
            density missing or out of range.
        AdapterError: unreadable adapters, adapters of different bases, ranks the method
            cannot combine, DoRA / modules_to_save adapters.
    """
    from lorakit.lora.io import (CONFIG_NAME, MANIFEST_NAME, PREFIX, WEIGHTS_NAME,
                                 atomic_save_safetensors, atomic_write_json)
    from lorakit.version import __version__

    pairs = list(adapters.items()) if isinstance(adapters, dict) else [tuple(p) for p in adapters]
    weights = [float(w) for w in weights]
    _check_arguments([name for name, _ in pairs], method, weights, density)
    out = Path(out)
    if out.exists() and not overwrite:
        raise AdapterError(f"output {out} already exists; choose another --out or pass "
                           f"--overwrite to replace it")
    items = [_read(name, folder) for name, folder in pairs]
    _check_same_base(items)
    new_rank = _ranks(items, method)
    target_modules = _target_modules(items)
    order, order_source = _module_order(items, model)
    if method.startswith("dare") and order_source == "sorted":
        warnings.warn("the base model's config could not be read (pass --model): layers are "
                      "visited in sorted order, so the random draws differ from PEFT's for the "
                      "same seed", UserWarning, stacklevel=2)
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        combined = combine_layers(items, weights, method, density, order, new_rank)

    state = {}
    for path, (a, b) in combined.items():
        state[f"{PREFIX}{path}.lora_A.weight"] = a
        state[f"{PREFIX}{path}.lora_B.weight"] = b
    config = {**items[0].raw, "r": new_rank, "lora_alpha": new_rank,
              "target_modules": target_modules, "rank_pattern": {}, "alpha_pattern": {},
              "use_rslora": False, "inference_mode": True}
    manifest = {k: v for k, v in items[0].manifest.items()
                if k in ("base_model", "base_config_sha256", "chat_template_sha256", "quantization")}
    manifest.setdefault("base_model", items[0].base_model)
    manifest.update({
        "lorakit_version": __version__, "adapter_name": "default",
        "merged_from": {"method": method, "weights": weights, "density": density, "seed": seed,
                        "adapters": {i.name: str(i.folder) for i in items},
                        "module_order": order_source},
    })
    out.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(state, out / WEIGHTS_NAME, metadata={"format": "pt"})
    atomic_write_json(out / CONFIG_NAME, config)
    atomic_write_json(out / MANIFEST_NAME, manifest)
    return {"out": str(out), "method": method, "r": new_rank, "lora_alpha": new_rank,
            "target_modules": target_modules, "layers": len(combined),
            "module_order": order_source}


def parse_adapter_args(values: Iterable[str]) -> list[tuple[str, str]]:
    """``["a=DIR", "b=DIR"]`` -> ``[("a", "DIR"), ("b", "DIR")]``; a bare DIR is named after
    its folder.

    Raises:
        ConfigError: an empty name or folder.
    """
    pairs = []
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep:
            name, folder = Path(value).name, value
        if not name or not folder:
            raise ConfigError(f"--adapter {value!r}: expected NAME=DIR")
        pairs.append((name, folder))
    return pairs


def parse_weights(text: str) -> list[float]:
    """``"0.6,0.4"`` -> ``[0.6, 0.4]``.

    Raises:
        ConfigError: an entry that is not a number.
    """
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--weights {text!r}: expected comma-separated numbers, one per "
                          f"adapter (e.g. 0.6,0.4)") from None
