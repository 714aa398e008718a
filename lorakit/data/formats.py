"""Reading training data: every supported file format becomes one canonical :class:`Example`.

Formats are detected per record from the keys present (mlx-lm style), or forced with
``format=``. Accepted shapes::

    prompt_completion  {"prompt": str, "completion": str}
    chat               {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
    instruction        {"instruction": str, "input": str (optional), "output": str}   (alpaca)
    sharegpt           {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
    text               {"text": str}
    preference         {"prompt": str|messages, "chosen": str|messages, "rejected": str|messages}
    kto                {"prompt": str|messages, "completion": str|messages, "label": bool}
                       or {"messages": [...], "label": bool}   (the last assistant turn is judged)

prompt_completion, instruction and sharegpt become ``kind="chat"`` examples (user prompt ->
assistant answer) so the model's chat template applies to them; text stays ``kind="text"``;
preference becomes ``kind="preference"`` with the prompt in ``messages``; kto becomes
``kind="kto"`` with the whole conversation in ``messages`` (prompt, then the judged answer)
and ``label`` True for a desirable answer, False for an undesirable one.

Files are JSONL (one object per line) or JSON (one list of objects), read by
:func:`lorakit.data.jsonl.read_jsonl_records` (the rules for each suffix, and for hostile JSON,
are there); either way every error names the file, the line and the field. Bad records are
skipped and counted, never dropped silently; ``strict=True`` raises
:class:`~lorakit.errors.DataError` on the first one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lorakit.data.jsonl import DataIssue, read_jsonl_records, show  # DataIssue: as before
from lorakit.errors import ConfigError, DataError, did_you_mean

FORMATS = ("prompt_completion", "chat", "instruction", "sharegpt", "text", "preference", "kto")
_ALIASES = {
    "auto": "auto",
    "alpaca": "instruction",
    "messages": "chat",
    "openai": "chat",
    "prompt-completion": "prompt_completion",
    "completion": "prompt_completion",
    "dpo": "preference",
    "plain": "text",
}
ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant", "system": "system"}


@dataclass
class Example:
    """One training example in lorakit's canonical form.

    Attributes:
        kind: ``"chat"``, ``"text"``, ``"preference"`` or ``"kto"``.
        messages: for chat, the whole conversation; for preference, the prompt turns.
            Each message is ``{"role": "system"|"user"|"assistant", "content": str}``.
        text: the document, for ``kind="text"``.
        chosen, rejected: the preferred / dispreferred answer turns (preference only).
        label: kto only: True when the last assistant turn is a desirable answer.
        source: ``(file, line)`` the example was read from (line is 1-based; for a
            ``datasets`` Dataset or a list the "line" is the 1-based row number).
        format: the input format it was read as (one of :data:`FORMATS`).
    """

    kind: str
    messages: list[dict] = field(default_factory=list)
    text: str | None = None
    chosen: list[dict] = field(default_factory=list)
    rejected: list[dict] = field(default_factory=list)
    label: bool | None = None
    source: tuple[str, int] = ("<memory>", 0)
    format: str = "chat"

    def prompt_messages(self) -> list[dict]:
        """The turns before the last assistant turn (the whole prompt for preference)."""
        if self.kind == "preference":
            return self.messages
        last = max((i for i, m in enumerate(self.messages) if m["role"] == "assistant"), default=None)
        return self.messages if last is None else self.messages[:last]

    def answer_text(self) -> str:
        """The supervised answer: last assistant turn, the chosen answer, or the text."""
        if self.kind == "text":
            return self.text or ""
        turns = self.chosen if self.kind == "preference" else self.messages
        answers = [m["content"] for m in turns if m["role"] == "assistant"]
        return answers[-1] if answers else ""

    def all_text(self) -> str:
        """Every piece of text in the example, joined by newlines (for dedup and stats)."""
        if self.kind == "text":
            return self.text or ""
        parts = [m["content"] for m in self.messages]
        parts += [m["content"] for m in self.chosen] + [m["content"] for m in self.rejected]
        return "\n".join(parts)


@dataclass
class LoadResult:
    """What :func:`load_examples` read: the valid examples and the problems it skipped."""

    examples: list[Example]
    errors: list[DataIssue]
    formats: dict[str, int]
    records: int  # records seen, valid or not

    @property
    def skipped(self) -> int:
        return self.records - len(self.examples)


class _RecordError(Exception):
    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def normalize_format(format: str) -> str:
    """Map a user-given format name (or alias) to one of :data:`FORMATS` or ``"auto"``.

    Raises:
        ConfigError: for an unknown name, suggesting the nearest valid one.
    """
    name = format.strip().lower()
    if name in FORMATS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    choices = ("auto",) + FORMATS
    raise ConfigError(f"unknown data format {format!r}{did_you_mean(name, choices + tuple(_ALIASES))}; "
                      f"choose one of {', '.join(choices)}")


def detect_format(record: dict) -> str | None:
    """The format a record is in, judged from its keys, or ``None`` if none fits."""
    if "label" in record and ("completion" in record or "messages" in record):
        return "kto"
    if "messages" in record:
        return "chat"
    if "conversations" in record:
        return "sharegpt"
    if "chosen" in record or "rejected" in record:
        return "preference"
    if "instruction" in record:
        return "instruction"
    if "prompt" in record or "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


# ---------------------------------------------------------------- per-format parsers


def _string(record: dict, key: str, *, allow_empty: bool = False, where: str | None = None) -> str:
    where = where or key
    if key not in record or record[key] is None:
        raise _RecordError(where, "missing")
    value = record[key]
    if not isinstance(value, str):
        raise _RecordError(where, f"must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _RecordError(where, "empty")
    return value


def _messages(value: Any, where: str, role_key: str = "role", content_key: str = "content",
              roles: dict[str, str] | None = None) -> list[dict]:
    if not isinstance(value, list):
        raise _RecordError(where, f"must be a list of messages, got {type(value).__name__}")
    if not value:
        raise _RecordError(where, "empty")
    roles = roles or {r: r for r in ROLES}
    out = []
    for i, msg in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(msg, dict):
            raise _RecordError(at, f"must be an object, got {type(msg).__name__}")
        role = msg.get(role_key)
        if role is None:
            raise _RecordError(f"{at}.{role_key}", "missing")
        if not isinstance(role, str) or role not in roles:
            hint = did_you_mean(role, roles) if isinstance(role, str) and len(role) < 40 else ""
            raise _RecordError(f"{at}.{role_key}",
                               f"unknown role {show(role)}{hint}; expected one of {', '.join(roles)}")
        content = _string(msg, content_key, where=f"{at}.{content_key}")
        out.append({"role": roles[role], "content": content})
    return out


def _check_conversation(messages: list[dict], where: str) -> None:
    if messages[-1]["role"] != "assistant":
        raise _RecordError(where, "conversation ends without an assistant turn")
    if not any(m["role"] == "user" for m in messages):
        raise _RecordError(where, "conversation has no user turn")


def _as_turns(value: Any, where: str, role: str) -> list[dict]:
    """A preference field: a string (one turn of ``role``) or a message list."""
    if isinstance(value, str):
        if not value.strip():
            raise _RecordError(where, "empty")
        return [{"role": role, "content": value}]
    if value is None:
        raise _RecordError(where, "missing")
    if isinstance(value, list):
        return _messages(value, where)
    raise _RecordError(where, f"must be a string or a list of messages, got {type(value).__name__}")


def _parse(record: dict, fmt: str) -> Example:
    if fmt == "chat":
        messages = _messages(record.get("messages"), "messages")
        _check_conversation(messages, "messages")
        return Example("chat", messages=messages)
    if fmt == "sharegpt":
        messages = _messages(record.get("conversations"), "conversations", "from", "value",
                             _SHAREGPT_ROLES)
        _check_conversation(messages, "conversations")
        return Example("chat", messages=messages)
    if fmt == "prompt_completion":
        prompt = _string(record, "prompt")
        completion = _string(record, "completion")
        return Example("chat", messages=[{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": completion}])
    if fmt == "instruction":
        instruction = _string(record, "instruction")
        extra = _string(record, "input", allow_empty=True) if record.get("input") is not None else ""
        output = _string(record, "output")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        if record.get("system"):
            messages.insert(0, {"role": "system", "content": _string(record, "system")})
        return Example("chat", messages=messages)
    if fmt == "text":
        return Example("text", text=_string(record, "text"))
    if fmt == "preference":
        prompt = _as_turns(record.get("prompt"), "prompt", "user")
        chosen = _as_turns(record.get("chosen"), "chosen", "assistant")
        rejected = _as_turns(record.get("rejected"), "rejected", "assistant")
        for name, turns in (("chosen", chosen), ("rejected", rejected)):
            if turns[-1]["role"] != "assistant":
                raise _RecordError(name, "must end with an assistant turn")
        if prompt[-1]["role"] == "assistant":
            raise _RecordError("prompt", "must not end with an assistant turn")
        return Example("preference", messages=prompt, chosen=chosen, rejected=rejected)
    if fmt == "kto":
        return _parse_kto(record)
    raise AssertionError(fmt)


def _parse_kto(record: dict) -> Example:
    """``{"prompt", "completion", "label"}`` or ``{"messages", "label"}`` -> ``kind="kto"``."""
    if "messages" in record:
        messages = _messages(record.get("messages"), "messages")
        _check_conversation(messages, "messages")
    else:
        prompt = _as_turns(record.get("prompt"), "prompt", "user")
        completion = _as_turns(record.get("completion"), "completion", "assistant")
        if prompt[-1]["role"] == "assistant":
            raise _RecordError("prompt", "must not end with an assistant turn")
        if completion[-1]["role"] != "assistant":
            raise _RecordError("completion", "must end with an assistant turn")
        messages = prompt + completion
    label = record.get("label")
    if label is None:
        raise _RecordError("label", "missing (true for a desirable answer, false otherwise)")
    if not isinstance(label, bool):
        raise _RecordError("label", f"must be true or false, got {show(label)}")
    return Example("kto", messages=messages, label=label)


def parse_record(record: Any, format: str = "auto") -> Example:
    """Turn one raw record (a dict) into an :class:`Example`.

    Raises:
        DataError: if the record is not valid in the given (or detected) format.
    """
    try:
        return _parse_or_raise(record, normalize_format(format))
    except _RecordError as exc:
        raise DataError(f"{exc.field}: {exc.message}" if exc.field else exc.message) from None


def _parse_or_raise(record: Any, fmt: str) -> Example:
    if not isinstance(record, dict):
        raise _RecordError("", f"expected a JSON object, got {type(record).__name__}")
    detected = fmt if fmt != "auto" else detect_format(record)
    if detected is None:
        names = sorted(map(str, record))
        keys = ", ".join(show(k)[1:-1] for k in names[:8]) + (f", ... ({len(names)} keys)"
                                                              if len(names) > 8 else "")
        keys = keys or "none"
        raise _RecordError("", f"unrecognised record (keys: {keys}); expected messages, conversations, "
                               "prompt/completion, instruction/output, text or prompt/chosen/rejected")
    example = _parse(record, detected)
    example.format = detected
    return example


# ---------------------------------------------------------------- files


def _iter_rows(rows: Iterable[Any]) -> Iterable[tuple[int, Any, DataIssue | None]]:
    for i, row in enumerate(rows, start=1):
        yield i, dict(row) if hasattr(row, "keys") and not isinstance(row, dict) else row, None


def load_examples(path_or_dataset: Any, format: str = "auto", strict: bool = False,
                  layout: str = "auto") -> LoadResult:
    """Read examples from a JSONL/JSON file, a list of dicts, or a Hugging Face ``Dataset``.

    Args:
        path_or_dataset: a file path (``str`` / ``Path``; ``.jsonl`` or a JSON list), a list of
            records, or any iterable of mappings such as a ``datasets.Dataset``.
        format: ``"auto"`` (detect per record) or one of :data:`FORMATS` (aliases such as
            ``"alpaca"`` and ``"messages"`` are accepted).
        strict: raise on the first bad record instead of skipping it.
        layout: for a path, ``"auto"`` (from the suffix: ``.jsonl`` is one object per line,
            anything else a JSON array or JSON lines), ``"jsonl"`` or ``"json"``; see
            :func:`lorakit.data.jsonl.read_jsonl_records`.

    Returns:
        A :class:`LoadResult` with the valid examples, the errors (file, line, field,
        message) of the skipped ones, and counts per detected format.

    Raises:
        DataError: the file is missing or unreadable, or ``strict`` and a record is bad
            (the message names file, line and field: ``train.jsonl:7: completion: empty``).
        ConfigError: ``format`` is not a known format.
    """
    fmt = normalize_format(format)
    if isinstance(path_or_dataset, (str, Path)):
        name = str(path_or_dataset)
        records = read_jsonl_records(Path(path_or_dataset), name=name, layout=layout)
    else:
        name = "<dataset>" if hasattr(path_or_dataset, "column_names") else "<memory>"
        records = _iter_rows(path_or_dataset)

    examples: list[Example] = []
    errors: list[DataIssue] = []
    formats: dict[str, int] = {}
    seen = 0
    for line, record, issue in records:
        seen += 1
        if issue is None:
            try:
                example = _parse_or_raise(record, fmt)
            except _RecordError as exc:
                issue = DataIssue(name, line, exc.field, exc.message)
            else:
                example.source = (name, line)
                examples.append(example)
                formats[example.format] = formats.get(example.format, 0) + 1
                continue
        if strict:
            raise DataError(str(issue))
        errors.append(issue)
    return LoadResult(examples=examples, errors=errors, formats=formats, records=seen)
