"""The forgetting and safety flags of `lorakit eval` fire on a run that forgets, and stay
down on one that does not.

The base is a tiny model taught (here, in a few dozen full fine-tuning steps) to refuse the
bundled harmful requests, so the refusal rate has somewhere to fall from. The forgetting run
is a real `lorakit train` LoRA run at a high learning rate on unrelated data (spell a digit);
the control is the same run at a learning rate too small to move anything.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_data import write_digit_data
from tiny_models import make_smol_llama

from lorakit.cli import main

REFUSAL = "I'm sorry, but I can't help with that."


@pytest.fixture(scope="module")
def refusing_base(tmp_path_factory, smol_tokenizer):
    from lorakit.eval.forgetting import safety_prompts

    tok = smol_tokenizer
    folder = tmp_path_factory.mktemp("refusing-base")
    model = make_smol_llama(tok)
    answer = tok(REFUSAL + tok.eos_token, add_special_tokens=False)["input_ids"]
    rows = []
    for prompt in safety_prompts():
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                      add_generation_prompt=True, return_dict=False)
        rows.append((list(ids), answer))
    width = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), width), tok.eos_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    targets = []  # (row, position predicting the token, token)
    for i, (p, a) in enumerate(rows):
        input_ids[i, :len(p) + len(a)] = torch.tensor(p + a)
        mask[i, :len(p) + len(a)] = 1
        targets += [(i, len(p) + j - 1, t) for j, t in enumerate(a)]
    rows_idx, pos_idx, labels = (torch.tensor(x) for x in zip(*targets))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(80):
        hidden = model.model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[rows_idx, pos_idx]), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, loss.item()
    model.eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def digit_data(tmp_path_factory):
    return write_digit_data(tmp_path_factory.mktemp("digits"))


def _run(base, data, out, lr, steps):
    from lorakit.config import load_config
    from lorakit.train.sft import train

    cfg = load_config(None, [f"model={base}", f"data.train={data / 'train.jsonl'}",
                             f"output_dir={out}", "data.max_length=64", "train.batch_size=8",
                             f"train.max_steps={steps}", f"train.lr={lr}", "train.precision=fp32",
                             "train.save_every=null", "train.eval_every=null", "lora.r=8",
                             "lora.alpha=16", "lora.dropout=0", "train.warmup=0"])
    return train(cfg, progress=False, log=lambda m: None).adapter_dir


def test_forgetting_and_safety_flags(refusing_base, digit_data, tmp_path, capsys):
    from lorakit.eval.forgetting import REFUSAL_DROP_THRESHOLD

    forgets = _run(refusing_base, digit_data, tmp_path / "forgets", lr=3e-2, steps=30)
    gentle = _run(refusing_base, digit_data, tmp_path / "gentle", lr=1e-7, steps=1)
    rc = main(["eval", "--adapter", f"forgets={forgets}", "--adapter", f"gentle={gentle}",
               "--data", str(digit_data / "eval.jsonl"), "--max-new-tokens", "4",
               "--probe-limit", "24", "--out", str(tmp_path / "report"), "--json"])
    assert rc == 0
    s = json.loads(capsys.readouterr().out)
    base_rate = s["safety"]["base"]["refusal_rate"]
    assert base_rate >= 0.9  # the base refuses
    assert s["safety"]["forgets"]["flagged"] and s["forgetting"]["forgets"]["flagged"], s
    assert s["safety"]["forgets"]["drop"] >= REFUSAL_DROP_THRESHOLD
    assert not s["safety"]["gentle"]["flagged"] and not s["forgetting"]["gentle"]["flagged"], s
    # and the run did learn its task: it answers the digits better than the base
    assert s["models"]["forgets"]["loss"] < s["models"]["base"]["loss"]
