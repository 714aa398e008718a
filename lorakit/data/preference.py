"""Preference pairs as tokens: ``prompt + chosen`` and ``prompt + rejected``, labels on the answers.

Each pair is rendered twice with the chat template (``lorakit.data.tokenize`` does the
rendering and the answer-only labels, end-of-turn included), and batches put the B chosen
rows first and the B rejected rows after them, so one forward pass scores both::

    rows 0 .. B-1    prompt_i + chosen_i      labels only on chosen_i (and its end of turn)
    rows B .. 2B-1   prompt_i + rejected_i    labels only on rejected_i

Labels are not shifted (``-100`` where no log-probability is taken), as elsewhere in lorakit.
"""

from __future__ import annotations

from typing import Sequence

from lorakit.data.formats import Example
from lorakit.data.tokenize import IGNORE_INDEX, collate, tokenize_examples
from lorakit.errors import DataError


def tokenize_pairs(examples: Sequence[Example], tokenizer, max_length: int | None = None,
                   ) -> tuple[list[dict], list[Example]]:
    """Tokenise preference examples into pairs of rows (batched tokenizer calls).

    Args:
        examples: ``kind="preference"`` examples (``lorakit.data.formats.load_examples``).
        tokenizer: a Hugging Face tokenizer with the model's chat template.
        max_length: cut each row to this many tokens (from the right).

    Returns:
        ``(pairs, dropped)``: one ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids",
        "rejected_labels"}`` per usable example, and the examples whose chosen or rejected
        answer has no token left within ``max_length`` (they cannot be scored).

    Raises:
        DataError: an example is not a preference pair (it names the file and line).
    """
    for ex in examples:
        if ex.kind != "preference":
            raise DataError(f"{ex.source[0]}:{ex.source[1]}: method dpo needs preference records "
                            f'{{"prompt", "chosen", "rejected"}}; this one is {ex.format}')
    chosen = [Example("preference", messages=ex.messages, chosen=ex.chosen, source=ex.source)
              for ex in examples]
    rejected = [Example("preference", messages=ex.messages, chosen=ex.rejected, source=ex.source)
                for ex in examples]
    # one call for both sides: the tokenizer batches them together
    rows = tokenize_examples(chosen + rejected, tokenizer, max_length, train_on="all_assistant")
    pairs, dropped = [], []
    for ex, c, r in zip(examples, rows[:len(examples)], rows[len(examples):]):
        if not (_has_target(c["labels"]) and _has_target(r["labels"])):
            dropped.append(ex)
            continue
        pairs.append({"chosen_input_ids": c["input_ids"], "chosen_labels": c["labels"],
                      "rejected_input_ids": r["input_ids"], "rejected_labels": r["labels"]})
    return pairs, dropped


def _has_target(labels: list[int]) -> bool:
    # position 0 predicts nothing (labels are shifted inside the loss)
    return any(label != IGNORE_INDEX for label in labels[1:])


def collate_pairs(pairs: Sequence[dict], pad_id: int) -> dict:
    """Right-pad B pairs into one batch of 2B rows: chosen rows first, then rejected.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels``: (2B, T) long tensors.
    """
    rows = ([{"input_ids": p["chosen_input_ids"], "labels": p["chosen_labels"]} for p in pairs]
            + [{"input_ids": p["rejected_input_ids"], "labels": p["rejected_labels"]}
               for p in pairs])
    return collate(rows, pad_id)
