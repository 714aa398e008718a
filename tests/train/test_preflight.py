"""`lorakit train` runs the memory estimate first: a warning, or a refusal with --strict-memory."""

import torch

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.plan import preflight as P


def _args(tiny_model_dir, data, out, *extra):
    return ["train", f"model={tiny_model_dir}", f"data.train={data / 'train.jsonl'}",
            f"output_dir={out}", "data.max_length=64", "train.batch_size=2", "lora.r=4",
            "train.max_steps=1", "--no-progress", *extra]


def test_estimate_of_the_run_is_the_planner_figure(tiny_model_dir, arithmetic_data, tmp_path):
    from lorakit.plan.estimate import estimate

    cfg = load_config(None, [f"model={tiny_model_dir}", "data.max_length=64", "train.batch_size=2",
                             "lora.r=4", "lora.dropout=0"])
    est = P.estimate_run(cfg, torch.device("cpu"), "fp32")
    ref = estimate(str(tiny_model_dir), method="lora", r=4, seq_len=64, batch_size=2,
                   precision="fp32", lora_dropout=0.0, device="cpu")
    assert est.memory_bytes == ref.memory_bytes
    # DPO runs chosen and rejected together: twice the rows of activations
    dpo = load_config(None, [f"model={tiny_model_dir}", "method=dpo", "data.max_length=64",
                             "train.batch_size=2", "lora.r=4", "lora.dropout=0"])
    assert P.estimate_run(dpo, torch.device("cpu"), "fp32").memory_bytes["activations"] == \
        estimate(str(tiny_model_dir), method="lora", r=4, seq_len=64, batch_size=4, precision="fp32",
                 lora_dropout=0.0, device="cpu").memory_bytes["activations"]


def test_too_little_memory_warns_or_refuses(tiny_model_dir, arithmetic_data, tmp_path, capsys,
                                            monkeypatch):
    monkeypatch.setattr(P, "available_memory_bytes", lambda device: 1024)  # 1 KiB free
    out = tmp_path / "strict"
    assert main(_args(tiny_model_dir, arithmetic_data, out, "--strict-memory")) == 2
    err = capsys.readouterr().err
    assert "refused because of --strict-memory" in err and "train.batch_size" in err
    assert not out.exists()

    out = tmp_path / "warned"
    assert main(_args(tiny_model_dir, arithmetic_data, out)) == 0
    assert "warning: this run needs about" in capsys.readouterr().err
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_enough_memory_says_nothing(tiny_model_dir, arithmetic_data, tmp_path, capsys):
    cfg = load_config(None, [f"model={tiny_model_dir}", "data.max_length=64", "train.batch_size=2"])
    report = P.preflight(cfg, strict=True, log=lambda m: None)
    assert report["fits"] and 0 < report["estimate_bytes"] < report["available_bytes"]
    assert main(_args(tiny_model_dir, arithmetic_data, tmp_path / "ok", "--strict-memory")) == 0
    assert "warning: this run needs" not in capsys.readouterr().err
