"""Issue 19: one client, one adapter or one bad request must not hurt anyone else.

Driven through a real server (uvicorn on loopback) with the official ``openai`` client, and
with httpx / raw sockets where the client cannot say it (bodies, headers). Each test checks
that the good requests running beside the bad one get exactly the tokens they get alone.
"""

import json
import shutil
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file, save_file

API_KEY = "sk-lorakit-test"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MSG = [{"role": "user", "content": "Name three colours."}]


def chat(client, model, messages=MSG, **kw):
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=messages, **kw)


def streamed(client, model, **kw):
    stream = chat(client, model, stream=True, **kw)
    return "".join(e.choices[0].delta.content or "" for e in stream if e.choices)


class Beside:
    """Good streaming requests running while the test does something bad; ``check()`` asserts
    each got exactly what it gets alone."""

    def __init__(self, client, models=("a0", "tiny-base"), max_tokens=24):
        self.client, self.jobs = client, [(m, max_tokens) for m in models]
        self.alone = [chat(client, m, max_tokens=n, extra_body={"ignore_eos": True})
                      .choices[0].message.content for m, n in self.jobs]
        self.got = [None] * len(self.jobs)
        self.threads = [threading.Thread(target=self._run, args=(i,))
                        for i in range(len(self.jobs))]

    def _run(self, i):
        m, n = self.jobs[i]
        self.got[i] = streamed(self.client, m, max_tokens=n, extra_body={"ignore_eos": True})

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        for t in self.threads:
            t.join(120)
        if exc[0] is None:
            assert self.got == self.alone


def _copy_adapter(serve_env, src, name):
    dst = serve_env["root"] / name
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(serve_env["root"] / src, dst)
    return dst


def _auth(key):
    return {"Authorization": f"Bearer {key}"} if key else {}


def _load(server, name, path, key=API_KEY):
    return httpx.post(server["url"] + "/v1/load_lora_adapter", timeout=120, headers=_auth(key),
                      json={"lora_name": name, "lora_path": str(path)})


def _unload(server, name, key=API_KEY):
    return httpx.post(server["url"] + "/v1/unload_lora_adapter", timeout=60, headers=_auth(key),
                      json={"lora_name": name})


def _no_trace(engine, name):
    """Nothing of adapter versions named ``name`` is left in the model or the engine."""
    from lorakit.lora.inject import adapter_configs, lora_layers

    slots = {s for s, e in engine._slots.items() if e.name == name}
    installed = set(adapter_configs(engine.model)) | {
        n for _, layer in lora_layers(engine.model) for n in layer.lora_A}
    return name not in engine.adapters() and not (slots & installed)


# ---------------------------------------------------------------------- engine isolation
def test_denormal_temperature_fails_alone(client, server):
    """Sampling that makes one row's probabilities non-finite ends that request (400), not
    the batch."""
    before = server["engine"].stats["row_errors"]
    with Beside(client):
        time.sleep(0.2)
        with pytest.raises(openai.BadRequestError, match="sampling failed"):
            chat(client, "a1", temperature=1e-310, max_tokens=8)
        r = httpx.post(server["url"] + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "a2", "prompt": "Hi", "temperature": 5e-324,
                             "max_tokens": 4, "stream": True})
        assert "sampling failed" in r.text and r.text.rstrip().endswith("data: [DONE]")
    assert server["engine"].stats["row_errors"] >= before + 2


