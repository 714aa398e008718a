"""Engine behaviour that the HTTP tests cannot see directly."""

import threading

import pytest

from lorakit.serve import adapters as adapter_files
from lorakit.serve.engine import SamplingParams, _safe_length


def _ids(tokenizer, text="Count to ten."):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                        add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _concurrently(engine, jobs, params) -> list[list[int]]:
    """Each (adapter, text, _) job generated from its own thread, all at once: token ids."""
    results = [None] * len(jobs)

    def run(i):
        a, t, _ = jobs[i]
        results[i] = engine.generate(_ids(engine.tokenizer, t), a, params[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return [r["token_ids"] for r in results]


def test_hot_load_does_not_stall_generation(server, serve_env, monkeypatch):
    """While an adapter's files are being read (held open here), running requests finish."""
    engine = server["engine"]
    release, reading = threading.Event(), threading.Event()
    real_prepare = adapter_files.prepare

    def slow_prepare(path, signature):
        if path.name == "late":  # only the new adapter's read is slow (evicted ones reload)
            reading.set()
            assert release.wait(60)
        return real_prepare(path, signature)

    monkeypatch.setattr(adapter_files, "prepare", slow_prepare)
    loader = threading.Thread(target=engine.add_adapter, args=("hot", serve_env["root"] / "late"),
                              kwargs={"check_root": True})
    loader.start()
    try:
        assert reading.wait(30)
        out = engine.generate(_ids(engine.tokenizer), "a0",
                              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                              timeout=60)
        assert out["completion_tokens"] == 20 and "hot" not in engine.adapters()
    finally:
        release.set()
        loader.join(60)
    assert "hot" in engine.adapters()
    assert engine.generate(_ids(engine.tokenizer), "hot", SamplingParams(max_tokens=3, temperature=0))
    engine.remove_adapter("hot")


def test_alone_equals_mixed_at_engine_level(server):
    """Different prompt lengths (left padding), rows leaving early, adapters per row."""
    engine = server["engine"]
    tok = engine.tokenizer
    jobs = [("a0", "Hi", 3), ("a1", "A much longer question about the weather today?", 12),
            (None, "Why?", 7), ("a2", "Tell me a joke about cats and dogs", 5)]
    params = [SamplingParams(max_tokens=n, temperature=0) for *_, n in jobs]
    alone = [engine.generate(_ids(tok, t), a, p)["token_ids"] for (a, t, _), p in zip(jobs, params)]
    assert _concurrently(engine, jobs, params) == alone


def test_requests_admitted_together_prefill_in_one_forward_as_alone(server, monkeypatch):
    """Requests that arrive together are prefilled as one left-padded batch (mixed adapters,
    different prompt lengths, one finishing on its first token) and decode the tokens each
    decodes alone."""
    engine = server["engine"]
    tok = engine.tokenizer
    jobs = [("a0", "Hi", 4), ("a1", "A much longer question about the weather today?", 9),
            (None, "Why?", 1), ("a2", "Tell me a joke about cats and dogs", 6), ("a0", "Ok", 5)]
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for *_, n in jobs]
    alone = [engine.generate(_ids(tok, t), a, p)["token_ids"] for (a, t, _), p in zip(jobs, params)]
    real_admit, gate = engine._admit, threading.Event()

    def admit_when_all_wait():  # hold admission until every request is queued
        if not gate.is_set():
            with engine._lock:
                if len(engine._waiting) < len(jobs):
                    return
            gate.set()
        real_admit()

    monkeypatch.setattr(engine, "_admit", admit_when_all_wait)
    before = dict(engine.stats)
    assert _concurrently(engine, jobs, params) == alone
    assert engine.stats["prefills"] - before["prefills"] == 1  # one forward for all five
    assert engine.stats["prefill_rows"] - before["prefill_rows"] == len(jobs)


def test_prefill_groups_respect_the_token_budget(server, monkeypatch):
    from lorakit.serve.engine import Request

    engine = server["engine"]
    monkeypatch.setattr(engine, "max_prefill_tokens", 20)
    reqs = [Request([1] * n, None, SamplingParams(), lambda e: None) for n in (4, 5, 8, 30, 2)]
    groups = engine._prefill_groups(reqs)
    # 3 rows x 8 = 24 > 20: a new group at the 8-token prompt; a 30-token prompt alone
    assert [[len(r.prompt_ids) for r in g] for g in groups] == [[4, 5], [8], [30], [2]]


@pytest.mark.parametrize("text, stops, safe", [
    ("hello wor", ["world"], 6),       # "wor" may become "world": hold it back
    ("hello", ["xyz"], 5),
    ("caf\ufffd", [], 3),              # an incomplete UTF-8 character is held back
    ("ab", ["b", "abc"], 0),           # "ab" could start "abc"
])
def test_streaming_holds_back_possible_stop_prefixes(text, stops, safe):
    assert _safe_length(text, stops) == safe
