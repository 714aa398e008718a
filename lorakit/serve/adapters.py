"""Adapters for serving: safe paths under ``--adapter-root``, reading and checking an adapter
against the served base *before* it touches the model, and installing it into the model.

Reading (disk, safetensors, checks) runs on any thread; only :func:`install` changes the
model, and the engine calls it between decode steps, so a hot load never stalls a batch for
longer than copying a few small tensors.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from lorakit.errors import AdapterError
from lorakit.lora.io import CONFIG_NAME, MANIFEST_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, MANIFEST_NAME)


def resolve_under_root(root: str | os.PathLike | None, path: str | os.PathLike) -> Path:
    """Resolve ``path`` (relative to ``root``, or absolute) and require it to stay inside ``root``.

    Symlinks are followed before the check, so a link pointing out of the root is refused, and
    so are ``..`` components that climb out of it. The adapter files inside the folder are
    checked the same way (a folder inside the root holding a link to a file outside is refused).

    Raises:
        AdapterError: no root configured, the path escapes the root, or it does not exist.
    """
    if root is None:
        raise AdapterError("loading adapters at runtime is disabled: start the server with "
                           "--adapter-root DIR and pass paths inside DIR")
    base = Path(root).resolve()
    raw = Path(os.fspath(path)).expanduser()
    candidate = raw if raw.is_absolute() else base / raw
    try:
        resolved = candidate.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        raise AdapterError(f"adapter path {os.fspath(path)!r} does not exist under the adapter "
                           f"root {base}") from None
    if not resolved.is_relative_to(base):
        raise AdapterError(f"adapter path {os.fspath(path)!r} resolves to {resolved}, outside the "
                           f"adapter root {base} (path traversal or a symlink out of the root)")
    for name in ADAPTER_FILES:
        file = resolved / name
        if file.exists() and not file.resolve().is_relative_to(base):
            raise AdapterError(f"{file} is a link to {file.resolve()}, outside the adapter root "
                               f"{base}")
    return resolved


@dataclass
class PreparedAdapter:
    """An adapter read from disk and checked against the base; ready for :func:`install`."""

    path: Path
    config: object  # lorakit.lora.config.LoraConfig
    tensors: dict[str, dict[str, torch.Tensor]]  # module path -> {"A", "B"[, "m"]}
    ranks: dict[str, int] = field(default_factory=dict)
    scalings: dict[str, float] = field(default_factory=dict)  # worked out off the engine thread

    @property
    def targets(self) -> list[str]:
        return list(self.tensors)


def base_signature(model: nn.Module) -> dict:
    """A snapshot of what an adapter must match, taken once before serving starts, so adapter
    checks on other threads never walk the live model: base linear shapes and config hash."""
    from lorakit.lora.inject import linear_modules
    from lorakit.lora.io import base_config_hash
    from lorakit.lora.layers import linear_features

    shapes = {path: linear_features(module) for path, module in linear_modules(model)}
    return {"shapes": shapes, "config_sha256": base_config_hash(model),
            "spec": getattr(model, "lorakit_spec", None)}


def prepare(path: Path, signature: dict) -> PreparedAdapter:
    """Read an adapter folder and check that it fits the served base.

    Raises:
        AdapterError: unreadable files; an adapter for another base (layer missing, shapes
            differ, or the lorakit manifest records a different base config); an adapter that
            cannot vary per batch row (``modules_to_save`` or trained biases).
    """
    from lorakit.lora.io import read_adapter_folder, split_keys

    folder = read_adapter_folder(path)
    config = folder.config
    served = f"the served base {signature.get('spec')!r}"
    folder.check_base(signature.get("config_sha256"), against=served,
                      fix="serve it with its own base model")
    if config.modules_to_save:
        raise AdapterError(f"adapter {path} has modules_to_save {config.modules_to_save}: whole "
                           f"modules cannot differ per batch row; merge it and serve it alone")
    for kind in ("rank_pattern", "alpha_pattern"):
        for key in (getattr(config, kind, None) or {}):
            check_pattern(key, f"adapter {path}: {kind}")
    layers, other = split_keys(folder.tensors())
    if other:
        raise AdapterError(f"adapter {path} also stores {sorted(other)[:3]} (trained biases or full "
                           f"modules), which cannot differ per batch row; serve it merged")
    check_tensors(path, layers)
    ranks = folder.check_layers(layers, signature["shapes"], base=served)
    scalings = {}
    for target, r in ranks.items():
        scaling = config.scaling_for(target, r)  # the patterns are safe to match (checked above)
        if not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
            raise AdapterError(f"adapter {path}: layer {target}: scaling {scaling!r} is not a "
                               f"finite number (lora_alpha / alpha_pattern)")
        scalings[target] = float(scaling)
    return PreparedAdapter(path=path, config=config, tensors=layers, ranks=ranks,
                           scalings=scalings)


MAX_PATTERN_CHARS = 256
MAX_UNBOUNDED_REPEATS = 3


def check_pattern(pattern, where: str) -> None:
    """Refuse a ``rank_pattern`` / ``alpha_pattern`` key that is not a regex, or one that could
    backtrack catastrophically when matched against module paths.

    Python's ``re`` backtracks, so ``(a+)+$`` takes exponential time on a near miss. The pattern
    is parsed (never matched) and refused when it is longer than :data:`MAX_PATTERN_CHARS`,
    uses back-references or look-arounds, nests an unbounded repeat inside another repeat, or
    has more than :data:`MAX_UNBOUNDED_REPEATS` unbounded repeats (``a*a*a*...``: polynomial
    blow-up). Every pattern PEFT writes (layer paths, ``.*`` wildcards, alternations) passes.

    Raises:
        AdapterError: naming the pattern and the reason.
    """
    import re._parser as sre  # the stdlib's regex parser: the tree `re` itself compiles

    if not isinstance(pattern, str) or not pattern:
        raise AdapterError(f"{where}: key {pattern!r} is not a non-empty string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise AdapterError(f"{where}: pattern of {len(pattern)} characters is longer than "
                           f"{MAX_PATTERN_CHARS}")
    try:
        parsed = sre.parse(pattern)
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterError(f"{where}: {pattern!r} is not a valid regular expression: "
                           f"{exc}") from None
    unbounded = 0

    def walk(items, in_loop: bool) -> None:
        """``in_loop``: inside an unbounded repeat, where any further choice (another repeat
        or an alternation) multiplies the ways a near miss can be tried."""
        nonlocal unbounded
        for op, arg in items:
            name = str(op)
            if name in ("GROUPREF", "GROUPREF_EXISTS", "ASSERT", "ASSERT_NOT"):
                raise AdapterError(f"{where}: {pattern!r} uses back-references or look-arounds, "
                                   f"which are not allowed in adapter patterns")
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, sub = arg
                loop = high > 1000
                if in_loop and high > 1:
                    raise AdapterError(f"{where}: {pattern!r} nests a repeat inside a repeat "
                                       f"(like '(a+)+'), which can backtrack catastrophically")
                unbounded += loop
                walk(sub, in_loop or loop)
            elif name == "SUBPATTERN":
                walk(arg[-1], in_loop)
            elif name == "BRANCH":
                if in_loop:
                    raise AdapterError(f"{where}: {pattern!r} repeats an alternation (like "
                                       f"'(a|aa)+'), which can backtrack catastrophically")
                for branch in arg[1]:
                    walk(branch, in_loop)
            elif name == "ATOMIC_GROUP":
                walk(arg, in_loop)

    walk(parsed, False)
    if unbounded > MAX_UNBOUNDED_REPEATS:
        raise AdapterError(f"{where}: {pattern!r} has {unbounded} unbounded repeats (at most "
                           f"{MAX_UNBOUNDED_REPEATS}), which can backtrack for a very long time")


def check_tensors(path, layers: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every LoRA tensor is a finite floating-point matrix (``m``: a vector) with rank >= 1.

    Raises:
        AdapterError: naming the layer and the tensor.
    """
    for target, tensors in layers.items():
        for key, t in tensors.items():
            want = 1 if key == "m" else 2
            label = {"A": "lora_A", "B": "lora_B", "m": "lora_magnitude_vector"}.get(key, key)
            if t.dim() != want and not (key == "m" and t.dim() == 2 and 1 in t.shape):
                raise AdapterError(f"adapter {path}: layer {target}: {label} has shape "
                                   f"{tuple(t.shape)}; expected a {want}-D tensor")
            if not t.dtype.is_floating_point:
                raise AdapterError(f"adapter {path}: layer {target}: {label} has dtype {t.dtype}; "
                                   f"expected floating point")
            if t.numel() == 0:
                raise AdapterError(f"adapter {path}: layer {target}: {label} is empty (rank 0)")
            if not bool(torch.isfinite(t).all()):
                raise AdapterError(f"adapter {path}: layer {target}: {label} holds NaN or "
                                   f"infinite values")


