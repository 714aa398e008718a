"""The few-shot prompt baseline: selection, rendering against the chat template, no eval leakage,
and the base-<K>shot row in lorakit eval's JSON and report."""

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.eval import fewshot


def _records(rows):
    return [{"prompt": p, "completion": c} for p, c in rows]


TRAIN = _records([
    ("What is the capital of France?", "Paris"),
    ("Name the colour number 1.", "green"),          # also an eval question (below)
    ("How many legs does a spider have?", "Eight"),
    ("What is the capital of Spain?", "Madrid"),
    ("name the COLOUR number 2!", "blue"),            # the eval question, differently written
    ("How many legs does a dog have?", "Four"),
    ("Translate 'cat' into German.", "Katze"),
])


def test_similar_picks_the_nearest_neighbours():
    shots, _ = fewshot.load_shots(TRAIN)
    questions = ["What is the capital of Italy?", "How many legs does an ant have?"]
    picked = fewshot.select_shots(shots, questions, 2, "similar")
    prompts = [[shots[i].prompt for i in row] for row in picked]
    assert set(prompts[0]) == {"What is the capital of France?", "What is the capital of Spain?"}
    assert set(prompts[1]) == {"How many legs does a spider have?", "How many legs does a dog have?"}
    # the nearest is placed last, right before the question
    sims = fewshot.tfidf_similarity(questions[:1], [s.prompt for s in shots])[0]
    assert sims[picked[0][-1]] >= sims[picked[0][0]]


def test_tfidf_matches_scikit_learn():
    import random

    from sklearn.feature_extraction.text import TfidfVectorizer  # the reference (dev extra)

    rng = random.Random(0)
    words = [f"w{i}" for i in range(30)]
    generated = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) for _ in range(200)]
    for docs, queries in (([s["prompt"] for s in TRAIN], ["capital of Italy", "legs of an ant", "colour"]),
                          (generated, generated[:20] + ["w1 w2 w3", "nothing known"])):
        vec = TfidfVectorizer(ngram_range=(1, 2), token_pattern=r"(?u)[^\W_]+")
        ref = (vec.fit(docs).transform(queries) @ vec.transform(docs).T).toarray()
        assert fewshot.tfidf_similarity(queries, docs) == pytest.approx(ref, abs=1e-9)


def test_first_and_random_selection():
    shots, _ = fewshot.load_shots(TRAIN)
    assert fewshot.select_shots(shots, ["a", "b"], 3, "first") == [[0, 1, 2], [0, 1, 2]]
    one = fewshot.select_shots(shots, ["a"] * 5, 3, "random", seed=4)
    assert one == fewshot.select_shots(shots, ["a"] * 5, 3, "random", seed=4)
    assert all(len(set(r)) == 3 for r in one) and len({tuple(r) for r in one}) > 1


def test_eval_questions_are_never_shots():
    eval_prompts = ["Name the colour number 1.", "Name the colour number 2."]
    shots, excluded = fewshot.load_shots(TRAIN, exclude=eval_prompts)
    assert excluded == 2
    keys = {fewshot.prompt_key(p) for p in eval_prompts}
    assert all(fewshot.prompt_key(s.prompt) not in keys for s in shots)
    # even when similarity would pick them first
    picked = fewshot.select_shots(shots, eval_prompts, len(shots), "similar")
    for row in picked:
        assert all(fewshot.prompt_key(shots[i].prompt) not in keys for i in row)


def test_kshot_rendering_is_the_chat_template(smol_tokenizer):
    from lorakit.eval.generate import render_prompts

    shots, _ = fewshot.load_shots(TRAIN)
    question = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of Italy?"}]
    messages = fewshot.fewshot_messages(question, shots[:2])
    expected = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "Paris"},
                {"role": "user", "content": "Name the colour number 1."},
                {"role": "assistant", "content": "green"},
                {"role": "user", "content": "What is the capital of Italy?"}]
    assert messages == expected
    prompt = fewshot.fewshot_prompt(smol_tokenizer, messages)
    text = render_prompts(smol_tokenizer, [prompt])[0]  # what generate_batch encodes
    ids = smol_tokenizer(text, add_special_tokens=False)["input_ids"]
    ref = smol_tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=True)
    ref = list(ref["input_ids"] if hasattr(ref, "keys") else ref)
    assert ids == ref


