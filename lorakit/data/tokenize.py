"""Rendering examples with the chat template and labelling only what the model should learn.

The supervised spans are found in the rendered text itself: each assistant message's content
is located (in order) in the string the chat template produced, extended over the
end-of-turn marker that follows it, and the character spans are mapped to tokens through the
tokenizer's offset mapping. So any template works as it is, with no ``{% generation %}``
markers, and the end-of-turn token (``<|im_end|>``, ``<|eot_id|>``, ``</s>``...) after every
supervised answer is supervised too, so the tuned model learns to stop.

The end-of-turn marker is read off the template once: render ``[user, assistant]`` and take
what follows the assistant content (trailing whitespace dropped).

Labels use ``-100`` for positions that carry no loss and are *not* shifted: a Hugging Face
causal LM shifts them itself (``model(input_ids, labels=labels)``).

``train_on`` picks the supervised part of a conversation:

    all_assistant   every assistant turn (default)
    last_turn       only the final assistant turn
    everything      every token, prompts and template included
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from lorakit.data.formats import Example
from lorakit.errors import ConfigError, DataError, did_you_mean

IGNORE_INDEX = -100
TRAIN_ON = ("all_assistant", "last_turn", "everything")

_PROBE_USER = "lorakit probe question 7f3a"
_PROBE_ANSWER = "lorakit probe answer 9c1e"
_EOT_CACHE: dict[tuple, str] = {}


def _check_train_on(train_on: str) -> None:
    if train_on not in TRAIN_ON:
        raise ConfigError(f"unknown train_on {train_on!r}{did_you_mean(train_on, TRAIN_ON)}; "
                          f"choose one of {', '.join(TRAIN_ON)}")


def has_chat_template(tokenizer) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def end_of_turn(tokenizer) -> str:
    """The text the chat template writes after an assistant message (e.g. ``"<|im_end|>"``).

    Returns ``""`` when the template writes nothing after the answer, or there is no template
    (the caller then appends the EOS token itself).
    """
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return ""
    key = (template, getattr(tokenizer, "eos_token", None))
    if key not in _EOT_CACHE:
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": _PROBE_USER},
                 {"role": "assistant", "content": _PROBE_ANSWER}], tokenize=False)
            at = text.rfind(_PROBE_ANSWER)
            _EOT_CACHE[key] = text[at + len(_PROBE_ANSWER):].rstrip() if at >= 0 else ""
        except Exception:  # a template that rejects the probe: fall back to the EOS string
            _EOT_CACHE[key] = ""
    return _EOT_CACHE[key]


def pad_token_id(tokenizer) -> int:
    """The id to pad with. Padded positions are excluded by ``attention_mask`` and labels of
    ``-100``, never by comparing ids, so it is harmless when this equals the EOS id."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    return 0


# ---------------------------------------------------------------- prompts


