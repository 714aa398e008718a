"""The server end to end: a real uvicorn server on loopback, driven by the official openai client."""

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

ADAPTERS = ["a0", "a1", "a2", "a3"]
API_KEY = "sk-lorakit-test"

MSG = [{"role": "user", "content": "Name three colours."}]


def chat(client, model, messages=MSG, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def test_models_lists_base_and_adapters_with_parent(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(ADAPTERS) | {"tiny-base"} <= set(models)
    assert models["tiny-base"].model_extra["parent"] is None
    for name in ADAPTERS:
        assert models[name].model_extra["parent"] == "tiny-base"


@pytest.fixture(scope="module")
def peft_reference(serve_env):
    """Greedy tokens from transformers' generate on PEFT-loaded adapters (the reference)."""
    from peft import PeftModel

    from lorakit.models.load import load_model

    tokenizer = serve_env["tokenizer"]
    ids = tokenizer.apply_chat_template(MSG, add_generation_prompt=True, tokenize=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    out = {}
    base, _ = load_model(serve_env["base_dir"])
    for name in [None, "a0", "a1"]:
        model = PeftModel.from_pretrained(copy.deepcopy(base), serve_env["root"] / name) \
            if name else base
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=8, do_sample=False, pad_token_id=0)
        out[name or "tiny-base"] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    return out


def test_chat_base_and_two_adapters_match_peft(client, peft_reference):
    got = {m: chat(client, m).choices[0].message.content for m in ["tiny-base", "a0", "a1"]}
    assert got == peft_reference
    assert len(set(got.values())) == 3  # each adapter changes the output its own way
    resp = chat(client, "a0")
    assert resp.object == "chat.completion" and resp.choices[0].finish_reason in {"stop", "length"}
    assert resp.usage.completion_tokens <= 8
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_equals_non_streaming(client, server):
    full = chat(client, "a1", max_tokens=10)
    stream = chat(client, "a1", max_tokens=10, stream=True,
                  stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.choices:
            pieces.append(event.choices[0].delta.content or "")
            finish = event.choices[0].finish_reason or finish
        if event.usage:
            usage = event.usage
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens
    # completions endpoint too, and the raw SSE ends with data: [DONE]
    plain = client.completions.create(model="a2", prompt="Once upon a time", max_tokens=6,
                                      temperature=0)
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="a2", prompt="Once upon a time", max_tokens=6, temperature=0, stream=True))
    assert streamed == plain.choices[0].text and plain.usage.completion_tokens >= 1
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "a2", "prompt": "Once upon a time", "max_tokens": 3,
                            "temperature": 0, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_32_concurrent_requests_equal_each_request_alone(client, server):
    models = ["tiny-base"] + ADAPTERS
    prompts = [f"Tell me about item {i}." for i in range(32)]
    jobs = [(models[i % 5], prompts[i]) for i in range(32)]

    def run(job):
        model, prompt = job
        return chat(client, model, [{"role": "user", "content": prompt}], max_tokens=6)

    alone = [run(job).choices[0].message.content for job in jobs]  # one at a time
    steps_before = server["engine"].stats["steps"]
    with ThreadPoolExecutor(32) as pool:
        together = [r.choices[0].message.content for r in pool.map(run, jobs)]
    assert together == alone
    stats = server["engine"].stats
    # batched: far fewer decode steps than the 32 * 5 a one-at-a-time server would need
    assert stats["steps"] - steps_before < 32 * 5 / 2
    assert len(server["engine"].resident_adapters()) <= 3  # the LRU bound held
    assert stats["adapter_evictions"] >= 1  # 4 adapters, 3 slots: some were evicted and reloaded


def test_load_and_unload_at_runtime(client, server):
    url, headers = server["url"], {"Authorization": f"Bearer {API_KEY}"}
    with pytest.raises(openai.NotFoundError):
        chat(client, "late")
    r = httpx.post(url + "/v1/load_lora_adapter", headers=headers,
                   json={"lora_name": "late", "lora_path": "late"})
    assert r.status_code == 200 and "late" in r.text
    assert "late" in {m.id for m in client.models.list().data}
    assert chat(client, "late").choices[0].message.content != chat(client, "tiny-base").choices[0].message.content
    again = httpx.post(url + "/v1/load_lora_adapter", headers=headers,
                       json={"lora_name": "late", "lora_path": "late"})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    r = httpx.post(url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "late"})
    assert r.status_code == 200
    assert "late" not in {m.id for m in client.models.list().data}
    with pytest.raises(openai.NotFoundError):
        chat(client, "late")
    r = httpx.post(url + "/v1/unload_lora_adapter", headers=headers, json={"lora_name": "late"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("path, reason", [
    ("../outside/evil", "outside the adapter root"),
    ("link_out", "outside the adapter root"),
    ("{outside}/evil", "outside the adapter root"),
    ("does_not_exist", "does not exist"),
    ("wide", "trained on another base"),
    ("other_base", "differs from the served base"),
])
def test_load_refusals(server, serve_env, path, reason):
    r = httpx.post(server["url"] + "/v1/load_lora_adapter",
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"lora_name": "bad", "lora_path": path.format(outside=serve_env["outside"])})
    assert r.status_code == 400
    assert reason in r.json()["error"]["message"]
    assert "bad" not in server["engine"].adapters()


def test_auth(server):
    import openai as oa

    wrong = oa.OpenAI(base_url=server["url"] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(oa.AuthenticationError) as err:
        wrong.models.list()
    assert err.value.status_code == 401
    r = httpx.get(server["url"] + "/v1/models")  # no header at all
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(server["url"] + "/v1/load_lora_adapter",
                   json={"lora_name": "x", "lora_path": "a0"})
    assert r.status_code == 401
    assert httpx.get(server["url"] + "/health").json()["status"] == "ok"


def test_errors_have_openai_shape_and_do_not_disturb_others(client, server):
    expected = chat(client, "a3", max_tokens=24).choices[0].message.content
    result = {}

    def long_stream():
        stream = chat(client, "a3", max_tokens=24, stream=True)
        result["text"] = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)

    t = threading.Thread(target=long_stream)
    t.start()
    with pytest.raises(openai.NotFoundError):
        chat(client, "no-such-adapter")
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, "a3", temperature=5)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        chat(client, "a3", messages=[{"role": "user", "content": "word " * 400}])
    with pytest.raises(openai.BadRequestError):
        chat(client, "a3", max_tokens=0)
    r = httpx.post(server["url"] + "/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {API_KEY}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "param", "code"}
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "a3"},
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    t.join(timeout=120)
    assert result["text"] == expected


