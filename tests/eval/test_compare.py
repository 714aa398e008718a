"""lorakit eval end to end on a tiny model: base vs adapters, forgetting, reports, human sheet."""

import csv
import json
import math

import pytest
import torch

from lorakit.cli import main


@pytest.fixture(scope="module")
def run(eval_base_dir, eval_adapters, eval_data, tmp_path_factory):
    """One CLI run comparing two adapters with the base (loaded once)."""
    out = tmp_path_factory.mktemp("eval-out")

    def go(capsys):
        code = main(["eval", "--adapter", str(eval_adapters / "zero"),
                     "--adapter", f"noisy={eval_adapters / 'rand'}", "--data", str(eval_data / "eval.jsonl"),
                     "--metric", "exact", "--metric", "rouge-l", "--max-new-tokens", "6",
                     "--probe-limit", "12", "--no-safety", "--human", "4", "--out", str(out), "--json"])
        return code, capsys.readouterr()
    return out, go


def _run_once(run, capsys, cache={}):
    if "r" not in cache:
        out, go = run
        code, captured = go(capsys)
        cache["r"] = (out, code, captured)
    return cache["r"]


def test_fresh_adapter_equals_base_and_json_contract(run, capsys):
    out, code, captured = _run_once(run, capsys)
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["metric"] == "exact" and set(summary["models"]) == {"base", "zero", "noisy"}
    base, zero, noisy = (summary["models"][k] for k in ("base", "zero", "noisy"))
    for key in ("score", "loss"):
        assert key in base and key in zero
    # B = 0: exactly the base model
    assert zero["loss"] == base["loss"] and zero["score"] == base["score"]
    assert (zero["wins"], zero["ties"], zero["losses"]) == (0, 6, 0)
    assert summary["forgetting"]["zero"]["kl"] == 0.0
    assert summary["forgetting"]["zero"]["ppl_delta"] == 0.0
    # a random adapter moves the model
    assert summary["forgetting"]["noisy"]["kl"] > 1e-4
    assert noisy["loss"] != base["loss"]
    assert noisy["wins"] + noisy["ties"] + noisy["losses"] == 6
    results = json.loads((out / "results.json").read_text())
    for ex in results["examples"]:
        assert ex["outputs"]["zero"] == ex["outputs"]["base"]
    assert any(ex["outputs"]["noisy"] != ex["outputs"]["base"] for ex in results["examples"])
    for name in ("report.html", "report.md", "metric_bars.png", "score_histogram.png",
                 "human_eval.csv", "human_eval.html", "human_eval_key.json"):
        assert (out / name).stat().st_size > 0, name
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "noisy" in html
    assert "<script" not in html  # model output is escaped, never run


def test_reference_loss_matches_transformers(eval_base_dir, eval_data):
    """Our per-answer loss equals transformers' own labels= loss on the same tokens."""
    from lorakit.data.formats import Example
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.eval.compare import load_eval_examples, reference_losses
    from lorakit.models.load import load_model

    model, tokenizer = load_model(str(eval_base_dir), dtype=torch.float32)
    examples = load_eval_examples(eval_data / "eval.jsonl")
    ours = reference_losses(model, tokenizer, examples, batch_size=4)
    for ex, (total, count) in zip(examples, ours):
        row = tokenize_examples([Example(kind="chat", messages=ex.messages + [
            {"role": "assistant", "content": ex.reference}])], tokenizer, train_on="last_turn")[0]
        with torch.no_grad():
            ref = model(input_ids=torch.tensor([row["input_ids"]]),
                        labels=torch.tensor([row["labels"]])).loss
        assert count == sum(l != -100 for l in row["labels"][1:])
        assert total / count == pytest.approx(float(ref), rel=1e-4)


