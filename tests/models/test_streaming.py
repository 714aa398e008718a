"""Streaming load (lorakit.models.stream): 4-bit and 16-bit bases built as the shards are read.

Memory is measured in a fresh process (a process's peak RSS only grows): ``VmHWM`` is reset
through ``/proc/self/clear_refs`` after a warm-up load (imports, bitsandbytes' kernel probe),
and the peak of the real load is compared with what the loaded model holds.
"""

import json
import re
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from checkpoints import llama_config, save_word_tokenizer, write_llama_checkpoint
from lorakit.errors import LorakitError, ModelLoadError
from lorakit.models import stream
from lorakit.models.load import load_model
from lorakit.memory import reset_peak_rss
from tiny_models import FAMILIES, _config, sample_input_ids

MIB = 2**20
# What a load may hold beyond the loaded model and one shard: module objects, the tokenizer,
# the float32 copy of the tensor being quantized and bitsandbytes' temporaries, allocator slack.
OVERHEAD = 64 * MIB

CHILD = r"""
import gc, json, sys
from lorakit.models.load import load_model
from lorakit.models.quantize import quantized_weight_bytes
from lorakit.models.stream import release_freed_memory
from lorakit.memory import reset_peak_rss, rss_bytes as rss

warm, path = sys.argv[1:3]
results = {}
for dtype, quant in (("bfloat16", None), ("float32", "nf4")):
    model, _ = load_model(warm, dtype=dtype, device="cpu", quantization=quant)  # imports, probe
    del model
    gc.collect()
    release_freed_memory()
    assert reset_peak_rss()  # VmHWM = the current RSS
    base = rss("VmRSS")
    model, _ = load_model(path, dtype=dtype, device="cpu", quantization=quant)
    results[quant or dtype] = {"peak": rss("VmHWM") - base, "after": rss("VmRSS") - base,
                               "weights": quantized_weight_bytes(model)["total_bytes"]}
    del model
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """Peak and final RSS deltas of a bf16 and an nf4 (float32 compute) load of a 168 MB bf16
    checkpoint (84M parameters, 6 layers of hidden 1024) in 48 MB shards, one fresh process."""
    if not reset_peak_rss():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    root = tmp_path_factory.mktemp("ckpt")
    info = write_llama_checkpoint(root / "big", llama_config(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=6, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=8000), shard_bytes=48 * MIB)
    write_llama_checkpoint(root / "warm", llama_config(hidden_size=64, intermediate_size=128,
                                                       num_hidden_layers=1, vocab_size=64))
    done = subprocess.run([sys.executable, "-c", CHILD, str(root / "warm"), str(info["path"])],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return info, json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- memory
def test_nf4_load_peaks_below_quantized_model_plus_one_shard(measured):
    info, results = measured
    got = results["nf4"]
    bound = got["weights"] + info["largest_shard_bytes"] + OVERHEAD
    dense_fp32 = 4 * info["parameters"]
    assert bound < 0.7 * dense_fp32  # so the check below means the dense model never existed
    assert got["peak"] < bound, (got, bound)
    assert got["after"] < got["weights"] + OVERHEAD


def test_bf16_load_peaks_at_the_bf16_model(measured):
    info, results = measured
    got = results["bfloat16"]
    assert got["weights"] == info["total_bytes"]  # every weight, 2 bytes each
    # float32 first would need 2x the bf16 bytes; the bound leaves room for one shard only
    assert got["peak"] < info["total_bytes"] + info["largest_shard_bytes"] + OVERHEAD
    assert got["peak"] < 1.5 * info["total_bytes"]


def test_bf16_load_never_creates_a_float32_weight(tmp_path):
    from torch.utils._python_dispatch import TorchDispatchMode

    write_llama_checkpoint(tmp_path, llama_config(hidden_size=128, intermediate_size=256,
                                                  num_hidden_layers=2, vocab_size=256))
    load_model(tmp_path, dtype="bfloat16", device="cpu")  # first load: imports
    seen = []

    class Float32Spy(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if (isinstance(t, torch.Tensor) and t.dtype == torch.float32
                        and t.device.type != "meta" and t.numel() >= 128 * 128):
                    seen.append((str(func), tuple(t.shape)))
            return out

    with Float32Spy():
        model, _ = load_model(tmp_path, dtype="bfloat16", device="cpu")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert seen == []  # (a weight-sized float32 tensor would be listed with the op making it)


# ---------------------------------------------------------------------- same model as before
def _wide(family):
    """tiny_models' config of ``family`` with every in_features a multiple of 64 (CPU 4-bit)."""
    config = _config(family)
    wide = {"n_embd": 64} if family == "gpt2" else \
        {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16}
    return type(config)(**{**config.to_dict(), **wide})


def _save_family(path, family, dtype=torch.bfloat16):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_wide(family), dtype=dtype)
    model.save_pretrained(path, max_shard_size="40KB")  # several shards even for tiny models
    save_word_tokenizer(path, model.config.vocab_size)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family,quant,dtype", [
    *[(f, "nf4", torch.float32) for f in FAMILIES],
    *[(f, q, d) for f in ("llama", "gpt2", "gemma")
      for q, d in (("fp4", torch.bfloat16), (None, torch.bfloat16), (None, torch.float32))]])
