"""What a fine-tuning request may say, and OpenAI's JSON shapes of the service's rows.

- :class:`JobRequest`: the body of ``POST /v1/fine_tuning/jobs`` (also built by the UI's form).
- :func:`resolve_hyperparameters`: OpenAI's ``hyperparameters`` (``"auto"`` -> lorakit's
  defaults, :data:`AUTO`); ``learning_rate_multiplier`` multiplies :data:`BASE_LR`.
- :func:`check_lorakit_options`: lorakit's own settings, the request's ``lorakit`` object
  (:data:`LORAKIT_KEYS`, docs/service.md).
- ``file_object`` / ``job_object`` / ``event_object`` / ``checkpoint_object``: store rows as
  OpenAI's ``file``, ``fine_tuning.job``, ``fine_tuning.job.event`` and
  ``fine_tuning.job.checkpoint`` objects; :func:`fine_tuned_name` names a job's model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lorakit.errors import ConfigError

BASE_LR = 2.0e-4  # learning_rate_multiplier multiplies this (lorakit's SFT default)
AUTO = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
# lorakit's own settings, under the request's `lorakit` key (docs/service.md)
LORAKIT_KEYS = {"lora_r": int, "lora_alpha": float, "lora_dropout": float, "quantization": str,
                "max_steps": int, "max_length": int, "checkpoint_every": int, "eval": bool,
                "eval_limit": int, "beta": float, "packing": bool}
# the range of each numeric option: (low, high, low is allowed)
LORAKIT_BOUNDS = {"lora_r": (1, 1024, True), "lora_alpha": (0, 16384, False),
                  "lora_dropout": (0, 0.999, True), "max_steps": (1, 10_000_000, True),
                  "max_length": (1, 1 << 20, True), "checkpoint_every": (1, 10_000_000, True),
                  "eval_limit": (1, 1_000_000, True), "beta": (0, 10, False)}


class JobRequest(BaseModel):
    """The body of ``POST /v1/fine_tuning/jobs`` (OpenAI's fields plus ``lorakit``)."""

    model_config = ConfigDict(extra="allow")  # integrations, ... are accepted and ignored

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(default=None, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: dict | None = None
    hyperparameters: dict | None = None
    metadata: dict[str, str] | None = None
    lorakit: dict | None = None


def resolve_hyperparameters(requested: dict, n_examples: int) -> dict:
    """``"auto"`` / missing -> lorakit's defaults (batch size at most the example count).

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """
    out = {}
    for key, default in AUTO.items():
        value = requested.get(key, "auto")
        if value in ("auto", None):
            value = min(default, max(1, n_examples)) if key == "batch_size" else default
        kind = float if key == "learning_rate_multiplier" else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise ConfigError(f"hyperparameters.{key} must be 'auto' or a "
                              f"{'number' if kind is float else 'whole number'}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"hyperparameters.{key} must be a finite number, got {value!r}")
        value = kind(value)
        low, high = {"n_epochs": (1, 50), "batch_size": (1, 256),
                     "learning_rate_multiplier": (1e-3, 100)}[key]
        if not low <= value <= high:
            raise ConfigError(f"hyperparameters.{key} must be between {low} and {high}, got "
                              f"{value}")
        out[key] = value
    return out


def check_lorakit_options(options: Any) -> dict:
    """Validate the request's ``lorakit`` object (lorakit's own settings).

    Raises:
        ConfigError: unknown key (with the nearest valid one) or a wrong type.
    """
    from lorakit.errors import did_you_mean

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError("lorakit must be an object, e.g. {\"lora_r\": 8}")
    out = {}
    for key, value in options.items():
        if key not in LORAKIT_KEYS:
            raise ConfigError(f"unknown lorakit option {key!r}{did_you_mean(key, LORAKIT_KEYS)}; "
                              f"valid: {', '.join(LORAKIT_KEYS)}")
        kind = LORAKIT_KEYS[key]
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
            raise ConfigError(f"lorakit.{key} must be {kind.__name__}, got {value!r}")
        if kind is int and isinstance(value, float) and not (math.isfinite(value)
                                                             and value.is_integer()):
            raise ConfigError(f"lorakit.{key} must be a whole number, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"lorakit.{key} must be {kind.__name__}, got "
                              f"{str(value)[:40]!r}") from None
        if kind in (int, float):
            if not math.isfinite(value):
                raise ConfigError(f"lorakit.{key} must be a finite number, got {value!r}")
            low, high, closed = LORAKIT_BOUNDS[key]
            if not ((low <= value if closed else low < value) and value <= high):
                raise ConfigError(f"lorakit.{key} must be in {'[' if closed else '('}{low}, "
                                  f"{high}], got {value}")
        elif kind is str and len(value) > 64:
            raise ConfigError(f"lorakit.{key} is too long")
        out[key] = value
    if out.get("quantization") not in (None, "nf4"):
        raise ConfigError(f"lorakit.quantization must be 'nf4' or null, got "
                          f"{out['quantization']!r}")
    return out


# ---------------------------------------------------------------------- OpenAI shapes
def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


def finite(value):
    """``value`` with every NaN / infinite float replaced by None (JSON has no such numbers;
    a stored one must not break a listing)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def _json(text, default=None):
    """A stored JSON column; an unreadable one reads as ``default``."""
    if not text:
        return default
    try:
        return finite(json.loads(text))
    except (ValueError, TypeError, RecursionError):
        return default


def job_object(row: dict) -> dict:
    hp = _json(row["hyperparameters"], {})
    method = _json(row["method"], {})
    error = _json(row["error"])
    run_dir = Path(row["run_dir"])
    result_files = [f"{row['id']}/metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
    return {"id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
            "error": error, "fine_tuned_model": row["fine_tuned_model"],
            "finished_at": row["finished_at"],
            "hyperparameters": {k: hp.get(k) for k in AUTO}, "model": row["model"],
            "organization_id": row["owner"], "result_files": result_files, "seed": row["seed"],
            "status": row["status"], "trained_tokens": row["trained_tokens"],
            "training_file": row["training_file"], "validation_file": row["validation_file"],
            "estimated_finish": None, "integrations": [],
            "metadata": _json(row["metadata"]),
            "method": method, "user_provided_suffix": row["suffix"],
            "lorakit": _json(row["lorakit"], {})}


def event_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"],
            "data": _json(row["data"], {}), "type": row["type"]}


def checkpoint_object(row: dict, job: dict) -> dict:
    name = job["fine_tuned_model"] or fine_tuned_name(job)
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint",
            "created_at": row["created_at"], "fine_tuning_job_id": job["id"],
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{row['step']}",
            "step_number": row["step"], "metrics": _json(row["metrics"], {})}


def fine_tuned_name(job: dict) -> str:
    """OpenAI's naming: ``ft:<base>:<suffix>:<id>`` (suffix may be empty)."""
    return f"ft:{job['model']}:{job['suffix'] or ''}:{job['id'].split('-', 1)[1][:12]}"
