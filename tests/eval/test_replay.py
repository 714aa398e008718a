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


def _digits_and_replay(tmp_path):
    """30 tiny training examples and a 10-example replay file."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Spell the digit {i % 10}.", "completion": w}) + "\n"
                             for i, w in enumerate(["zero", "one", "two", "three", "four"] * 6)))
    own = tmp_path / "replay.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"General question {i}?", "completion": "A general answer."})
                           + "\n" for i in range(10)))
    return train, own


def test_training_mixes_replay_in(eval_base_dir, tmp_path, capsys):
    train, own = _digits_and_replay(tmp_path)
    run = tmp_path / "run"
    args = ["train", f"model={eval_base_dir}", f"data.train={train}", f"output_dir={run}",
            "data.max_length=64", "train.batch_size=4", "train.precision=fp32", "lora.r=4",
            "train.max_steps=2", "eval.after_train=false", "data.packing=false", "--no-progress"]
    assert main(args + ["data.replay.fraction=0.3", f"data.replay.file={own}"]) == 0
    err = capsys.readouterr().err
    assert "replay:" in err and str(own) in err
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_examples"] > 30  # the 30 training examples and the replay ones


def test_kl_replay_rows_carry_distill_flags_through_packing_and_collate():
    from lorakit.data.packing import collate_packed, pack_examples
    from lorakit.data.tokenize import IGNORE_INDEX, collate

    task = {"input_ids": [5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8]}
    (rep,) = replay.distill_rows([{"input_ids": [9, 10, 11], "labels": [IGNORE_INDEX, 10, 11]}])
    assert rep["labels"] == [IGNORE_INDEX] * 3 and rep["distill"] == [0, 1, 1]
    (row,) = pack_examples([task, rep], max_length=16)
    by_example = dict(zip(row["example_indices"], (slice(0, 4), slice(4, 7)) if
                          row["example_indices"] == [0, 1] else (slice(3, 7), slice(0, 3))))
    assert row["distill"][by_example[0]] == [0, 0, 0, 0]
    assert row["distill"][by_example[1]] == [0, 1, 1]  # never across the example boundary
    packed = collate_packed([row, {**row, "input_ids": row["input_ids"][:2], "labels": row["labels"][:2],
                                   "position_ids": [0, 1], "distill": row["distill"][:2]}], pad_id=0)
    assert packed["distill"].dtype == torch.bool and packed["distill"][0].tolist() == [bool(d) for d in row["distill"]]
    assert not packed["distill"][1, 2:].any()  # padding is never matched
    plain = collate([task, rep], pad_id=0)
    assert plain["distill"].tolist() == [[False] * 4, [False, True, True, False]]
    assert "distill" not in collate([task], pad_id=0)  # ce replay and plain data: no mask


def test_kl_replay_loss_is_the_kl_to_the_base_at_the_marked_positions(tiny):
    """``data.replay.loss=kl``: zero (and no gradient) while the adapter is the identity,
    and, once it is not, the summed KL(base || tuned) of the marked positions, computed here
    from two whole-model forwards (HF's own head at every position), plus the cross-entropy
    of the supervised ones; the count adds the marked positions."""
    from lorakit.lora.config import LoraConfig
    from lorakit.lora.inject import add_adapter, delete_adapter, disable_adapters
    from lorakit.lora.layers import lora_layers
    from lorakit.train import common

    model, _ = tiny
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"), name="default")
    try:
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(20, 400, (3, 9), generator=gen)
        labels = torch.full_like(ids, -100)
        labels[0, 5:] = ids[0, 5:]  # a task row: cross-entropy on its last tokens
        distill = torch.zeros_like(ids, dtype=torch.bool)
        distill[1, 1:] = True  # a replay row: every position but the first
        distill[2, 1:6] = True  # a shorter replay row (padding after it)
        mask = torch.ones_like(ids)
        mask[2, 6:] = 0
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels, "distill": distill}
        kl_only = {**batch, "labels": torch.full_like(ids, -100)}
        loss, n = common.supervised_loss(model, kl_only)
        assert n == 8 + 5 and common.count_supervised(kl_only) == n
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
        loss.backward()
        assert all(p.grad is None or float(p.grad.abs().max()) < 1e-6
                   for p in model.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                for b in layer.lora_B.values():
                    b.weight.normal_(0, 0.5, generator=gen)
            tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
            with disable_adapters(model):
                base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = (base.exp() * (base - tuned)).sum(-1)[:, :-1]  # position t predicts token t+1
        ce = -tuned[0, 4:8].gather(-1, ids[0, 5:9, None]).sum()
        expected = float(kl[distill[:, 1:]].sum() + ce)
        loss, n = common.supervised_loss(model, batch)
        assert n == 4 + 13 and float(kl[distill[:, 1:]].sum()) > 0.05
        assert float(loss) == pytest.approx(expected, rel=1e-4)
    finally:
        delete_adapter(model, "default")


def test_training_with_kl_replay_counts_every_replay_position(eval_base_dir, tmp_path, capsys):
    """The same run as above with ``data.replay.loss=kl``: the replay rows now add every
    position of each replay example to the loss, not only the answer's tokens."""
    train, own = _digits_and_replay(tmp_path)
    summaries = {}
    for loss in ("ce", "kl"):
        run = tmp_path / loss
        args = ["train", f"model={eval_base_dir}", f"data.train={train}", f"output_dir={run}",
                "data.max_length=64", "train.batch_size=8", "train.precision=fp32", "lora.r=4",
                "train.max_steps=1", "eval.after_train=false", "--no-progress", "train.seed=1",
                "data.replay.fraction=0.3", f"data.replay.file={own}", f"data.replay.loss={loss}"]
        assert main(args) == 0, capsys.readouterr().err
        summaries[loss] = json.loads((run / "summary.json").read_text())
    ce, kl = summaries["ce"], summaries["kl"]
    assert "data.replay.loss=kl" in capsys.readouterr().err
    from lorakit.config import load_config

    defaults = load_config(overrides=["data.replay.fraction=0.1"]).data.replay
    assert defaults.loss_for("lora") == defaults.loss_for("qlora") == "kl"
    assert defaults.loss_for("full") == "ce"  # it keeps no frozen base to match
    assert ce["train_examples"] == kl["train_examples"] > 30
    assert kl["supervised_tokens"] > ce["supervised_tokens"]  # prompts and template too
    assert kl["final_train_loss"] < ce["final_train_loss"]  # KL is 0 at step 1 (B = 0)
    capsys.readouterr()
    assert main(["train", "method=full", f"data.train={train}", "data.replay.fraction=0.1",
                 "data.replay.loss=kl"]) != 0
    assert "data.replay.loss=kl" in capsys.readouterr().err
