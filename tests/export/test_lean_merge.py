"""Layer-by-layer merge (lorakit.export.merge.LeanMerge): the same tensors as the in-memory
merge (and as PEFT's merge_and_unload), with memory bounded by one layer, not the model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.export.merge import (LeanMerge, load_adapted_base, merge_adapter_into_base,
                                  save_hf_folder)

from export.helpers import make_adapter, save_base

pytest.importorskip("bitsandbytes")

WIDE = dict(hidden_size=64, intermediate_size=128, head_dim=16)
# family, base overrides, LoraConfig fields, qlora
CASES = {
    "llama-lora-bias": ("llama", {}, dict(bias="lora_only"), False),
    "llama-rslora-patterns": ("llama", {}, dict(use_rslora=True, r=8,
                                                rank_pattern={"v_proj": 2},
                                                alpha_pattern={"o_proj": 3}), False),
    "llama-qlora-dora": ("llama", WIDE, dict(use_dora=True), True),
    "qwen2-qlora": ("qwen2", dict(WIDE, tokenizer="smol"), dict(), True),
    "gpt2-conv1d": ("gpt2", {}, dict(), False),
    "gpt2-conv1d-qlora": ("gpt2", dict(n_embd=64), dict(), True),
    "tied-modules_to_save": ("llama", dict(tie_word_embeddings=True),
                             dict(modules_to_save=["lm_head"]), False),
    "tied-untouched": ("llama", dict(tie_word_embeddings=True), dict(), False),
}


def _folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("model*.safetensors")):
        out.update(load_file(file))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", list(CASES))
def test_lean_merge_equals_in_memory_merge(case, dtype, tmp_path):
    family, overrides, lora, qlora = CASES[case]
    base = save_base(tmp_path, family, **overrides)
    adapter = make_adapter(tmp_path, base, qlora=qlora, **lora)
    lean = LeanMerge(adapter, dtype=dtype)
    assert lean.qlora == qlora
    lean.write_folder(tmp_path / "lean", max_shard_size="40KB")
    ours = _folder_tensors(tmp_path / "lean")
    # the reference: today's path, the whole model in memory, saved by save_pretrained
    adapted = load_adapted_base(adapter)
    merged = merge_adapter_into_base(adapted.merge_source, dtype=dtype)
    save_hf_folder(merged, adapted.tokenizer, tmp_path / "old", max_shard_size="40KB")
    theirs = _folder_tensors(tmp_path / "old")
    assert ours.keys() == theirs.keys(), (sorted(ours.keys() ^ theirs.keys()))
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype == dtype, key
        assert torch.equal(ours[key], theirs[key]), (key, (ours[key] - theirs[key]).abs().max())
    new_cfg = json.loads((tmp_path / "lean" / "config.json").read_text())
    old_cfg = json.loads((tmp_path / "old" / "config.json").read_text())
    for key in ("tie_word_embeddings", "architectures", "dtype", "model_type"):
        assert new_cfg.get(key) == old_cfg.get(key), key
    assert "quantization_config" not in new_cfg
    index = tmp_path / "lean" / "model.safetensors.index.json"
    assert index.is_file() and set(json.loads(index.read_text())["weight_map"]) == set(ours)
    # plain transformers reads the folder and computes what the old merge computes
    from transformers import AutoModelForCausalLM

    reread = AutoModelForCausalLM.from_pretrained(tmp_path / "lean", dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 33, 101, 7]])
    with torch.no_grad():
        diff = (reread(ids).logits - merged.float()(ids).logits).abs().max()
    # (a bf16 model cast back to float32 also lost its RoPE buffers' precision: looser there)
    assert diff < (1e-5 if dtype == torch.float32 else 1e-3), diff


def test_lean_merge_matches_peft_merge_and_unload(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_base(tmp_path, "mistral")
    adapter = make_adapter(tmp_path, base, use_dora=True, r=8, lora_alpha=4)
    LeanMerge(adapter).write_folder(tmp_path / "lean")
    ours = _folder_tensors(tmp_path / "lean")
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    theirs = peft.merge_and_unload().state_dict()
    plain = AutoModelForCausalLM.from_pretrained(base).state_dict()
    assert set(ours) <= set(theirs)
    worst = max((ours[k] - theirs[k]).abs().max().item() for k in ours)
    moved = (ours["model.layers.0.self_attn.q_proj.weight"]
             - plain["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    assert worst < 1e-6 and moved > 1e-3, (worst, moved)


# ---------------------------------------------------------------------- memory
_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from lorakit.export.merge import LeanMerge
    from lorakit.memory import reset_peak_rss, rss_bytes
    adapter, out, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    lean = LeanMerge(adapter, dtype=dtype)
    if lean.qlora:  # bitsandbytes' native library and thread pools: loaded once, not the merge
        from lorakit.models.quantize import probe_device
        probe_device(torch.device("cpu"))
    # VmHWM reset to the current RSS here, not ru_maxrss: Linux carries ru_maxrss over exec from
    # the forked parent, so under a big pytest process it read the parent's size (2.6 GB)
    assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
    before = rss_bytes("VmRSS")
    lean.write_folder(out, max_shard_size="2GB")
    peak = rss_bytes("VmHWM")
    print(json.dumps({"before": before, "peak": peak, "extra": peak - before}))
""")


