import json

import pytest

from lorakit.data.formats import FORMATS, Example, detect_format, load_examples, normalize_format, parse_record
from lorakit.errors import ConfigError, DataError

USER, ASSISTANT, SYSTEM = "user", "assistant", "system"

# (record, format, expected messages / text) — every format lands in the canonical form
CASES = [
    ({"prompt": "2+2?", "completion": "4"}, "prompt_completion",
     [(USER, "2+2?"), (ASSISTANT, "4")]),
    ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                   {"role": "assistant", "content": "Bye!"}]}, "chat",
     [(SYSTEM, "Be brief."), (USER, "Hi"), (ASSISTANT, "Hello"), (USER, "Bye"), (ASSISTANT, "Bye!")]),
    ({"instruction": "Translate", "input": "cat", "output": "Katze"}, "instruction",
     [(USER, "Translate\n\ncat"), (ASSISTANT, "Katze")]),
    ({"instruction": "Say hi", "input": "", "output": "hi"}, "instruction",
     [(USER, "Say hi"), (ASSISTANT, "hi")]),
    ({"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                        {"from": "gpt", "value": "A"}]}, "sharegpt",
     [(SYSTEM, "S"), (USER, "Q"), (ASSISTANT, "A")]),
]


@pytest.mark.parametrize("record,fmt,messages", CASES)
def test_formats_become_chat(record, fmt, messages):
    assert detect_format(record) == fmt
    ex = parse_record(record)
    assert ex.kind == "chat" and ex.format == fmt
    assert [(m["role"], m["content"]) for m in ex.messages] == messages


def test_text_and_preference():
    ex = parse_record({"text": "a document"})
    assert ex.kind == "text" and ex.text == "a document" and ex.format == "text"

    ex = parse_record({"prompt": "Q", "chosen": "good", "rejected": "bad"})
    assert ex.kind == "preference"
    assert ex.messages == [{"role": "user", "content": "Q"}]
    assert ex.chosen == [{"role": "assistant", "content": "good"}]
    assert ex.rejected == [{"role": "assistant", "content": "bad"}]

    ex = parse_record({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                       "chosen": [{"role": "assistant", "content": "good"}],
                       "rejected": [{"role": "assistant", "content": "bad"}]})
    assert [m["role"] for m in ex.messages] == ["system", "user"]
    assert ex.answer_text() == "good"


def test_format_override_and_aliases():
    assert normalize_format("alpaca") == "instruction"
    assert normalize_format("messages") == "chat"
    with pytest.raises(ConfigError, match="did you mean 'sharegpt'"):
        normalize_format("sharegtp")
    # forcing a format reports the fields that format needs
    with pytest.raises(DataError, match="output: missing"):
        parse_record({"instruction": "x", "text": "y"}, format="alpaca")
    # a record with both "text" and "prompt" is prompt/completion by detection, text when forced
    record = {"text": "doc", "prompt": "p", "completion": "c"}
    assert parse_record(record).kind == "chat"
    assert parse_record(record, format="text").text == "doc"


def _write_jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


BAD_LINES = [
    ('{"prompt": "ok", "completion": "fine"}', None, None),
    ('{"prompt": "x"', "", "malformed JSON"),
    ('{"prompt": "x", "completion": ""}', "completion", "empty"),
    ('{"prompt": "x"}', "completion", "missing"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}',
     "messages[1].role", "unknown role 'bot'"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},'
     ' {"role": "user", "content": "more?"}]}', "messages", "ends without an assistant turn"),
    ('{"messages": [{"role": "user", "content": ["a", "b"]}, {"role": "assistant", "content": "yo"}]}',
     "messages[0].content", "must be a string"),
    ('{"conversations": [{"from": "human", "value": "q"}, {"from": "robot", "value": "a"}]}',
     "conversations[1].from", "unknown role 'robot'"),
    ('{"foo": 1}', "", "unrecognised record"),
    ('[1, 2]', "", "a JSON list where a record (object) was expected"),
    ('42', "", "a JSON number where a record (object) was expected"),
    ('{"prompt": "q", "chosen": "a"}', "rejected", "missing"),
    ('{"text": 5}', "text", "must be a string"),
]


def test_errors_name_file_line_and_field(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [line for line, _, _ in BAD_LINES])
    result = load_examples(path)
    assert len(result.examples) == 1 and result.examples[0].source == (str(path), 1)
    assert result.records == len(BAD_LINES) and result.skipped == len(BAD_LINES) - 1
    expected = [(i, f, m) for i, (_, f, m) in enumerate(BAD_LINES, start=1) if f is not None]
    assert len(result.errors) == len(expected)
    for error, (line, field, message) in zip(result.errors, expected):
        assert error.file == str(path)
        assert error.line == line
        assert error.field == field
        assert message in error.message
        assert set(error.to_dict()) == {"file", "line", "field", "message"}


def test_strict_raises_with_location(tmp_path):
    path = _write_jsonl(tmp_path / "train.jsonl", [BAD_LINES[0][0], BAD_LINES[0][0], BAD_LINES[2][0]])
    with pytest.raises(DataError, match=rf"train.jsonl:3: completion: empty"):
        load_examples(path, strict=True)


def test_json_list_keeps_line_numbers(tmp_path):
    records = [{"prompt": "a", "completion": "b"}, {"prompt": "c"}, {"text": "d"}]
    path = tmp_path / "train.json"
    path.write_text(json.dumps(records, indent=2), encoding="utf-8")
    result = load_examples(path)
    assert [ex.source[1] for ex in result.examples] == [2, 9]
    assert [(e.line, e.field) for e in result.errors] == [(6, "completion")]
    assert result.formats == {"prompt_completion": 1, "text": 1}


def test_malformed_json_list_is_reported(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[{"text": "a"},\n {"text": "b" \n {"text": "c"}]', encoding="utf-8")
    result = load_examples(path)
    assert len(result.examples) == 1
    assert result.errors[0].line == 3 and "malformed JSON" in result.errors[0].message


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "nope.jsonl")


class FakeDataset:
    """Quacks like datasets.Dataset: has column_names and iterates over row dicts."""

    column_names = ["prompt", "completion"]

    def __iter__(self):
        yield {"prompt": "p1", "completion": "c1"}
        yield {"prompt": "p2", "completion": None}


def test_dataset_and_list_inputs():
    result = load_examples(FakeDataset())
    assert len(result.examples) == 1
    assert result.errors[0].file == "<dataset>" and result.errors[0].line == 2
    result = load_examples([{"text": "a"}, {"text": "b"}])
    assert [ex.text for ex in result.examples] == ["a", "b"]


def test_all_formats_listed():
    assert set(FORMATS) == {"prompt_completion", "chat", "instruction", "sharegpt", "text", "preference",
                            "kto"}
    assert Example("text", text="x").all_text() == "x"