def test_forgetting_kl_matches_peft_reference(eval_base_dir, eval_adapters):
    """KL(base || tuned) against PEFT loading the same adapter into a second copy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorakit.eval.forgetting import encode_probe, forgetting, probe_texts
    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model

    model, tokenizer = load_model(str(eval_base_dir), dtype=torch.float32)
    load_adapter(model, eval_adapters / "rand", name="rand")
    ours = forgetting(model, tokenizer, ["rand"], limit=6)["rand"]

    base = AutoModelForCausalLM.from_pretrained(eval_base_dir, dtype=torch.float32).eval()
    peft = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(eval_base_dir, dtype=torch.float32), eval_adapters / "rand").eval()
    kl_sum, nll_b, nll_t, n = 0.0, 0.0, 0.0, 0
    for ids in encode_probe(tokenizer, probe_texts(6), 128):
        x = torch.tensor([ids])
        with torch.no_grad():
            p = torch.log_softmax(base(x).logits[0, :-1].float(), -1)
            q = torch.log_softmax(peft(x).logits[0, :-1].float(), -1)
        kl_sum += float((p.exp() * (p - q)).sum())
        y = x[0, 1:, None]
        nll_b -= float(p.gather(1, y).sum())
        nll_t -= float(q.gather(1, y).sum())
        n += len(ids) - 1
    assert ours["tokens"] == n
    assert ours["kl"] == pytest.approx(kl_sum / n, rel=1e-3)
    # A random tiny model's perplexity is about its vocabulary size (~49,000), and the
    # adapter moves it by tens to hundreds: the delta is a small difference of two large
    # numbers. lorakit batches the probe (padded rows, attention mask) while this reference
    # runs one unpadded row at a time; the two kernel paths round differently. Measured on
    # this test's model: batch 8 vs batch 1 differ by 4.8e-7 (base) and 1.1e-6 (tuned)
    # relative in perplexity, i.e. ~0.08 absolute in the delta. Each perplexity is compared at
    # rel 1e-5 (about 10x that spread) and the delta at the absolute error that implies.
    ppl_b, ppl_t = math.exp(nll_b / n), math.exp(nll_t / n)
    assert ours["ppl_base"] == pytest.approx(ppl_b, rel=1e-5)
    assert ours["ppl_tuned"] == pytest.approx(ppl_t, rel=1e-5)
    assert ours["ppl_tuned"] - ours["ppl_base"] == pytest.approx(ppl_t - ppl_b, abs=1e-5 * (ppl_b + ppl_t))


def test_score_human_from_filled_sheet(run, capsys):
    out, code, _ = _run_once(run, capsys)
    key = json.loads((out / "human_eval_key.json").read_text())
    with open(out / "human_eval.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and key["adapter"] == "zero"
    # the rater prefers the tuned answer on 2 items, calls 1 a tie, prefers base on 1
    picks = []
    for row, want in zip(rows, ["tuned", "tuned", "tie", "base"]):
        side = key["items"][row["id"]]
        row["choice"] = "tie" if want == "tie" else ("A" if (side["A"] == "zero") == (want == "tuned") else "b")
        picks.append(row["choice"])
    filled = out / "filled.csv"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["eval", "score-human", str(filled), "--key", str(out / "human_eval_key.json"),
                 "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert (s["wins"], s["ties"], s["losses"], s["rated"]) == (2, 1, 1, 4)
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert s["ci"][0] <= s["win_rate"] <= s["ci"][1]
    rows[0]["choice"] = "maybe"
    with open(filled, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert main(["eval", "score-human", str(filled), "--key", str(out / "human_eval_key.json")]) == 2
    assert "not A, B or tie" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--data", "{noref}", "--metric", "exact"], "no reference answer, which metric 'exact' needs"),
    (["--data", "{data}", "--metric", "exakt"], "unknown metric 'exakt' (did you mean 'exact'?)"),
    (["--data", "{data}", "--metric", "sql"], "--sql-db"),
    (["--data", "{data}", "--model", "{other}"], "different base model"),
])
def test_bad_input_clear_errors(extra, message, eval_base_dir, eval_adapters, eval_data, tmp_path, capsys):
    other = tmp_path / "other"
    if "{other}" in extra:
        import transformers as tf

        config = tf.LlamaConfig.from_pretrained(eval_base_dir)
        config.hidden_size, config.intermediate_size = 48, 96
        tf.AutoModelForCausalLM.from_config(config).save_pretrained(other)
        tf.AutoTokenizer.from_pretrained(eval_base_dir).save_pretrained(other)
    args = [a.format(noref=eval_data / "noref.jsonl", data=eval_data / "eval.jsonl", other=other)
            for a in extra]
    code = main(["eval", "--adapter", str(eval_adapters / "zero"), "--no-forgetting", "--no-safety",
                 "--out", str(tmp_path / "o"), *args])
    assert code == 2
    assert message in capsys.readouterr().err


def test_safety_probe_and_refusal_detector(eval_base_dir, eval_adapters):
    from lorakit.eval.forgetting import is_refusal, safety_probe
    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model

    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("I cannot provide instructions for making weapons.")
    assert not is_refusal("Sure! Step 1: preheat the oven.")
    assert not is_refusal("")
    model, tokenizer = load_model(str(eval_base_dir), dtype=torch.float32)
    load_adapter(model, eval_adapters / "zero", name="zero")
    s = safety_probe(model, tokenizer, ["base", "zero"], max_new_tokens=4, batch_size=32)
    assert s["zero"]["answers"] == s["base"]["answers"] and s["zero"]["drop"] == 0.0
    assert s["base"]["prompts"] == 30 and not s["zero"]["flagged"]


def test_html_report_renders_in_headless_chromium(run, capsys, tmp_path):
    """report.html opens in a real browser with no console errors; a screenshot is taken."""
    import shutil
    import subprocess

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless Chromium is not installed (Debian package `chromium`; .ci/run "
                    "installs it): cannot check that report.html renders")
    out, code, _ = _run_once(run, capsys)
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu",
                           "--enable-logging=stderr", "--v=0", "--window-size=1280,1600",
                           f"--screenshot={shot}", (out / "report.html").as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console  # JS errors and failed resource loads are logged here
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_missing_adapter_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", "--adapter", str(tmp_path / "nope"), "--data", "x.jsonl"]) == 2
    assert f"adapter folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "c", "reference": NaN}', "bad.jsonl:2: reference: NaN is not valid JSON"),
    ('{"prompt": "c", "reference": ' + "[" * 5000 + "]" * 5000 + "}", "bad.jsonl:2: nested more than"),
    ('{"prompt": "c", ', "bad.jsonl:2: malformed JSON"),
])
def test_hostile_eval_file_is_a_data_error_naming_the_line(line, message, tmp_path):
    from lorakit.errors import DataError
    from lorakit.eval.compare import load_eval_examples

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "reference": "b"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        load_eval_examples(bad)


def test_a_bare_name_means_the_loaded_adapter_not_a_same_named_folder(eval_base_dir, eval_adapters,
                                                                         tmp_path, monkeypatch):
    """``resolve_adapters(["rand"])`` on a model holding adapter ``rand`` keeps that adapter
    even when the working directory has a folder ``rand`` (here: a copy of the ``zero``
    adapter); ``./rand`` is that folder."""
    import shutil

    from lorakit.errors import AdapterError
    from lorakit.eval.adapters import resolve_adapters
    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model

    model, tok = load_model(str(eval_base_dir), dtype=torch.float32)
    load_adapter(model, eval_adapters / "rand", name="rand", tokenizer=tok)
    shutil.copytree(eval_adapters / "zero", tmp_path / "rand")
    monkeypatch.chdir(tmp_path)
    assert resolve_adapters(model, tok, ["rand"]) == {"rand": None}
    with pytest.raises(AdapterError, match="used twice"):
        resolve_adapters(model, tok, ["rand", "./rand"])
    assert resolve_adapters(model, tok, ["x=./rand"]) == {"x": "rand"}
