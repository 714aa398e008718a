"""Train / eval splits that never put two copies of one example on both sides.

Exact and near-duplicates are grouped first (:func:`lorakit.data.dedup.duplicate_groups`);
whole groups are then shuffled with a fixed seed and moved to eval until it holds
``eval_fraction`` of the examples. Otherwise a near-copy of an eval example would sit in
train and the eval loss would flatter the model.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from lorakit.data.dedup import duplicate_groups
from lorakit.data.formats import Example
from lorakit.errors import ConfigError


def example_key(example: Example) -> str:
    """An exact-duplicate key: kind, roles and contents (source location excluded)."""
    if example.kind == "text":
        return "text\x00" + (example.text or "")
    parts = [example.kind]
    for name, turns in (("m", example.messages), ("c", example.chosen), ("r", example.rejected)):
        parts += [f"{name}:{m['role']}\x01{m['content']}" for m in turns]
    return "\x00".join(parts)


def example_groups(examples: Sequence[Example], threshold: float = 0.8):
    """Near- and exact-duplicate groups of ``examples``; see :func:`duplicate_groups`."""
    return duplicate_groups([ex.all_text() for ex in examples], threshold=threshold,
                            exact_keys=[example_key(ex) for ex in examples])


def split_train_eval(examples: Sequence[Example], eval_fraction: float, seed: int = 0,
                     ) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into train and eval, keeping duplicate groups on one side.

    Args:
        examples: canonical examples.
        eval_fraction: share of examples to hold out, in (0, 1).
        seed: the shuffle seed; the same examples and seed give the same split.

    Returns:
        ``(train, eval)``, each in the original order. Eval holds at least one example and
        about ``eval_fraction`` of them (whole groups, so it can be slightly more).

    Raises:
        ConfigError: ``eval_fraction`` is outside (0, 1) or there are fewer than 2 examples.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be between 0 and 1 (exclusive), got {eval_fraction}")
    if len(examples) < 2:
        raise ConfigError(f"need at least 2 examples to split off an eval set, got {len(examples)}")
    group, _ = example_groups(examples)
    roots, sizes = np.unique(group, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(roots))
    target = max(1, round(eval_fraction * len(examples)))
    in_eval = set()
    held = 0
    for g in order:
        if held >= target:
            break
        if held + sizes[g] > target and held > 0 and sizes[g] > 1:
            continue  # a big group would overshoot: try smaller ones
        in_eval.add(int(roots[g]))
        held += int(sizes[g])
    if held == len(examples):  # one group holds everything: nothing left to train on
        raise ConfigError("every example is a near-duplicate of the others; cannot split off "
                          "an eval set without leakage")
    train = [ex for ex, g in zip(examples, group) if int(g) not in in_eval]
    evals = [ex for ex, g in zip(examples, group) if int(g) in in_eval]
    return train, evals
