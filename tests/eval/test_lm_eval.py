"""``lorakit eval --lm-eval``: EleutherAI's lm-evaluation-harness on a small local task.

The task (lm_eval_task/tiny_text.yaml) is a rolling log-likelihood over a JSONL shipped here,
read with the `json` loader of `datasets`: nothing is downloaded. The scores lorakit reports
for the base and for the adapter are checked against the harness run directly on a plain
transformers model and on a PEFT-loaded one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorakit.cli import main

TASK_DIR = Path(__file__).with_name("lm_eval_task")
METRICS = ("word_perplexity", "byte_perplexity", "bits_per_byte")


@pytest.fixture()
def task_yaml(tmp_path):
    """The shipped task, copied with an absolute path to its JSONL."""
    folder = tmp_path / "task"
    folder.mkdir()
    shutil.copy(TASK_DIR / "tiny_text.jsonl", folder)
    text = (TASK_DIR / "tiny_text.yaml").read_text()
    text = text.replace("test: tiny_text.jsonl", f"test: {folder / 'tiny_text.jsonl'}")
    (folder / "tiny_text.yaml").write_text(text)
    return folder / "tiny_text.yaml"


def _harness(model, tokenizer, yaml_path):
    """The harness's own scores for ``model`` (a plain or PEFT transformers model)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(yaml_path.parent)], include_defaults=False)
    results = simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4),
                              tasks=["lorakit_tiny_text"], task_manager=manager,
                              log_samples=False)
    return results["results"]["lorakit_tiny_text"]


def test_lm_eval_scores_base_and_adapter_as_the_harness_does(eval_base_dir, eval_adapters,
                                                            eval_data, task_yaml, tmp_path,
                                                            capsys):
    pytest.importorskip("lm_eval")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "report"
    rc = main(["eval", "--adapter", f"rand={eval_adapters / 'rand'}", "--data",
               str(eval_data / "eval.jsonl"), "--max-new-tokens", "4", "--no-forgetting",
               "--no-safety", "--lm-eval", str(task_yaml), "--out", str(out), "--json",
               "--dtype", "float32"])  # the harness's reference runs below are float32
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)["lm_eval"]
    saved = json.loads((out / "results.json").read_text())["lm_eval"]
    assert printed == saved and set(saved) == {"base", "rand"}
    assert "lm-eval" in (out / "report.html").read_text()

    tokenizer = AutoTokenizer.from_pretrained(eval_base_dir)
    base = AutoModelForCausalLM.from_pretrained(eval_base_dir, dtype=torch.float32).eval()
    reference_base = _harness(base, tokenizer, task_yaml)
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(eval_base_dir, dtype=torch.float32),
        eval_adapters / "rand").eval()
    reference_tuned = _harness(tuned, tokenizer, task_yaml)
    for metric in METRICS:
        key = f"{metric},none"
        ours_base, ours_tuned = saved["base"]["lorakit_tiny_text"][key], \
            saved["rand"]["lorakit_tiny_text"][key]
        assert ours_base == pytest.approx(reference_base[key], rel=1e-5)
        assert ours_tuned == pytest.approx(reference_tuned[key], rel=1e-5)
        # the adapter was switched on: base and tuned lie 10x the matching tolerance apart
        # (a random adapter on a random model moves the scores little: 0.07% measured)
        assert ours_tuned != pytest.approx(ours_base, rel=1e-4)


def test_lm_eval_missing_package_is_a_clear_error_before_any_work(eval_adapters, eval_data,
                                                                   task_yaml, monkeypatch,
                                                                   capsys):
    import lorakit.eval.lmeval as lmeval

    monkeypatch.setattr(lmeval, "lm_eval_available", lambda: False)
    rc = main(["eval", "--adapter", str(eval_adapters / "rand"), "--data",
               str(eval_data / "eval.jsonl"), "--lm-eval", str(task_yaml)])
    err = capsys.readouterr().err
    assert rc == 2 and "pip install lm-eval" in err and "not installed" in err


def test_lm_eval_task_file_errors(tmp_path):
    from lorakit.errors import ConfigError
    from lorakit.eval.lmeval import _resolve_tasks

    with pytest.raises(ConfigError, match="does not exist"):
        _resolve_tasks(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(ConfigError, match="task: NAME"):
        _resolve_tasks(str(bad))
    assert _resolve_tasks(f"hellaswag, {TASK_DIR / 'tiny_text.yaml'}") == (
        ["hellaswag", "lorakit_tiny_text"], [str(TASK_DIR.resolve())])
