"""Replay against forgetting: the bundled instruction set, deterministic self-generation and
its cache, mixing at a token fraction, ``lorakit data replay``."""

import json

import pytest
import torch

from lorakit.cli import main
from lorakit.data import replay
from lorakit.data.formats import load_examples


def test_instruction_set_is_distinct_from_the_forgetting_probe():
    from lorakit.eval.fewshot import prompt_key, tfidf_similarity

    items = replay.instructions()
    assert 140 <= len(items) <= 160 and len({prompt_key(i) for i in items}) == len(items)
    probe = [json.loads(l)["text"] for l in
             (replay.INSTRUCTIONS.parents[2] / "eval" / "probe" / "general.jsonl").read_text().splitlines()]
    assert not {prompt_key(i) for i in items} & {prompt_key(p) for p in probe}
    assert tfidf_similarity(items, probe).max() < 0.8  # not even a rephrased probe item


@pytest.fixture(scope="module")
def tiny(eval_base_dir):
    """The tiny random model, with whitespace and special tokens never predicted (their tied
    embedding rows zeroed), so its greedy answers are not all blank."""
    from lorakit.models.load import load_model

    model, tokenizer = load_model(str(eval_base_dir), dtype=torch.float32)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    blank = [i for i, t in enumerate(pieces) if i < 17 or not t.replace("Ġ", "").replace("Ċ", "").strip()]
    with torch.no_grad():
        model.get_input_embeddings().weight[blank] = 0
    return model, tokenizer


def test_generation_is_greedy_deterministic_and_cached(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    one = replay.generate_replay(model, tokenizer, n=6, max_new_tokens=5)
    two = replay.generate_replay(model, tokenizer, n=6, max_new_tokens=5)
    assert one == two and len(one) > 0
    assert all(r["prompt"] in replay.instructions()[:6] for r in one)
    monkeypatch.setenv("LORAKIT_CACHE_DIR", str(tmp_path))
    records, path = replay.self_generated(model, tokenizer, max_new_tokens=3)
    assert path.is_file() and str(path).startswith(str(tmp_path))
    assert replay.instruction_set_hash() in path.name
    calls = []
    monkeypatch.setattr(replay, "generate_replay", lambda *a, **k: calls.append(1) or [])
    again, same = replay.self_generated(model, tokenizer, max_new_tokens=3)
    assert same == path and again == records and not calls  # read back, not regenerated


def test_adapters_are_off_while_generating(tiny, eval_adapters):
    from lorakit.lora.io import load_adapter

    model, tokenizer = tiny
    base = replay.generate_replay(model, tokenizer, n=4, max_new_tokens=4)
    load_adapter(model, eval_adapters / "rand", name="rand", tokenizer=tokenizer)
    try:
        assert replay.generate_replay(model, tokenizer, n=4, max_new_tokens=4) == base
    finally:
        from lorakit.lora.inject import delete_adapter

        delete_adapter(model, "rand")


def _examples(n, words):
    return load_examples([{"prompt": f"Task {i}: " + " ".join(["alpha"] * (i % 5 + 1)),
                           "completion": " ".join(["beta"] * words)} for i in range(n)]).examples


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_mixing_respects_the_token_fraction(smol_tokenizer, fraction):
    train = _examples(60, 30)
    rehearsal = load_examples([{"prompt": p, "completion": "A short general answer, about ten tokens."}
                               for p in replay.instructions()]).examples
    count = replay.token_counter(smol_tokenizer, 256)
    mixed, stats = replay.mix_replay(train, rehearsal, fraction, count, seed=3)
    assert mixed[:len(train)] == train
    added = mixed[len(train):]
    train_tokens, replay_tokens = sum(count(train)), sum(count(added))
    assert stats["replay_tokens"] == replay_tokens and stats["replay_examples"] == len(added)
    share = replay_tokens / (train_tokens + replay_tokens)
    longest = max(count(rehearsal))
    assert abs(share - fraction) <= longest / (train_tokens + replay_tokens)  # within one example
    assert replay.mix_replay(train, rehearsal, fraction, count, seed=3)[0] == mixed  # seeded


def test_mixing_cycles_a_small_replay_set_and_validates(smol_tokenizer):
    train = _examples(40, 40)
    small = _examples(3, 5)
    count = replay.token_counter(smol_tokenizer, 256)
    mixed, stats = replay.mix_replay(train, small, 0.5, count)
    assert stats["replay_examples"] > 3 and abs(stats["fraction"] - 0.5) < 0.05
    assert replay.mix_replay(train, small, 0.0, count)[0] == train
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError):
        replay.mix_replay(train, small, 1.0, count)


def test_apply_replay_with_a_user_file(smol_tokenizer, tmp_path):
    from lorakit.config import load_config

    own = tmp_path / "own.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"General question {i}?", "completion": "An answer."}) + "\n"
                           for i in range(20)))
    cfg = load_config(overrides=[f"data.replay.file={own}", "data.replay.fraction=0.2"])
    train = _examples(30, 20)
    mixed = replay.apply_replay(cfg, train, smol_tokenizer, model=None, log=lambda m: None)
    assert len(mixed) > len(train)
    assert all(ex.source[0] == str(own) for ex in mixed[len(train):])


def test_cli_makes_and_writes_the_set(eval_base_dir, tmp_path, capsys):
    out = tmp_path / "replay.jsonl"
    code = main(["data", "replay", "--model", str(eval_base_dir), "--n", "5", "--max-new-tokens", "3",
                 "--out", str(out), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert summary["records"] == len(rows) <= 5 and all(r["prompt"] in replay.instructions() for r in rows)


def test_training_mixes_replay_in(eval_base_dir, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Spell the digit {i % 10}.", "completion": w}) + "\n"
                             for i, w in enumerate(["zero", "one", "two", "three", "four"] * 6)))
    own = tmp_path / "replay.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"General question {i}?", "completion": "A general answer."})
                           + "\n" for i in range(10)))
    run = tmp_path / "run"
    args = ["train", f"model={eval_base_dir}", f"data.train={train}", f"output_dir={run}",
            "data.max_length=64", "train.batch_size=4", "train.precision=fp32", "lora.r=4",
            "train.max_steps=2", "eval.after_train=false", "data.packing=false", "--no-progress"]
    assert main(args + ["data.replay.fraction=0.3", f"data.replay.file={own}"]) == 0
    err = capsys.readouterr().err
    assert "replay:" in err and str(own) in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] > 30  # the 30 training examples and the replay ones
