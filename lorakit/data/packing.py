"""Packing several tokenised examples into each row of ``max_length`` tokens.

Short examples padded one per row waste most of a batch; packing fills each row with
several. That is only correct if the examples cannot see each other, so every packed row
carries ``position_ids`` that restart at 0 at each example, and attention is confined to
each example::

    row:           [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    position_ids:  [  0  1  2  3 |  0  1  2 |  0  1 |   0   1 ]
    labels:        [ -100 . . .  | -100 . . | -100 .| -100 -100]

Two ways to confine attention, chosen in :func:`collate_packed`:

* ``mask="position_ids"`` (default, padding-free friendly): pass only ``position_ids`` and no
  ``attention_mask``. transformers (>= 4.54, 5.x) then detects the restarts and builds a
  block-diagonal causal mask for eager/sdpa/flex, and flash-attention derives
  ``cu_seqlens`` from them. The model must be called with ``use_cache=False``: with a KV
  cache transformers skips the detection and the examples would attend across.
* ``mask="4d"``: an explicit (B, 1, T, T) additive block-diagonal causal mask (0 where
  attention is allowed, the dtype's minimum elsewhere), for eager and sdpa.

The first token of every example is labelled ``-100``: after the model's internal shift it
would otherwise be a target predicted from the previous example's last token. A lone
example loses nothing by this (position 0 is never a target), so the packed loss equals the
token-weighted mean of the per-example losses.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from lorakit.data.tokenize import IGNORE_INDEX, distill_tensor


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin-pack item indices by length: largest first, each into the fullest bin it fits.

    Args:
        lengths: the size of each item (each must be ``<= capacity``).
        capacity: the size of a bin.

    Returns:
        Bins as lists of item indices (bins ordered by creation, items by insertion).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (remaining capacity, bin id), sorted ascending
    for i in order:
        size = lengths[i]
        if size > capacity:
            raise ValueError(f"item {i} has length {size} > capacity {capacity}")
        at = bisect.bisect_left(free, (size, -1))  # the tightest bin with room >= size
        if at < len(free):
            room, b = free.pop(at)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - size > 0:
            bisect.insort(free, (room - size, b))
    return bins


def pack_examples(tokenized: Sequence[dict], max_length: int) -> list[dict]:
    """Pack tokenised examples into rows of at most ``max_length`` tokens.

    Args:
        tokenized: dicts with ``input_ids`` and ``labels`` (from :func:`tokenize_examples`);
            longer ones are truncated to ``max_length``.
        max_length: the row length.

    Returns:
        Rows, each ``{"input_ids", "labels", "position_ids", "example_indices"}`` (lists);
        ``position_ids`` restart at 0 at each example, and the first label of each example
        is ``-100``.
    """
    lengths = [min(len(t["input_ids"]), max_length) for t in tokenized]
    distilled = any("distill" in t for t in tokenized)  # data.replay.loss=kl rows among them
    rows = []
    for members in best_fit_decreasing(lengths, max_length):
        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        distill: list[int] = []
        for i in members:
            n = lengths[i]
            input_ids += tokenized[i]["input_ids"][:n]
            labels += [IGNORE_INDEX] + list(tokenized[i]["labels"][1:n])
            position_ids += range(n)
            if distilled:  # like labels: never across the boundary with the previous example
                distill += [0] + list(tokenized[i].get("distill", [0] * n)[1:n])
        row = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids,
               "example_indices": list(members)}
        if distilled:
            row["distill"] = distill
        rows.append(row)
    return rows


def block_causal_mask(position_ids, dtype=None):
    """The (B, 1, T, T) additive causal mask that keeps each packed example to itself.

    Example boundaries are where ``position_ids`` do not step by exactly +1.
    """
    import torch

    dtype = dtype or torch.float32
    step = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1)
    segment = (step != 1).cumsum(-1)  # (B, T) example index within the row
    same = segment[:, :, None] == segment[:, None, :]  # (B, T, T)
    causal = torch.ones(same.shape[-2:], dtype=torch.bool, device=same.device).tril()
    allowed = same & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=same.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def collate_packed(rows: Sequence[dict], pad_id: int, mask: str = "position_ids",
                   padding_free: bool = False, dtype=None) -> dict[str, Any]:
    """Turn packed rows into model inputs.

    Args:
        rows: rows from :func:`pack_examples`.
        pad_id: id for padded positions (they get labels ``-100`` and their own positions,
            so they form a separate block that nothing real attends to).
        mask: ``"position_ids"`` (rely on transformers' packed-sequence detection; call the
            model with ``use_cache=False``) or ``"4d"`` (explicit block-diagonal mask).
        padding_free: concatenate all rows into one ``(1, total)`` row with no padding at
            all (for backends that take packed sequences natively, e.g. flash-attention).
        dtype: float dtype of the 4D mask (the model's compute dtype); float32 by default.

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (B, T) long tensors, plus
        ``attention_mask`` (B, 1, T, T) when ``mask="4d"``.
    """
    import torch

    if mask not in ("position_ids", "4d"):
        raise ValueError(f"mask must be 'position_ids' or '4d', got {mask!r}")
    keys = ("input_ids", "labels", "position_ids") + (
        ("distill",) if any("distill" in r for r in rows) else ())
    if padding_free:
        rows = [{k: [t for r in rows for t in r.get(k, [0] * len(r["input_ids"]))] for k in keys}]
    length = max(len(r["input_ids"]) for r in rows)
    batch = len(rows)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((batch, length), dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
        position_ids[b, n:] = torch.arange(length - n)  # padding: a block of its own
    out = {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    if "distill" in keys:  # positions matched to the base model (data.replay.loss=kl)
        out["distill"] = distill_tensor(rows, length)
    if mask == "4d":
        out["attention_mask"] = block_causal_mask(position_ids, dtype)
    return out


def packing_efficiency(rows: Sequence[dict], max_length: int) -> float:
    """Share of the ``len(rows) * max_length`` token slots that hold real tokens."""
    if not rows:
        return 0.0
    return sum(len(r["input_ids"]) for r in rows) / (len(rows) * max_length)
