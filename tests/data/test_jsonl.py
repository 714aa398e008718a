"""Hostile JSON in data files: every record is read or reported (file, line, field), never a
traceback, never dropped silently. Covers lorakit/data/jsonl.py and its callers (load_examples,
``lorakit data check``, the train data loader)."""

import json
import subprocess
import sys

import pytest

from lorakit.cli import main
from lorakit.config import RunConfig
from lorakit.data.check import check_data
from lorakit.data.formats import load_examples
from lorakit.data.jsonl import MAX_DEPTH, JSONRecordError, loads_record, read_jsonl_records
from lorakit.errors import DataError

GOOD = b'{"prompt": "What is 2+2?", "completion": "4"}'
DEEP = 100_000

# (name, the bad line as bytes, the field reported, words the message must hold)
HOSTILE = [
    ("deep_list", b"[" * DEEP + b"]" * DEEP, "", "nested more than"),
    ("deep_object", b'{"a": ' * DEEP + b"1" + b"}" * DEEP, "", "nested more than"),
    ("deep_in_field", b'{"prompt": "q", "completion": ' + b"[" * DEEP + b"]" * DEEP + b"}", "",
     "nested more than"),
    ("lone_surrogate", b'{"prompt": "a\\ud800b", "completion": "c"}', "prompt", "lone surrogate"),
    ("low_surrogate_nested", b'{"messages": [{"role": "user", "content": "q"}, '
     b'{"role": "assistant", "content": "x\\udfff"}]}', "messages[1].content", "lone surrogate"),
    ("surrogate_key", b'{"text": "t", "k\\udbff": 1}', "", "lone surrogate"),
    ("invalid_utf8_in_string", b'{"prompt": "caf\xe9", "completion": "c"}', "prompt",
     "not valid UTF-8"),
    ("invalid_utf8_outside", b'{"prompt": "q", "completion": "c"}\xff\xfe', "", "not valid UTF-8"),
    ("huge_int", b'{"prompt": "q", "completion": "c", "id": ' + b"9" * DEEP + b"}", "id",
     "100000 digits"),
    ("huge_float", b'{"prompt": "q", "completion": "c", "score": 1e999}', "score", "out of range"),
    ("long_float", b'{"prompt": 1' + b"0" * DEEP + b'.5, "completion": "c"}', "prompt",
     "out of range"),
    ("nan", b'{"prompt": "q", "completion": "c", "score": NaN}', "score", "NaN is not valid JSON"),
    ("infinity", b'{"prompt": "q", "completion": "c", "scores": [1, -Infinity]}', "scores[1]",
     "-Infinity is not valid JSON"),
    ("json_list_line", b'[{"prompt": "q", "completion": "c"}]', "",
     "a JSON list where a record (object) was expected"),
    ("json_number_line", b"42", "", "a JSON number where a record"),
]
IDS = [case[0] for case in HOSTILE]


def _write(tmp_path, bad: bytes, name="train.jsonl"):
    """A file with a good line, the bad line, and another good line after it."""
    path = tmp_path / name
    path.write_bytes(GOOD + b"\n" + bad + b"\n" + GOOD.replace(b"4", b"four") + b"\n")
    return path


@pytest.mark.parametrize("name,bad,field,words", HOSTILE, ids=IDS)
def test_load_examples_reports_and_keeps_the_next_line(tmp_path, name, bad, field, words):
    path = _write(tmp_path, bad)
    result = load_examples(path)
    assert result.records == 3
    assert [ex.source[1] for ex in result.examples] == [1, 3]  # the line after the bad one is read
    assert result.examples[1].answer_text() == "four"
    [issue] = result.errors
    assert (issue.file, issue.line, issue.field) == (str(path), 2, field)
    assert words in issue.message
    json.dumps(issue.to_dict(), ensure_ascii=False).encode("utf-8")  # printable as UTF-8
    # strict (what a caller that wants no skipping uses) raises a DataError at file:line
    with pytest.raises(DataError, match=rf"train\.jsonl:2: .*{words[:12]}"):
        load_examples(path, strict=True)


