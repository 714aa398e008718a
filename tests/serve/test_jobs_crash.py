"""Crash safety: `kill -9` a real `lorakit serve --state-dir` process in the middle of a job,
start it again, and the job resumes from its last checkpoint, finishes, and its adapter equals
that of the same job run without interruption (same seed)."""

import fcntl
import os
import signal
import sqlite3
import time

import openai
import torch
from safetensors.torch import load_file
from service_helpers import free_port, sft_rows, start_cli_server, wait_job, write_jsonl


def _job_status(state, job_id):
    with sqlite3.connect(state / "jobs.db") as db:
        return db.execute("SELECT status FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]


def test_kill_9_mid_job_then_restart_resumes_to_the_same_adapter(serve_env, tmp_path):
    state, port = tmp_path / "state", free_port()
    data = write_jsonl(tmp_path / "train.jsonl", sft_rows(24))
    log = tmp_path / "server.log"
    hp = {"n_epochs": 2, "batch_size": 2}  # 24 steps
    opts = {"lora_r": 4, "checkpoint_every": 3, "packing": False}  # one example per row
    server = start_cli_server(serve_env["base_dir"], state, port, log, "--max-concurrent-jobs", "2")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="tiny-base", training_file=file.id, seed=11,
                                             hyperparameters=hp, extra_body={"lorakit": opts})
        run_dir = state / "jobs" / job.id
        deadline = time.monotonic() + 240
        while not (run_dir / "checkpoints" / "step-3" / "trainer_state.pt").is_file():
            assert time.monotonic() < deadline and server.poll() is None, log.read_text()[-2000:]
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)  # no shutdown handler runs
        server.wait()
    finally:
        if server.poll() is None:
            server.kill()
    assert _job_status(state, job.id) == "running"
    assert not (run_dir / "adapter").exists()
    done_before = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")
                      if (p / "trainer_state.pt").is_file())
    assert done_before < 24  # killed mid-job
    # the worker died with its server: nobody holds the run folder's lock (no orphan trains on)
    deadline = time.monotonic() + 10
    with open(run_dir / ".lock", "w") as lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "the worker outlived its killed server"
                time.sleep(0.1)
        fcntl.flock(lock, fcntl.LOCK_UN)

    server = start_cli_server(serve_env["base_dir"], state, port, log, "--max-concurrent-jobs", "2")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        assert client.files.retrieve(file.id).status == "processed"  # the upload survived
        # the same job, uninterrupted, beside the resumed one
        reference = client.fine_tuning.jobs.create(model="tiny-base", training_file=file.id,
                                                   seed=11, hyperparameters=hp,
                                                   extra_body={"lorakit": opts})
        resumed = wait_job(client, job.id)
        reference = wait_job(client, reference.id)
        assert resumed.status == reference.status == "succeeded", (resumed.error, reference.error)
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=200)]
        assert any("server restarted" in m for m in events)
        assert any(m.startswith(f"resumed from {run_dir / 'checkpoints'}") for m in events)
        reply = client.chat.completions.create(model=resumed.fine_tuned_model, max_tokens=3,
                                               messages=[{"role": "user", "content": "hi"}])
        assert reply.usage.completion_tokens >= 1
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    a = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(state / "jobs" / reference.id / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # and training moved the weights: the comparison is not between two untouched adapters
    assert max(float(v.abs().max()) for k, v in a.items() if "lora_B" in k) > 0
    # a restart serves finished adapters again (nothing lost)
    server = start_cli_server(serve_env["base_dir"], state, port, log)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=60)
        served = {m.id for m in client.models.list()}
        assert {resumed.fine_tuned_model, reference.fine_tuned_model} <= served
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
