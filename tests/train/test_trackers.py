"""train.report_to: [wandb, mlflow]: an offline wandb run and an mlflow file-store run hold the
same metrics as metrics.jsonl, the resolved config as parameters, and the adapter as an
artifact; each read back with the tracker's own files / API."""

import json
import struct
from pathlib import Path

import pytest

from lorakit.config import load_config
from lorakit.errors import ConfigError

wandb = pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def _wandb_records(path: Path):
    """The protobuf records of an offline run's ``run-ID.wandb`` file (wandb's LevelDB-style
    log: a 7-byte file header, 32 KiB blocks, records of crc32 / length / type + data,
    FULL = 1, FIRST = 2, MIDDLE = 3, LAST = 4), parsed with wandb's own message classes."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.fixture
def tracked_run(tiny_model_dir, arithmetic_data, tmp_path, monkeypatch):
    from lorakit.train.sft import train

    for var in ("WANDB_MODE", "WANDB_API_KEY", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                             f"data.eval={arithmetic_data / 'eval.jsonl'}", f"output_dir={run}",
                             "data.max_length=128", "train.batch_size=4", "train.precision=fp32",
                             "lora.r=4", "train.max_steps=3", "train.eval_every=2",
                             "eval.after_train=false", "train.report_to=[wandb, mlflow]"])
    train(cfg, progress=False, log=lambda m: None)
    logged = {}  # step -> every value metrics.jsonl has for it (the final eval is its own line)
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        logged.setdefault(record["step"], {}).update(record)
    return run, cfg, logged


def test_wandb_offline_and_mlflow_file_store_hold_metrics_params_and_adapter(tracked_run):
    run, cfg, logged = tracked_run
    assert sorted(logged) == [1, 2, 3] and "eval_loss" in logged[2] and "eval_loss" in logged[3]

    # wandb: offline (no network, no key), files under the run folder
    (wandb_file,) = run.glob("wandb/offline-run-*/run-*.wandb")
    history, config, artifacts = {}, {}, []
    for record in _wandb_records(wandb_file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.history.item}
            step = items.get("_step", record.history.step.num)
            history.setdefault(step, {}).update(items)
        elif kind in ("run", "config"):
            updates = record.run.config.update if kind == "run" else record.config.update
            config.update({i.key: json.loads(i.value_json) for i in updates})
        elif kind == "artifact":
            artifacts.append(record.artifact)
    assert sorted(history) == [1, 2, 3]
    for step, values in logged.items():
        for key in ("loss", "lr", "grad_norm", "eval_loss"):
            if key in values:
                assert history[step][key] == pytest.approx(values[key], rel=1e-9), (step, key)
    assert config["train"]["lr"] == cfg.train.lr and config["lora"]["r"] == 4
    assert config["model"] == cfg.model
    (artifact,) = artifacts
    assert artifact.type == "model"
    assert "adapter_model.safetensors" in {e.path for e in artifact.manifest.contents}

    # mlflow: a file store in RUN/mlruns, read with mlflow's client
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run / "mlruns").resolve().as_uri())
    (mlrun,) = client.search_runs([client.get_experiment_by_name("lorakit").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == run.name
    for key in ("loss", "lr", "eval_loss"):
        got = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, key)}
        want = {s: v[key] for s, v in logged.items() if key in v}
        assert got == pytest.approx(want, rel=1e-9), key
    params = mlrun.data.params
    assert params["train.lr"] == str(cfg.train.lr) and params["lora.r"] == "4"
    assert params["train.report_to"] == str(["wandb", "mlflow"])
    files = {f.path for f in client.list_artifacts(mlrun.info.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in files


def test_missing_tracker_package_is_a_config_error(tiny_model_dir, arithmetic_data, tmp_path,
                                                   monkeypatch):
    import importlib.util

    from lorakit.train.sft import train

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    cfg = load_config(None, [f"model={tiny_model_dir}", f"data.train={arithmetic_data / 'train.jsonl'}",
                             f"output_dir={tmp_path / 'run'}", "train.report_to=[mlflow]"])
    with pytest.raises(ConfigError, match=r"pip install 'lorakit\[mlflow\]'"):
        train(cfg, progress=False, log=lambda m: None)
    assert not (tmp_path / "run").exists()
