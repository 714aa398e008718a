"""``lorakit export gguf`` / ``gguf-lora``: files llama.cpp loads and decodes like transformers.

The judge is llama.cpp itself: the ``llama-server`` that `make llamacpp` builds from the
pinned sources (tests/llamacpp.py; under CI a missing build fails, locally it skips). The
reference is transformers with the adapter merged by PEFT (``merge_and_unload``), not by
lorakit, decoded greedily here; prompts go in as token ids so that tokenization is checked
on its own (the chat-template and tokenizer tests).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import ExportError
from lorakit.export import gguf_check, parity
from lorakit.export.gguf import permute_rows, write_model_gguf
from lorakit.models.load import load_model

from export.helpers import make_adapter, save_base
from lora.helpers import randomize_adapter

WIDE = dict(tokenizer="smol", hidden_size=64, intermediate_size=128, head_dim=16)


def _export(capsys, *args):
    rc = main(["export", *map(str, args), "--json"])
    captured = capsys.readouterr()
    return rc, (json.loads(captured.out) if rc == 0 else None), captured.err


def test_permute_rows_pairs_the_halves_of_each_head():
    # one head of 4 dims: transformers rotates (x0, x2) and (x1, x3); llama.cpp adjacent pairs
    w = torch.arange(8.0).reshape(4, 2)
    assert permute_rows(w, 1)[:, 0].tolist() == [0.0, 4.0, 2.0, 6.0]
    two_heads = torch.arange(8.0).reshape(8, 1)
    assert permute_rows(two_heads, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # mistral: the same GGUF arch as llama
def test_gguf_read_back_by_transformers(family, tmp_path, capsys):
    """transformers' GGUF reader (which undoes the q/k permutation) gets the merged model.
    A small BPE vocabulary: transformers' reader takes ~20 s per read of SmolLM2's 49,152."""
    base = save_base(tmp_path, family, **dict(WIDE, tokenizer="bpe"))
    adapter = make_adapter(tmp_path, base, r=4)
    out = tmp_path / "m.gguf"
    rc, result, _ = _export(capsys, "gguf", "--adapter", adapter, "--out", out, "--type", "f32",
                            "--no-check")
    assert rc == 0 and out.is_file() and result["check"] is None
    model, tokenizer = load_model(str(base), dtype=torch.float32)
    lorakit.load_adapter(model, adapter)
    ids = parity.encode_prompts(tokenizer)
    report = gguf_check.check_gguf(out, model, ids, 8, backend="transformers")
    assert report["greedy_match"] == 1.0, report
    from transformers import AutoModelForCausalLM, AutoTokenizer

    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32)
    with torch.no_grad():
        diff = (back(ids[0]).logits - model(ids[0]).logits).abs().max()
    assert diff < 1e-4, diff
    tok = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert tok.chat_template == tokenizer.chat_template
    assert tok("SELECT name FROM t;")["input_ids"] == tokenizer("SELECT name FROM t;")["input_ids"]


def _peft_merged(base, adapter):
    """The reference: transformers model with the adapter merged by PEFT, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens by transformers' forward (argmax of the last logits, no EOS stop)."""
    seq = torch.tensor([ids])
    out = []
    for _ in range(n):
        nxt = int(model(input_ids=seq).logits[0, -1].argmax())
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


def _rounded(model, dtype):
    """``model`` with every matrix rounded to ``dtype`` (what an f16 GGUF stores)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(p.to(dtype).float())
    return model


def _prompt_ids(tokenizer):
    return [ids[0].tolist() for ids in parity.encode_prompts(tokenizer)]


def _decoded(tokens_per_prompt, tokenizer):
    """Each token list up to its first special token: llama-server stops at an
    end-of-generation token, transformers' reference (no EOS stop) goes on past it."""
    special = set(tokenizer.all_special_ids)
    return [next((seq[:i] for i, t in enumerate(seq) if t in special), list(seq))
            for seq in tokens_per_prompt]


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def exported(request, tmp_path_factory):
    """A tiny base + random adapter of one family, its merged GGUFs (f32, f16, q8_0), the
    base alone as GGUF (f32) and the adapter as a LoRA GGUF, all written by lorakit."""
    from llamacpp import binary

    binary("llama-server")  # skip / fail before the exports when the judge is missing
    tmp = tmp_path_factory.mktemp(f"gguf-{request.param}")
    base = save_base(tmp, request.param, **WIDE)
    adapter = make_adapter(tmp, base, r=4)
    files = {}
    for gtype in ("f32", "f16", "q8_0"):
        files[gtype] = tmp / f"merged-{gtype}.gguf"
        assert main(["export", "gguf", "--adapter", str(adapter), "--out", str(files[gtype]),
                     "--type", gtype, "--no-check"]) == 0
    files["base"] = tmp / "base-f32.gguf"
    assert main(["export", "gguf", "--model", str(base), "--out", str(files["base"]),
                 "--type", "f32", "--no-check"]) == 0
    files["lora"] = tmp / "lora.gguf"
    assert main(["export", "gguf-lora", "--adapter", str(adapter), "--out",
                 str(files["lora"])]) == 0
    _, tokenizer = load_model(str(base), dtype=torch.float32)
    return {"family": request.param, "base": base, "adapter": adapter, "files": files,
            "tokenizer": tokenizer, "reference": _peft_merged(base, adapter)}