def test_kshot_without_template_is_prefixed_pairs(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = None
    shots, _ = fewshot.load_shots(TRAIN)
    messages = fewshot.fewshot_messages([{"role": "user", "content": "Q?"}], shots[:2])
    eos = tok.eos_token
    assert fewshot.fewshot_prompt(tok, messages) == (
        f"What is the capital of France?Paris{eos}Name the colour number 1.green{eos}Q?")


@pytest.fixture(scope="module")
def fewshot_run(eval_base_dir, eval_adapters, eval_data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fewshot")
    train = folder / "train.jsonl"
    rows = TRAIN + _records([(f"Name the colour number {i}.", "x") for i in range(6)])  # eval qs
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, train


def test_eval_adds_the_kshot_row(fewshot_run, eval_adapters, eval_data, capsys):
    folder, train = fewshot_run
    out = folder / "out"
    code = main(["eval", "--adapter", str(eval_adapters / "rand"), "--data", str(eval_data / "eval.jsonl"),
                 "--few-shot", "2", "--few-shot-data", str(train), "--few-shot-select", "similar",
                 "--max-new-tokens", "4", "--no-forgetting", "--no-safety", "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert list(summary["models"]) == ["base", "base-2shot", "rand"]
    assert set(summary["models"]["base-2shot"]) == set(summary["models"]["base"])
    assert summary["models"]["base-2shot"]["loss"] != summary["models"]["base"]["loss"]
    assert summary["models"]["rand"]["vs_prompt"]["baseline"] in ("base", "base-2shot")
    assert "prompt baseline" in summary["verdict"]
    results = json.loads((out / "results.json").read_text())
    train_lines = {i + 1: r["prompt"] for i, r in enumerate(json.loads(l) for l in train.read_text().splitlines())}
    eval_keys = {fewshot.prompt_key(ex["prompt"]) for ex in results["examples"]}
    for ex in results["examples"]:
        assert len(ex["shots"]) == 2
        assert all(fewshot.prompt_key(train_lines[line]) not in eval_keys for line in ex["shots"])
    md = (out / "report.md").read_text()
    assert "base-2shot" in md and "Fine-tuning vs prompting" in md


def test_few_shot_needs_a_source(eval_adapters, eval_data, capsys):
    code = main(["eval", "--adapter", str(eval_adapters / "rand"), "--data", str(eval_data / "eval.jsonl"),
                 "--few-shot", "2", "--no-forgetting", "--no-safety", "--json"])
    assert code != 0
    assert "--few-shot-data" in capsys.readouterr().err


def _result(flagged: bool):
    base = {"score": 0.2, "score_ci": [0.0, 0.4], "scores": {"exact": 0.2}, "loss": 1.0, "perplexity": 2.7}
    tuned = {**base, "score": 0.6, "wins": 2, "ties": 3, "losses": 0, "delta": 0.4, "delta_ci": [0.1, 0.7]}
    return {"metric": "exact", "model": "m", "examples_count": 5, "examples": [],
            "models": {"base": base, "run": tuned}, "adapters": ["run"],
            "forgetting": {"run": {"kl": 0.3 if flagged else 0.01, "ppl_delta": 1.0,
                                   "ppl_delta_pct": 30.0 if flagged else 1.0, "flagged": flagged}},
            "safety": {}, "thresholds": {"kl": 0.1, "ppl_increase_pct": 10.0, "refusal_drop": 0.1}}


def test_flagged_forgetting_names_the_remedies_with_real_config_keys(tmp_path):
    from lorakit.config import load_config
    from lorakit.eval.compare import format_table
    from lorakit.eval.report import REMEDIES, remedies, write_markdown

    assert remedies(_result(False)) == []
    assert remedies(_result(True)) == list(REMEDIES)
    md = write_markdown(_result(True), tmp_path / "r.md", {}).read_text()
    table = format_table(_result(True))
    for key, value in (("data.replay.fraction", "0.1"), ("train.lr", "1e-4"), ("lora.r", "8"),
                       ("lora.target_modules", "[q_proj,v_proj]"), ("train.epochs", "1")):
        assert key in md and key in table
        load_config(overrides=[f"{key}={value}"])  # each named key is a real config key
    assert "Remedies" not in write_markdown(_result(False), tmp_path / "ok.md", {}).read_text()


def test_run_config_default_is_three_shots_from_data_train():
    from lorakit.config import load_config

    assert fewshot.config_few_shot(load_config(overrides=["data.train=t.jsonl"])) == \
        {"few_shot": 3, "few_shot_data": "t.jsonl", "few_shot_select": "similar"}
    assert fewshot.config_few_shot(load_config())["few_shot"] == 0
    assert fewshot.config_few_shot(load_config(overrides=["data.train=t.jsonl", "eval.few_shot=0"]))["few_shot"] == 0
