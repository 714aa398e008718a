"""lorakit.plan.estimate: counts against real models and files, memory accounting, errors, CLI."""

import json
import math

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.plan import estimate as E
from lorakit.plan.presets import GPUS, PRESETS, TABLE_PRESETS, gpu_by_name
from tiny_models import FAMILIES, _config, make_tiny_model


# ---------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", [n for n, p in PRESETS.items() if p.params])
def test_preset_parameter_count_is_the_published_one(name):
    """The preset's config, built on the meta device, has the model card's exact count, and
    the estimate reports that count."""
    from transformers import AutoModelForCausalLM

    preset = PRESETS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(preset.make_config())
    counted = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    assert counted == preset.params
    assert E.estimate(name, method="full", seq_len=128).parameters == preset.params


# ---------------------------------------------------------------------- adapter size
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("r,targets,dora", [(8, "all-linear", False), (4, None, False),
                                            (8, "all-linear", True)])
def test_adapter_file_size_is_exact(tmp_path, family, r, targets, dora):
    """adapter_bytes equals the size of the adapter_model.safetensors save_adapter writes, and
    adapter_parameters the live adapter's element count."""
    import lorakit

    model = make_tiny_model(family)
    if targets is None:  # a named subset: the first two linear names of this family
        targets = lorakit.model_info(model)["target_modules"][:2]
    config = lorakit.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, use_dora=dora)
    lorakit.add_adapter(model, config)
    lorakit.save_adapter(model, tmp_path)
    real = (tmp_path / "adapter_model.safetensors").stat().st_size
    live = sum(p.numel() for p in model.parameters() if p.requires_grad)
    est = E.estimate(family, config=_config(family), method="lora", r=r, target_modules=targets,
                     use_dora=dora, seq_len=32)
    assert est.adapter_bytes == real
    assert est.adapter_parameters == live == est.trainable_parameters


def test_safetensors_size_matches_the_library_for_mixed_dtypes():
    from safetensors.torch import save

    tensors = {"b.weight": torch.zeros(3, 5, dtype=torch.bfloat16), "a": torch.zeros(7),
               "c.x": torch.zeros(2, 2, 2, dtype=torch.float16), "d": torch.zeros(1, dtype=torch.int64)}
    names = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64"}
    spec = {k: (names[v.dtype], tuple(v.shape)) for k, v in tensors.items()}
    assert E.safetensors_size(spec, {"format": "pt"}) == len(save(tensors, metadata={"format": "pt"}))
    assert E.safetensors_size(spec) == len(save(tensors))


# ---------------------------------------------------------------------- memory
def test_qlora_weights_equal_a_real_quantized_model():
    """The QLoRA weight bytes are what bitsandbytes really stores after quantize_model."""
    import transformers as tf

    from lorakit.models.quantize import quantize_model, quantized_weight_bytes

    config = tf.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config)
    quantize_model(model, "nf4", double_quant=True)
    real = quantized_weight_bytes(model)
    est = E.estimate("tiny", config=config, method="qlora", precision="fp32", seq_len=32)
    assert est.memory_bytes["weights"] == real["total_bytes"]


def test_activation_formula_against_autograd_saved_tensors():
    """The per-token activation count is within 15% of the bytes autograd really saves (saved-
    tensor hooks, parameters excluded) for a LoRA step of a Llama-style model, with and without
    LoRA dropout."""
    import transformers as tf

    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import add_adapter
    from lorakit.train.common import supervised_loss

    config = tf.LlamaConfig(vocab_size=512, hidden_size=96, intermediate_size=256,
                            num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2)
    seq = 64
    totals = {}
    for dropout, distill in ((0.0, False), (0.05, False), (0.0, True)):
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(config)
        add_adapter(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                      target_modules="all-linear"))
        model.train()
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                saved[st.data_ptr()] = max(saved.get(st.data_ptr(), 0), st.nbytes())
            return t

        ids = torch.randint(0, 512, (1, seq))
        batch = {"input_ids": ids, "labels": ids, "position_ids": torch.arange(seq)[None]}
        if distill:  # a replay row under data.replay.loss=kl: every position matched to the base
            batch.update(labels=torch.full_like(ids, -100), distill=torch.ones_like(ids, dtype=torch.bool))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            supervised_loss(model, batch)
        layout = E.adapter_layout(config, 8, "all-linear")
        predicted = E.activation_bytes(E._facts(config), layout["targets"], tokens=seq,
                                       seq_len=seq, e=4, lora_dropout=dropout, r=8,
                                       grad_checkpointing=False, distill=distill)
        predicted -= seq * 8 * 512  # the head's backward buffers are not saved tensors
        assert predicted == pytest.approx(sum(saved.values()), rel=0.15), (dropout, distill)
        totals[(dropout, distill)] = (predicted, sum(saved.values()))
    # the KL rows' own term, alone: the base's fp32 log-probs kept as the target (4 V a token)
    (p_ce, m_ce), (p_kl, m_kl) = totals[(0.0, False)], totals[(0.0, True)]
    assert p_kl - p_ce == seq * 4 * 512
    assert m_kl - m_ce == pytest.approx((seq - 1) * 4 * 512, rel=0.02)  # the last predicts nothing


