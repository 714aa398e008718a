"""`lorakit train` ends with lorakit eval's base-vs-tuned table on data.eval (eval.after_train)."""

import json

from lorakit.cli import main


def _args(tiny_model_dir, data, out, *extra):
    return ["train", f"model={tiny_model_dir}", f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'eval.jsonl'}", f"output_dir={out}", "data.max_length=128",
            "train.batch_size=4", "train.precision=fp32", "train.lr=1e-2", "lora.r=4",
            "train.max_steps=6", "eval.metric=exact", "eval.sql_db=null", "eval.limit=null", "eval.max_new_tokens=6", "eval.probe_limit=4",
            "--no-progress", *extra]


def test_train_prints_base_vs_tuned_and_writes_the_report(tiny_model_dir, arithmetic_data,
                                                          tmp_path, capsys, monkeypatch):
    # output_dir relative to the working directory, as people type it: the run folder "sums"
    # then exists there, and must not be taken for the adapter's folder
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "sums"
    assert main(_args(tiny_model_dir, arithmetic_data, "sums")) == 0
    out = capsys.readouterr().out
    assert "held-out: 12 examples, metric exact" in out
    assert "base" in out and "sums" in out

    result = json.loads((run / "eval" / "results.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    # eval.few_shot defaults to 3 when data.train is set: the prompt baseline base-3shot
    assert set(result["models"]) == {"base", "base-3shot", "sums"}
    assert result["few_shot"]["source"] == str(arithmetic_data / "train.jsonl")
    # the report scores the adapter the run saved: its held-out loss is the run's final eval
    # loss (same examples, same answer tokens), and the base (adapter off) differs from it
    assert abs(result["models"]["sums"]["loss"] - summary["final_eval_loss"]) < 1e-4
    assert abs(result["models"]["base"]["loss"] - summary["final_eval_loss"]) > 1e-3
    assert result["forgetting"]["sums"]["kl"] > 0
    assert (run / "eval" / "report.html").is_file()


def test_after_train_off_and_no_eval_file_skip_it(tiny_model_dir, arithmetic_data, tmp_path, capsys):
    run = tmp_path / "off"
    assert main(_args(tiny_model_dir, arithmetic_data, run, "eval.after_train=false")) == 0
    assert not (run / "eval").exists()
    assert "held-out:" not in capsys.readouterr().out