def test_adapter_fault_in_a_forward_fails_only_its_rows(client, server, serve_env):
    """An adapter that breaks inside a decode step: its requests fail with a clear error and
    it is unloaded; the other rows of the same steps go on, token for token."""
    from lorakit.lora.inject import lora_layers

    engine = server["engine"]
    faults_before = engine.stats["adapter_faults"]
    assert _load(server, "faulty", "late").status_code == 200
    victim = {}

    def doomed():
        try:
            streamed(client, "faulty", max_tokens=200, extra_body={"ignore_eos": True})
        except openai.APIError as exc:  # the stream carries the error
            victim["error"] = str(exc)
        else:
            victim["error"] = None

    with Beside(client, models=("a0", "a3", "tiny-base"), max_tokens=40):
        t = threading.Thread(target=doomed)
        t.start()
        slot = engine.adapter("faulty").slot
        deadline = time.monotonic() + 60
        while not any(r.slot == slot for r in list(engine._rows)) and time.monotonic() < deadline:
            time.sleep(0.01)
        _, layer = next((p, lay) for p, lay in lora_layers(engine.model) if slot in lay.lora_A)
        bad = torch.nn.Parameter(torch.zeros(3, 5), requires_grad=False)
        layer.lora_A[slot].weight = bad  # the next forward with this adapter raises
        t.join(120)
    assert victim["error"] is not None and "faulty" in victim["error"]
    assert "failed during generation" in victim["error"]
    assert "faulty" not in engine.adapters() and engine.stats["adapter_faults"] > faults_before
    with pytest.raises(openai.NotFoundError):
        chat(client, "faulty")
    deadline = time.monotonic() + 10
    while not _no_trace(engine, "faulty") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _no_trace(engine, "faulty")


@pytest.mark.parametrize("what, change, message", [
    ("rank", "a_1d", "expected a 2-D tensor"),
    ("regex", {"alpha_pattern": {"(": 8}}, "not a valid regular expression"),
    ("backtracking", {"alpha_pattern": {"(a+)+$": 8}}, "backtrack catastrophically"),
    ("backtracking", {"rank_pattern": {"(x|xx)*y": 4}}, "backtrack catastrophically"),
    ("nan", "nan", "NaN or infinite"),
])
def test_adapters_that_fail_checks_are_refused_at_load(client, server, serve_env, what, change,
                                                       message):
    folder = _copy_adapter(serve_env, "late", f"broken_{what}")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    if change == "a_1d":
        key = next(k for k in tensors if "lora_A" in k)
        tensors[key] = tensors[key][0].contiguous()  # a vector where a matrix belongs
        save_file(tensors, weights)
    elif change == "nan":
        key = next(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, weights)
    else:
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(change)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    with Beside(client, models=("a1",)):
        r = _load(server, "broken", folder)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    assert _no_trace(server["engine"], "broken")


def test_install_failure_leaves_nothing_behind(client, server, monkeypatch):
    """An adapter that passes every check but fails while being installed (half its layers
    done): the load is a clean 400, the name is not registered, no layer keeps it."""
    import lorakit.lora.io as lora_io

    engine, real_copy = server["engine"], lora_io.copy_lora_weights

    def broken_copy(model, slot, layers):
        if engine._slots[slot].name == "halfway":  # only this adapter; others (re)load fine
            raise RuntimeError("simulated failure while copying weights")
        return real_copy(model, slot, layers)

    monkeypatch.setattr(lora_io, "copy_lora_weights", broken_copy)
    with Beside(client, models=("a2", "tiny-base")):
        r = _load(server, "halfway", "late")
    assert r.status_code == 400 and "could not be installed" in r.json()["error"]["message"]
    assert _no_trace(server["engine"], "halfway")
    monkeypatch.undo()
    assert _load(server, "halfway", "late").status_code == 200  # the name is free again
    assert _unload(server, "halfway").status_code == 200


def test_swap_while_requests_run(client, server, serve_env):
    """Unload + load of the same name while requests run on it: running requests finish with
    the version they started with, the load answers at once, new requests get the new one."""
    engine = server["engine"]
    assert _load(server, "swap", "late").status_code == 200
    long = {"max_tokens": 30, "extra_body": {"ignore_eos": True}}
    old = chat(client, "swap", **long).choices[0].message.content
    new_alone = chat(client, "a0", **long).choices[0].message.content
    assert old != new_alone
    with ThreadPoolExecutor(4) as pool:
        running = [pool.submit(streamed, client, "swap", max_tokens=30,
                               extra_body={"ignore_eos": True}) for _ in range(3)]
        deadline = time.monotonic() + 60
        while engine.occupancy()["running"] < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert _unload(server, "swap").status_code == 200
        assert _load(server, "swap", serve_env["root"] / "a0").status_code == 200
        after = chat(client, "swap", max_tokens=30, extra_body={"ignore_eos": True})
        results = [f.result(timeout=120) for f in running]
    assert results == [old] * 3  # every future resolved, with the version it started on
    assert after.choices[0].message.content == new_alone
    assert _unload(server, "swap").status_code == 200
    deadline = time.monotonic() + 10
    while not _no_trace(engine, "swap") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _no_trace(engine, "swap")


