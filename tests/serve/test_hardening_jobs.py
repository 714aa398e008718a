"""Issue 19, the fine-tuning service: hostile uploads and hyperparameters are clean 400s that
leave nothing behind, a bad stored record never breaks a listing, and the web UI's forms are
protected against cross-site requests (session id cookie, CSRF token, Origin check)."""

import json
import re
import time

import httpx
import openai
import pytest
from service_helpers import running_service, sft_rows, write_jsonl

ALICE, BOB = "sk-alice", "sk-bob"


@pytest.fixture(scope="module")
def service(serve_env, tmp_path_factory):
    good = write_jsonl(tmp_path_factory.mktemp("hard-data") / "train.jsonl", sft_rows(8))
    with running_service(serve_env["base_dir"], tmp_path_factory.mktemp("hard-state"),
                         api_keys={ALICE: "alice", BOB: "bob"}) as running:
        yield {**running, "good": good}


def _client(service, key=ALICE):
    return openai.OpenAI(base_url=service["url"] + "/v1", api_key=key, max_retries=0, timeout=120)


def _leftovers(service):
    return [p.name for p in (service["state"] / "files").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("name, line", [
    ("deep.jsonl", '{"prompt": ' + "[" * 50000 + "]" * 50000 + ', "completion": "x"}'),
    ("surrogate.jsonl", '{"prompt": "bad \\ud800 char", "completion": "x"}'),
    ("list_first.jsonl", '[{"prompt": "a", "completion": "b"}]'),
    ("huge_number.jsonl", '{"prompt": "a", "completion": "b", "x": 1e999}'),
])
def test_hostile_uploads_are_clean_400s(service, name, line):
    alice, bob = _client(service), _client(service, BOB)
    before = {f.id for f in bob.files.list().data}
    good = "".join(json.dumps(r) + "\n" for r in sft_rows(3))
    with pytest.raises(openai.BadRequestError) as err:
        alice.files.create(file=(name, (good + line + "\n").encode()), purpose="fine-tune")
    assert name in str(err.value) and ":4" in str(err.value)  # file and line named
    assert _leftovers(service) == []
    # the other owner, and the same owner's next good upload, are unaffected
    assert {f.id for f in bob.files.list().data} == before
    ok = alice.files.create(file=open(service["good"], "rb"), purpose="fine-tune")
    assert ok.status == "processed"


def test_upload_over_the_limit_is_413_and_leaves_nothing(service, monkeypatch):
    monkeypatch.setattr(service["app"].state.limits, "max_upload_bytes", 4096)
    big = "".join(json.dumps(r) + "\n" for r in sft_rows(200)).encode()
    assert len(big) > 4096
    headers = {"Authorization": f"Bearer {ALICE}"}

    r = httpx.post(service["url"] + "/v1/files", headers=headers, timeout=60,
                   files={"file": ("big.jsonl", big)}, data={"purpose": "fine-tune"})
    assert r.status_code == 413
    boundary = "lorakitboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
            f"fine-tune\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.jsonl\"\r\n\r\n").encode() + big \
        + f"\r\n--{boundary}--\r\n".encode()
    # an iterator body is sent chunked (no Content-Length): counted while it streams in
    r = httpx.post(service["url"] + "/v1/files", timeout=60,
                   content=iter([body[:2048], body[2048:]]),
                   headers={**headers, "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413
    assert _leftovers(service) == []
    monkeypatch.undo()
    assert _client(service).files.create(file=open(service["good"], "rb"),
                                         purpose="fine-tune").status == "processed"


@pytest.mark.parametrize("options, field", [
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"lora_r": 10**6}, "lora_r"),
    ({"lora_r": float("inf")}, "lora_r"),
    ({"lora_dropout": float("nan")}, "lora_dropout"),
    ({"lora_dropout": 1.5}, "lora_dropout"),
    ({"max_steps": 10**12}, "max_steps"),
    ({"max_length": 2.5}, "max_length"),
    ({"beta": float("inf")}, "beta"),
])
def test_bad_hyperparameters_are_refused_at_create(service, options, field):
    alice = _client(service)
    train = alice.files.create(file=open(service["good"], "rb"), purpose="fine-tune").id
    before = len(alice.fine_tuning.jobs.list().data)
    payload = json.dumps({"model": "tiny-base", "training_file": train, "lorakit": options})
    r = httpx.post(service["url"] + "/v1/fine_tuning/jobs", content=payload, timeout=60,
                   headers={"Authorization": f"Bearer {ALICE}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400 and field in r.json()["error"]["message"]
    payload = json.dumps({"model": "tiny-base", "training_file": train,
                          "hyperparameters": {"learning_rate_multiplier": float("nan")}})
    r = httpx.post(service["url"] + "/v1/fine_tuning/jobs", content=payload, timeout=60,
                   headers={"Authorization": f"Bearer {ALICE}",
                            "Content-Type": "application/json"})
    assert r.status_code == 400
    assert len(alice.fine_tuning.jobs.list().data) == before


def test_a_bad_stored_record_does_not_break_the_listing(service):
    """A row stored by an older version with NaN in it: the owner's listing still answers."""
    store = service["manager"].store
    alice = _client(service)
    row = {"id": "ftjob-badrecord0000", "owner": "alice", "model": "tiny-base",
           "base_model": "x", "training_file": "file-x", "validation_file": None,
           "suffix": None, "seed": 1, "method": json.dumps({"type": "supervised"}),
           "hyperparameters": json.dumps({"n_epochs": 3, "batch_size": float("nan"),
                                          "learning_rate_multiplier": float("inf")}),
           "lorakit": '{"lora_alpha": NaN', "metadata": None, "status": "failed",
           "created_at": int(time.time()), "run_dir": str(service["state"] / "jobs" / "x")}
    store.add_job(row)
    jobs = {j.id: j for j in alice.fine_tuning.jobs.list().data}
    assert jobs["ftjob-badrecord0000"].hyperparameters.batch_size is None
    assert alice.fine_tuning.jobs.retrieve("ftjob-badrecord0000").status == "failed"


# ---------------------------------------------------------------------- the UI
def _login(service, **headers):
    return httpx.post(service["url"] + "/ui/login", data={"key": ALICE}, timeout=30,
                      headers={"Origin": service["url"], **headers})


def _csrf(html: str) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', html).group(1)


def test_ui_session_cookie_holds_no_key(service):
    r = _login(service)
    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert ALICE not in cookie and "httponly" in cookie.lower()
    assert "secure" not in cookie.lower()  # plain http
    sid = r.cookies["lorakit_session"]
    assert len(sid) >= 32
    tls = _login(service, **{"X-Forwarded-Proto": "https"})  # loopback is a trusted proxy here
    assert "secure" in tls.headers["set-cookie"].lower()
    assert httpx.get(service["url"] + "/ui", cookies={"lorakit_session": sid}).status_code == 200
    forged = httpx.get(service["url"] + "/ui", cookies={"lorakit_session": "forged"})
    assert forged.status_code == 401
    httpx.get(service["url"] + "/ui/logout", cookies={"lorakit_session": sid})
    assert httpx.get(service["url"] + "/ui", cookies={"lorakit_session": sid}).status_code == 401


def test_ui_forms_refuse_cross_site_requests(service):
    alice = _client(service)
    train = alice.files.create(file=open(service["good"], "rb"), purpose="fine-tune").id
    cookies = {"lorakit_session": _login(service).cookies["lorakit_session"]}
    page = httpx.get(service["url"] + "/ui", cookies=cookies)
    token = _csrf(page.text)
    before = len(alice.fine_tuning.jobs.list().data)
    form = {"training_file": train, "n_epochs": "1", "max_steps": "1"}
    url = service["url"] + "/ui/jobs"
    attempts = [
        ({"Origin": "http://evil.example"}, {**form, "csrf_token": token}),  # foreign origin
        ({}, {**form, "csrf_token": token}),  # neither Origin nor Referer
        ({"Origin": service["url"]}, form),  # no token
        ({"Origin": service["url"]}, {**form, "csrf_token": "x" * 43}),  # wrong token
        ({"Referer": "http://evil.example/page"}, {**form, "csrf_token": token}),
    ]
    for headers, data in attempts:
        r = httpx.post(url, data=data, headers=headers, cookies=cookies, timeout=30)
        assert r.status_code == 403, (headers, r.status_code)
    assert len(alice.fine_tuning.jobs.list().data) == before  # nothing was created
    r = httpx.post(service["url"] + "/ui/login", data={"key": ALICE},
                   headers={"Origin": "http://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers
    ok = httpx.post(url, data={**form, "csrf_token": token}, cookies=cookies, timeout=30,
                    headers={"Origin": service["url"]})
    assert ok.status_code == 303 and "/ui/jobs/ftjob-" in ok.headers["location"]
    job_id = ok.headers["location"].rsplit("/", 1)[-1]
    r = httpx.post(service["url"] + f"/ui/jobs/{job_id}/cancel", cookies=cookies, timeout=30,
                   data={"csrf_token": token}, headers={"Origin": service["url"]})
    assert r.status_code == 303
    assert alice.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
