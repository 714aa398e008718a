"""What tests of training runs share (their data set: tiny_data.write_digit_data): readers of
a run folder's files (strict: a torn line fails the test), and rewinding a finished run to an earlier
checkpoint, as a crash after that checkpoint would leave it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def metrics_records(run_dir: Path) -> list[dict]:
    """Every line of ``run_dir/metrics.jsonl`` as JSON (no line skipped)."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def adapter_tensors(folder: Path) -> dict:
    """The tensors of ``folder/adapter_model.safetensors``."""
    from safetensors.torch import load_file

    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    """The largest absolute difference between two tensor dicts with the same keys."""
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def rewind(run_dir: Path, drop_step: int = 4) -> Path:
    """Make the finished run ``run_dir`` look as if it died just before checkpoint
    ``drop_step``: that checkpoint, the final adapter and the summary are removed."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / "checkpoints" / f"step-{drop_step}")
    shutil.rmtree(run_dir / "adapter")
    (run_dir / "summary.json").unlink(missing_ok=True)
    return run_dir