@pytest.mark.parametrize("name,bad,field,words", HOSTILE, ids=IDS)
def test_data_check_cli_json(tmp_path, capsys, name, bad, field, words):
    path = _write(tmp_path, bad)
    code = main(["data", "check", str(path), "--model", "none", "--json", "--strict"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    report = json.loads(out)
    assert report["records"] == 3 and report["examples"] == 2 and report["skipped"] == 1
    [row] = report["errors"]
    assert row["file"] == str(path) and row["line"] == 2 and row["field"] == field
    assert words in row["message"]


@pytest.mark.parametrize("name,bad,field,words", HOSTILE[::3], ids=IDS[::3])
def test_data_check_cli_text(tmp_path, capsys, name, bad, field, words):
    path = tmp_path / "only_bad.jsonl"
    path.write_bytes(bad + b"\n")
    code = main(["data", "check", str(path), "--model", "none"])
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err  # no valid example left
    flat = " ".join(out.split())  # rich wraps long lines
    assert f"only_bad.jsonl:1:{' ' + field + ':' if field else ''}" in flat
    assert words in flat


def test_data_check_with_tokenizer_survives_surrogates(tmp_path, smol_tokenizer):
    # a lone surrogate used to reach the (Rust) tokenizer and raise there
    path = _write(tmp_path, HOSTILE[3][1])
    report = check_data(path, tokenizer=smol_tokenizer, max_length=64)
    assert report["examples"] == 2 and report["tokens"]["unit"] == "tokens"
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(2, "prompt")]


def test_data_check_process_never_tracebacks(tmp_path):
    """The real command in its own process, on a file of every hostile line."""
    path = tmp_path / "all.jsonl"
    path.write_bytes(b"\n".join([GOOD] + [bad for _, bad, _, _ in HOSTILE]) + b"\n")
    done = subprocess.run([sys.executable, "-m", "lorakit", "data", "check", str(path),
                           "--model", "none", "--json"], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    assert b"Traceback" not in done.stderr
    report = json.loads(done.stdout)
    assert report["examples"] == 1
    assert [e["line"] for e in report["errors"]] == list(range(2, len(HOSTILE) + 2))


def test_train_loader_names_file_and_line(tmp_path):
    from lorakit.train.common import load_train_and_eval

    logged = []
    path = _write(tmp_path, HOSTILE[0][1])
    train, _ = load_train_and_eval(RunConfig(data={"train": str(path)}), logged.append,
                                   expected="a file")
    assert [ex.source[1] for ex in train] == [1, 3]
    assert any(f"{path}:2: nested more than" in line for line in logged)

    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_bytes(HOSTILE[3][1] + b"\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: prompt: holds a lone surrogate"):
        load_train_and_eval(RunConfig(data={"train": str(only_bad)}), logged.append,
                            expected="a file")


# ---------------------------------------------------------------- layout rules


def test_jsonl_first_line_list_does_not_swallow_the_file(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"text": "a"}, {"text": "b"}]
    path.write_text(json.dumps(rows) + "\n" + json.dumps({"text": "c"}) + "\n", encoding="utf-8")
    result = load_examples(path)
    assert [ex.text for ex in result.examples] == ["c"]  # not a, b read from the list
    [issue] = result.errors
    assert issue.line == 1 and "use a .json file" in issue.message


def test_jsonl_pretty_printed_array_is_reported_with_a_hint(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps([{"text": "a"}], indent=2), encoding="utf-8")
    result = load_examples(path)
    assert not result.examples and result.errors[0].line == 1
    assert "JSON array spread over several lines" in result.errors[0].message
    assert [e.line for e in result.errors] == [1, 2, 3, 4, 5]  # every line accounted for


def test_json_array_hostile_elements_keep_their_lines(tmp_path):
    path = tmp_path / "train.json"
    elements = [b'{"text": "a"}', b"[" * DEEP + b"]" * DEEP, b'{"text": "b\\ud800"}',
                b'{"text": NaN}', b"[1]", b"[" * (MAX_DEPTH + 5) + b"]" * (MAX_DEPTH + 5),
                b'{"text": "\xff"}', b'{"text": "ok"}']
    path.write_bytes(b"[" + b",\n".join(elements) + b"]\n")
    result = load_examples(path)
    assert [(ex.source[1], ex.text) for ex in result.examples] == [(1, "a"), (8, "ok")]
    got = [(e.line, e.field, e.message.split(" (")[0]) for e in result.errors]
    assert got == [(2, "", "nested more than 100 levels deep"),
                   (3, "text", "holds a lone surrogate \\ud800 at character 2"),
                   (4, "text", "NaN is not valid JSON"),
                   (5, "", "a JSON list where a record"),
                   (6, "", "nested more than 100 levels deep"),
                   (7, "text", "not valid UTF-8")]


def test_json_array_trailing_data_and_unclosed_are_reported(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"text": "a"}]\n{"text": "b"}\n', encoding="utf-8")
    result = load_examples(path)
    assert [ex.text for ex in result.examples] == ["a"]
    assert result.errors[0].line == 2 and "extra data after the closing ']'" in result.errors[0].message
    path.write_text('[{"text": "a"},\n{"text": "b"}\n', encoding="utf-8")
    result = load_examples(path)
    assert [ex.text for ex in result.examples] == ["a", "b"]
    assert "not closed" in result.errors[0].message and "rest of this file" in result.errors[0].message


