"""Will vLLM / llama.cpp / PEFT accept this adapter? A lint with one fix per finding.

Each rule reads only the adapter folder (``adapter_config.json``, the safetensors header,
``lorakit.json``) and the base's config (built on the meta device: no weights are read), and
encodes what the runtime's own loading code rejects (docs/export.md cites the files):

* vLLM (``vllm/lora/peft_helper.py`` ``PEFTHelper._validate_features`` / ``validate_legal``,
  ``vllm/lora/lora_model.py`` ``LoRAModel.from_local_checkpoint`` / ``from_lora_tensors``,
  ``vllm/lora/utils.py`` ``parse_fine_tuned_lora_name``, ``vllm/config/lora.py``, and each
  model class's ``packed_modules_mapping`` / ``embedding_modules``): DoRA, a non-empty
  ``modules_to_save``, ``bias != "none"``, ``r`` above ``--max-lora-rank``, any tensor that
  is not a lora_A/lora_B (or lora_embedding_A/B) weight, a layer whose name is not one of the
  architecture's LoRA modules, an embedding LoRA whose vocabulary differs from the base's.
* llama.cpp (``convert_lora_to_gguf.py`` and ``src/llama-adapter.cpp`` of the llama.cpp the
  tests build): only lora_A/lora_B pairs of tensors it can map (no DoRA magnitude, no full
  module, no bias); one ``adapter.lora.alpha`` for the file and the scale ``alpha / rank``
  (so rsLoRA and ``alpha_pattern`` come out wrong through its converter); every LoRA tensor
  must exist in the base GGUF (no ``lm_head`` LoRA on a base with tied embeddings).
* PEFT reads the format lorakit writes; it needs ``base_model_name_or_path`` to find the base
  by itself.

Findings are ``error`` (the target rejects or mis-serves the adapter), ``warning`` (it works
only with a flag or with a caveat) or ``info``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = ("vllm", "llamacpp", "peft")
VLLM_DEFAULT_MAX_LORA_RANK = 16
# vllm/config/lora.py: MaxLoRARanks (the only values --max-lora-rank accepts)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_ATTN_MLP = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                       "down_proj"})
_EMBEDDINGS = frozenset({"embed_tokens", "lm_head"})
# The layer names vLLM accepts per architecture (HF model_type): the model class's linear
# layers with packed_modules_mapping expanded (qkv_proj -> q/k/v_proj, gate_up_proj ->
# gate/up_proj), plus its embedding_modules. vllm/model_executor/models/llama.py
# (LlamaForCausalLM, also serving MistralForCausalLM; Phi3ForCausalLM keeps qkv_proj and
# gate_up_proj packed in the checkpoint), qwen2.py / qwen3.py / gemma.py / gemma2.py (no
# embedding_modules: no LoRA on embed_tokens / lm_head).
VLLM_LORA_MODULES = {
    "llama": _ATTN_MLP | _EMBEDDINGS, "mistral": _ATTN_MLP | _EMBEDDINGS,
    "qwen2": _ATTN_MLP, "qwen3": _ATTN_MLP, "gemma": _ATTN_MLP, "gemma2": _ATTN_MLP,
    "phi3": frozenset({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}) | _EMBEDDINGS,
}
# architectures whose vLLM model class does not implement SupportsLoRA
VLLM_NO_LORA = {"gpt2": "GPT2LMHeadModel"}
# Hugging Face hub ids of lorakit's built-in aliases (what vLLM must be given)
ALIAS_HUB_IDS = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


@dataclass
class Finding:
    level: str  # "error" | "warning" | "info"
    rule: str
    message: str
    fix: str


def _adapter_facts(folder: Path) -> dict:
    """Config, manifest, tensor names/dtypes/ranks of an adapter folder (header only)."""
    from lorakit.lora.io import read_adapter_folder

    adapter = read_adapter_folder(folder, strict=True)
    header = adapter.tensor_header()
    shapes = {key: shape for key, (shape, _) in header.items()}
    dtypes = {dtype for _, dtype in header.values()}
    ranks = {k[: -len(".lora_A.weight")]: s[0] for k, s in shapes.items()
             if k.endswith(".lora_A.weight")}
    ranks.update({k[: -len(".lora_embedding_A")]: s[0] for k, s in shapes.items()
                  if k.endswith(".lora_embedding_A")})
    return {"config": adapter.config, "raw": adapter.peft_config, "manifest": adapter.manifest,
            "shapes": shapes, "dtypes": dtypes, "ranks": ranks, "base": adapter.base_model}


_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")
# base weights PEFT may store next to an embedding LoRA; vLLM and llama.cpp skip them
_SKIPPED = (".embed_tokens.base_layer.weight", ".lm_head.base_layer.weight")


def _full_weight_keys(shapes: dict) -> list[str]:
    """Keys that are not low-rank factors: what vLLM's parse_fine_tuned_lora_name calls an
    "unsupported LoRA weight" and llama.cpp's converter "Not a lora_A or lora_B tensor"
    (modules_to_save copies, trained biases, DoRA magnitudes)."""
    return [k for k in shapes if not k.endswith(_LORA_SUFFIXES) and not k.endswith(_SKIPPED)]


def _base_config(spec: str | None):
    """The base's transformers config (meta device, no weights), or None when it cannot be
    had here (e.g. a hub id while offline)."""
    if not spec:
        return None
    from lorakit.models.load import meta_model, resolve_spec

    try:
        meta, _ = meta_model(resolve_spec(spec))
    except Exception:  # noqa: BLE001 - unknown base: the rules that need it are skipped
        return None
    return meta.config


def check_adapter(folder, target: str, *, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
                  model: str | None = None) -> list[Finding]:
    """Lint adapter ``folder`` for ``target`` ("vllm", "llamacpp" or "peft").

    Args:
        folder: a PEFT / lorakit adapter folder.
        target: the runtime it will be deployed on.
        max_lora_rank: the ``--max-lora-rank`` vLLM will be started with.
        model: the base it will be served on (default: the base the adapter records); checked
            against the manifest's base config, and its architecture decides vLLM's layers.

    Returns:
        The findings, errors first.

    Raises:
        ConfigError: an unknown target.
        AdapterError: not an adapter folder.
    """
    from lorakit.errors import ConfigError, did_you_mean

    if target not in TARGETS:
        raise ConfigError(f"unknown target {target!r}{did_you_mean(target, TARGETS)}; choose "
                          f"one of {', '.join(TARGETS)}")
    folder = Path(folder)
    facts = _adapter_facts(folder)
    manifest = facts["manifest"]
    findings: list[Finding] = []
    if target == "vllm":
        findings += _vllm_rules(folder, facts, max_lora_rank, _base_config(model or facts["base"]))
    elif target == "llamacpp":
        findings += _llamacpp_rules(folder, facts, _base_config(model or facts["base"]))
    add = lambda *a: findings.append(Finding(*a))  # noqa: E731
    # base model
    if model:
        finding = _base_mismatch(manifest, model)
        if finding:
            findings.append(finding)
    elif not manifest.get("base_model") and not facts["raw"].get("base_model_name_or_path"):
        add("warning", "base_model", "the adapter does not record its base model "
            "(base_model_name_or_path is empty)", "set base_model_name_or_path in "
            "adapter_config.json, or always pass the base explicitly")
    # dtype
    odd_dtypes = facts["dtypes"] - {"F32", "F16", "BF16"}
    if odd_dtypes:
        add("error", "dtype", f"adapter tensors are stored as {', '.join(sorted(odd_dtypes))}; "
            f"runtimes load float32 / float16 / bfloat16", "re-save the adapter in float32")
    quant = manifest.get("quantization")
    if quant and target in ("vllm", "llamacpp"):
        add("warning", "dtype", f"the adapter was trained on a {quant.get('type', '4-bit')} "
            f"4-bit base; {'vLLM' if target == 'vllm' else 'llama.cpp'} will apply it to a "
            f"16-bit (or differently quantized) base, whose weights differ from those it learned "
            f"to correct", "compare both rows of `lorakit merge`'s parity table, or serve the "
            "model merged into the dequantized base (lorakit merge / export gguf)")
    if target == "vllm" and "F32" in facts["dtypes"]:
        add("info", "dtype", "adapter weights are float32; vLLM casts them to the model's dtype "
            "(or --lora-dtype)", "nothing to do")
    order = {"error": 0, "warning": 1, "info": 2}
    return sorted(findings, key=lambda f: order[f.level])


def _merge_fix(folder: Path) -> str:
    return f"merge it into the base and serve the merged model: lorakit merge --adapter {folder} --out MERGED"


def _vllm_rules(folder: Path, facts: dict, max_lora_rank: int, base_config) -> list[Finding]:
    """What vLLM's LoRA loader raises on (see the module docstring for the files)."""
    raw, shapes = facts["raw"], facts["shapes"]
    out: list[Finding] = []
    add = lambda *a: out.append(Finding(*a))  # noqa: E731
    if base_config is not None and base_config.model_type in VLLM_NO_LORA:
        add("error", "architecture", f"vLLM's {VLLM_NO_LORA[base_config.model_type]} has no LoRA "
            f"support (it does not implement SupportsLoRA): vllm serve --enable-lora refuses "
            f"the base", _merge_fix(folder))
    # PEFTHelper._validate_features
    if raw.get("use_dora"):
        add("error", "dora", "the adapter uses DoRA (use_dora=true); vLLM rejects it: \"vLLM "
            "does not yet support DoRA.\"", _merge_fix(folder))
    if raw.get("modules_to_save"):
        add("error", "modules_to_save", f"modules_to_save={raw['modules_to_save']}; vLLM "
            f"rejects it: \"vLLM only supports modules_to_save being None.\"",
            f"train without it (modules_to_save: null), or {_merge_fix(folder)}")
    # PEFTHelper.validate_legal
    if raw.get("bias", "none") != "none":
        add("error", "bias", f"bias={raw['bias']!r}: the adapter trains biases; vLLM rejects it: "
            f"\"Adapter bias is not supported.\"",
            "train with bias: none, or serve the merged model (lorakit merge)")
    rank = max([int(raw.get("r") or 0), *facts["ranks"].values()])
    if max_lora_rank not in VLLM_MAX_LORA_RANKS:
        add("error", "rank", f"--max-lora-rank {max_lora_rank} is not a value vLLM accepts",
            f"use one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}")
    if rank > max_lora_rank:
        need = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
        add("error", "rank", f"the adapter's rank is {rank}, above vLLM's --max-lora-rank "
            f"{max_lora_rank} (default {VLLM_DEFAULT_MAX_LORA_RANK}): \"LoRA rank {rank} is "
            f"greater than max_lora_rank {max_lora_rank}.\"",
            f"start vLLM with --max-lora-rank {need} (allowed: "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))})" if need else
            f"retrain with r <= {VLLM_MAX_LORA_RANKS[-1]}, or merge (lorakit merge)")
    # parse_fine_tuned_lora_name: anything but lora_A/lora_B (lora_embedding_A/B) weights
    full = _full_weight_keys(shapes)
    if full:
        add("error", "modules_to_save", f"the adapter holds tensors that are not LoRA factors, "
            f"such as {full[0]} (a trained full module, bias or DoRA magnitude); vLLM stops at "
            f"them: \"... is unsupported LoRA weight\"", _merge_fix(folder))
    # LoRAModel.from_local_checkpoint: every adapted layer's last name in the expected modules
    layers = sorted({p.rsplit(".", 1)[-1] for p in facts["ranks"]})
    expected = VLLM_LORA_MODULES.get(base_config.model_type) if base_config is not None else None
    if expected is not None:
        odd = [n for n in layers if n not in expected]
        if odd:
            add("error", "target_modules", f"vLLM's {base_config.model_type} model has no LoRA "
                f"layer named {', '.join(odd)} (it expects {', '.join(sorted(expected))}): "
                f"\"While loading ..., expected target modules in ... but received ...\"",
                f"train on [{', '.join(sorted(expected & _ATTN_MLP) or sorted(expected))}] "
                f"only, or {_merge_fix(folder)}")
    elif base_config is None:
        add("info", "target_modules", "the base's config is not available here, so its "
            "architecture's LoRA layers were not checked", "pass --model with the base")
    elif base_config.model_type not in VLLM_NO_LORA:
        add("info", "target_modules", f"lorakit has no table of vLLM's LoRA layers for "
            f"{base_config.model_type!r}", "check the model class in vllm/model_executor/models")
    # from_lora_tensors: an embedding LoRA must match the base's vocabulary
    vocab = getattr(base_config, "vocab_size", None) if base_config is not None else None
    for key, shape in shapes.items():
        if key.endswith(".lora_embedding_A") and vocab and shape[1] != vocab:
            add("error", "embeddings", f"{key} covers {shape[1]} tokens but the base's vocabulary "
                f"has {vocab} (tokens were added in training); vLLM rejects it: \"The embedding "
                f"LoRA size({shape[1]}) must be consistent with the base model's vocabulary "
                f"size({vocab}).\"", _merge_fix(folder))
            break
    return out


