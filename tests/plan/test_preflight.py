"""The pre-flight check names the part that does not fit and the changes that would, each with
its own estimate, and ``--strict-memory`` refuses before any weight is read."""

import pytest
import torch

from checkpoints import llama_config, write_llama_checkpoint
from lorakit.config import load_config
from lorakit.errors import ConfigError
from lorakit.plan import preflight as P

GIB = 2**30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("m")
    write_llama_checkpoint(path, llama_config(hidden_size=512, intermediate_size=1536,
                                              num_hidden_layers=6, vocab_size=512))
    return path


def _cfg(model_dir, *overrides):
    # fp32, the precision the figures below are estimated at (auto may pick a bf16 base)
    return load_config(None, [f"model={model_dir}", "lora.r=4", "train.precision=fp32", *overrides])


def _free(monkeypatch, nbytes):
    monkeypatch.setattr(P, "available_memory_bytes", lambda device: int(nbytes))


def test_activations_too_big_suggests_checkpointing_with_its_figure(model_dir, monkeypatch):
    cfg = _cfg(model_dir, "data.max_length=2048", "train.batch_size=8")
    est = P.estimate_run(cfg, torch.device("cpu"), "fp32")
    m = est.memory_bytes
    assert m["activations"] > 4 * m["weights"]
    checkpointed = P.estimate_run(cfg, torch.device("cpu"), "fp32", grad_checkpointing=True)
    _free(monkeypatch, (checkpointed.memory_bytes["total"] + m["total"]) / 2)  # between the two
    with pytest.raises(ConfigError) as err:
        P.preflight(cfg, strict=True)
    msg = str(err.value)
    assert "Too big: the activations" in msg and "refused because of --strict-memory" in msg
    fits = msg.split("These fit:")[1].split("These help")[0]
    assert f"train.grad_checkpointing=true -> {checkpointed.memory_bytes['total'] / GIB:.1f} GiB" in fits
    assert "train.batch_size=4 (with train.grad_accum=2" in msg and "data.max_length=1024" in msg


def test_weights_too_big_suggests_qlora(model_dir, monkeypatch):
    cfg = _cfg(model_dir, "data.max_length=16", "train.batch_size=1", "method=full")
    est = P.estimate_run(cfg, torch.device("cpu"), "fp32")
    qlora = P.estimate_run(cfg, torch.device("cpu"), "fp32", method="qlora")
    _free(monkeypatch, qlora.memory_bytes["total"] * 1.01)
    logged = []
    report = P.preflight(cfg, log=logged.append)
    assert not report["fits"] and report["too_big"] == "optimizer"  # AdamW: 8 bytes a parameter
    assert report["estimate_bytes"] == est.memory_bytes["total"]
    options = dict(report["options"])
    assert options["method=qlora (4-bit NF4 base)"] == qlora.memory_bytes["total"]
    assert logged[0].startswith("warning: this run needs about")
    assert "These fit: method=qlora (4-bit NF4 base)" in logged[0]


def test_processes_on_one_cpu_share_its_memory(model_dir, monkeypatch):
    cfg = _cfg(model_dir, "data.max_length=64", "train.strategy=fsdp", "lora.dora=true")
    one = P.estimate_run(cfg, torch.device("cpu"), "fp32")
    _free(monkeypatch, 1.5 * one.memory_bytes["total"])
    assert P.preflight(cfg, processes=1, log=lambda m: None)["fits"]
    report = P.preflight(cfg, processes=4, log=lambda m: None)
    # DoRA: each rank loads the whole base before FSDP shards it: 4 x at least the load peak
    assert report["estimate_bytes"] >= 4 * one.load_bytes and not report["fits"]


def test_fsdp_sharded_load_needs_a_share_of_the_load_peak_per_process(model_dir, monkeypatch):
    """A dense LoRA base under FSDP is read shard by shard on each rank
    (lorakit.train.distributed.materialize_sharded): the load term is load_bytes / N."""
    cfg = _cfg(model_dir, "data.max_length=64", "train.strategy=fsdp")
    est = P.estimate_run(cfg, torch.device("cpu"), "fp32")
    assert P._sharded_load(cfg, 4, "fsdp") and not P._sharded_load(cfg, 4, "ddp")
    m = est.memory_bytes
    state = m["weights"] + m["adapter"] + m["gradients"] + m["optimizer"]
    sharded = P.process_need(est, processes=4, strategy="fsdp", sharded_load=True)
    whole = P.process_need(est, processes=4, strategy="fsdp", sharded_load=False)
    assert sharded == pytest.approx(max(state / 4 + m["activations"] + m["overhead"],
                                        est.load_bytes / 4))
    assert whole == pytest.approx(max(state / 4 + m["activations"] + m["overhead"], est.load_bytes))
    _free(monkeypatch, 1e15)
    report = P.preflight(cfg, processes=4, log=lambda m: None)
    assert report["estimate_bytes"] == pytest.approx(4 * sharded)  # 4 processes share one CPU


def test_strict_memory_refuses_before_loading_the_model(model_dir, tmp_path, monkeypatch,
                                                        capsys):
    import lorakit.models.load as load
    from lorakit.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "w3 w4", "completion": "w5"}\n' * 4)
    _free(monkeypatch, 1024)
    monkeypatch.setattr(load, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    out = tmp_path / "run"
    code = main(["train", f"model={model_dir}", f"data.train={data}", f"output_dir={out}",
                 "lora.r=4", "train.max_steps=1", "--no-progress", "--strict-memory"])
    assert code == 2 and not out.exists()
    assert "Too big:" in capsys.readouterr().err


def test_estimate_reports_the_streaming_load_peak():
    from lorakit.plan.estimate import estimate

    est = estimate("llama3-8b", method="qlora", precision="bf16")
    m = est.memory_bytes
    # the streamed load holds the 4-bit weights and one tensor in flight, never the 16-bit model
    assert m["weights"] < est.load_bytes < m["weights"] + 2 * GIB < 2 * est.parameters
    assert est.to_json()["load_gib"] == round(est.load_bytes / GIB, 3)
    assert not any("before quantizing" in n for n in est.notes)