@pytest.fixture(scope="module")
def big_base(tmp_path_factory):
    """A random bf16 Llama of ~120M parameters (236 MB in bf16, 470 MB in fp32), 4 shards."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoints import llama_config, write_llama_checkpoint

    path = tmp_path_factory.mktemp("big") / "base"
    config = llama_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=8, vocab_size=8192)
    info = write_llama_checkpoint(path, config, shard_bytes=64 * 2**20)
    return path, info


def _adapter_for(base: Path, out: Path, qlora: bool) -> Path:
    """An r=8 all-linear adapter over ``base`` with non-zero B, written without loading the
    base's weights (they play no part in the adapter's tensors)."""
    import lorakit
    from lorakit.models import stream
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base)
    model = stream.build_skeleton(config, torch.float32)
    model.lorakit_spec = str(base)
    model.lorakit_quantization = ({"type": "nf4", "double_quant": True, "block_size": 64,
                                   "compute_dtype": "float32"} if qlora else None)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16))
    g = torch.Generator().manual_seed(0)
    from lorakit.lora.layers import lora_layers

    for _, layer in lora_layers(model):
        for m in (layer.lora_A["default"], layer.lora_B["default"]):
            m.to_empty(device="cpu")
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.02)
    return lorakit.save_adapter(model, out)


@pytest.mark.parametrize("qlora,dtype", [(False, "float32"), (True, "bfloat16")])
def test_lean_merge_peak_memory_is_one_layer_not_the_model(big_base, tmp_path, qlora, dtype):
    base, info = big_base
    adapter = _adapter_for(base, tmp_path / "adapter", qlora)
    out = tmp_path / "merged"
    done = subprocess.run([sys.executable, "-c", _MEASURE, str(adapter), str(out), dtype],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    fp32_model = info["parameters"] * 4
    largest_fp32 = 8192 * 1024 * 4  # the embedding / head
    # a few float32 copies of one tensor + overhead (allocator slack, bitsandbytes' buffers);
    # measured: +138 MiB (dense -> fp32), +217 MiB (QLoRA -> bf16) on a 456 MiB fp32 model
    bound = 4 * largest_fp32 + 160 * 2**20
    print(f"lean merge qlora={qlora} -> {dtype}: +{measured['extra'] / 2**20:.0f} MiB peak "
          f"(model fp32 {fp32_model / 2**20:.0f} MiB, bound {bound / 2**20:.0f} MiB)")
    assert measured["extra"] < bound, measured
    assert measured["extra"] < 0.65 * fp32_model, measured
    written = sum(p.stat().st_size for p in out.glob("model*.safetensors"))
    assert written > 0.9 * info["parameters"] * (4 if dtype == "float32" else 2)


@pytest.mark.parametrize("case", ["llama-lora-bias", "gpt2-conv1d", "tied-untouched",
                                  "qwen2-qlora", "llama-qlora-dora"])
def test_parity_gate_by_layer_reports_what_the_whole_models_report(case, tmp_path):
    """The gate run layer by layer computes the same logits, so its reports are identical;
    adapters that cannot run so (trained biases, DoRA) fall back to the whole float32 base."""
    from lorakit.export.merge import merge_to_folder

    family, overrides, lora, qlora = CASES[case]
    base = save_base(tmp_path, family, **overrides)
    adapter = make_adapter(tmp_path, base, qlora=qlora, **lora)
    whole = merge_to_folder(adapter, tmp_path / "whole", by_layer=False, max_new_tokens=4)
    layered = merge_to_folder(adapter, tmp_path / "layered", by_layer=True, max_new_tokens=4)
    assert whole["parity_by_layer"] is False and layered["parity_by_layer"] is True
    assert layered["passed"] and layered["parity"] == whole["parity"]
    assert _folder_tensors(tmp_path / "whole").keys() == _folder_tensors(tmp_path / "layered").keys()


def test_parity_gate_by_layer_is_chosen_when_float32_does_not_fit(monkeypatch):
    from lorakit.export import merge
    from lorakit.plan import preflight

    monkeypatch.setattr(preflight, "available_memory_bytes", lambda device: 10 * 2**30)
    assert merge._gate_by_layer(None, 27 * 2**30) is True  # a 7B model in float32
    assert merge._gate_by_layer(None, 2 * 2**30) is False
    assert merge._gate_by_layer(False, 27 * 2**30) is False  # --parity-by-layer off
    assert merge._gate_by_layer(True, None) is False  # a base that does not stream


_MEASURE_GATE = textwrap.dedent("""
    import json, sys, torch
    from lorakit.export.merge import merge_to_folder
    from lorakit.memory import reset_peak_rss, rss_bytes
    from lorakit.models.load import import_model_code
    adapter, base, out, by_layer = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "on"
    import lorakit.export.parity, lorakit.models.layerwise  # noqa: code, not the merge
    import_model_code(base)
    assert reset_peak_rss(), "needs Linux /proc/self/clear_refs"
    before = rss_bytes("VmRSS")
    result = merge_to_folder(adapter, out, dtype=torch.bfloat16, by_layer=by_layer,
                             max_new_tokens=2, prompts=["w5 w6 w7"])
    peak = rss_bytes("VmHWM")
    print(json.dumps({"extra": peak - before, "passed": result["passed"]}))
""")


def test_merge_with_parity_by_layer_never_holds_the_float32_model(big_base, tmp_path):
    """The whole `lorakit merge` (layer-by-layer merge + the gate layer by layer) of a dense
    adapter stays far below the float32 model; the gate with whole models needs it."""
    base, info = big_base
    adapter = _adapter_for(base, tmp_path / "adapter", qlora=False)
    extra = {}
    for mode in ("on", "off"):
        done = subprocess.run([sys.executable, "-c", _MEASURE_GATE, str(adapter), str(base),
                               str(tmp_path / f"merged-{mode}"), mode],
                              capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        assert measured["passed"]
        extra[mode] = measured["extra"]
    fp32_model = info["parameters"] * 4
    print(f"merge + gate: by layer +{extra['on'] / 2**20:.0f} MiB, whole models "
          f"+{extra['off'] / 2**20:.0f} MiB (model fp32 {fp32_model / 2**20:.0f} MiB)")
    assert extra["off"] > 0.9 * fp32_model  # the whole-model gate holds the float32 model
    assert extra["on"] < 0.45 * fp32_model
