"""Request log and drift: exact PSI / JS values, and the verdict on shifted traffic."""

import json
import math
import time

import pytest

from lorakit.serve.monitor import RequestLog, drift, js_divergence, parse_since, psi, reference_prompts


def test_js_divergence_exact_values():
    assert js_divergence({"a": 3, "b": 1}, {"a": 6, "b": 2}) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence({"a": 1}, {"b": 5}) == pytest.approx(1.0)  # disjoint: 1 bit
    # p = (1/2, 1/2), q = (1, 0): m = (3/4, 1/4)
    want = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) \
        + 0.5 * math.log2(1 / 0.75)
    assert js_divergence({"a": 1, "b": 1}, {"a": 2}) == pytest.approx(want)


def test_psi_by_hand():
    reference = list(range(100))  # deciles: 10 per bin
    assert psi(reference, reference) == pytest.approx(0.0, abs=1e-12)
    live = [5] * 50 + [95] * 50  # half in the first bin, half in the last
    e, a, floor = 0.1, 0.5, 1e-4
    want = 2 * (a - e) * math.log(a / e) + 8 * (floor - e) * math.log(floor / e)
    assert psi(reference, live) == pytest.approx(want)


def test_parse_since():
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("1d", now=100_000.0) == 100_000.0 - 86400
    assert parse_since("1700000000") == 1_700_000_000.0
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="--since"):
        parse_since("yesterday-ish")


@pytest.fixture(scope="module")
def reference_file(tmp_path_factory):
    words = ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"]
    rows = [{"messages": [{"role": "user", "content": f"What colour is a {w} number {i}?"},
                          {"role": "assistant", "content": "yellow"}]}
            for i, w in enumerate(words * 6)]
    path = tmp_path_factory.mktemp("ref") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, rows


def _log(path, tokenizer, prompts, adapter="a0", log_text=True):
    from lorakit.serve.monitor import _render_prompt_ids

    log = RequestLog(path, log_text=log_text, base_model="smollm2-135m-instruct")
    t0 = time.time() - 3600
    for i, messages in enumerate(prompts):
        log.log(endpoint="chat.completions", adapter=adapter,
                prompt_tokens=len(_render_prompt_ids(tokenizer, messages)), completion_tokens=3,
                latency_s=0.1, status=200, finish_reason="stop", prompt=messages,
                completion="yellow", at=t0 + 60 * i)
    return log


def test_drift_verdicts(tmp_path, reference_file, smol_tokenizer):
    path, rows = reference_file
    reference = reference_prompts(path, smol_tokenizer)
    same = [r["messages"][:1] for r in rows[::2]]
    log = _log(tmp_path / "same.db", smol_tokenizer, same)
    report = drift(log.rows(), reference, smol_tokenizer)
    assert report["verdict"] == "ok" and report["ood_share"] == 0.0
    shifted = [[{"role": "user", "content": "Translate into German, carefully and with a long "
                                            f"explanation of every grammatical choice: text {i} "
                                            "about quantum chromodynamics and gluon fields"}]
               for i in range(24)]
    log = _log(tmp_path / "shifted.db", smol_tokenizer, shifted)
    report = drift(log.rows(), reference, smol_tokenizer, windows=4)
    assert report["verdict"] == "drift"
    assert report["psi_length"] > 0.25 and report["js_tokens"] > report["thresholds"]["js_tokens"][1]
    assert report["ood_share"] == 1.0 and len(report["windows"]) == 4
    # without texts only the length measure is available
    log = _log(tmp_path / "notext.db", smol_tokenizer, shifted, log_text=False)
    report = drift(log.rows(), reference, smol_tokenizer)
    assert report["js_tokens"] is None and report["psi_length"] > 0.25


def test_drift_cli_writes_verdict_and_png(tmp_path, reference_file, smol_tokenizer, capsys):
    from lorakit.cli import main

    path, rows = reference_file
    shifted = [[{"role": "user", "content": "Please write a very long essay on the history of "
                                            f"medieval European trade routes, part {i}"}]
               for i in range(12)]
    _log(tmp_path / "log.db", smol_tokenizer, shifted)
    _log(tmp_path / "log.db", smol_tokenizer, [r["messages"][:1] for r in rows[1::2]], adapter="b")
    png = tmp_path / "drift.png"
    code = main(["monitor", "drift", "--log", str(tmp_path / "log.db"), "--reference", str(path),
                 "--adapter", "a0", "--since", "2d", "--plot", str(png), "--json"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["verdict"] == "drift" and report["requests"] == 12
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    code = main(["monitor", "drift", "--log", str(tmp_path / "missing.db"), "--reference",
                 str(path)])
    assert code == 2 and "no such request log" in capsys.readouterr().err
    code = main(["monitor", "drift", "--log", str(tmp_path / "log.db"), "--reference", str(path),
                 "--adapter", "b", "--plot", str(png)])
    text = capsys.readouterr().out
    assert code == 0 and "verdict: OK" in text and "prompt length PSI" in text