def test_streamed_model_equals_load_then_quantize(tmp_path, family, quant, dtype, monkeypatch):
    from lorakit.lora.io import base_config_hash
    from lorakit.models.quantize import quantize_model

    _save_family(tmp_path, family)
    assert (tmp_path / stream.INDEX).is_file()
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()  # today's path
    if quant:
        quantize_model(ref, quant_type=quant)
    calls = []
    real = AutoModelForCausalLM.from_pretrained
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    model, _ = load_model(tmp_path, dtype=dtype, device="cpu", quantization=quant)
    assert calls == []  # streamed, not from_pretrained
    ids = sample_input_ids()
    assert torch.equal(_logits(model, ids), _logits(ref, ids))
    got, want = model.state_dict(), ref.state_dict()  # 4-bit: codes and quant-state tensors too
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    assert model.lorakit_quantization == getattr(ref, "lorakit_quantization", None)
    assert base_config_hash(model) == base_config_hash(ref) and not model.training
    if model.config.tie_word_embeddings:
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deferred_load_reads_every_tensor_once_into_its_homes(tmp_path, family):
    """``defer_weights=True`` (the FSDP sharded load) reads nothing, and ``read_deferred``
    yields each tensor once (tied copies share an entry) with every (module, attribute) it
    belongs to; filling them gives the eager load, also when only some rows are read."""
    _save_family(tmp_path, family)
    eager, _ = load_model(tmp_path, dtype=torch.float32, device="cpu")
    model, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", defer_weights=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    deferred = model.lorakit_deferred
    want = eager.state_dict()
    seen, homes_of = [], {}
    for name, tensor, homes in stream.read_deferred(deferred):
        seen.append(name)
        homes_of[name] = homes
        assert torch.equal(tensor, want[name]) and tensor.dtype == torch.float32
        param = torch.nn.Parameter(tensor, requires_grad=False)  # one for all its homes
        for module, attr in homes:
            setattr(module, attr, param)
    assert len(seen) == len(set(seen))
    covered = {id(getattr(m, a)) for homes in homes_of.values() for m, a in homes}
    assert all(id(p) in covered for p in model.parameters())
    if model.config.tie_word_embeddings:
        emb = model.get_input_embeddings().weight
        assert model.get_output_embeddings().weight is emb
        assert sum(len(h) for h in homes_of.values()) == len(seen) + 1  # one entry, two homes
    ids = sample_input_ids()
    assert torch.equal(_logits(model.eval(), ids), _logits(eager.eval(), ids))
    # an FSDP rank's rows: rows(homes, shape) -> (start, stop)
    half = {n: t for n, t, _ in stream.read_deferred(
        deferred, rows=lambda homes, shape: (0, (shape[0] + 1) // 2))}
    assert all(torch.equal(half[n], want[n][:(want[n].shape[0] + 1) // 2]) for n in seen)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_deferred_4bit_load_quantizes_when_read_to_the_eager_codes(tmp_path, family):
    """``defer_weights`` with ``quantization`` (FSDP's sharded QLoRA load): the model is built
    with 4-bit layers whose packed codes are on the meta device and no weight read; reading
    it (``materialize_sharded``, here in one process) quantizes each weight as it is read,
    to the eager 4-bit load's bytes and quant state, and computes the same logits."""
    from lorakit.lora.inject import trainable_parameters
    from lorakit.models.quantize import is_4bit
    from lorakit.train.distributed import materialize_sharded

    _save_family(tmp_path, family)
    eager, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="nf4")
    model, _ = load_model(tmp_path, dtype=torch.float32, device="cpu", quantization="nf4",
                          defer_weights=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    layers = [(n, m) for n, m in model.named_modules() if type(m).__name__ == "Linear4bit"]
    assert len(layers) == sum(is_4bit(m) for m in eager.modules()) > 0
    assert all(m.quant_state is None for _, m in layers)  # nothing quantized yet
    assert trainable_parameters(model) == trainable_parameters(eager)  # logical sizes
    assert model.lorakit_quantization == eager.lorakit_quantization
    materialize_sharded(model, model.lorakit_deferred)
    for name, layer in layers:
        ref = eager.get_submodule(name)
        assert torch.equal(layer.weight.data, ref.weight.data), name
        got, want = layer.quant_state, ref.weight.quant_state
        assert torch.equal(got.absmax, want.absmax) and torch.equal(got.offset, want.offset)
        assert torch.equal(got.state2.absmax, want.state2.absmax)
    ids = sample_input_ids()
    assert torch.equal(_logits(model.eval(), ids), _logits(eager.eval(), ids))


def test_lora_trains_over_a_streamed_4bit_base(tmp_path):
    import bitsandbytes as bnb

    import lorakit
    from lorakit.lora.inject import lora_layers

    _save_family(tmp_path, "llama")
    model, _ = load_model(tmp_path, dtype="float32", device="cpu", quantization="nf4")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit) and layer.support_avx512bf16_for_cpu is False
    assert layer.weight.quant_state.dtype == torch.float32  # quantized from the float32 weight
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, lora_alpha=8))
    assert len(list(lora_layers(model))) == 2 * 7
    model.train()
    ids = sample_input_ids()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all("lora_" in n for n in grads)


def test_gguf_cache_entry_is_streamed(tmp_path, monkeypatch):
    """The GGUF cache holds a plain float32 model.safetensors: it streams like any folder."""
    from lorakit.models import cache

    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)))
    monkeypatch.setattr(cache, "_convert_gguf",
                        lambda path, out: _save_family(out, "llama", torch.float32))
    ref = AutoModelForCausalLM.from_pretrained(cache.ensure_gguf_entry(gguf), dtype=torch.bfloat16)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("not streamed"))
    model, _ = load_model(str(gguf), dtype="bf16", device="cpu")
    ids = sample_input_ids()
    assert torch.equal(_logits(model, ids), _logits(ref.eval(), ids))


