"""lorakit advise: the documented rule on a tiny model, and on the bundled SQL example (slow)."""

import json

import pytest

from lorakit.cli import main


def _write(path, n, start=0):
    rows = [{"prompt": f"Question {i}: what is {i} plus {i + 3}, in words please?",
             "completion": f"The answer is {2 * i + 3}."} for i in range(start, start + n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _advise(capsys, *args):
    code = main(["advise", *args, "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_few_examples_recommend_prompting(tmp_path, eval_base_dir, capsys):
    data = _write(tmp_path / "thirty.jsonl", 30)
    out = _advise(capsys, "--data", str(data), "--model", str(eval_base_dir), "--limit", "4",
                  "--max-new-tokens", "3")
    assert out["recommendation"] == "prompt"
    assert out["data"]["examples"] == 30 and out["data"]["few"] is True
    assert any("fewer than 50" in r for r in out["reasons"])
    assert set(out["baselines"]) == {"base", "base-3shot"}
    for row in out["baselines"].values():
        assert 0.0 <= row["score"] <= 1.0 and len(row["score_ci"]) == 2
    assert out["estimate"]["lora"]["memory_gib"] > 0
    assert out["held_out"]["examples"] == 4


def test_enough_examples_and_a_weak_baseline_recommend_fine_tuning(tmp_path, eval_base_dir, capsys):
    # a random tiny model answers nothing right: 80 examples and a baseline far from the target
    data = _write(tmp_path / "eighty.jsonl", 80)
    held = _write(tmp_path / "held.jsonl", 5, start=500)
    out = _advise(capsys, "--data", str(data), "--eval", str(held), "--model", str(eval_base_dir),
                  "--limit", "5", "--max-new-tokens", "3", "--few-shot", "2")
    assert out["recommendation"] == "fine-tune"
    assert out["baselines"]["base-2shot"]["score"] < 0.9
    assert any("falls short" in r for r in out["reasons"])


def test_the_rule():
    from lorakit.eval.advise import recommend

    weak = {"base": {"score": 0.1, "score_ci": [0.0, 0.3]}}
    good = {"base": {"score": 0.1, "score_ci": [0.0, 0.3]},
            "base-3shot": {"score": 0.95, "score_ci": [0.85, 1.0]}}
    unclear = {"base": {"score": 0.8, "score_ci": [0.5, 1.0]}}
    assert recommend(49, weak)[0] == "prompt"
    assert recommend(400, weak)[0] == "fine-tune"
    assert recommend(400, good)[0] == "prompt"
    assert recommend(400, unclear)[0] == "prompt"


@pytest.mark.slow
def test_bundled_sql_example_recommends_fine_tuning(capsys):
    out = _advise(capsys, "--limit", "12", "--max-new-tokens", "48", "--few-shot-select", "first")
    assert out["metric"] == "sql" and out["data"]["examples"] == 400
    assert out["recommendation"] == "fine-tune", out["reasons"]