def _llamacpp_rules(folder: Path, facts: dict, base_config) -> list[Finding]:
    """What llama.cpp's convert_lora_to_gguf.py / llama-adapter.cpp reject or mis-scale."""
    raw, shapes = facts["raw"], facts["shapes"]
    out: list[Finding] = []
    add = lambda *a: out.append(Finding(*a))  # noqa: E731
    gguf_fix = f"export the merged model instead: lorakit export gguf --adapter {folder} --out MODEL.gguf"
    if raw.get("use_dora"):
        add("error", "dora", "the adapter uses DoRA; a llama.cpp LoRA GGUF has no magnitude "
            "vector (its converter stops at lora_magnitude_vector: \"Not a lora_A or lora_B "
            "tensor\")", gguf_fix)
    full = [k for k in _full_weight_keys(shapes) if ".lora_magnitude_vector" not in k]
    if raw.get("modules_to_save") or full:
        what = (f"modules_to_save={raw['modules_to_save']}" if raw.get("modules_to_save")
                else f"full-weight tensors such as {full[0]}")
        add("error", "modules_to_save", f"the adapter holds {what}; llama.cpp loads only "
            f"low-rank A/B pairs (its converter: \"Not a lora_A or lora_B tensor\")", gguf_fix)
    if raw.get("bias", "none") != "none":
        add("error", "bias", f"bias={raw['bias']!r}: the adapter trains biases, which llama.cpp "
            f"LoRA GGUFs cannot hold", "train with bias: none, or " + gguf_fix)
    if raw.get("use_rslora") or raw.get("alpha_pattern"):
        what = "use_rslora (scale alpha/sqrt(r))" if raw.get("use_rslora") else \
            f"alpha_pattern {raw['alpha_pattern']}"
        add("warning", "scaling", f"the adapter uses {what}; llama.cpp scales every layer by "
            f"the file's one adapter.lora.alpha / rank, so convert_lora_to_gguf.py's output "
            f"applies the wrong scale", f"write the GGUF with lorakit export gguf-lora --adapter "
            f"{folder} (it folds each layer's own scale into lora_b)")
    lm_head = [p for p in facts["ranks"] if p.endswith("lm_head")]
    if lm_head and base_config is not None and getattr(base_config, "tie_word_embeddings", False):
        add("error", "target_modules", "the adapter adapts lm_head, but the base ties it to the "
            "embeddings: its GGUF has no output tensor, and llama.cpp refuses the LoRA "
            "(\"LoRA tensor 'output.weight' does not exist in base model\")", gguf_fix)
    odd = _llamacpp_unmapped(list(facts["ranks"]))
    if odd:
        add("error", "target_modules", f"llama.cpp has no tensor for adapted layers such as "
            f"{odd[0]}", gguf_fix)
    return out


