"""train.grad_checkpointing for LoRA, QLoRA and DPO: the same loss and gradients as without,
and less memory at the peak of a training step (measured in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lorakit.config import RunConfig
from lorakit.errors import ConfigError
from lorakit.train import common, dpo, sft

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Six layers, long enough rows that activations outweigh the weights."""
    import transformers as tf

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_folder

    folder = tmp_path_factory.mktemp("ckpt-llama")
    save_tiny_folder(folder)  # the word-level tokenizer (vocab 256)
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=1024, bos_token_id=1, eos_token_id=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


def _cfg(model_dir, method, checkpointing, **extra):
    return RunConfig(model=str(model_dir), method=method,
                     lora={"r": 8, "alpha": 16, "dropout": 0.0},
                     train={"grad_checkpointing": checkpointing, "precision": "fp32"}, **extra)


def _batch(rows=2, length=64, seed=3):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 256, (rows, length), generator=g)
    labels = ids.clone()
    labels[:, : length // 4] = common.IGNORE_INDEX  # the prompt is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _randomize_adapter(model):
    """B starts at zero, which would leave A's gradient zero: give every adapter weight values."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _sft_step(model_dir, method, checkpointing):
    cpu = torch.device("cpu")
    model, _, _ = sft.setup_model(_cfg(model_dir, method, checkpointing), cpu, "fp32")
    assert model.is_gradient_checkpointing == checkpointing
    _randomize_adapter(model)
    loss, n = common.supervised_loss(model, _batch())
    (loss / n).backward()
    return float(loss), _grads(model)


def _dpo_step(model_dir, checkpointing):
    cpu = torch.device("cpu")
    cfg = _cfg(model_dir, "dpo", checkpointing)
    model, _, _, has_ref = dpo.setup_model(cfg, cpu, "fp32", log=lambda m: None)
    assert model.is_gradient_checkpointing == checkpointing
    _randomize_adapter(model)
    batch = _batch(rows=4)  # rows 0-1 chosen, 2-3 rejected
    with dpo.reference(model, has_ref):
        ref, _ = dpo.sequence_logps(model, batch)
    logps, _ = dpo.sequence_logps(model, batch)
    loss = -torch.nn.functional.logsigmoid(
        0.1 * ((logps[:2] - ref[:2]) - (logps[2:] - ref[2:]))).mean()
    loss.backward()
    return float(loss), _grads(model)


def _assert_close(a, b):
    (la, ga), (lb, gb) = a, b
    assert la == pytest.approx(lb, rel=1e-5, abs=1e-5)
    assert ga.keys() == gb.keys() and ga
    for k in ga:
        assert float(ga[k].abs().max()) > 0, k  # every adapter weight gets a gradient
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_same_loss_and_gradients_with_checkpointing(model_dir, method):
    _assert_close(_sft_step(model_dir, method, True), _sft_step(model_dir, method, False))


def test_dpo_same_loss_and_gradients_with_checkpointing(model_dir):
    _assert_close(_dpo_step(model_dir, True), _dpo_step(model_dir, False))


_PEAK = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from lorakit.train import common, sft
    from test_checkpointing import _cfg, _batch

    def rss(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024

    torch.manual_seed(0)
    model, _, _ = sft.setup_model(_cfg({folder!r}, {method!r}, {ckpt!r}), torch.device("cpu"), "fp32")
    batch = _batch(rows=4, length=384)
    def step():
        loss, n = common.supervised_loss(model, batch)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)
    step()  # warm up the allocator and lazy initialisation
    before = rss("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
    step()
    print(json.dumps({{"step_peak": rss("VmHWM") - before}}))
""")


def _step_peak(model_dir, method, ckpt) -> int:
    code = _PEAK.format(tests=str(ROOT / "tests" / "train"), folder=str(model_dir),
                        method=method, ckpt=ckpt)
    # a fixed mmap threshold: freed activations go back to the OS instead of staying in the
    # heap (glibc's dynamic threshold would keep the warm-up step's memory resident)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["step_peak"]


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_checkpointing_lowers_the_step_peak(model_dir, method):
    """4 rows x 384 tokens through 6 layers: without checkpointing every layer's activations
    stay until backward; with it, only each layer's input (and one layer recomputed)."""
    without = _step_peak(model_dir, method, False)
    with_ckpt = _step_peak(model_dir, method, True)
    print(f"{method}: step peak {without / 2**20:.0f} MiB without, {with_ckpt / 2**20:.0f} MiB with")
    assert with_ckpt < 0.6 * without


def test_activation_offload_is_refused_on_cpu(model_dir):
    cfg = RunConfig(model=str(model_dir), train={"activation_offload": True})
    with pytest.raises(ConfigError, match="activation_offload"):
        common.load_base_for_config(cfg, torch.device("cpu"))