# ---------------------------------------------------------------------- limits
def _raw(server, head: bytes, body: bytes = b"", read_timeout=30) -> bytes:
    """Send raw bytes; return what the server answers (until it closes or goes quiet)."""
    host, port = server["url"].removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=read_timeout) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.find(b"\r\n\r\n") + 4 + 20:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_no_key_is_refused_before_the_body(server):
    """401 comes back while the client has sent only the headers of a 'large' body."""
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n")
    answer = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 401")


def test_body_size_limits(client, server, monkeypatch):
    limits = server["app"].state.limits
    monkeypatch.setattr(limits, "max_body_bytes", 64 * 1024)
    with Beside(client, models=("a3",)):
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                b"application/json\r\nAuthorization: Bearer " + API_KEY.encode() +
                b"\r\nContent-Length: 100000000\r\n\r\n")
        assert _raw(server, head).startswith(b"HTTP/1.1 413")  # from Content-Length, no body

        def chunks():  # no Content-Length: counted while it streams in
            yield b'{"model": "a3", "messages": [{"role": "user", "content": "'
            for _ in range(64):
                yield b"x" * 4096
            yield b'"}]}'

        r = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, content=chunks(),
                       timeout=60)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
        small = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, timeout=60,
                           json={"model": "a3", "messages": MSG, "max_tokens": 2})
        assert small.status_code == 200


class _TimedTokenizer:
    """The engine's tokenizer, recording when each call on a huge text ran (monotonic)."""

    def __init__(self, tokenizer):
        self._tokenizer, self.spans = tokenizer, []

    def __call__(self, *args, **kwargs):
        start = time.monotonic()
        try:
            return self._tokenizer(*args, **kwargs)
        finally:
            if args and len(args[0]) > 1_000_000:
                self.spans.append((start, time.monotonic()))

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_health_answers_while_a_huge_prompt_is_tokenized(server, monkeypatch):
    monkeypatch.setattr(server["app"].state.limits, "max_body_bytes", 32 << 20)
    timed = _TimedTokenizer(server["engine"].tokenizer)
    monkeypatch.setattr(server["engine"], "tokenizer", timed)
    prompt = "lorem ipsum dolor sit amet " * 150_000  # ~4 MB: seconds of tokenizing
    done, answered, health = threading.Event(), [], []

    def big():
        try:
            r = httpx.post(server["url"] + "/v1/completions", headers=AUTH, timeout=300,
                           json={"model": "tiny-base", "prompt": prompt, "max_tokens": 1})
            answered.append(("big", r.status_code))
        finally:
            done.set()

    t = threading.Thread(target=big)
    t.start()
    while not done.is_set():
        sent = time.monotonic()
        r = httpx.get(server["url"] + "/health", timeout=60)
        if r.status_code == 200:
            health.append((sent, time.monotonic()))
        time.sleep(0.01)
    t.join()
    assert answered == [("big", 400)]  # longer than the context
    # a /health asked and answered while the prompt was being tokenized: the event loop was
    # free (tokenizing on it would hold every answer back until the tokenizer returned)
    assert len(timed.spans) == 1
    begin, end = timed.spans[0]
    assert any(begin < sent and got < end for sent, got in health), (timed.spans, health[-5:])


