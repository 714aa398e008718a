"""Will vLLM / llama.cpp / PEFT accept this adapter? A lint with one fix per finding.

Each rule reads only the adapter folder (``adapter_config.json``, the safetensors header,
``lorakit.json``) and, for the base-model rule, the base's config (built on the meta device:
no weights are read). Findings are ``error`` (the target rejects or mis-serves the adapter),
``warning`` (it works only with a flag or with a caveat) or ``info``.

What the targets do, as of vLLM 0.11 / llama.cpp b6000 / PEFT 0.17:

* vLLM loads LoRA (and rsLoRA) weights of the linear layers; it rejects DoRA
  (``use_dora``), full-weight ``modules_to_save`` and embedding / lm_head weights, and refuses
  an adapter whose rank exceeds ``--max-lora-rank`` (default 16; allowed values below).
* llama.cpp's LoRA GGUF has low-rank pairs for the tensors of its graph only: no DoRA
  magnitude, no full modules, no biases (``lorakit export gguf-lora`` writes it).
* PEFT reads the format lorakit writes; it needs ``base_model_name_or_path`` to find the base
  by itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

TARGETS = ("vllm", "llamacpp", "peft")
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# layer names vLLM's LoRA layers wrap in the Llama-family models (packed or not)
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj",
                "down_proj", "gate_up_proj", "dense", "fc1", "fc2", "c_attn", "c_proj", "c_fc",
                "query_key_value", "dense_h_to_4h", "dense_4h_to_h", "out_proj", "w1", "w2", "w3",
                "wqkv", "wo"}
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
    from safetensors import safe_open

    from lorakit.export.merge import read_manifest
    from lorakit.lora.io import CONFIG_NAME, read_adapter_config, read_adapter_weights

    config = read_adapter_config(folder)
    raw = json.loads((folder / CONFIG_NAME).read_text())
    weights = folder / "adapter_model.safetensors"
    if not weights.is_file():
        read_adapter_weights(folder)  # raises the clear AdapterError
    shapes, dtypes = {}, set()
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            shapes[key] = tuple(sl.get_shape())
            dtypes.add(str(sl.get_dtype()))
    ranks = {k[: -len(".lora_A.weight")]: s[0] for k, s in shapes.items()
             if k.endswith(".lora_A.weight")}
    return {"config": config, "raw": raw, "manifest": read_manifest(folder), "shapes": shapes,
            "dtypes": dtypes, "ranks": ranks}


def _full_weight_keys(shapes: dict) -> list[str]:
    return [k for k in shapes if not (k.endswith(".lora_A.weight") or k.endswith(".lora_B.weight")
                                      or ".lora_magnitude_vector" in k)]


def check_adapter(folder, target: str, *, max_lora_rank: int = VLLM_DEFAULT_MAX_LORA_RANK,
                  model: str | None = None) -> list[Finding]:
    """Lint adapter ``folder`` for ``target`` ("vllm", "llamacpp" or "peft").

    Args:
        folder: a PEFT / lorakit adapter folder.
        target: the runtime it will be deployed on.
        max_lora_rank: the ``--max-lora-rank`` vLLM will be started with.
        model: the base it will be served on; checked against the manifest's base config.

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
    config, manifest, shapes = facts["config"], facts["manifest"], facts["shapes"]
    findings: list[Finding] = []
    add = lambda *a: findings.append(Finding(*a))  # noqa: E731

    # DoRA
    if config.use_dora and target == "vllm":
        add("error", "dora", "the adapter uses DoRA (use_dora=true); vLLM rejects DoRA adapters",
            f"merge it into the base and serve the merged model: lorakit merge --adapter "
            f"{folder} --out MERGED")
    if config.use_dora and target == "llamacpp":
        add("error", "dora", "the adapter uses DoRA; a llama.cpp LoRA GGUF has no magnitude "
            "vector", f"export the merged model instead: lorakit export gguf --adapter {folder} "
            f"--out MODEL.gguf")
    # full weights: modules_to_save, lm_head / embeddings, biases
    full = _full_weight_keys(shapes)
    head_or_embed = [k for k in shapes if any(s in k for s in ("lm_head", "embed_tokens", "wte",
                                                               "embed_out"))]
    if target in ("vllm", "llamacpp") and (config.modules_to_save or full or head_or_embed):
        what = (f"modules_to_save={config.modules_to_save}" if config.modules_to_save
                else f"full-weight tensors such as {(full or head_or_embed)[0]}")
        runtime = "vLLM" if target == "vllm" else "llama.cpp"
        fix = (f"train without them (modules_to_save: null), or merge and serve the merged model: "
               f"lorakit merge --adapter {folder} --out MERGED" if target == "vllm" else
               f"export the merged model: lorakit export gguf --adapter {folder} --out MODEL.gguf")
        add("error", "modules_to_save", f"the adapter holds {what} (lm_head / embedding / full "
            f"module weights); {runtime} loads only low-rank A/B pairs", fix)
    if target in ("vllm", "llamacpp") and config.bias != "none":
        add("error" if target == "llamacpp" else "warning", "bias",
            f"bias={config.bias!r}: the adapter trains biases, which "
            f"{'llama.cpp LoRA GGUFs cannot hold' if target == 'llamacpp' else 'vLLM ignores or rejects (no LoRA bias support in recent versions)'}",
            "train with bias: none, or serve the merged model (lorakit merge)")
    # rank
    top = max(facts["ranks"].values(), default=config.r)
    if target == "vllm" and top > max_lora_rank:
        need = next((r for r in VLLM_MAX_LORA_RANKS if r >= top), top)
        add("error", "rank", f"the adapter's rank is {top}, above vLLM's --max-lora-rank "
            f"{max_lora_rank} (default {VLLM_DEFAULT_MAX_LORA_RANK}); vLLM refuses to load it",
            f"start vLLM with --max-lora-rank {need} (allowed: "
            f"{', '.join(map(str, VLLM_MAX_LORA_RANKS))})")
    # target modules
    layers = sorted({p.rsplit(".", 1)[-1] for p in facts["ranks"]})
    if target == "vllm":
        odd = [n for n in layers if n not in VLLM_TARGETS]
        if odd:
            add("error", "target_modules", f"vLLM has no LoRA support for layers named "
                f"{', '.join(odd)}", "train on the attention/MLP projections only "
                "(target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]) "
                "or merge (lorakit merge)")
    if target == "llamacpp":
        odd = _llamacpp_unmapped(list(facts["ranks"]))
        if odd:
            add("error", "target_modules", f"llama.cpp has no tensor for adapted layers such as "
                f"{odd[0]}", "export the merged model instead (lorakit export gguf)")
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


def _base_mismatch(manifest: dict, model: str) -> Finding | None:
    from lorakit.lora.io import base_config_hash
    from lorakit.models.load import _meta_model, resolve_spec

    want = manifest.get("base_config_sha256")
    if not want:
        return None
    meta, _ = _meta_model(resolve_spec(model))
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