# ---------------------------------------------------------------------- broken checkpoints
@pytest.fixture
def sharded(tmp_path):
    info = write_llama_checkpoint(tmp_path, llama_config(hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, vocab_size=64),
                                  shard_bytes=40_000)
    assert len(info["shards"]) >= 3
    return info


def _first_tensor_of(info, shard):
    return next(n for n, f in info["weight_map"].items() if f == shard)


@pytest.mark.parametrize("quant", [None, "nf4"])
def test_missing_shard_names_the_file_and_a_tensor(sharded, quant):
    shard = sharded["shards"][1]
    (sharded["path"] / shard).unlink()
    with pytest.raises(ModelLoadError, match="shard missing") as err:
        load_model(sharded["path"], dtype="float32", device="cpu", quantization=quant)
    assert shard in str(err.value) and _first_tensor_of(sharded, shard) in str(err.value)
    assert isinstance(err.value, LorakitError)


def test_truncated_shard_names_the_file_and_the_tensor(sharded):
    path = sharded["path"] / sharded["shards"][2]
    with open(path, "r+b") as f:
        f.truncate(f.seek(0, 2) - 1000)
    with pytest.raises(ModelLoadError, match="truncated") as err:
        load_model(sharded["path"], dtype="float32", device="cpu", quantization="nf4")
    header = json.loads(path.read_bytes()[8:8 + int.from_bytes(path.read_bytes()[:8], "little")])
    last = max((k for k in header if k != "__metadata__"),
               key=lambda k: header[k]["data_offsets"][1])
    assert path.name in str(err.value) and repr(last) in str(err.value)


def test_garbled_header_names_the_file_and_a_tensor(sharded):
    shard = sharded["shards"][0]
    path = sharded["path"] / shard
    data = bytearray(path.read_bytes())
    data[8:24] = b"\x00garbage garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt safetensors header") as err:
        load_model(sharded["path"], dtype="float32", device="cpu")
    assert shard in str(err.value) and _first_tensor_of(sharded, shard) in str(err.value)


def test_index_pointing_at_the_wrong_shard_names_the_tensor(sharded):
    index_path = sharded["path"] / stream.INDEX
    index = json.loads(index_path.read_text())
    name = _first_tensor_of(sharded, sharded["shards"][0])
    index["weight_map"][name] = sharded["shards"][1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="not in this shard") as err:
        load_model(sharded["path"], dtype="float32", device="cpu")
    assert sharded["shards"][1] in str(err.value) and repr(name) in str(err.value)


def test_config_that_does_not_match_the_weights_names_file_and_tensor(sharded):
    config_path = sharded["path"] / "config.json"
    config = json.loads(config_path.read_text())
    config["intermediate_size"] = 192
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"has shape \[.*128.*\], .* expects \[.*192.*\]") as err:
        load_model(sharded["path"], dtype="float32", device="cpu", quantization="nf4")
    assert re.search(r"model-\d+-of-\d+\.safetensors: tensor 'model\.layers\.\d\.mlp\.\w+_proj\.weight'",
                     str(err.value))


def test_checkpoint_helper_writes_shard_by_shard_with_a_valid_index(sharded):
    layout = stream.checkpoint_layout(sharded["path"])
    assert {n: i.file.name for n, i in layout.tensors.items()} == sharded["weight_map"]
    assert sum(layout.shard_bytes.values()) == sharded["total_bytes"]
    assert layout.largest_shard_bytes == sharded["largest_shard_bytes"] <= 40_000
    # the weights depend on the seed and the name only, not on how the shards are cut
    other = write_llama_checkpoint(sharded["path"] / "one", llama_config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, vocab_size=64),
        shard_bytes=10**9)
    a, _ = load_model(sharded["path"], dtype="float32", device="cpu")
    b, _ = load_model(other["path"], dtype="float32", device="cpu")
    assert len(other["shards"]) == 1
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