def test_memory_accounting_follows_the_method_and_settings():
    base = dict(seq_len=512, precision="bf16")
    full = E.estimate("smollm2-135m", method="full", **base)
    lora = E.estimate("smollm2-135m", method="lora", **base)
    qlora = E.estimate("smollm2-135m", method="qlora", **base)
    p = full.parameters
    # full: fp32 weights and gradients, two fp32 AdamW moments (16 bytes/param)
    assert full.memory_bytes["weights"] == full.memory_bytes["gradients"] == 4 * p
    assert full.memory_bytes["optimizer"] == 8 * p
    # LoRA: bf16 frozen base; fp32 adapter, its gradients and moments
    a = lora.adapter_parameters
    assert lora.memory_bytes["weights"] == 2 * p
    assert (lora.memory_bytes["adapter"], lora.memory_bytes["gradients"],
            lora.memory_bytes["optimizer"]) == (4 * a, 4 * a, 8 * a)
    assert qlora.memory_bytes["weights"] < 0.6 * lora.memory_bytes["weights"]
    eight_bit = E.estimate("smollm2-135m", method="lora", optimizer="adamw8bit", **base)
    assert eight_bit.memory_bytes["optimizer"] == pytest.approx(lora.memory_bytes["optimizer"] / 4, rel=0.02)
    assert E.estimate("smollm2-135m", method="lora", optimizer="sgd", **base).memory_bytes["optimizer"] == 0
    # activations: linear in tokens with fused attention; checkpointing keeps far less
    longer = E.estimate("smollm2-135m", method="lora", seq_len=1024, precision="bf16")
    assert longer.memory_bytes["activations"] == pytest.approx(2 * lora.memory_bytes["activations"])
    ckpt = E.estimate("smollm2-135m", method="lora", grad_checkpointing=True, **base)
    head = 12 * 49152 * 512  # the output head's fp32 buffers stay (SmolLM2's vocabulary is large)
    assert head < ckpt.memory_bytes["activations"]
    assert ckpt.memory_bytes["activations"] - head < (lora.memory_bytes["activations"] - head) / 5
    parts = [v for k, v in lora.memory_bytes.items() if k != "total"]
    assert lora.memory_bytes["total"] == pytest.approx(sum(parts))


def test_fits_lists_the_smallest_count_per_card_and_shards_big_models():
    small = E.estimate("smollm2-135m", method="qlora", seq_len=512)
    assert small.fits == [f"1x {g.label}" for g in GPUS]  # every card, one of each
    big = E.estimate("llama3-70b", method="lora", seq_len=2048, grad_checkpointing=True)
    counts = {f.split("x ", 1)[1]: int(f.split("x ", 1)[0]) for f in big.fits}
    assert counts["A100 80GB"] >= 2 and "RTX 4060 Ti 16GB" not in counts
    card = gpu_by_name("A100 80GB")
    n = counts["A100 80GB"]  # fits on n cards but not on n/2
    m = big.memory_bytes
    state = m["weights"] + m["adapter"] + m["gradients"] + m["optimizer"]
    per_gpu = lambda k: state / k + m["activations"]
    assert per_gpu(n) * 1.05 + E.CUDA_CONTEXT_GIB * E.GIB <= card.memory_gib * E.GIB
    assert per_gpu(n // 2) * 1.05 + E.CUDA_CONTEXT_GIB * E.GIB > card.memory_gib * E.GIB


def test_time_and_cost():
    kw = dict(seq_len=1024, examples=1000, avg_tokens=500, epochs=2)
    lora = E.estimate("llama3-8b", method="lora", gpu="H100", **kw)
    full = E.estimate("llama3-8b", method="full", gpu="H100", **kw)
    assert lora.tokens == 1_000_000
    # frozen base: no weight gradients, so about 4 N instead of 6 N FLOPs per token
    n = E._facts(PRESETS["llama3-8b"].make_config())["matmul_params"]
    assert lora.flops / lora.tokens == pytest.approx(4 * n, rel=0.05)
    assert full.flops / full.tokens == pytest.approx(6 * n, rel=0.05)
    h100 = gpu_by_name("H100")
    assert lora.hours == pytest.approx(lora.flops / (h100.bf16_tflops * 1e12 * E.DEFAULT_MFU["lora"])
                                       / 3600, rel=1e-3)
    assert lora.cost_usd == pytest.approx(lora.hours * h100.usd_per_hour, abs=0.01)
    priced = E.estimate("llama3-8b", method="lora", gpu="H100", price_per_hour=10.0, mfu=0.5, **kw)
    assert priced.hours == pytest.approx(lora.hours * E.DEFAULT_MFU["lora"] / 0.5, rel=1e-3)
    assert priced.cost_usd == pytest.approx(priced.hours * 10.0, abs=0.01)
    ckpt = E.estimate("llama3-8b", method="lora", gpu="H100", grad_checkpointing=True, **kw)
    assert ckpt.flops > 1.4 * lora.flops  # one more forward


# ---------------------------------------------------------------------- bad input
def test_bad_input_says_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="llama3-8b") as err:
        E.estimate("llama-3-8b")
    assert all(name in str(err.value) for name in TABLE_PRESETS)
    with pytest.raises(ConfigError, match=r"r=64 is larger than layer .*q_proj .*choose r <= 16"):
        E.estimate("llama", config=_config("llama"), r=64, seq_len=32)
    with pytest.raises(ConfigError, match="matches no linear layer"):
        E.estimate("smollm2-135m", target_modules=["qproj"])
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"model_type": "llama", "vocab_size": 100, "num_hidden_layers": 2,
                               "num_attention_heads": 4}))
    with pytest.raises(ConfigError, match="missing field 'hidden_size'"):
        E.config_from_json(bad)
    bad.write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type"):
        E.config_from_json(bad)
    with pytest.raises(ConfigError, match="ambiguous"):
        gpu_by_name("A100")
    with pytest.raises(ConfigError, match="unknown GPU"):
        gpu_by_name("TPU v5")
    with pytest.raises(ConfigError, match="--avg-tokens"):
        E.estimate("smollm2-135m", examples=10)


