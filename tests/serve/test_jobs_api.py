"""The files + fine-tuning jobs API, driven with the official ``openai`` client against a real
server (uvicorn on loopback) over a tiny Llama with the SmolLM2 tokenizer. Two API keys with
different owners check isolation. Jobs really train, in worker processes."""

import json
import time
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file
from service_helpers import (bad_rows_text, dpo_rows, running_service, sft_rows, wait_job,
                             write_jsonl)

ALICE, BOB = "sk-alice", "sk-bob"


@pytest.fixture(scope="module")
def service(serve_env, tmp_path_factory):
    data = tmp_path_factory.mktemp("jobs-data")
    files = {"train": write_jsonl(data / "train.jsonl", sft_rows(24)),
             "valid": write_jsonl(data / "valid.jsonl", sft_rows(4, start=100)),
             "pairs": write_jsonl(data / "pairs.jsonl", dpo_rows(12))}
    (data / "bad.jsonl").write_text(bad_rows_text())
    files["bad"] = data / "bad.jsonl"
    with running_service(serve_env["base_dir"], tmp_path_factory.mktemp("jobs-state"),
                         api_keys={ALICE: "alice", BOB: "bob"}, ui=False,
                         max_concurrent=2) as running:
        yield {**running, "files": files, "base_dir": serve_env["base_dir"]}