@torch.no_grad()
def install(model: nn.Module, name: str, prepared: PreparedAdapter, dtype: torch.dtype) -> None:
    """Add a prepared adapter to ``model`` as ``name`` (call only between forwards)."""
    from lorakit.lora.inject import add_adapter
    from lorakit.lora.io import copy_lora_weights

    # the scalings were worked out by prepare(): the engine thread never matches the
    # adapter's own regexes (rank_pattern / alpha_pattern)
    config = prepared.config.model_copy(update={"rank_pattern": {}, "alpha_pattern": {}})
    try:
        add_adapter(model, config, name, targets=prepared.targets, ranks=prepared.ranks,
                    dtype=dtype)
        for target, scaling in prepared.scalings.items():
            model.get_submodule(target).scaling[name] = scaling
        copy_lora_weights(model, name, prepared.tensors)
    except Exception:
        purge(model, name)  # never leave the name half-installed
        raise
    finally:
        for param in model.parameters():  # serving: nothing trains
            param.requires_grad_(False)


def purge(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from ``model`` (call only between forwards): every trace of it,
    also of a half-done install (layers that got it while others did not, a name missing from
    the model's adapter table)."""
    from lorakit.lora.inject import adapter_configs, delete_adapter, lora_layers
    from lorakit.models.modules import replace_module

    if name in adapter_configs(model):
        delete_adapter(model, name)
        return
    for target, layer in list(lora_layers(model)):
        if name in layer.lora_A or name in layer.lora_B:
            layer.delete_adapter(name)
            if not layer.lora_A:
                replace_module(model, target, layer.base_layer)