N = 16  # greedy tokens per prompt


def test_merged_gguf_f32_f16_decode_like_transformers(exported):
    """Token for token, all prompts: f32 against the merged model, f16 against it with its
    matrices rounded to f16."""
    from llamacpp import Server

    prompts = _prompt_ids(exported["tokenizer"])
    for gtype, reference in (("f32", exported["reference"]),
                             ("f16", _rounded(exported["reference"], torch.float16))):
        want = [_greedy(reference, ids, N) for ids in prompts]
        with Server(exported["files"][gtype]) as server:
            got = [server.greedy(ids, N) for ids in prompts]
        tok = exported["tokenizer"]
        assert _decoded(got, tok) == _decoded(want, tok), (exported["family"], gtype)


def test_q8_0_agrees_and_is_smaller(exported):
    from llamacpp import Server

    prompts = _prompt_ids(exported["tokenizer"])
    want = [_greedy(exported["reference"], ids, N) for ids in prompts]
    with Server(exported["files"]["q8_0"]) as server:
        got = [server.greedy(ids, N) for ids in prompts]
    agreement = gguf_check.agreement(_decoded(want, exported["tokenizer"]),
                                     _decoded(got, exported["tokenizer"]))
    assert agreement["greedy_token_agreement"] >= 0.5, agreement
    sizes = {t: exported["files"][t].stat().st_size for t in ("f32", "f16", "q8_0")}
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


def test_base_gguf_plus_lora_gguf_equals_the_merged_model(exported):
    """llama.cpp applies lorakit's LoRA GGUF (--lora) on lorakit's base GGUF exactly as the
    adapter merged by PEFT computes; without --lora it decodes something else."""
    from llamacpp import Server

    files, prompts = exported["files"], _prompt_ids(exported["tokenizer"])
    want = [_greedy(exported["reference"], ids, N) for ids in prompts]
    tok = exported["tokenizer"]
    with Server(files["base"], lora=[files["lora"]]) as server:
        assert [a["path"] for a in server.get("/lora-adapters")] == [str(files["lora"])]
        assert _decoded([server.greedy(ids, N) for ids in prompts], tok) == _decoded(want, tok)
    with Server(files["base"]) as server:
        assert _decoded([server.greedy(ids, N) for ids in prompts], tok) != _decoded(want, tok)


def test_chat_template_renders_like_the_tokenizer(exported):
    """llama.cpp (--jinja) renders the GGUF's chat template as transformers renders the
    tokenizer's, for a system + user + assistant + user conversation."""
    from llamacpp import Server

    tokenizer = exported["tokenizer"]
    messages = [{"role": "system", "content": "You answer in SQL."},
                {"role": "user", "content": "Count the rows of t."},
                {"role": "assistant", "content": "SELECT COUNT(*) FROM t;"},
                {"role": "user", "content": "And the distinct names?"}]
    want = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    with Server(exported["files"]["f32"]) as server:
        assert server.post("/apply-template", {"messages": messages})["prompt"] == want


def test_llama_server_serves_the_exported_model_over_the_openai_api(exported):
    """/v1/chat/completions on the merged GGUF: the chat template applied, greedy, and the
    answer's tokens are the merged model's own continuation of the templated prompt."""
    from llamacpp import Server

    tokenizer = exported["tokenizer"]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                        return_dict=False)
    want = _greedy(exported["reference"], list(ids), 8)
    with Server(exported["files"]["f32"]) as server:
        models = server.get("/v1/models")["data"]
        assert len(models) == 1
        reply = server.post("/v1/chat/completions", {
            "messages": messages, "max_tokens": 8, "temperature": 0, "top_k": 1,
            "ignore_eos": True, "return_tokens": True})
        choice = reply["choices"][0]
        assert reply["usage"]["completion_tokens"] == 8
        assert reply["usage"]["prompt_tokens"] == len(ids)
        assert choice["message"]["role"] == "assistant"
        assert server.tokenize(choice["message"]["content"]) == want or \
            choice["message"]["content"] == tokenizer.decode(want, skip_special_tokens=True)