def _client(service, key):
    return openai.OpenAI(base_url=service["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def alice(service):
    return _client(service, ALICE)


@pytest.fixture(scope="module")
def bob(service):
    return _client(service, BOB)


@pytest.fixture(scope="module")
def sft_job(service, alice):
    """Alice's finished SFT job (with a validation file, so it also writes an eval report)."""
    train = alice.files.create(file=open(service["files"]["train"], "rb"), purpose="fine-tune")
    valid = alice.files.create(file=open(service["files"]["valid"], "rb"), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(
        model="tiny-base", training_file=train.id, validation_file=valid.id, suffix="digits",
        seed=7, hyperparameters={"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 20},
        extra_body={"lorakit": {"lora_r": 4, "checkpoint_every": 2, "eval_limit": 4}})
    created_status = job.status
    job = wait_job(alice, job.id)
    return {"job": job, "created_status": created_status, "train": train, "valid": valid}


def test_bad_file_is_rejected_with_line_numbers(service, alice):
    with pytest.raises(openai.BadRequestError) as err:
        alice.files.create(file=open(service["files"]["bad"], "rb"), purpose="fine-tune")
    message = err.value.body["message"]
    assert "bad.jsonl:2: prompt" in message and "bad.jsonl:3" in message
    assert "bad.jsonl:1" not in message and "bad.jsonl:4" not in message
    assert all(f.filename != "bad.jsonl" for f in alice.files.list())
    with pytest.raises(openai.BadRequestError, match="purpose"):
        alice.files.create(file=open(service["files"]["train"], "rb"), purpose="assistants")


def test_file_objects_and_content(service, alice):
    uploaded = alice.files.create(file=open(service["files"]["train"], "rb"), purpose="fine-tune")
    assert uploaded.id.startswith("file-") and uploaded.status == "processed"
    assert uploaded.bytes == service["files"]["train"].stat().st_size
    assert alice.files.retrieve(uploaded.id).filename == "train.jsonl"
    assert alice.files.content(uploaded.id).read() == service["files"]["train"].read_bytes()
    assert uploaded.id in [f.id for f in alice.files.list(purpose="fine-tune")]
    deleted = alice.files.delete(uploaded.id)
    assert deleted.deleted and deleted.id == uploaded.id
    with pytest.raises(openai.NotFoundError):
        alice.files.retrieve(uploaded.id)


def test_sft_job_succeeds_and_is_served_at_once(service, alice, sft_job):
    job = sft_job["job"]
    assert sft_job["created_status"] == "validating_files"
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:tiny-base:digits:{job.id[len('ftjob-'):][:12]}"
    assert job.trained_tokens > 0 and job.seed == 7 and job.hyperparameters.n_epochs == 2
    assert job.method.type == "supervised"
    # it is in /v1/models and the engine serves the run's own adapter folder
    assert job.fine_tuned_model in [m.id for m in alice.models.list()]
    run_dir = service["manager"].root / "jobs" / job.id
    assert service["engine"].adapters()[job.fine_tuned_model] == (run_dir / "adapter").resolve()
    # chat with it equals PEFT applying the same adapter file to the base (greedy)
    messages = [{"role": "user", "content": "Spell the digit 3 (3)"}]
    reply = alice.chat.completions.create(model=job.fine_tuned_model, messages=messages,
                                          max_tokens=8, temperature=0)
    assert reply.choices[0].message.content == _peft_greedy(service, run_dir / "adapter",
                                                            messages, 8)
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items())  # it trained


def _peft_greedy(service, adapter_dir: Path, messages, max_new_tokens: int) -> str:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(service["base_dir"])
    model = AutoModelForCausalLM.from_pretrained(service["base_dir"], dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    out = model.generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(service["engine"].eos_ids), pad_token_id=0)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t not in service["engine"].eos_ids]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_events_checkpoints_and_eval_report(service, alice, sft_job):
    job = sft_job["job"]
    events = list(alice.fine_tuning.jobs.list_events(job.id, limit=100))
    assert events[0].created_at >= events[-1].created_at  # newest first
    messages = [e.message for e in events]
    assert messages[-1].startswith("Validating training file") and \
        messages[0] == "The job has successfully completed"
    metrics = sorted((e.data["step"], e.data["train_loss"]) for e in events if e.type == "metrics")
    total = json.loads((service["manager"].root / "jobs" / job.id / "summary.json").read_text())
    assert [s for s, _ in metrics] == list(range(1, total["steps"] + 1))
    recorded = [json.loads(line) for line in
                (service["manager"].root / "jobs" / job.id / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["loss"] for r in recorded if "loss" in r} == dict(metrics)
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    steps = [c.step_number for c in checkpoints]
    assert steps == sorted(steps, reverse=True) and steps[0] == total["steps"] and \
        all(s % 2 == 0 for s in steps)
    assert checkpoints[0].fine_tuned_model_checkpoint == \
        f"{job.fine_tuned_model}:ckpt-step-{steps[0]}"
    assert checkpoints[0].metrics.train_loss == dict(metrics)[steps[0]]
    report = service["manager"].root / "jobs" / job.id / "eval" / "report.html"
    assert report.is_file() and job.fine_tuned_model in report.read_text()


def test_owner_isolation(service, alice, bob, sft_job):
    job = sft_job["job"]
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.checkpoints.list(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.cancel(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.retrieve(sft_job["train"].id)
    with pytest.raises(openai.NotFoundError):
        bob.files.delete(sft_job["train"].id)
    with pytest.raises(openai.NotFoundError):  # using alice's file for a job
        bob.fine_tuning.jobs.create(model="tiny-base", training_file=sft_job["train"].id)
    assert job.id not in [j.id for j in bob.fine_tuning.jobs.list()]
    assert sft_job["train"].id not in [f.id for f in bob.files.list()]
    assert job.fine_tuned_model not in [m.id for m in bob.models.list()]
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=job.fine_tuned_model, max_tokens=2,
                                    messages=[{"role": "user", "content": "hi"}])
    assert job.id in [j.id for j in alice.fine_tuning.jobs.list()]
    with pytest.raises(openai.AuthenticationError):
        _client(service, "sk-nobody").fine_tuning.jobs.list()


def test_error_cases(service, alice, sft_job):
    train = sft_job["train"].id
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        alice.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=train)
    with pytest.raises(openai.NotFoundError):
        alice.fine_tuning.jobs.retrieve("ftjob-doesnotexist")
    with pytest.raises(openai.NotFoundError, match="training_file"):
        alice.fine_tuning.jobs.create(model="tiny-base", training_file="file-nope")
    with pytest.raises(openai.BadRequestError, match="preference pairs"):
        alice.fine_tuning.jobs.create(model="tiny-base", training_file=train,
                                      method={"type": "dpo"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        alice.fine_tuning.jobs.create(model="tiny-base", training_file=train,
                                      hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.BadRequestError, match="did you mean 'lora_r'"):
        alice.fine_tuning.jobs.create(model="tiny-base", training_file=train,
                                      extra_body={"lorakit": {"lora_rank": 8}})
    with pytest.raises(openai.BadRequestError, match="already succeeded"):
        alice.fine_tuning.jobs.cancel(sft_job["job"].id)
    assert len(alice.fine_tuning.jobs.list().data) >= 1  # none of the bad requests made a job
    assert all(j.training_file != "file-nope" for j in alice.fine_tuning.jobs.list())


def test_cancel_stops_within_a_step_and_keeps_the_checkpoint(service, alice):
    train = alice.files.create(file=open(service["files"]["train"], "rb"), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(
        model="tiny-base", training_file=train.id, seed=1,
        hyperparameters={"batch_size": 1, "n_epochs": 50},
        extra_body={"lorakit": {"lora_r": 4, "checkpoint_every": 100000}})
    deadline = time.monotonic() + 240
    while not any(e.type == "metrics" for e in alice.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() < deadline, "the job never ran a step"
        time.sleep(0.1)
    cancelled = alice.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    manager = service["manager"]
    deadline = time.monotonic() + 120
    while job.id in manager._procs:  # the worker finishes its step, checkpoints and exits
        assert time.monotonic() < deadline, "the worker did not stop"
        time.sleep(0.1)
    run_dir = manager.root / "jobs" / job.id
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    checkpoints = alice.fine_tuning.jobs.checkpoints.list(job.id).data
    # the only checkpoint is the stop checkpoint, at the last step run: nothing ran after it
    assert [c.step_number for c in checkpoints] == [max(steps)] and max(steps) < 24 * 50
    assert (run_dir / "checkpoints" / f"step-{max(steps)}" / "adapter").is_dir()
    assert not (run_dir / "adapter").exists()
    final = alice.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    assert any(e.message.startswith("Training stopped at step")
               for e in alice.fine_tuning.jobs.list_events(job.id))


def test_dpo_job(service, alice):
    pairs = alice.files.create(file=open(service["files"]["pairs"], "rb"), purpose="fine-tune")
    job = alice.fine_tuning.jobs.create(
        model="tiny-base", training_file=pairs.id, suffix="pref", seed=3,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 1,
                                                           "batch_size": 4}}},
        extra_body={"lorakit": {"lora_r": 4}})
    job = wait_job(alice, job.id)
    assert job.status == "succeeded", job.error
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.25
    run_dir = service["manager"].root / "jobs" / job.id
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["method"] == "dpo" and summary["beta"] == 0.25 and summary["steps"] == 3
    metrics = [e for e in alice.fine_tuning.jobs.list_events(job.id, limit=100)
               if e.type == "metrics"]
    assert len(metrics) == 3 and all("rewards/accuracy" in e.data for e in metrics)
    assert job.fine_tuned_model in [m.id for m in alice.models.list()]
    reply = alice.chat.completions.create(model=job.fine_tuned_model, max_tokens=4,
                                          messages=[{"role": "user", "content": "Spell 4"}])
    assert reply.model == job.fine_tuned_model and reply.usage.completion_tokens >= 1
