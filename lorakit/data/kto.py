"""KTO examples as tokens: each is a prompt and one judged answer, labelled desirable or not.

A batch of B examples holds 2B rows, so one forward pass scores both::

    rows 0 .. B-1    prompt_i + answer_i        labels on answer_i (and its end of turn)
    rows B .. 2B-1   prompt_i + answer_(i-1)    the mismatched pairs of KTO's reference point

The mismatched answers are the batch's own answers shifted by one (row 0 takes the last
one), as TRL's KTOTrainer builds them; their log-ratios estimate the KL term and carry no
gradient.
"""

from __future__ import annotations

from typing import Sequence

from lorakit.data.formats import Example
from lorakit.data.tokenize import IGNORE_INDEX, collate, tokenize_examples
from lorakit.errors import DataError


def tokenize_kto(examples: Sequence[Example], tokenizer, max_length: int | None = None,
                 ) -> tuple[list[dict], list[Example]]:
    """Tokenise ``kind="kto"`` examples (``lorakit.data.formats``, format ``kto``).

    Returns:
        ``(items, dropped)``: one ``{"prompt_ids", "answer_ids", "answer_labels", "label"}``
        per usable example (the rendered conversation split where the judged answer's labels
        begin), and the examples with no answer token left within ``max_length``.

    Raises:
        DataError: an example is not a kto record (it names the file and line).
    """
    for ex in examples:
        if ex.kind != "kto":
            raise DataError(f"{ex.source[0]}:{ex.source[1]}: method kto needs records with a "
                            f'label: {{"prompt", "completion", "label": true|false}} or '
                            f'{{"messages", "label"}}; this one is {ex.format}')
    rows = tokenize_examples(list(examples), tokenizer, max_length, train_on="last_turn")
    items, dropped = [], []
    for ex, row in zip(examples, rows):
        labels = row["labels"]
        first = next((i for i, l in enumerate(labels) if i > 0 and l != IGNORE_INDEX), None)
        if first is None:
            dropped.append(ex)
            continue
        items.append({"prompt_ids": row["input_ids"][:first], "answer_ids": row["input_ids"][first:],
                      "answer_labels": labels[first:], "label": bool(ex.label)})
    return items, dropped


def collate_kto(items: Sequence[dict], pad_id: int, max_length: int | None = None) -> dict:
    """Right-pad B examples and their B mismatched pairs into one batch of 2B rows.

    Returns:
        ``input_ids``, ``attention_mask``, ``labels`` (2B, T) and ``label`` (B,) bool.
    """
    import torch

    def row(prompt: dict, answer: dict) -> dict:
        ids = prompt["prompt_ids"] + answer["answer_ids"]
        labels = [IGNORE_INDEX] * len(prompt["prompt_ids"]) + answer["answer_labels"]
        if max_length is not None:
            ids, labels = ids[:max_length], labels[:max_length]
        return {"input_ids": ids, "labels": labels}

    n = len(items)
    rows = [row(it, it) for it in items] + [row(items[i], items[i - 1]) for i in range(n)]
    batch = collate(rows, pad_id)
    batch["label"] = torch.tensor([it["label"] for it in items], dtype=torch.bool)
    return batch
