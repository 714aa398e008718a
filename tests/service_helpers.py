"""Shared by the serving and fine-tuning service tests (tests/serve/): small datasets, polling a
job, the service on a loopback port in this process (:func:`running_service`), and a
`lorakit serve` subprocess (:func:`start_cli_server`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TERMINAL = ("succeeded", "failed", "cancelled")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_rows(n: int, start: int = 0) -> list[dict]:
    return [{"prompt": f"Spell the digit {i % 10} ({i})", "completion": WORDS[i % 10]}
            for i in range(start, start + n)]


def dpo_rows(n: int) -> list[dict]:
    return [{"prompt": f"Spell the digit {i % 10} ({i})", "chosen": WORDS[i % 10],
             "rejected": WORDS[(i + 3) % 10]} for i in range(n)]


def bad_rows_text() -> str:
    return ('{"prompt": "Spell 1", "completion": "one"}\n'
            '{"prompt": 3, "completion": "three"}\n'
            'this line is not JSON\n'
            '{"prompt": "Spell 2", "completion": "two"}\n')


def wait_job(client, job_id: str, timeout: float = 240, until=TERMINAL):
    """Poll with the openai client until the job's status is in ``until``."""
    deadline = time.monotonic() + timeout
    while True:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in until:
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job {job_id} still {job.status} after {timeout} s")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_service(base_dir: Path, state_dir: Path, *, api_key: str | None = None,
                    api_keys: dict[str, str] | None = None, ui: bool = True,
                    max_concurrent: int = 1, max_batch_size: int = 16):
    """The inference server with the fine-tuning service (``create_service_app``) over the tiny
    base at ``base_dir``, served as ``tiny-base`` on a free loopback port; yields
    ``{"url", "engine", "manager", "app", "state"}`` and stops it all afterwards.
    ``max_batch_size=1`` decodes one request at a time (bit-identical to any later request
    run alone, for tests that compare answers across separate calls)."""
    from lorakit.jobs.api import create_service_app
    from lorakit.jobs.manager import JobManager
    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread
    from lorakit.serve.engine import Engine

    model, tokenizer = load_model(base_dir)
    engine = Engine(model, tokenizer, base_name="tiny-base", max_model_len=256,
                    max_batch_size=max_batch_size)
    manager = JobManager(state_dir, engine, base_model=str(base_dir), base_name="tiny-base",
                         max_concurrent=max_concurrent, poll_s=0.1)
    app = create_service_app(engine, manager, api_key=api_key, api_keys=api_keys, ui=ui)
    thread = ServerThread(app).start()
    try:
        yield {"url": thread.url, "engine": engine, "manager": manager, "app": app,
               "state": state_dir}
    finally:
        thread.stop()
        manager.stop()
        engine.stop()


def start_cli_server(base_dir: Path, state_dir: Path | None, port: int, log: Path, *extra: str,
                     timeout: float = 120) -> subprocess.Popen:
    """`lorakit serve` (with `--state-dir` unless ``state_dir`` is None) as a real process,
    open (no API key, whatever the environment says); returns once /health answers."""
    import httpx

    state = ["--state-dir", str(state_dir)] if state_dir is not None else []
    cmd = [sys.executable, "-m", "lorakit", "serve", "--model", str(base_dir),
           "--served-model-name", "tiny-base", *state, "--port", str(port),
           "--log", "none", "--max-model-len", "256", *extra]
    env = {k: v for k, v in os.environ.items() if k != "LORAKIT_API_KEY"}
    env |= {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the server exited ({proc.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()[-3000:]}")
