"""lorakit's one-pass GGUF -> HF conversion writes what transformers' own GGUF loader writes.

The files are tiny llama / qwen2 models with a small byte-level BPE vocabulary (so transformers'
slow path takes seconds, not a minute), written by lorakit's exporter in f32 and q8_0.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from lorakit.export.gguf import permute_rows, write_model_gguf
from lorakit.models import cache, gguf_convert
from lorakit.models.gguf_convert import unpermute_rows
from tiny_models import tiny_bpe_tokenizer


def _model(family: str, vocab: int, tied: bool):
    import transformers as tf

    cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family]
    config = cls(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=256, tie_word_embeddings=tied, bos_token_id=1,
                 eos_token_id=2)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config).eval()


def _gguf(tmp_path, family, tied, out_type, name="tiny"):
    tokenizer = tiny_bpe_tokenizer()
    model = _model(family, len(tokenizer), tied)
    path = tmp_path / f"{family}-{out_type}.gguf"
    write_model_gguf(model, tokenizer, path, out_type, name=name)
    return path, model


def _tensors(folder):
    state = safetensors.torch.load_file(folder / cache.WEIGHTS)
    # a tied model's one matrix: transformers' save_model keeps it as lm_head.weight, lorakit
    # under its Hugging Face name model.embed_tokens.weight; from_pretrained ties either
    if "lm_head.weight" in state and "model.embed_tokens.weight" not in state:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    return state


def test_unpermute_rows_inverts_permute_rows():
    w = torch.randn(4 * 16, 3)
    assert torch.equal(unpermute_rows(permute_rows(w, 4), 4), w)
    b = torch.randn(2 * 8)
    assert torch.equal(unpermute_rows(permute_rows(b, 2), 2), b)
    assert not torch.equal(unpermute_rows(w, 4), w)


@pytest.mark.parametrize("family,tied,out_type", [
    ("llama", True, "f32"), ("llama", False, "q8_0"), ("qwen2", True, "q8_0"),
    ("qwen2", False, "f32")])
def test_one_pass_conversion_writes_what_transformers_writes(family, tied, out_type, tmp_path):
    path, model = _gguf(tmp_path, family, tied, out_type)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    ours.mkdir(), theirs.mkdir()
    gguf_convert.convert(path, ours)
    cache._convert_gguf_transformers(path, theirs)
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in theirs.iterdir())
    for file in theirs.glob("*.json"):
        assert json.loads((ours / file.name).read_text()) == json.loads(file.read_text()), file.name
    assert (ours / "chat_template.jinja").read_text() == (theirs / "chat_template.jinja").read_text()
    a, b = _tensors(ours), _tensors(theirs)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    if out_type == "f32":  # and both are the model that was exported (q/k rows unpermuted)
        want = model.state_dict()
        assert all(torch.equal(a[k], want[k]) for k in a)


def test_converted_folder_loads_as_the_exported_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model = _gguf(tmp_path, "llama", False, "f32")
    out = tmp_path / "out"
    out.mkdir()
    gguf_convert.convert(path, out)
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 17, 40, 99, 5]])
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    source, read = tiny_bpe_tokenizer(), AutoTokenizer.from_pretrained(out)
    assert read.get_vocab() == source.get_vocab()
    assert (read.bos_token, read.eos_token) == (source.bos_token, source.eos_token)
    messages = [{"role": "user", "content": "hi"}]
    assert (read.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            == source.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


def test_a_file_transformers_reads_differently_is_refused(tmp_path):
    """transformers takes a llama file named "mistral" for a Mistral model; the one-pass path
    does not read it as llama."""
    path, _ = _gguf(tmp_path, "llama", True, "f32", name="mistral")
    with pytest.raises(gguf_convert.Unsupported, match="mistral"):
        gguf_convert.convert(path, tmp_path)
    assert not (tmp_path / cache.WEIGHTS).exists()


def test_a_file_it_does_not_reproduce_goes_to_transformers(tmp_path, caplog):
    """A tensor the config's model has no place for (Llama 3.1 files carry rope_freqs): the
    one-pass path refuses the file and the cache's conversion uses transformers' loader."""
    import logging

    tokenizer = tiny_bpe_tokenizer()
    model = _model("llama", len(tokenizer), True)
    path = tmp_path / "extra.gguf"
    write_model_gguf(model, tokenizer, path, "f32", tensors=[
        *model.state_dict().items(), ("rope.freqs.weight", torch.ones(8))])
    with pytest.raises(gguf_convert.Unsupported, match="rope_freqs"):
        gguf_convert.convert(path, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.INFO, logger=cache.__name__):
        cache._convert_gguf(path, out)
    assert "transformers' GGUF loader" in caplog.text and "rope_freqs" in caplog.text
    got = _tensors(out)
    assert all(torch.equal(got[k], v) for k, v in model.state_dict().items() if k in got)
    assert got.keys() == model.state_dict().keys() - {"lm_head.weight"}