def test_stop_and_seed(client):
    full = chat(client, "a0", max_tokens=8).choices[0].message.content
    assert len(full) > 2
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = chat(client, "a0", max_tokens=8, stop=[stop]).choices[0]
    assert cut.message.content == full[:full.index(stop)] and cut.finish_reason == "stop"
    sampled = [chat(client, "a1", temperature=1.0, seed=s, max_tokens=8).choices[0].message.content
               for s in (1, 1, 2)]
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]


def test_disconnected_stream_is_cancelled(server, client):
    before = len(server["log"].rows())
    with httpx.stream("POST", server["url"] + "/v1/completions",
                      headers={"Authorization": f"Bearer {API_KEY}"},
                      json={"model": "a1", "prompt": "Go on", "max_tokens": 200,
                            "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # leave after the first chunk: the connection closes
    chat(client, "tiny-base")  # the server keeps working
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        rows = [x for x in server["log"].rows()[before:] if x["status"] == 499]
        if rows:
            break
        time.sleep(0.1)
    assert rows and rows[0]["completion_tokens"] < 200


def test_metrics_and_request_log(client, server):
    from prometheus_client.parser import text_string_to_metric_families

    chat(client, "a2")
    with pytest.raises(openai.NotFoundError):
        chat(client, "nope")
    r = httpx.get(server["url"] + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    requests = {(s.labels["model"], s.labels["status"]): s.value
                for s in families["lorakit_requests"].samples if s.name.endswith("_total")}
    assert requests[("a2", "200")] >= 1
    tokens = {s.labels["model"]: s.value for s in families["lorakit_generation_tokens"].samples
              if s.name.endswith("_total")}
    assert tokens["a2"] >= 1
    buckets = [s for s in families["lorakit_request_latency_seconds"].samples
               if s.name.endswith("_bucket") and s.labels["model"] == "a2"]
    assert buckets and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value >= 1
    rows = server["log"].rows(adapter="a2")
    assert rows and rows[-1]["status"] == 200 and rows[-1]["completion_tokens"] >= 1
    assert json.loads(rows[-1]["prompt_text"])[0]["content"] == MSG[0]["content"]