def test_llama_cpp_refuses_an_lm_head_lora_on_a_tied_base(tmp_path):
    """check-adapter's llamacpp rule for lm_head on tied embeddings, judged by llama.cpp: its
    converter writes the file, and llama-server refuses to apply it."""
    from llamacpp import Server, binary, convert_lora
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorakit.export.compat import check_adapter

    binary("llama-server")
    base = save_base(tmp_path, "llama", **dict(WIDE, tokenizer="bpe"), tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(base)
    get_peft_model(model, LoraConfig(r=4, target_modules=["lm_head", "q_proj"])).save_pretrained(
        tmp_path / "adapter")
    assert any(f.rule == "target_modules" and f.level == "error"
               for f in check_adapter(tmp_path / "adapter", "llamacpp"))
    assert convert_lora(tmp_path / "adapter", base, tmp_path / "l.gguf").returncode == 0
    assert main(["export", "gguf", "--model", str(base), "--out", str(tmp_path / "b.gguf"),
                 "--type", "f32", "--no-check"]) == 0
    with pytest.raises(AssertionError, match="does not exist in base model"):
        with Server(tmp_path / "b.gguf", lora=[tmp_path / "l.gguf"]):
            pass


def test_unsupported_architecture(tmp_path, capsys):
    base = save_base(tmp_path, "phi3")
    adapter = make_adapter(tmp_path, base)
    rc, _, err = _export(capsys, "gguf", "--adapter", adapter, "--out", tmp_path / "x.gguf")
    assert rc == 2 and "'phi3'" in err and "llama, mistral, qwen2" in err
    assert not (tmp_path / "x.gguf").exists()


def test_gguf_lora_refuses_dora_and_existing_output(tmp_path, capsys):
    base = save_base(tmp_path, "llama", **WIDE)
    dora = make_adapter(tmp_path, base, use_dora=True)
    rc, _, err = _export(capsys, "gguf-lora", "--adapter", dora, "--out", tmp_path / "l.gguf")
    assert rc == 2 and "DoRA" in err and "lorakit export gguf" in err
    (tmp_path / "l.gguf").write_text("keep")
    rc, _, err = _export(capsys, "gguf-lora", "--adapter", dora, "--out", tmp_path / "l.gguf")
    assert rc == 2 and "already exists" in err and (tmp_path / "l.gguf").read_text() == "keep"


def test_gguf_check_failure_deletes_the_file(tmp_path, capsys, monkeypatch):
    """A GGUF whose weights are wrong (a writer that scrambles the output head) fails the
    f32 gate. (Leaving q/k unpermuted is too subtle for a random tiny model's greedy tokens;
    the SmolLM2 test covers the permutation.)"""
    import lorakit.export.gguf as gguf_module

    base = save_base(tmp_path, "llama", **dict(WIDE, tokenizer="bpe"))
    adapter = make_adapter(tmp_path, base)
    real = gguf_module._maybe_permute

    def scrambled(name, tensor, arch, config):
        tensor = real(name, tensor, arch, config)
        return tensor.flip(0) if name == "lm_head.weight" else tensor

    monkeypatch.setattr(gguf_module, "_maybe_permute", scrambled)
    out = tmp_path / "bad.gguf"
    rc, _, err = _export(capsys, "gguf", "--adapter", adapter, "--out", out, "--type", "f32")
    assert rc == 2 and "differ from the merged model" in err and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".bad.gguf")]


@pytest.mark.slow
def test_smollm2_gguf_round_trip_with_llama_cpp(smol_model, tmp_path, capsys):
    """The embedded default, judged by llama-server: the merged f32 GGUF decodes like
    transformers; the LoRA GGUF on the base GGUF decodes like the merged model; llama.cpp
    tokenizes the chat prompt like transformers (the tokenizer is copied from the base GGUF)."""
    from llamacpp import Server, binary

    binary("llama-server")
    model, tokenizer = smol_model
    model = copy.deepcopy(model)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, lora_alpha=16, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]))
    randomize_adapter(model, scale=0.02)
    adapter = lorakit.save_adapter(model, tmp_path / "adapter", tokenizer=tokenizer)
    merged_gguf, base_gguf, lora_gguf = (tmp_path / n for n in ("m.gguf", "b.gguf", "l.gguf"))
    rc, _, err = _export(capsys, "gguf", "--adapter", adapter, "--out", merged_gguf,
                         "--type", "f32", "--no-check")
    assert rc == 0, err
    rc, _, err = _export(capsys, "gguf", "--model", "smollm2-135m-instruct", "--out", base_gguf,
                         "--type", "f32", "--no-check")
    assert rc == 0, err
    rc, _, err = _export(capsys, "gguf-lora", "--adapter", adapter, "--out", lora_gguf)
    assert rc == 0, err
    prompts = _prompt_ids(tokenizer)
    with torch.no_grad():
        want = [parity.greedy_tokens(model, torch.tensor([ids]), N) for ids in prompts]
    want = _decoded(want, tokenizer)
    with Server(merged_gguf, ctx=1024) as server:
        assert _decoded([server.greedy(ids, N) for ids in prompts], tokenizer) == want
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Count 1234 rows!"}],
                                             tokenize=False, add_generation_prompt=True)
        assert server.tokenize(text) == tokenizer(text, add_special_tokens=False)["input_ids"]
    with Server(base_gguf, lora=[lora_gguf], ctx=1024) as server:
        assert _decoded([server.greedy(ids, N) for ids in prompts], tokenizer) == want
    with Server(base_gguf, ctx=1024) as server:  # the adapter matters
        assert _decoded([server.greedy(ids, N) for ids in prompts], tokenizer) != want


def test_write_model_gguf_rejects_unknown_type(tmp_path):
    model, tokenizer = load_model(str(save_base(tmp_path, "llama", **WIDE)))
    with pytest.raises(ExportError, match="f32, f16, bf16, q8_0"):
        write_model_gguf(model, tokenizer, tmp_path / "x.gguf", "q4_k")