def prompt_messages(prompt: str | Sequence[dict], system: str | None = None) -> list[dict]:
    """A prompt as chat messages: a string becomes one user turn (after ``system``, if any);
    a message list is taken as it is."""
    if isinstance(prompt, str):
        head = [{"role": "system", "content": system}] if system is not None else []
        return head + [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


def prompt_text(tokenizer, prompt: str | Sequence[dict], system: str | None = None) -> str:
    """The text a model is asked to continue: ``prompt`` (a string or chat messages) through
    the chat template with the generation prompt when the tokenizer has one; without a
    template, the plain text (messages' contents, and ``system``, joined by blank lines)."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt_messages(prompt, system), tokenize=False,
                                             add_generation_prompt=True)
    if isinstance(prompt, str):
        return prompt if system is None else f"{system}\n\n{prompt}"
    return "\n".join(str(m.get("content", "")) for m in prompt)


def prompt_ids(tokenizer, prompt: str | Sequence[dict], system: str | None = None) -> list[int]:
    """Token ids of :func:`prompt_text`: the rendered template is tokenized without adding
    special tokens (the template wrote them); plain text gets the tokenizer's own (BOS)."""
    text = prompt_text(tokenizer, prompt, system)
    special = not has_chat_template(tokenizer)
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


# ---------------------------------------------------------------- rendering


_RENDERERS: dict[tuple, Any] = {}


def _chat_renderer(tokenizer):
    """``messages -> str``, identical to ``apply_chat_template(messages, tokenize=False)``.

    transformers' per-call overhead (normalising messages, copying them into plain data)
    is half the rendering time on 100k examples, so the compiled template is rendered
    directly; it is checked once against ``apply_chat_template``, and if anything differs
    (or transformers' internals moved) the public method is used.
    """
    template = tokenizer.chat_template
    special = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    key = (template, tuple(sorted(special.items())))
    if key in _RENDERERS:
        return _RENDERERS[key]

    def slow(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False)

    renderer = slow
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        compiled = _compile_jinja_template(template)

        def fast(messages):
            return compiled.render(messages=messages, tools=None, documents=None,
                                   add_generation_prompt=False, **special)

        probe = [{"role": "system", "content": "S"}, {"role": "user", "content": _PROBE_USER},
                 {"role": "assistant", "content": _PROBE_ANSWER},
                 {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"}]
        if fast(probe) == slow(probe) and fast(probe[1:3]) == slow(probe[1:3]):
            renderer = fast
    except Exception:  # internals changed, or the template rejects the probe
        pass
    _RENDERERS[key] = renderer
    return renderer


def _find(text: str, content: str, start: int) -> tuple[int, int] | None:
    at = text.find(content, start)
    if at >= 0:
        return at, at + len(content)
    stripped = content.strip()  # many templates trim the content ({{ m.content | trim }})
    if stripped and stripped != content:
        at = text.find(stripped, start)
        if at >= 0:
            return at, at + len(stripped)
    return None


def _extend_over_eot(text: str, end: int, eot: str) -> int:
    if not eot:
        return end
    for marker in dict.fromkeys((eot, eot.split()[0] if eot.split() else eot)):
        if text.startswith(marker, end):
            return end + len(marker)
        gap = end
        while gap < len(text) and text[gap] in " \t\n":
            gap += 1
        if gap > end and text.startswith(marker.lstrip(), gap):
            return gap + len(marker.lstrip())
    return end


def _assistant_spans(text: str, messages: Sequence[dict], eot: str, source) -> dict[int, tuple[int, int]]:
    """Character span (content start, end of end-of-turn) of each assistant message, by index."""
    spans: dict[int, tuple[int, int]] = {}
    cursor = safe = 0  # safe: end of the last assistant span, cursor: also past prompt turns
    following = [None] * len(messages)  # index of the next assistant message
    nxt = None
    for i in range(len(messages) - 1, -1, -1):
        following[i] = nxt
        if messages[i]["role"] == "assistant":
            nxt = i
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            # Skip past the prompt turn so an answer that repeats part of its question is
            # not matched inside the question. A template may move a turn elsewhere (a
            # system prompt folded into the last user turn): a turn found only after the
            # next answer's first occurrence is such a moved turn and is not skipped.
            if following[i] is None:
                continue
            found = _find(text, message["content"], cursor)
            answer = _find(text, messages[following[i]]["content"], cursor)
            if found and (answer is None or found[0] <= answer[0]):
                cursor = found[1]
            continue
        found = _find(text, message["content"], cursor) or _find(text, message["content"], safe)
        if found is None:
            raise DataError(f"{source[0]}:{source[1]}: messages[{i}].content: the chat template "
                            "does not render this assistant message verbatim, so its tokens "
                            "cannot be located for the labels")
        start, end = found
        end = _extend_over_eot(text, end, eot)
        spans[i] = (start, end)
        cursor = safe = end
    return spans


def render(example: Example, tokenizer, train_on: str = "all_assistant",
           ) -> tuple[str, list[tuple[int, int]], bool]:
    """Render ``example`` to text and find the character spans to supervise.

    Returns:
        ``(text, spans, append_eos)``: the string to tokenise (without the tokenizer's own
        special tokens), the supervised ``(start, end)`` character spans, and whether an
        EOS token must be appended (and supervised) because the text does not end one.
    """
    _check_train_on(train_on)
    if example.kind == "text":
        text = example.text or ""
        return text, [(0, len(text))], True
    messages = list(example.messages)
    first_supervised = 0
    if example.kind == "preference":
        first_supervised = len(messages)
        messages = messages + list(example.chosen)
    assistant = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_supervised]
    if train_on == "last_turn":
        assistant = assistant[-1:]

    if not has_chat_template(tokenizer):
        return _render_plain(messages, tokenizer, set(assistant), train_on)
    try:
        text = _chat_renderer(tokenizer)(messages)
    except Exception as exc:  # jinja raises its own errors (e.g. "roles must alternate")
        raise DataError(f"{example.source[0]}:{example.source[1]}: the chat template rejected "
                        f"this conversation: {exc}") from None
    if train_on == "everything":
        return text, [(0, len(text))], False
    eot = end_of_turn(tokenizer)
    spans = _assistant_spans(text, messages, eot, example.source)
    chosen = [spans[i] for i in assistant]
    # No end-of-turn marker in the template: append EOS after the final answer if supervised.
    append_eos = not eot and bool(assistant) and assistant[-1] == len(messages) - 1
    return text, chosen, append_eos


def _render_plain(messages, tokenizer, supervised: set[int], train_on: str):
    """No chat template: plain concatenation, EOS written after every assistant answer."""
    eos = getattr(tokenizer, "eos_token", None) or ""
    parts, spans, pos = [], [], 0
    for i, message in enumerate(messages):
        piece = message["content"] + (eos if message["role"] == "assistant" else "")
        if i in supervised or train_on == "everything":
            spans.append((pos, pos + len(piece)))
        parts.append(piece)
        pos += len(piece)
    return "".join(parts), spans, False


# ---------------------------------------------------------------- tokenising


def _end(offset) -> int:
    return offset[1]


def _start(offset) -> int:
    return offset[0]


def _labels_from_offsets(ids: list[int], offsets: list[tuple[int, int]], spans) -> list[int]:
    """Label the tokens that overlap a supervised character span, ``-100`` elsewhere.

    A token overlapping a span is supervised, so a leading space merged into the first
    answer token is learned with it. Offsets are sorted, so each span is two binary searches.
    """
    labels = [IGNORE_INDEX] * len(ids)
    for start, end in spans:
        lo = bisect.bisect_right(offsets, start, key=_end)  # first token ending after start
        hi = bisect.bisect_left(offsets, end, key=_start)  # first token starting at/after end
        labels[lo:hi] = ids[lo:hi]
    return labels


def _encode_by_pieces(tokenizer, text: str, spans) -> tuple[list[int], list[int]]:
    """Slow-tokenizer fallback (no offset mapping): tokenise span by span."""
    cuts = sorted({0, len(text), *(p for span in spans for p in span)})
    ids, labels = [], []
    for a, b in zip(cuts, cuts[1:]):
        piece = tokenizer(text[a:b], add_special_tokens=False)["input_ids"]
        inside = any(s <= a and b <= e for s, e in spans)
        ids += piece
        labels += piece if inside else [IGNORE_INDEX] * len(piece)
    return ids, labels


def tokenize_examples(examples: Sequence[Example], tokenizer, max_length: int | None = None,
                      train_on: str = "all_assistant") -> list[dict]:
    """Tokenise many examples at once (batched Rust tokenizer calls; 100k in seconds).

    Args:
        examples: canonical examples (chat, text or preference; preference uses ``chosen``).
        tokenizer: a Hugging Face tokenizer, ideally a fast one (offset mapping).
        max_length: truncate each example to this many tokens (``None``: no truncation).
        train_on: ``"all_assistant"``, ``"last_turn"`` or ``"everything"``.

    Returns:
        One ``{"input_ids": list[int], "labels": list[int]}`` per example, labels ``-100``
        where no loss is taken, not shifted.

    Raises:
        DataError: the chat template rejects a conversation or does not render an answer
            verbatim. ConfigError: unknown ``train_on``.
    """
    from concurrent.futures import ThreadPoolExecutor

    _check_train_on(train_on)
    out: list[dict] = []
    # Render a chunk (Python, holds the GIL) while the Rust tokenizer encodes the previous
    # one (it releases the GIL): the two stages overlap on 100k examples.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for at in range(0, len(examples), _CHUNK):
            chunk = examples[at:at + _CHUNK]
            rendered = [render(ex, tokenizer, train_on) for ex in chunk]
            job = (chunk, rendered, pool.submit(_encode, tokenizer, chunk, rendered))
            if pending:
                out += _finish(tokenizer, *pending, max_length)
            pending = job
        if pending:
            out += _finish(tokenizer, *pending, max_length)
    return out


_CHUNK = 2048


def _encode(tokenizer, chunk: Sequence[Example], rendered) -> list[tuple[list[int], list | None]]:
    """(ids, offsets or None) per example; text examples get the tokenizer's own special
    tokens (a BOS for Llama-style ones), chat templates already write the ones they want."""
    result: list = [None] * len(chunk)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    for flag in (False, True):
        idx = [i for i, ex in enumerate(chunk) if (ex.kind == "text") == flag]
        if not idx:
            continue
        texts = [rendered[i][0] for i in idx]
        if backend is not None:
            # the Rust tokenizer directly: half the time of tokenizer(...)
            for i, enc in zip(idx, backend.encode_batch(texts, add_special_tokens=flag)):
                result[i] = (enc.ids, enc.offsets)
        else:
            for i, text in zip(idx, texts):
                result[i] = (tokenizer(text, add_special_tokens=flag)["input_ids"], None)
    return result


def _finish(tokenizer, chunk, rendered, future, max_length) -> list[dict]:
    eos_id = getattr(tokenizer, "eos_token_id", None)
    items = []
    for ex, (text, spans, append_eos), (ids, offsets) in zip(chunk, rendered, future.result()):
        if ex.kind == "text":  # plain text: everything is learned
            labels = list(ids)
        elif offsets is not None:
            labels = _labels_from_offsets(ids, offsets, spans)
        else:
            ids, labels = _encode_by_pieces(tokenizer, text, spans)
        if append_eos and eos_id is not None and (not ids or ids[-1] != eos_id):
            ids, labels = ids + [int(eos_id)], labels + [int(eos_id)]
        if max_length is not None and len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
        items.append({"input_ids": ids, "labels": labels})
    return items


def tokenize_example(example: Example, tokenizer, max_length: int | None = None,
                     train_on: str = "all_assistant") -> dict:
    """Tokenise one example; see :func:`tokenize_examples`.

    Returns:
        ``{"input_ids": list[int], "labels": list[int]}``.
    """
    return tokenize_examples([example], tokenizer, max_length, train_on)[0]


def tokenize_preference(example: Example, tokenizer, max_length: int | None = None) -> dict:
    """Tokenise a preference example twice, prompt + chosen and prompt + rejected.

    Returns:
        ``{"chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels"}``;
        only the answer turns (and their end-of-turn) are labelled.
    """
    if example.kind != "preference":
        raise DataError(f"{example.source[0]}:{example.source[1]}: not a preference example")
    out = {}
    for name, turns in (("chosen", example.chosen), ("rejected", example.rejected)):
        ex = Example("preference", messages=example.messages, chosen=turns, source=example.source)
        item = tokenize_example(ex, tokenizer, max_length)
        out[f"{name}_input_ids"], out[f"{name}_labels"] = item["input_ids"], item["labels"]
    return out


def supervised_segments(item: dict, tokenizer) -> list[tuple[str, bool]]:
    """Decode a tokenised example into ``(text, supervised)`` runs, for previews."""
    ids, labels = item["input_ids"], item["labels"]
    runs: list[tuple[str, bool]] = []
    start = 0
    for t in range(1, len(ids) + 1):
        if t == len(ids) or (labels[t] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            runs.append((tokenizer.decode(ids[start:t]), labels[start] != IGNORE_INDEX))
            start = t
    return runs


def collate(batch: Sequence[dict], pad_id: int, pad_to_multiple_of: int | None = None,
            ) -> dict[str, Any]:
    """Right-pad tokenised examples into tensors.

    Padding is marked by ``attention_mask == 0`` and ``labels == -100``; labels are copied
    from each example, never derived from ``input_ids == pad_id``, so a real EOS label
    survives even when the pad id is the EOS id.

    Args:
        batch: dicts with ``input_ids`` and ``labels`` lists.
        pad_id: the id written into padded positions (see :func:`pad_token_id`).
        pad_to_multiple_of: round the padded length up to a multiple of this.

    Returns:
        ``input_ids`` (B, T) long, ``attention_mask`` (B, T) long, ``labels`` (B, T) long.
    """
    import torch

    length = max(len(item["input_ids"]) for item in batch)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item["input_ids"])
        input_ids[row, :n] = torch.tensor(item["input_ids"], dtype=torch.long)
        labels[row, :n] = torch.tensor(item["labels"], dtype=torch.long)
        attention_mask[row, :n] = 1
    out = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    if any("distill" in item for item in batch):  # data.replay.loss=kl (lorakit/data/replay.py)
        out["distill"] = distill_tensor(batch, length)
    return out


def distill_tensor(rows: Sequence[dict], length: int):
    """(B, T) bool: the rows' ``distill`` flags, False for padding and rows without any."""
    import torch

    out = torch.zeros((len(rows), length), dtype=torch.bool)
    for b, row in enumerate(rows):
        if "distill" in row:
            out[b, :len(row["distill"])] = torch.tensor(row["distill"], dtype=torch.bool)
    return out
