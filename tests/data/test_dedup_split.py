import random

import numpy as np
import pytest

from lorakit.data.dedup import duplicate_groups, minhash_signatures, normalize_text
from lorakit.data.formats import Example
from lorakit.data.split import split_train_eval
from lorakit.errors import ConfigError

WORDS = [f"word{i}" for i in range(2000)]


def _random_texts(n, seed=0, lo=20, hi=60):
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi))) for _ in range(n)]


def test_normalize_text():
    assert normalize_text("  Hello,  World!\n") == "hello world"


def test_minhash_estimates_jaccard():
    base = _random_texts(1, seed=3, lo=200, hi=200)[0].split()
    edited = list(base)
    for i in range(0, 200, 40):  # 5 edits -> 15 of ~198 shingles changed
        edited[i] = "edited"
    sig, empty = minhash_signatures([" ".join(base), " ".join(edited), "other text entirely here"])
    assert not empty.any()
    assert (sig[0] == sig[1]).mean() > 0.75
    assert (sig[0] == sig[2]).mean() < 0.1


def test_duplicate_groups_exact_near_and_distinct():
    texts = _random_texts(300)
    near = texts[5].split()
    near[len(near) // 2] = "CHANGED"
    texts += [texts[0], " ".join(near), texts[7].upper() + "!!", "", ""]
    group, exact = duplicate_groups(texts)
    n = 300
    assert exact[n] == 0 and group[n] == 0            # exact copy
    assert exact[n + 1] == n + 1 and group[n + 1] == 5  # one word changed
    assert group[n + 2] == 7                           # case / punctuation only
    assert exact[n + 4] == n + 3                       # empty texts are exact duplicates
    assert len(np.unique(group[:n])) == n              # random texts stay apart


def _examples(texts):
    return [Example("chat", messages=[{"role": "user", "content": t[:30]},
                                      {"role": "assistant", "content": t}]) for t in texts]


def test_split_keeps_duplicates_on_one_side_and_is_seeded():
    texts = _random_texts(200, seed=1, lo=80, hi=120)
    texts += texts[:40]  # 40 exact duplicates
    near = [t.split() for t in texts[40:80]]
    for words in near:
        words[-1] = "CHANGED"
    texts += [" ".join(w) for w in near]  # 40 near duplicates (Jaccard > 0.9)
    examples = _examples(texts)
    train, evals = split_train_eval(examples, 0.2, seed=7)
    assert len(train) + len(evals) == len(examples)
    assert abs(len(evals) - 0.2 * len(examples)) <= 2
    train_answers = {ex.messages[1]["content"] for ex in train}
    eval_answers = {ex.messages[1]["content"] for ex in evals}
    assert not train_answers & eval_answers
    for original, words in zip(texts[40:80], near):
        assert (original in eval_answers) == (" ".join(words) in eval_answers)
    again = split_train_eval(examples, 0.2, seed=7)
    assert [id(e) for e in again[1]] == [id(e) for e in evals]
    other = split_train_eval(examples, 0.2, seed=8)
    assert [id(e) for e in other[1]] != [id(e) for e in evals]


def test_split_rejects_bad_fraction():
    with pytest.raises(ConfigError):
        split_train_eval(_examples(["a b c", "d e f"]), 1.5)
