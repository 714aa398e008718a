"""The SFT recipe on a tiny model: loss maths, stored losses, exact resume, stop signals,
NaN guard, config errors, and the full / qlora methods."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from run_helpers import adapter_tensors, max_abs_diff, metrics_records, rewind

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.train.common import supervised_loss
from lorakit.train.sft import TrainingError, make_batch, prepare_rows, setup_model, train


def _cfg(tiny_model_dir, data, out, *extra):
    return load_config(None, [f"model={tiny_model_dir}", f"data.train={data / 'train.jsonl'}",
                              f"data.eval={data / 'eval.jsonl'}", f"output_dir={out}",
                              "data.max_length=128", "train.batch_size=4", "train.precision=fp32",
                              "train.lr=1e-3", "lora.r=4", "lora.alpha=8", "lora.dropout=0.1",
                              *extra])


def _adapter(run_dir):
    return adapter_tensors(Path(run_dir) / "adapter")


def test_supervised_loss_equals_transformers_loss(tiny_model_dir, arithmetic_data, tmp_path):
    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "run")
    model, tokenizer, _ = setup_model(cfg, torch.device("cpu"), "fp32")
    with torch.no_grad():  # make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    rows, _, _ = prepare_rows(cfg, tokenizer, log=lambda m: None)
    batch = make_batch(rows, [0, 1, 2], pad_id=tokenizer.pad_token_id, packed=True,
                       device=torch.device("cpu"))
    model.eval()
    ours, n = supervised_loss(model, batch)
    reference = model(**batch, use_cache=False).loss  # mean over shifted, non-ignored labels
    assert n == int((batch["labels"][:, 1:] != -100).sum()) > 0
    torch.testing.assert_close(ours / n, reference, atol=1e-5, rtol=1e-5)


# Losses of the first steps of the tiny recipe, recorded once (torch 2.13 CPU, fp32). A change
# in the data pipeline, the loss, the optimizer or the schedule moves them.
STORED_LOSSES = [10.765762329101562, 10.748546253551137, 10.71001942952474, 10.699962615966797]


def test_recipe_losses_match_stored_values_and_learn(tiny_model_dir, arithmetic_data, tmp_path):
    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "run", "train.max_steps=6",
               "train.eval_every=3")
    result = train(cfg, progress=False, log=lambda m: None)
    records = metrics_records(result.run_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 6
    assert losses[:4] == pytest.approx(STORED_LOSSES, rel=1e-4)
    evals = [r["eval_loss"] for r in records if r.get("eval_loss") is not None]
    assert len(evals) == 2 and evals[-1] < evals[0]
    for name in ("config.yaml", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/lorakit.json", "metrics.jsonl", "loss.png", "summary.json"):
        assert (result.run_dir / name).is_file(), name
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["supervised_tokens"] > 0
    assert summary["final_eval_loss"] == pytest.approx(evals[-1])


def test_two_plus_two_resumed_steps_equal_four(tiny_model_dir, arithmetic_data, tmp_path):
    straight = train(_cfg(tiny_model_dir, arithmetic_data, tmp_path / "a", "train.max_steps=4"),
                     progress=False, log=lambda m: None)
    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "b", "train.max_steps=4",
               "train.save_every=2", "train.keep_checkpoints=5")
    # forget everything after step 2, then resume from there in a fresh model
    rewind(train(cfg, progress=False, log=lambda m: None).run_dir)
    resumed = train(cfg.model_copy(update={"resume": True}), progress=False, log=lambda m: None)
    assert resumed.summary["steps"] == 4
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(resumed.run_dir)) <= 1e-6
    records = metrics_records(tmp_path / "b")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]  # none duplicated by resume


def test_resume_without_a_checkpoint_starts_from_scratch(tiny_model_dir, arithmetic_data,
                                                         tmp_path):
    """resume=true on a folder with no checkpoint yet (a first run killed before its first save,
    or a first run started with resume=true) trains from step 0, like a fresh run."""
    straight = train(_cfg(tiny_model_dir, arithmetic_data, tmp_path / "a", "train.max_steps=2"),
                     progress=False, log=lambda m: None)
    logs = []
    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "b", "train.max_steps=2", "resume=true")
    fresh = train(cfg, progress=False, log=logs.append)
    assert any("no checkpoint yet" in m for m in logs)
    assert fresh.summary["steps"] == 2
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(fresh.run_dir)) <= 1e-6


def _write_config(path, tiny_model_dir, data, out, *extra):
    cfg = _cfg(tiny_model_dir, data, out, *extra)
    path.write_text(cfg.to_yaml())
    return path


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "lorakit", "train", *args, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, **kw)


def _wait_for(path: Path, proc, timeout=120):
    deadline = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"run ended before {path} appeared:\n{proc.stdout.read().decode()}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_killed_run_resumes_to_the_same_adapter(sig, tiny_model_dir, arithmetic_data, tmp_path):
    extra = ("train.max_steps=30", "train.save_every=1", "train.batch_size=2")
    straight = train(_cfg(tiny_model_dir, arithmetic_data, tmp_path / "straight", *extra),
                     progress=False, log=lambda m: None)
    run = tmp_path / "killed"
    config = _write_config(tmp_path / "run.yaml", tiny_model_dir, arithmetic_data, run, *extra)
    proc = _cli(str(config))
    _wait_for(run / "checkpoints" / "step-3", proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0].decode()
    if sig == signal.SIGINT:
        assert proc.returncode == 130, output
        assert "Continue with resume=true" in output
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (run / "adapter").exists()  # it did not get to finish
    resumed = _cli(str(config), "resume=true")
    output = resumed.communicate(timeout=300)[0].decode()
    assert resumed.returncode == 0, output
    assert "resumed from" in output
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(run)) <= 1e-6


def test_nan_loss_stops_with_step_and_keeps_checkpoint(tiny_model_dir, arithmetic_data, tmp_path,
                                                      monkeypatch):
    from lorakit.train import common

    real = common.supervised_loss
    calls = {"n": 0}

    def poisoned(model, batch, **kwargs):  # the 4th micro-batch's loss is NaN (as after a bad update)
        loss, n = real(model, batch, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 4 else loss), n

    monkeypatch.setattr(common, "supervised_loss", poisoned)
    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "run", "train.max_steps=20",
               "train.save_every=1")
    with pytest.raises(TrainingError, match=r"loss became nan at step 4") as err:
        train(cfg, progress=False, log=lambda m: None)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    assert [c.name for c in checkpoints] == ["step-2", "step-3"]  # the NaN step saved nothing
    assert "last good checkpoint" in str(err.value) and "step-3" in str(err.value)
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1e-4", "did you mean 'lr'"),
    ("lora.rank=8", "did you mean 'r'"),
    ("train.batch_size=many", "batch_size"),
    ("method=sparse", "method"),
])
def test_config_errors_exit_nonzero_and_write_nothing(override, message, tiny_model_dir,
                                                      arithmetic_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                 f"output_dir={out}", override, "--no-progress"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_empty_data_files(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", f"model={tiny_model_dir}", f"data.train={tmp_path / 'nope.jsonl'}",
                 f"output_dir={out}", "--no-progress"])
    assert code == 2 and "nope.jsonl does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code = main(["train", f"model={tiny_model_dir}", f"data.train={empty}", f"output_dir={out}",
                 "--no-progress"])
    assert code == 2 and "no valid example" in capsys.readouterr().err
    assert not out.exists()


def test_yaml_config_file_and_unknown_top_level_key(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("model: smollm2-135m-instruct\nmethd: lora\n")
    assert main(["train", str(config)]) == 2
    assert "did you mean 'method'" in capsys.readouterr().err


def test_full_fine_tuning_runs_and_saves_a_model(tiny_model_dir, arithmetic_data, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "run", "method=full", "train.max_steps=3",
               "train.save_every=3")
    result = train(cfg, progress=False, log=lambda m: None)
    tuned = AutoModelForCausalLM.from_pretrained(result.adapter_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    diff = max(float((a - b).abs().max()) for a, b in zip(tuned.parameters(), base.parameters()))
    assert diff > 0  # every weight was trainable and moved
    assert (result.run_dir / "checkpoints" / "step-3" / "model.safetensors").is_file()


def test_qlora_runs_end_to_end_and_leaves_base_untouched(tiny_model_dir, arithmetic_data, tmp_path):
    import lorakit

    cfg = _cfg(tiny_model_dir, arithmetic_data, tmp_path / "run", "method=qlora", "train.max_steps=3",
               "quantization.compute_dtype=float32")
    result = train(cfg, progress=False, log=lambda m: None)
    manifest = json.loads((result.adapter_dir / "lorakit.json").read_text())
    assert manifest["quantization"]["type"] == "nf4" and manifest["quantization"]["double_quant"]
    # the adapter trained over 4-bit layers loads onto a freshly quantized base and changes it
    model, _ = lorakit.load_model(tiny_model_dir, quantization="nf4", compute_dtype="float32")
    ids = torch.tensor([[1, 50, 60, 70, 80]])
    before = model(ids).logits
    lorakit.load_adapter(model, result.adapter_dir)
    assert (model(ids).logits - before).abs().max() > 0
