"""train.report_to: [tensorboard] writes event files that carry the same numbers as metrics.jsonl."""

import json

import pytest

from lorakit.config import load_config
from lorakit.train.sft import train

pytest.importorskip("tensorboard")


def test_tensorboard_events_match_metrics_log(tiny_model_dir, arithmetic_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                             f"data.eval={arithmetic_data / 'eval.jsonl'}", f"output_dir={run}",
                             "data.max_length=128", "train.batch_size=4", "train.precision=fp32",
                             "lora.r=4", "train.max_steps=3", "train.eval_every=2",
                             "train.report_to=[tensorboard]"])
    train(cfg, progress=False, log=lambda m: None)

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r for r in records if "loss" in r}
    assert sorted(logged) == [1, 2, 3]
    tb_loss = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb_loss) == [1, 2, 3]
    for step, value in tb_loss.items():
        assert value == pytest.approx(logged[step]["loss"], rel=1e-6)
    tb_eval = {e.step: e.value for e in events.Scalars("train/eval_loss")}
    assert tb_eval == {2: pytest.approx(logged[2]["eval_loss"], rel=1e-6)}
    assert [e.step for e in events.Scalars("train/lr")] == [1, 2, 3]


def test_tensorboard_missing_is_a_config_error(tiny_model_dir, arithmetic_data, tmp_path, monkeypatch):
    import builtins

    from lorakit.errors import ConfigError

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                             f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
                             "train.report_to=[tensorboard]"])
    with pytest.raises(ConfigError, match=r"pip install 'lorakit\[tensorboard\]'"):
        train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
