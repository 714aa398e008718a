"""lorakit eval on the embedded SmolLM2-135M with an adapter trained by lorakit (slow)."""

import json

import pytest

from lorakit.cli import main

pytestmark = pytest.mark.slow


def test_trained_adapter_beats_base(tmp_path, capsys):
    from lorakit.config import load_config
    from lorakit.train.sft import train

    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    rows = [{"prompt": f"Spell the digit {i % 10} (item {n})", "completion": words[i % 10]}
            for n, i in enumerate(range(60))]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    cfg = load_config(None, [f"data.train={tmp_path / 'train.jsonl'}", f"output_dir={tmp_path / 'run'}",
                             "data.max_length=64", "train.batch_size=4", "train.max_steps=16",
                             "train.lr=1e-3", "train.precision=fp32", "lora.r=8", "lora.dropout=0.0"])
    result = train(cfg, progress=False, log=lambda m: None)

    out = tmp_path / "eval"
    code = main(["eval", "--adapter", str(result.adapter_dir), "--data", str(tmp_path / "eval.jsonl"),
                 "--metric", "exact", "--max-new-tokens", "8", "--probe-limit", "16", "--no-safety",
                 "--out", str(out), "--json"])
    assert code == 0
    s = json.loads(capsys.readouterr().out)
    assert s["model"] == "smollm2-135m-instruct"  # taken from the adapter's manifest
    tuned = s["models"]["run"]
    assert tuned["score"] > s["models"]["base"]["score"] + 0.3, s["models"]
    assert tuned["loss"] < s["models"]["base"]["loss"]
    assert tuned["wins"] > tuned["losses"]
    assert s["forgetting"]["run"]["kl"] > 0
    assert (out / "training_loss.png").stat().st_size > 0  # the run's metrics.jsonl was found