def _base_mismatch(manifest: dict, model: str) -> Finding | None:
    from lorakit.lora.io import base_config_hash
    from lorakit.models.load import meta_model, resolve_spec

    want = manifest.get("base_config_sha256")
    if not want:
        return None
    meta, _ = meta_model(resolve_spec(model))
    if base_config_hash(meta) == want:
        return None
    return Finding("error", "base_model", f"the adapter was trained on "
                   f"{manifest.get('base_model')!r}, whose config differs from {model!r}",
                   f"serve it on the base it was trained on ({manifest.get('base_model')})")


def _llamacpp_unmapped(paths: list[str]) -> list[str]:
    """Adapted layer paths with no llama.cpp tensor (the llama name map; qwen2's and
    mistral's layers have the same names)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 512)
    return [p for p in paths if names.get_name(f"{p.removeprefix('base_model.model.')}.weight",
                                               try_suffixes=(".weight",)) is None]


def vllm_command(adapters: dict[str, str], model: str | None = None, *,
                 max_lora_rank: int | None = None) -> dict:
    """The ``vllm serve`` command line and ``/v1/load_lora_adapter`` bodies for adapters.

    Args:
        adapters: name -> adapter folder.
        model: the base (default: the first adapter's recorded base; lorakit aliases become
            their hub ids).
        max_lora_rank: force a value (default: the smallest vLLM accepts for the largest rank).

    Returns:
        ``{"command", "argv", "load_lora_adapter", "max_lora_rank", "max_loras", "findings"}``
        (findings: name -> list of Finding dicts, from ``check_adapter(..., "vllm")``).
    """
    import shlex

    from lorakit.errors import ConfigError
    from lorakit.export.merge import base_spec_for

    if not adapters:
        raise ConfigError("pass at least one --adapter NAME=DIR")
    ranks, findings = {}, {}
    for name, folder in adapters.items():
        facts = _adapter_facts(Path(folder))
        ranks[name] = max(facts["ranks"].values(), default=facts["config"].r)
    top = max(ranks.values())
    rank = max_lora_rank or next((r for r in VLLM_MAX_LORA_RANKS
                                  if r >= max(top, VLLM_DEFAULT_MAX_LORA_RANK)), top)
    for name, folder in adapters.items():
        findings[name] = [asdict(f) for f in check_adapter(folder, "vllm", max_lora_rank=rank)]
    base = model or base_spec_for(next(iter(adapters.values())))
    base = ALIAS_HUB_IDS.get(base, base)
    argv = ["vllm", "serve", base, "--enable-lora", "--lora-modules",
            *[f"{n}={Path(d).resolve()}" for n, d in adapters.items()],
            "--max-lora-rank", str(rank), "--max-loras", str(len(adapters))]
    return {"command": shlex.join(argv), "argv": argv, "max_lora_rank": rank,
            "max_loras": len(adapters),
            "load_lora_adapter": [{"lora_name": n, "lora_path": str(Path(d).resolve())}
                                  for n, d in adapters.items()],
            "findings": findings}
