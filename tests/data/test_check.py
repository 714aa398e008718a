import json

import pytest

from lorakit.cli import main
from lorakit.data.check import check_data
from lorakit.errors import DataError


def _write(path, records, bad_lines=()):
    lines = [json.dumps(r) for r in records] + list(bad_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _qa(i):
    return {"prompt": f"Question number {i}: what is {i} plus {i}?",
            "completion": f"The answer to question {i} is {2 * i}, because {i} and {i} make {2 * i}."}


@pytest.fixture
def files(tmp_path):
    records = [_qa(i) for i in range(30)]
    records += [_qa(0), _qa(1)]  # exact duplicates
    records.append({"prompt": _qa(2)["prompt"], "completion": "Something else entirely."})  # conflict
    near = dict(_qa(3))
    near["completion"] = near["completion"].upper() + "!!"  # case/punctuation only
    records.append(near)
    records.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    train = _write(tmp_path / "train.jsonl", records,
                   bad_lines=['{"prompt": "x"', '{"messages": [{"role": "user", "content": "only a question"}]}'])
    evals = _write(tmp_path / "eval.jsonl", [_qa(5), _qa(100)])
    return train, evals


def test_check_report_without_tokenizer(files):
    train, evals = files
    report = check_data(train, eval_path=evals)
    assert report["examples"] == 35 and report["records"] == 37 and report["skipped"] == 2
    assert [(e["line"], e["field"]) for e in report["errors"]] == [(36, ""), (37, "messages")]
    assert all(e["file"] == str(train) for e in report["errors"])
    assert report["formats"] == {"prompt_completion": 34, "chat": 1}
    assert report["duplicates"]["exact"] == 2 and report["duplicates"]["near"] == 1
    assert report["conflicts"] == {"prompts": 1, "examples": 2}
    assert report["leakage"] == {"eval_examples": 2, "exact": 1, "near": 0}
    assert report["tokens"]["unit"] == "words" and report["truncated"] is None
    assert 0 < report["diversity"]["distinct_2"] <= 1
    warnings = "\n".join(report["warnings"])
    assert "fewer than 50 examples: prompt engineering may suffice" in warnings
    assert "2 of 37 records were skipped" in warnings
    assert "exact duplicates" in warnings and "different answers" in warnings
    assert "also appear in train" in warnings
    json.dumps(report)  # the report is plain JSON


def test_near_duplicate_warning_shows_percentage(tmp_path):
    base = " ".join(f"word{j}" for j in range(80))  # one word in 80 differs: Jaccard ~0.93
    records = [{"text": f"{base} {i} and more words to pad the sentence out further"} for i in range(60)]
    records += [{"text": f"completely different document {i} " + " ".join(f"w{i}x{j}" for j in range(20))}
                for i in range(40)]
    report = check_data(_write(tmp_path / "t.jsonl", records))
    assert report["duplicates"]["near"] == 59
    assert "59% of examples are near-duplicates (59)" in report["warnings"]


def test_strict_raises(files):
    with pytest.raises(DataError, match=r"train.jsonl:36"):
        check_data(files[0], strict=True)


@pytest.mark.slow
def test_check_with_tokenizer(files, smol_tokenizer):
    report = check_data(files[0], tokenizer=smol_tokenizer, max_length=64, preview=2)
    tokens = report["tokens"]
    assert tokens["unit"] == "tokens"
    assert tokens["min"] <= tokens["p50"] <= tokens["p90"] <= tokens["p95"] <= tokens["p99"] <= tokens["max"]
    assert isinstance(report["truncated"], int) and report["truncated"] > 0  # default system prompt is long
    assert 0 < report["supervised_share"] < 1
    seg = report["preview"][0]["segments"]
    assert [text for text, sup in seg if sup] == [_qa(0)["completion"] + "<|im_end|>"]


def _cli(capsys, *argv):
    code = main(["data", "check", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_json(files, capsys):
    train, evals = files
    code, out, _ = _cli(capsys, train, "--eval", evals, "--model", "none", "--json")
    assert code == 0
    report = json.loads(out)
    for key in ("examples", "errors", "duplicates", "tokens", "warnings"):
        assert key in report
    assert set(report["errors"][0]) == {"file", "line", "field", "message"}
    assert report["duplicates"]["exact"] == 2


def test_cli_strict_exit_code_and_human_output(files, capsys):
    train, _ = files
    code, out, _ = _cli(capsys, train, "--model", "none", "--strict")
    assert code == 1
    assert "train.jsonl:37: messages: conversation ends without an assistant turn" in out
    assert "warning: fewer than 50 examples" in out
    code, _, _ = _cli(capsys, train, "--model", "none")
    assert code == 0


def test_cli_missing_file(tmp_path, capsys):
    code, _, err = _cli(capsys, tmp_path / "missing.jsonl", "--model", "none")
    assert code == 2 and "no such file" in err


@pytest.mark.slow
def test_cli_preview_brackets_when_piped(files, capsys, monkeypatch, smol_tokenizer):
    import lorakit.data.cli as data_cli

    monkeypatch.setattr(data_cli, "_load_tokenizer", lambda model: smol_tokenizer)
    code, out, _ = _cli(capsys, files[0], "--preview", "1")
    assert code == 0
    assert "[[" + _qa(0)["completion"] + "<|im_end|>]]" in out
