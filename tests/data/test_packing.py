"""Packing is trustworthy: a packed batch gives the same loss as the examples one by one."""

import random

import pytest
import torch
from tiny_models import make_tiny_model

from lorakit.data.packing import (best_fit_decreasing, block_causal_mask, collate_packed,
                                  pack_examples, packing_efficiency)
from lorakit.data.tokenize import IGNORE_INDEX

LENGTHS = [5, 9, 3, 17, 12, 7, 2, 30, 11, 6, 1, 25, 14]
MAX_LENGTH = 32


def _examples(lengths=LENGTHS, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 256, (n,), generator=g).tolist()
        prompt = n // 3  # first third unsupervised, like a prompt
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return out


def test_best_fit_decreasing_fills_tightest_bin():
    bins = best_fit_decreasing([6, 5, 4, 3, 2], capacity=10)
    assert sorted(sorted(b) for b in bins) == [[0, 2], [1, 3, 4]]
    lengths = [random.Random(i).randint(1, 100) for i in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    assert len(bins) <= 1.25 * sum(lengths) / 128 + 1  # BFD is within 11/9 OPT + 1
    with pytest.raises(ValueError):
        best_fit_decreasing([200], 128)


def test_pack_rows_restart_positions_and_mask_first_labels():
    examples = _examples()
    rows = pack_examples(examples, MAX_LENGTH)
    assert sorted(i for r in rows for i in r["example_indices"]) == list(range(len(examples)))
    for row in rows:
        assert len(row["input_ids"]) <= MAX_LENGTH
        at = 0
        for i in row["example_indices"]:
            n = len(examples[i]["input_ids"])
            assert row["position_ids"][at:at + n] == list(range(n))
            assert row["input_ids"][at:at + n] == examples[i]["input_ids"]
            assert row["labels"][at] == IGNORE_INDEX
            assert row["labels"][at + 1:at + n] == examples[i]["labels"][1:]
            at += n
    assert packing_efficiency(rows, MAX_LENGTH) > 0.8
    # too-long examples are truncated to the row length
    rows = pack_examples(_examples([40, 3]), MAX_LENGTH)
    assert sorted(len(r["input_ids"]) for r in rows) == [3, MAX_LENGTH]


def test_block_causal_mask():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(position_ids)[0, 0] == 0
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [0, 0, 0, 1, 0, 0],
                             [0, 0, 0, 1, 1, 0],
                             [0, 0, 0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(allowed, expected)


def _one_by_one_loss(model, examples):
    """Token-weighted mean of per-example losses (position 0 is never a target)."""
    total, count = 0.0, 0
    for ex in examples:
        n = sum(lab != IGNORE_INDEX for lab in ex["labels"][1:])
        if n == 0:  # nothing to predict (a 1-token example): weight 0, and its loss is NaN
            continue
        loss = model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]]),
                     use_cache=False).loss
        total, count = total + loss.double() * n, count + n
    return total / count


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mask,padding_free", [("position_ids", False), ("4d", False), ("position_ids", True)])
def test_packed_loss_equals_token_weighted_mean(family, attn, mask, padding_free):
    model = make_tiny_model(family)
    model.set_attn_implementation(attn)
    examples = _examples()
    rows = pack_examples(examples, MAX_LENGTH)
    assert len(rows) < len(examples)
    batch = collate_packed(rows, pad_id=0, mask=mask, padding_free=padding_free)
    with torch.no_grad():
        reference = _one_by_one_loss(model, examples)
        packed = model(**batch, use_cache=False).loss
    assert abs(packed.item() - reference.item()) < 1e-5


def test_comparison_detects_cross_contamination():
    """Sanity check of the test itself: without restarting positions the examples see each
    other and the loss moves well past the tolerance."""
    model = make_tiny_model("llama")
    examples = _examples()
    batch = collate_packed(pack_examples(examples, MAX_LENGTH), pad_id=0)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"])
    with torch.no_grad():
        reference = _one_by_one_loss(model, examples)
        packed = model(**batch, use_cache=False).loss
    assert abs(packed.item() - reference.item()) > 1e-4


def test_collate_packed_pads_with_own_block():
    rows = pack_examples(_examples([5, 3, 20]), 24)
    batch = collate_packed(rows, pad_id=7, mask="4d")
    assert batch["input_ids"].shape == batch["position_ids"].shape == batch["labels"].shape
    width = max(len(r["input_ids"]) for r in rows)  # padded to the longest row
    assert batch["attention_mask"].shape == (2, 1, width, width)
    short = min(range(2), key=lambda b: len(rows[b]["input_ids"]))
    n = len(rows[short]["input_ids"])
    assert (batch["input_ids"][short, n:] == 7).all() and (batch["labels"][short, n:] == IGNORE_INDEX).all()
    assert batch["position_ids"][short, n:].tolist() == list(range(width - n))
    flat = collate_packed(rows, pad_id=7, padding_free=True)
    assert flat["input_ids"].shape == (1, sum(len(r["input_ids"]) for r in rows))
    assert "attention_mask" not in flat