# ---------------------------------------------------------------------- CLI
def _cli(capsys, *argv):
    from lorakit.cli import main

    code = main(["estimate", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json_has_the_documented_fields(capsys):
    code, out, _ = _cli(capsys, "--model", "mistral-7b", "--method", "qlora", "--r", "8",
                        "--target-modules", "q_proj,v_proj", "--seq-len", "1024",
                        "--examples", "100", "--avg-tokens", "300", "--gpu", "4090", "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data["memory_gib"]) == {"weights", "adapter", "gradients", "optimizer",
                                       "activations", "overhead", "total"}
    direct = E.estimate("mistral-7b", method="qlora", r=8, target_modules=["q_proj", "v_proj"],
                        seq_len=1024, examples=100, avg_tokens=300, gpu="4090")
    assert data["adapter_parameters"] == direct.adapter_parameters == 32 * 8 * (4096 + 4096 + 4096 + 1024)
    assert data["adapter_bytes"] == direct.adapter_bytes
    assert data["fits"] == direct.fits and "1x RTX 4090 24GB" in data["fits"]
    assert data["hours"] == direct.hours and data["cost_usd"] == direct.cost_usd


def test_cli_from_config_reads_a_run_config_and_a_hf_config(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: smollm2-135m-instruct\nmethod: qlora\nlora: {r: 8, target_modules: "
                   "[q_proj, v_proj], dropout: 0.0}\ndata: {max_length: 512}\n"
                   "train: {batch_size: 4, grad_checkpointing: true}\n")
    code, out, _ = _cli(capsys, "--from-config", str(run), "--json")
    assert code == 0
    data = json.loads(out)
    want = E.estimate("smollm2-135m", method="qlora", r=8, target_modules=["q_proj", "v_proj"],
                      lora_dropout=0.0, seq_len=512, batch_size=4, grad_checkpointing=True)
    assert data["memory_gib"] == want.memory_gib() and data["method"] == "qlora"
    code, out, _ = _cli(capsys, "--from-config", str(run), "--r", "4", "--json")  # flags win
    assert json.loads(out)["adapter_parameters"] == want.adapter_parameters // 2

    hf = tmp_path / "config.json"
    _config("qwen2").to_json_file(hf)
    code, out, _ = _cli(capsys, "--from-config", str(hf), "--method", "full", "--seq-len", "64",
                        "--json")
    model = make_tiny_model("qwen2")
    assert json.loads(out)["parameters"] == sum(p.numel() for p in model.parameters())


def test_cli_errors_exit_2(capsys):
    code, _, err = _cli(capsys, "--model", "llama-9000")
    assert code == 2 and "presets:" in err
    code, _, err = _cli(capsys, "--model", "llama3-8b", "--measure")
    assert code == 2 and "--measure needs a model it can load" in err


def test_cli_table(capsys):
    code, out, _ = _cli(capsys, "--table", "--json")
    data = json.loads(out)
    assert [row["model"] for row in data["rows"]] == TABLE_PRESETS
    assert "gradient checkpointing" in data["assumptions"]
    by_model = {row["model"]: row for row in data["rows"]}
    # the CLI table prints the planner's verdict; that one card is enough is checked against
    # the QLoRA paper's published 65B-on-48-GB figure in test_published.py
    assert by_model["llama3-70b"]["qlora"]["smallest"] == "1x A100 80GB"
    assert by_model["llama3-70b"]["lora"]["smallest"] != by_model["llama3-70b"]["qlora"]["smallest"]
    assert math.isclose(by_model["llama3-8b"]["qlora"]["total_gib"],
                        E.estimate("llama3-8b", method="qlora", grad_checkpointing=True,
                                   optimizer="paged_adamw8bit").memory_gib()["total"])