@pytest.mark.parametrize("body, field", [
    ({"seed": 2**70}, "seed"),
    ({"seed": -(2**64)}, "seed"),
    ({"max_tokens": 10**30}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 3}, "n"),
    ({"logprobs": True}, "logprobs"),
    ({"top_logprobs": 99}, "top_logprobs"),
    ({"presence_penalty": 9}, "presence_penalty"),
    ({"stop": ["x" * 1000]}, "stop"),
])
def test_numeric_bounds_are_400s(server, body, field):
    payload = json.dumps({"model": "a0", "messages": MSG, **body})  # NaN as JSON's NaN literal
    r = httpx.post(server["url"] + "/v1/chat/completions", timeout=60, content=payload,
                   headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]["message"] + str(r.json()["error"]["param"])


def test_huge_seed_in_range_works(client):
    a = chat(client, "a0", temperature=1, seed=2**64 - 1).choices[0].message.content
    b = chat(client, "a0", temperature=1, seed=2**64 - 1).choices[0].message.content
    assert a == b


def test_deadline(client, server, monkeypatch):
    monkeypatch.setattr(server["app"].state.limits, "request_timeout", 0.3)
    with pytest.raises(openai.APIStatusError) as err:
        chat(client, "a1", max_tokens=200, extra_body={"ignore_eos": True})
    assert err.value.status_code == 504 and "deadline" in str(err.value)
    monkeypatch.undo()
    assert chat(client, "a1").choices[0].message.content  # later requests are fine


def test_non_streaming_client_that_leaves_is_cancelled(client, server, monkeypatch):
    log = server["log"]
    before = len(log.rows())
    # a decode step of >= 10 ms, so 240 tokens outlast the client's 0.5 s on any machine (the
    # tiny model alone can finish them first on a fast CPU, and then nothing is cancelled)
    engine = server["engine"]
    step = engine._decode_step
    monkeypatch.setattr(engine, "_decode_step", lambda: (time.sleep(0.01), step())[1])
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server["url"] + "/v1/completions", headers=AUTH, timeout=0.5,
                   json={"model": "a1", "prompt": "Go on", "max_tokens": 240,
                         "ignore_eos": True, "temperature": 0})
    deadline = time.monotonic() + 60
    rows = []
    while time.monotonic() < deadline and not rows:
        rows = [x for x in log.rows()[before:] if x["status"] == 499]
        time.sleep(0.1)
    assert rows and rows[0]["completion_tokens"] < 240
    assert chat(client, "tiny-base").choices[0].message.content


# ---------------------------------------------------------------------- owners
ALICE, BOB, ROOT = "sk-alice", "sk-bob", "sk-root"


@pytest.fixture(scope="module")
def tenants(serve_env, tmp_path_factory):
    """A server with a keys file: alice, bob, and root (an admin key); a0, a1 from --adapter."""
    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread, create_app
    from lorakit.serve.auth import load_keys
    from lorakit.serve.engine import Engine

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n{ROOT} root admin\n")
    model, tokenizer = load_model(serve_env["base_dir"])
    engine = Engine(model, tokenizer, base_name="tiny-base", adapter_root=serve_env["root"],
                    max_model_len=256)
    for name in ("a0", "a1"):
        engine.add_adapter(name, serve_env["root"] / name, source="static", wait=False)
    app = create_app(engine, api_keys=load_keys(keys))
    thread = ServerThread(app).start()
    yield {"url": thread.url, "engine": engine, "app": app}
    thread.stop()
    engine.stop()


