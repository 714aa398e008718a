"""Experiment trackers (``train.report_to: [wandb, mlflow]``; TensorBoard is in report.py).

Each gets the resolved run config as its parameters, every record ``metrics.jsonl`` gets
(same keys, same steps, numeric values only), and at the end the run's adapter folder as an
artifact.

- wandb: offline unless ``WANDB_MODE`` says otherwise or ``WANDB_API_KEY`` is set (no
  network is needed; ``wandb sync RUN/wandb/offline-run-*`` uploads later). Files go under
  ``RUN/wandb/``; project ``WANDB_PROJECT`` or ``lorakit``; the run is named after the folder.
- mlflow: ``MLFLOW_TRACKING_URI`` when set, else a local file store in ``RUN/mlruns``
  (``mlflow ui --backend-store-uri RUN/mlruns``); experiment ``MLFLOW_EXPERIMENT_NAME`` or
  ``lorakit``.
"""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path

from lorakit.errors import ConfigError

TRACKERS = ("wandb", "mlflow")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_installed(cfg) -> None:
    """Raise before anything is written when a tracker asked for is not installed.

    Raises:
        ConfigError: naming the pip install that provides it.
    """
    import importlib.util

    for name in TRACKERS:
        if name in cfg.train.report_to and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"train.report_to=[{name}] needs the {name} package: "
                              f"pip install 'lorakit[{name}]'")


def flat_params(data: dict, prefix: str = "") -> dict[str, str]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": "0.0001"}`` (mlflow's parameters)."""
    out = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:6000]
    return out


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(float(v))}


class Trackers:
    """The trackers of ``train.report_to`` other than TensorBoard, for one run."""

    def __init__(self, cfg, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.wandb_run = None
        self.mlflow = None  # (client, run id)
        names = [n for n in cfg.train.report_to if n in TRACKERS]
        if not names:
            return
        params = cfg.model_dump(mode="json")
        if "wandb" in names:
            self.wandb_run = _start_wandb(cfg, self.run_dir, params)
        if "mlflow" in names:
            self.mlflow = _start_mlflow(self.run_dir, params)

    def log(self, record: dict, step: int) -> None:
        values = _numbers(record)
        if not values:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(values, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def finish(self, adapter_dir: Path | None = None, ok: bool = True) -> None:
        """Attach the adapter folder (when given and present) and close the runs."""
        adapter = Path(adapter_dir) if adapter_dir is not None else None
        if adapter is not None and not adapter.is_dir():
            adapter = None
        if self.wandb_run is not None:
            import wandb

            if adapter is not None:
                name = re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.run_dir.name}-adapter")
                artifact = wandb.Artifact(name, type="model")
                artifact.add_dir(str(adapter))
                self.wandb_run.log_artifact(artifact)
            self.wandb_run.finish(exit_code=0 if ok else 1)
            self.wandb_run = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            if adapter is not None:
                client.log_artifacts(run_id, str(adapter), artifact_path="adapter")
            client.set_terminated(run_id, "FINISHED" if ok else "FAILED")
            self.mlflow = None


def _start_wandb(cfg, run_dir: Path, params: dict):
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                            else "offline")
    run_dir.mkdir(parents=True, exist_ok=True)
    return wandb.init(mode=mode, dir=str(run_dir), project=os.environ.get("WANDB_PROJECT", "lorakit"),
                      name=run_dir.name, config=params,
                      settings=wandb.Settings(silent=True))


def _start_mlflow(run_dir: Path, params: dict):
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        # a local file store: MLflow 3 keeps it but asks for this opt-in
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = (run_dir / "mlruns").resolve().as_uri()
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "lorakit")
    experiment = client.get_experiment_by_name(name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(name)
    run = client.create_run(experiment_id, run_name=run_dir.name)
    flat = [Param(k, v) for k, v in flat_params(params).items()]
    for start in range(0, len(flat), 100):  # log_batch takes at most 100 params a call
        client.log_batch(run.info.run_id, params=flat[start:start + 100])
    return client, run.info.run_id
