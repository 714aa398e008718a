"""`lorakit serve` as a user runs it: a subprocess on a free loopback port."""

import os
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from lorakit.models.load import inference_dtype


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_help_lists_the_issue_flags():
    out = subprocess.run([sys.executable, "-m", "lorakit", "serve", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for flag in ["--model", "--adapter", "--adapter-root", "--quantization", "--host", "--port",
                 "--api-key", "--max-loaded-adapters", "--max-batch-size", "--max-model-len"]:
        assert flag in out


def test_lorakit_serve_subprocess(serve_env, tmp_path):
    port = _free_port()
    db = tmp_path / "log.db"
    env = {**os.environ, "LORAKIT_API_KEY": "sk-env-key"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lorakit", "serve", "--model", str(serve_env["base_dir"]),
         "--adapter", f"a0={serve_env['root'] / 'a0'}", "--adapter-root", str(serve_env["root"]),
         "--port", str(port), "--max-loaded-adapters", "1", "--max-batch-size", "4",
         "--max-model-len", "128", "--log", str(db)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"lorakit serve exited: {proc.stdout.read()}")
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.3)
        client = openai.OpenAI(base_url=url + "/v1", api_key="sk-env-key", max_retries=0)
        assert {m.id for m in client.models.list().data} == {str(serve_env["base_dir"]), "a0"}
        r = client.chat.completions.create(model="a0", max_tokens=4, temperature=0,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens >= 1
        # runtime load under --adapter-root evicts a0 (one slot), then a0 reloads on demand
        load = httpx.post(url + "/v1/load_lora_adapter",
                          headers={"Authorization": "Bearer sk-env-key"},
                          json={"lora_name": "a1", "lora_path": "a1"})
        assert load.status_code == 200
        again = client.chat.completions.create(model="a0", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "hi"}])
        assert again.choices[0].message.content == r.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            client.completions.create(model="a0", prompt="hello " * 100, max_tokens=64)
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    # no --dtype: bf16 where this CPU runs it natively, else fp32, and the banner says which
    expected = str(inference_dtype("cpu")[0]).removeprefix("torch.")
    assert f"adapter(s) in {expected} (" in proc.stdout.read()
    import sqlite3

    rows = sqlite3.connect(db).execute("SELECT adapter, status, prompt_text FROM requests").fetchall()
    assert ("a0", 200, None) in rows and ("a0", 400, None) in rows  # no texts without --log-text
