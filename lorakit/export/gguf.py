r"""GGUF files for llama.cpp: the merged model, and the adapter alone as a llama.cpp LoRA.

The bytes are written by the ``gguf`` package (``GGUFWriter``; tensor names from its
``TensorNameMap``, quantization by ``gguf.quants``). What lorakit decides is only what
llama.cpp expects of each architecture, as its converter (``convert_hf_to_gguf.py``) does:

* ``llama`` / ``mistral`` -> GGUF arch ``llama``. llama.cpp applies rotary embeddings to
  adjacent pairs (x0, x1), (x2, x3) ... while transformers rotates the two halves of each
  head (x_i, x_{i+d/2}), so the rows of q_proj and k_proj (and the rows of their lora_B) are
  permuted per head::

      W (n_head * d, in) -> reshape (n_head, 2, d/2, in) -> swap axes 1, 2 -> (n_head * d, in)

* ``qwen2`` -> GGUF arch ``qwen2`` (NeoX-style rotation, no permutation; q/k/v biases).

The tokenizer is copied verbatim from the base's own GGUF when the base was one (the built-in
alias, a .gguf file), so llama.cpp tokenizes exactly as before; otherwise it is built from the
Hugging Face ``tokenizer.json`` (byte-level BPE only: ``tokenizer.ggml.model = gpt2``).

Norm weights and biases are always float32 (llama.cpp requires it); ``q8_0`` quantizes the
2-D weights whose rows are a multiple of 32 values, as llama.cpp's own converter does.

A llama.cpp LoRA GGUF (``general.type = adapter``, ``adapter.type = lora``) holds, for each
adapted weight ``blk.N.attn_q.weight``, the tensors ``...weight.lora_a`` (r, in) and
``...weight.lora_b`` (out, r). The LoRA scaling (alpha / r, or alpha / sqrt(r) for rsLoRA,
per layer with rank/alpha patterns) is folded into lora_b and no ``adapter.lora.alpha`` is
written, so llama.cpp applies the update with scale 1 (times its user scale).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from lorakit.errors import AdapterError, ExportError

# transformers model_type -> GGUF architecture name
SUPPORTED_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp pre-tokenizer names for byte-level BPE tokenizers built from tokenizer.json
_PRE_TOKENIZER = {"qwen2": "qwen2", "llama": "llama-bpe", "mistral": "llama-bpe"}


def gguf_arch(model) -> str:
    """The GGUF architecture of a transformers model.

    Raises:
        ExportError: an architecture the GGUF export does not support (the message names the
            supported ones).
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise ExportError(
            f"GGUF export does not support the {model_type!r} architecture "
            f"({type(model).__name__}); supported: {', '.join(SUPPORTED_ARCHITECTURES)}. "
            f"Use `lorakit merge` for a Hugging Face folder instead")
    return SUPPORTED_ARCHITECTURES[model_type]


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", None) or 10000.0)


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def permute_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows of a q/k projection (n_head * d, ...) from transformers' half-split rotary layout
    to llama.cpp's interleaved one (see the module docstring)."""
    rest = weight.shape[1:]
    d = weight.shape[0] // n_head
    return weight.reshape(n_head, 2, d // 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _maybe_permute(name: str, tensor: torch.Tensor, arch: str, config) -> torch.Tensor:
    if arch != "llama":
        return tensor
    if name.endswith("self_attn.q_proj.weight"):
        return permute_rows(tensor, config.num_attention_heads)
    if name.endswith("self_attn.k_proj.weight"):
        return permute_rows(tensor, config.num_key_value_heads or config.num_attention_heads)
    return tensor


def _encode(array: np.ndarray, out_type: str, force_f32: bool):
    """(data, raw_dtype) for GGUFWriter.add_tensor."""
    import gguf

    if force_f32 or out_type == "f32":
        return array.astype(np.float32), None
    if out_type == "f16":
        return array.astype(np.float16), None
    qtype = {"bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0}[out_type]
    if out_type == "q8_0" and (array.ndim != 2 or array.shape[-1] % 32):
        return array.astype(np.float16), None
    return gguf.quants.quantize(array.astype(np.float32), qtype), qtype


def _file_type(out_type: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]


# ---------------------------------------------------------------------- tokenizer metadata
def _copy_tokenizer_from_gguf(writer, source: Path) -> None:
    """Copy every ``tokenizer.*`` key of the base's own GGUF (exactly what llama.cpp used)."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, vtype)


def _tokenizer_from_hf(writer, tokenizer, model_type: str) -> None:
    """Byte-level BPE tokenizer metadata from a Hugging Face fast tokenizer."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError("the base's tokenizer has no tokenizer.json (fast tokenizer); GGUF "
                          "export needs one, or a .gguf base whose tokenizer is copied")
    data = json.loads(backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise ExportError(
            f"GGUF export builds only byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen2, "
            f"Llama 3) from tokenizer.json; this one is {model.get('type')!r}. Export from the "
            f"model's own .gguf file as base (its tokenizer is copied), or convert with "
            f"llama.cpp's convert_hf_to_gguf.py")
    vocab = tokenizer.get_vocab()
    size = max(max(vocab.values()) + 1, len(tokenizer))
    added = {t.content: t.special for t in tokenizer.added_tokens_decoder.values()}
    tokens, types = [], []
    by_id = {i: t for t, i in vocab.items()}
    for i in range(size):
        token = by_id.get(i, f"[PAD{i}]")
        tokens.append(token)
        if i not in by_id:
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            types.append(gguf.TokenType.CONTROL if added[token] else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_PRE_TOKENIZER.get(model_type, "default"))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for attr, add in (("bos_token_id", writer.add_bos_token_id),
                      ("eos_token_id", writer.add_eos_token_id),
                      ("unk_token_id", writer.add_unk_token_id),
                      ("pad_token_id", writer.add_pad_token_id)):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            add(int(value))
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    template = getattr(tokenizer, "chat_template", None)
    if template:
        writer.add_chat_template(template)


# ---------------------------------------------------------------------- model GGUF
def _hparams(writer, config, arch: str) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads or config.num_attention_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    head_dim = _head_dim(config)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_vocab_size(int(config.vocab_size))


@contextmanager
def _gguf_file(out: Path, arch: str, progress: bool):
    """A GGUFWriter on a temporary file beside ``out``: when the block ends the file is
    written and renamed to ``out``; when it raises, the temporary file is deleted."""
    import gguf

    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    # use_temp_file: each added tensor goes to a spooled temporary file (256 MB in memory,
    # then disk) instead of being kept as an array until the end, so tensors can be handed
    # over one at a time and freed
    writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()


def _tensor_names(arch: str, config):
    """gguf's map from Hugging Face tensor names to llama.cpp's for ``arch``."""
    import gguf

    model_arch = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    return gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)


def write_model_gguf(model, tokenizer, out, out_type: str = "f16", *,
                     tokenizer_gguf: str | os.PathLike | None = None, name: str | None = None,
                     progress: bool = False, tensors=None) -> Path:
    """Write a plain transformers causal LM (e.g. a merged model) as a GGUF file.

    Args:
        model: a llama / mistral / qwen2 transformers model with no adapters; or, with
            ``tensors``, anything with its ``.config`` (e.g. a meta-device skeleton).
        tensors: ``(name, tensor)`` pairs to write instead of ``model.state_dict()``, taken
            one at a time (``lorakit.export.merge.LeanMerge.tensors``: the merge streamed).
        tokenizer: its Hugging Face tokenizer (used when ``tokenizer_gguf`` is None).
        out: the ``.gguf`` file to write (written under a temporary name, then renamed).
        out_type: "f32", "f16", "bf16" or "q8_0".
        tokenizer_gguf: a GGUF file whose ``tokenizer.*`` metadata is copied verbatim.
        name: ``general.name``.

    Returns:
        The written path.

    Raises:
        ExportError: unsupported architecture, tokenizer or type.
    """
    import gguf

    if out_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    arch = gguf_arch(model)
    config = model.config
    names = _tensor_names(arch, config)
    out = Path(out)
    with _gguf_file(out, arch, progress) as writer:
        writer.add_name(name or out.stem)
        writer.add_file_type(_file_type(out_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(writer, config, arch)
        if tokenizer_gguf is not None:
            _copy_tokenizer_from_gguf(writer, Path(tokenizer_gguf))
            template = getattr(tokenizer, "chat_template", None)
            if template and "tokenizer.chat_template" not in gguf.GGUFReader(
                    str(tokenizer_gguf)).fields:
                writer.add_chat_template(template)
        else:
            _tokenizer_from_hf(writer, tokenizer, config.model_type)
        items = model.state_dict().items() if tensors is None else tensors
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for key, tensor in items:
            if tied and key == "lm_head.weight":
                continue  # llama.cpp reuses token_embd when output.weight is absent
            gguf_name = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                raise ExportError(f"no GGUF tensor name for {key} ({arch}); the model has a "
                                  f"layer llama.cpp's {arch} graph does not")
            array = _maybe_permute(key, tensor.detach().float().cpu(), arch, config).numpy()
            del tensor
            data, raw = _encode(array, out_type, force_f32=array.ndim == 1)
            writer.add_tensor(gguf_name, data, raw_dtype=raw)
            del array, data
    return out


# ---------------------------------------------------------------------- LoRA GGUF
def lora_gguf_problems(config, state_keys) -> list[str]:
    """Why an adapter cannot be a llama.cpp LoRA GGUF (empty: it can)."""
    problems = []
    if config.use_dora:
        problems.append("DoRA (llama.cpp LoRA adapters have no magnitude vector): export the "
                        "merged model with `lorakit export gguf` instead")
    if config.modules_to_save:
        problems.append(f"modules_to_save={config.modules_to_save} (full weights, not low-rank): "
                        f"export the merged model with `lorakit export gguf` instead")
    if config.bias != "none" or any(k.endswith(".bias") for k in state_keys):
        problems.append(f"bias={config.bias!r} (trained biases): export the merged model")
    return problems


@torch.no_grad()
def write_lora_gguf(model, adapter_name: str, out, *, progress: bool = False) -> Path:
    """Write adapter ``adapter_name`` of ``model`` (a dense llama/mistral/qwen2 base with the
    adapter loaded) as a llama.cpp LoRA adapter GGUF (float32 tensors).

    Raises:
        ExportError: unsupported architecture, or an adapter llama.cpp cannot apply (DoRA,
            modules_to_save, trained biases).
    """
    from lorakit.lora.inject import adapter_configs, lora_layers
    from lorakit.lora.io import adapter_state_dict

    arch = gguf_arch(model)
    config = model.config
    lora_config = adapter_configs(model)[adapter_name]
    problems = lora_gguf_problems(lora_config, adapter_state_dict(model, adapter_name))
    if problems:
        raise ExportError("this adapter cannot be a llama.cpp LoRA GGUF: " + "; ".join(problems))
    names = _tensor_names(arch, config)
    out = Path(out)
    with _gguf_file(out, arch, progress) as writer:
        writer.add_string("general.type", "adapter")
        writer.add_string("adapter.type", "lora")
        writer.add_name(out.stem)
        count = 0
        for path, layer in lora_layers(model):
            if adapter_name not in layer.lora_A:
                continue
            key = f"{path}.weight"
            gguf_name = names.get_name(key, try_suffixes=(".weight",))
            if gguf_name is None:
                raise ExportError(f"llama.cpp has no tensor for adapted layer {path}")
            a = layer.lora_A[adapter_name].weight.float().cpu()  # (r, in)
            b = layer.lora_B[adapter_name].weight.float().cpu() * layer.scaling[adapter_name]
            b = _maybe_permute(key, b, arch, config)  # (out, r): permute rows like W
            writer.add_tensor(f"{gguf_name}.lora_a", a.contiguous().numpy())
            writer.add_tensor(f"{gguf_name}.lora_b", b.contiguous().numpy())
            count += 1
        if not count:
            raise AdapterError(f"adapter {adapter_name!r} adapts no layer")
    return out


# ---------------------------------------------------------------------- commands
GATED_TYPES = ("f32", "f16")  # greedy completions must match token for token; others reported


def _tokenizer_source(spec: str):
    """The base's own GGUF file when the base is one (alias or .gguf), else None."""
    from lorakit.models.load import resolve_spec

    resolved = resolve_spec(spec)
    return resolved.path if resolved.kind in ("alias", "gguf") else None


def _rounded_like(model, out_type: str):
    """``model`` with its weights rounded to the 16-bit type the GGUF stores (computing in
    float32), the reference a GGUF of that type is held to."""
    import copy

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}.get(out_type)
    if dtype is None:
        return model
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in rounded.parameters():
            if p.ndim > 1:
                p.copy_(p.to(dtype).float())
    return rounded


def _check_and_publish(tmp: Path, out: Path, report: dict | None, gated: bool, force: bool,
                       console) -> dict:
    from lorakit.export.merge import publish

    if report is not None:
        console.print(f"llama.cpp check ({report['backend']}): greedy completions identical for "
                      f"{report['greedy_match'] * report['prompts']:.0f}/{report['prompts']} "
                      f"prompts, token agreement {report['greedy_token_agreement']:.3f}"
                      f"{'' if gated else ' (reported, not gated)'}", highlight=False)
    failed = report is not None and gated and report["greedy_match"] < 1.0
    if failed and not force:
        tmp.unlink(missing_ok=True)
        raise ExportError(f"the GGUF's greedy completions differ from the merged model's "
                          f"({report['greedy_match']:.2f} of prompts identical); the file was "
                          f"not written. Pass --force to keep it anyway")
    publish(tmp, out)
    return {"out": str(out), "check": report, "passed": not failed, "forced": failed}


def export_gguf(adapter_dir, out, model: str | None = None, *, out_type: str = "f16",
                force: bool = False, overwrite: bool = False, check: bool = True,
                prompts: list[str] | None = None, max_new_tokens: int = 16,
                console=None) -> dict:
    """``lorakit export gguf``: merge the adapter (or none: the base alone) and write a GGUF;
    check it with llama.cpp (see ``gguf_check``). For f32/f16 the greedy completions must
    equal the merged model's (rounded to f16 for f16) token for token, else the file is deleted
    and ExportError raised (unless ``force``); for bf16/q8_0 the agreement is reported.

    Returns:
        ``{"out", "check", "passed", "forced", "type", "base"}``.
    """
    from rich.console import Console

    from lorakit.export import gguf_check, parity
    from lorakit.export.merge import (LeanMerge, NotStreamable, load_adapted_base,
                                      merge_adapter_into_base, prepare_output)

    console = console or Console(stderr=True)
    out = Path(out)
    if out_type not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {out_type!r}; choose one of {', '.join(GGUF_TYPES)}")
    tmp = prepare_output(out, overwrite)
    if adapter_dir is None:
        from lorakit.models.load import load_model

        if not model:
            raise ExportError("pass --adapter DIR (and optionally --model) or --model alone")
        spec = model
        merged, tokenizer = load_model(model, dtype=torch.float32, device="cpu")
        lean = None
    else:
        try:
            lean = LeanMerge(adapter_dir, model, allow_base_mismatch=force)
        except NotStreamable:
            lean = None
    if lean is not None:  # layer by layer: the merged model is never in memory
        from lorakit.models.stream import build_skeleton

        spec, tokenizer = lean.spec, lean.tokenizer
        skeleton = build_skeleton(lean.output_config(), torch.float32)
        gguf_arch(skeleton)  # fail before merging
        with console.status(f"merging layer by layer and writing {out} ({out_type})…"):
            write_model_gguf(skeleton, tokenizer, tmp, out_type,
                             tokenizer_gguf=_tokenizer_source(spec), name=out.stem,
                             tensors=lean.tensors())
        merged = None
        if check:  # the reference: the merged model, written as a folder and read back
            import shutil
            import tempfile

            from transformers import AutoModelForCausalLM

            folder = Path(tempfile.mkdtemp(prefix=".merged-", dir=out.parent))
            try:
                lean.write_folder(folder)
                merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        del lean
    else:
        if adapter_dir is not None:
            with console.status("loading the base model and the adapter…"):
                adapted = load_adapted_base(adapter_dir, model, allow_base_mismatch=force)
            spec, tokenizer = adapted.spec, adapted.tokenizer
            gguf_arch(adapted.model)  # fail before merging
            merged = merge_adapter_into_base(adapted.merge_source)
        with console.status(f"writing {out} ({out_type})…"):
            write_model_gguf(merged, tokenizer, tmp, out_type,
                             tokenizer_gguf=_tokenizer_source(spec), name=out.stem)
    report = None
    if check:
        with console.status("checking the GGUF's greedy completions…"):
            report = gguf_check.check_gguf(tmp, _rounded_like(merged, out_type),
                                           parity.encode_prompts(tokenizer, prompts),
                                           max_new_tokens)
    result = _check_and_publish(tmp, out, report, out_type in GATED_TYPES, force, console)
    return {**result, "type": out_type, "base": spec}


def export_gguf_lora(adapter_dir, out, model: str | None = None, *, base_gguf=None,
                     force: bool = False, overwrite: bool = False,
                     prompts: list[str] | None = None, max_new_tokens: int = 16,
                     console=None) -> dict:
    """``lorakit export gguf-lora``: the adapter alone as a llama.cpp LoRA GGUF. With
    ``base_gguf`` (the base written by ``export gguf``, f32 or f16) and llama-cpp-python
    installed, llama.cpp(base + LoRA) must decode what the adapter on its base decodes.

    Returns:
        ``{"out", "check", "passed", "forced", "base"}``.
    """
    from rich.console import Console

    from lorakit.export import gguf_check, parity
    from lorakit.export.merge import load_adapted_base, prepare_output

    console = console or Console(stderr=True)
    out = Path(out)
    tmp = prepare_output(out, overwrite)
    adapted = load_adapted_base(adapter_dir, model, allow_base_mismatch=force)
    write_lora_gguf(adapted.model, "default", tmp)
    report = None
    if base_gguf is not None:
        report = gguf_check.check_gguf(base_gguf, adapted.model,
                                       parity.encode_prompts(adapted.tokenizer, prompts),
                                       max_new_tokens, lora_path=tmp, backend="llama.cpp"
                                       if gguf_check.llama_cpp_available() else "transformers")
    result = _check_and_publish(tmp, out, report, True, force, console)
    return {**result, "base": adapted.spec}