def _as(tenants, key):
    return openai.OpenAI(base_url=tenants["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def test_owners_of_adapters(tenants):
    alice, bob, root = (_as(tenants, k) for k in (ALICE, BOB, ROOT))
    assert _load(tenants, "alice-secret", "late", key=ALICE).status_code == 200
    mine = chat(alice, "alice-secret").choices[0].message.content
    assert "alice-secret" in {m.id for m in alice.models.list().data}
    assert "alice-secret" not in {m.id for m in bob.models.list().data}
    assert {"a0", "a1"} <= {m.id for m in bob.models.list().data}  # --adapter: everyone's
    with pytest.raises(openai.NotFoundError) as err:
        chat(bob, "alice-secret")
    assert "alice-secret" not in str(err.value).split("Served models:")[-1]
    with pytest.raises(openai.NotFoundError) as err:
        chat(bob, "nope")
    assert "alice-secret" not in str(err.value)
    # bob can neither unload nor take over alice's adapter; it answers as a missing name
    r = _unload(tenants, "alice-secret", key=BOB)
    assert r.status_code == 404 and "alice-secret" in tenants["engine"].adapters()
    assert _load(tenants, "alice-secret", "a0", key=BOB).status_code == 400
    assert chat(alice, "alice-secret").choices[0].message.content == mine
    # --adapter ones: everyone uses them, only an admin key unloads them
    assert chat(bob, "a0").choices[0].message.content
    r = _unload(tenants, "a1", key=BOB)
    assert r.status_code == 403 and "a1" in tenants["engine"].adapters()
    assert "alice-secret" in {m.id for m in root.models.list().data}  # admin sees all
    assert _unload(tenants, "a1", key=ROOT).status_code == 200
    assert _load(tenants, "a1", "a1", key=ROOT).status_code == 200
    # runtime names of fine-tuned models are reserved
    assert _load(tenants, "ft:tiny-base::x", "late", key=BOB).status_code == 400
    # the owner unloads its own
    assert _unload(tenants, "alice-secret", key=ALICE).status_code == 200


def test_open_metrics_name_no_private_adapter(tenants):
    from prometheus_client.parser import text_string_to_metric_families

    alice = _as(tenants, ALICE)
    assert _load(tenants, "alice-metrics", "late", key=ALICE).status_code == 200
    chat(alice, "alice-metrics")
    chat(alice, "a0")
    text = httpx.get(tenants["url"] + "/metrics").text
    assert "alice-metrics" not in text
    labels = {s.labels.get("model") for f in text_string_to_metric_families(text)
              for s in f.samples}
    assert {"private", "a0"} <= labels
    assert _unload(tenants, "alice-metrics", key=ALICE).status_code == 200


# ---------------------------------------------------------------------- the CLI
def test_sigterm_stops_the_server_after_a_swap_under_load(serve_env, tmp_path):
    """`lorakit serve` as a process: swap an adapter while streams run on it, then SIGTERM
    with requests in flight: the process exits (it used to hang)."""
    import signal

    from service_helpers import free_port, start_cli_server

    port, log = free_port(), tmp_path / "serve.log"
    proc = start_cli_server(serve_env["base_dir"], None, port, log,
                            "--adapter-root", str(serve_env["root"]), "--shutdown-timeout", "5",
                            "--request-timeout", "120", "--max-body-bytes", "65536")
    url = f"http://127.0.0.1:{port}"
    try:
        server = {"url": url}
        assert _load(server, "swap", "late", key="").status_code == 200
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
        pool = ThreadPoolExecutor(3)
        futures = [pool.submit(streamed, client, "swap", max_tokens=200,
                               extra_body={"ignore_eos": True}) for _ in range(3)]
        time.sleep(0.5)
        assert _unload(server, "swap", key="").status_code == 200
        assert _load(server, "swap", "a0", key="").status_code == 200
        r = httpx.post(url + "/v1/completions", content=b"x" * 100_000, timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        proc.send_signal(signal.SIGTERM)
        # uvicorn re-raises SIGTERM after its shutdown: the exit is 0 or -SIGTERM
        assert proc.wait(timeout=90) in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert "Application shutdown complete" in log.read_text()
        for f in futures:  # each stream ended, one way or another
            try:
                f.result(timeout=30)
            except Exception:  # noqa: BLE001 - cut off by the shutdown: fine
                pass
        pool.shutdown()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_help_lists_the_limit_flags():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for flag in ["--max-body-bytes", "--max-upload-bytes", "--request-timeout",
                 "--shutdown-timeout", "--trusted-proxy", "--keys-file"]:
        assert flag in out