def test_json_suffix_without_array_is_json_lines(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [ex.text for ex in load_examples(path).examples] == ["a", "b"]


def test_layout_override_for_temporary_names(tmp_path):
    # an upload's temporary file has lost its suffix: layout="jsonl" keeps the .jsonl rule
    path = tmp_path / ".file-abc.jsonl.tmp"
    path.write_text('[{"text": "a"}]\n{"text": "b"}\n', encoding="utf-8")
    sniffed = load_examples(path)  # read as a JSON array, the next line reported as extra data
    assert [ex.text for ex in sniffed.examples] == ["a"] and "extra data" in sniffed.errors[0].message
    result = load_examples(path, layout="jsonl")
    assert [ex.text for ex in result.examples] == ["b"] and result.errors[0].line == 1
    report = check_data(path, layout="jsonl")
    assert report["examples"] == 1 and report["errors"][0]["line"] == 1


def test_line_separators_inside_strings_do_not_split_records(tmp_path):
    # U+2028 and U+0085 are legal raw characters in JSON strings; str.splitlines split on them
    path = tmp_path / "t.jsonl"
    path.write_bytes('\ufeff{"text": "a\u2028b\x85c"}\r\n{"text": "d"}\n'.encode("utf-8"))
    result = load_examples(path)
    assert [ex.text for ex in result.examples] == ["a\u2028b\x85c", "d"] and not result.errors


def test_valid_surrogate_pairs_and_big_but_fine_numbers_are_accepted(tmp_path):
    path = tmp_path / "t.jsonl"
    line = {"text": "smile \U0001F600", "id": 10 ** 300, "score": 1e308}
    path.write_text(json.dumps(line) + "\n", encoding="utf-8")  # ensure_ascii: \ud83d\ude00
    [(lineno, record, issue)] = list(read_jsonl_records(path))
    assert issue is None and record == line


def test_error_messages_stay_short(tmp_path):
    path = tmp_path / "t.jsonl"
    huge_role = '{"messages": [{"role": "' + "x" * 100_000 + '", "content": "c"}]}'
    many_keys = json.dumps({f"key{i}": i for i in range(10_000)})
    path.write_text(huge_role + "\n" + many_keys + "\n", encoding="utf-8")
    errors = load_examples(path).errors
    assert [e.line for e in errors] == [1, 2]
    assert all(len(e.message) < 300 for e in errors)


def test_loads_record_public_helper():
    assert loads_record(b'{"a": [1, "x"]}') == {"a": [1, "x"]}
    with pytest.raises(JSONRecordError) as info:
        loads_record('{"a": {"b": "\\udc00"}}')
    assert info.value.field == "a.b" and isinstance(info.value, DataError)
    with pytest.raises(JSONRecordError, match="nested more than 3 levels"):
        loads_record("[[[[1]]]]", max_depth=3)
    assert loads_record("[[[1]]]", max_depth=3) == [[[1]]]


def test_missing_and_directory_paths_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_jsonl_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a directory"):
        read_jsonl_records(tmp_path)
