"""What a crash, a power cut or a full disk leaves behind must not stop a run from resuming:
a truncated newest checkpoint or one without its marker is skipped for the one before it, a
torn last line of metrics.jsonl is tolerated and cut off, and a failed write (disk full,
permission denied) is one line naming the file, not a traceback."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
from run_helpers import adapter_tensors, max_abs_diff

from lorakit.cli import main
from lorakit.config import load_config
from lorakit.train.common import checkpoint_problem
from lorakit.train.report import plot_metrics, read_metrics
from lorakit.train.sft import train


def _overrides(tiny_model_dir, data, out, *extra):
    return [f"model={tiny_model_dir}", f"data.train={data / 'train.jsonl'}",
            f"data.eval={data / 'eval.jsonl'}", f"output_dir={out}", "data.max_length=128",
            "train.batch_size=4", "train.precision=fp32", "train.lr=1e-3", "lora.r=4",
            "lora.alpha=8", "lora.dropout=0.1", "train.max_steps=4", "train.save_every=2",
            "train.keep_checkpoints=5", *extra]


def _cfg(*args):
    return load_config(None, _overrides(*args))


def _adapter(run_dir):
    return adapter_tensors(Path(run_dir) / "adapter")


@pytest.fixture(scope="module")
def straight(tiny_model_dir, arithmetic_data, tmp_path_factory):
    """An uninterrupted 4-step run (what every resumed run below must reproduce)."""
    out = tmp_path_factory.mktemp("straight") / "run"
    return train(_cfg(tiny_model_dir, arithmetic_data, out), progress=False, log=lambda m: None)


def _crashed_run(tiny_model_dir, arithmetic_data, out):
    """A finished 4-step run with checkpoints at 2 and 4, made to look as if it died just
    after step 4's checkpoint: no final adapter, no summary."""
    cfg = _cfg(tiny_model_dir, arithmetic_data, out)
    train(cfg, progress=False, log=lambda m: None)
    shutil.rmtree(out / "adapter")
    (out / "summary.json").unlink()
    return cfg.model_copy(update={"resume": True})


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("damage, why", [
    ("truncate", "truncated"),  # a power cut before the file's data reached the disk
    ("no-marker", "checkpoint.json marker"),  # a copy or write that stopped before the end
])
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(
        damage, why, straight, tiny_model_dir, arithmetic_data, tmp_path):
    run = tmp_path / "run"
    cfg = _crashed_run(tiny_model_dir, arithmetic_data, run)
    newest = run / "checkpoints" / "step-4"
    if damage == "truncate":
        _truncate(newest / "trainer_state.pt")
        named = newest / "trainer_state.pt"
    else:
        (newest / "checkpoint.json").unlink()
        named = newest
    logs = []
    resumed = train(cfg, progress=False, log=logs.append)
    warning = [m for m in logs if m.startswith("warning: skipping checkpoint")]
    assert len(warning) == 1 and str(named) in warning[0] and why in warning[0], logs
    assert any(f"resumed from {run / 'checkpoints' / 'step-2'} (step 2)" in m for m in logs), logs
    assert resumed.summary["steps"] == 4
    # steps 3 and 4 trained again from step 2: the same adapter as the uninterrupted run
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(run)) <= 1e-6
    assert checkpoint_problem(newest) is None  # step 4 was written again, whole
    steps = [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_no_whole_checkpoint_starts_from_scratch(straight, tiny_model_dir, arithmetic_data,
                                                 tmp_path):
    run = tmp_path / "run"
    cfg = _crashed_run(tiny_model_dir, arithmetic_data, run)
    _truncate(run / "checkpoints" / "step-4" / "trainer_state.pt")
    _truncate(run / "checkpoints" / "step-2" / "adapter" / "adapter_model.safetensors")
    logs = []
    fresh = train(cfg, progress=False, log=logs.append)
    skipped = [m for m in logs if m.startswith("warning: skipping checkpoint")]
    assert len(skipped) == 2 and "step-2/adapter/adapter_model.safetensors" in skipped[1]
    assert any("no whole checkpoint: starting from scratch" in m for m in logs), logs
    assert not any(m.startswith("resumed from") for m in logs)
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(run)) <= 1e-6


def test_torn_last_metrics_line_is_cut_off_on_resume(straight, tiny_model_dir, arithmetic_data,
                                                     tmp_path):
    """The process died while appending step 3's record, after step 2's checkpoint."""
    run = tmp_path / "run"
    cfg = _crashed_run(tiny_model_dir, arithmetic_data, run)
    shutil.rmtree(run / "checkpoints" / "step-4")
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    assert [json.loads(line)["step"] for line in lines[:3]] == [1, 2, 3]
    torn = lines[2][:len(lines[2]) // 2]
    (run / "metrics.jsonl").write_text(lines[0] + lines[1] + torn)
    # every reader takes the whole records and leaves the torn one
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2]
    assert plot_metrics(run / "metrics.jsonl", ["loss"], tmp_path / "m.png", "t", "loss")
    from lorakit.eval.report import training_history

    assert [r["step"] for r in training_history(run / "adapter")] == [1, 2]

    logs = []
    train(cfg, progress=False, log=logs.append)
    assert any("metrics.jsonl:3 is not a whole JSON record" in m for m in logs), logs
    text = (run / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    records = [json.loads(line) for line in text.splitlines()]  # every line whole again
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert max_abs_diff(_adapter(straight.run_dir), _adapter(run)) <= 1e-6


def test_jobs_manager_skips_torn_metrics_lines(tmp_path):
    """The jobs service follows metrics.jsonl while the worker writes it: a torn line (cut
    short, or continued by a later append) is skipped, the whole ones become events."""
    from lorakit.jobs.manager import JobManager

    class Store:
        def __init__(self):
            self.events = []

        def last_metric_step(self, job_id):
            return max((e["data"]["step"] for e in self.events), default=0)

        def add_event(self, job_id, message, data=None, type="message", **kw):
            self.events.append({"data": data, "type": type})

        def checkpoints(self, job_id):
            return []

    run = tmp_path / "job"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo'
                                       '{"step": 2, "loss": 1.5}\n{"step": 3, "loss": 1.')
    manager = JobManager.__new__(JobManager)
    store = manager.store = Store()
    manager._tails = {}
    job = {"id": "ftjob-1", "run_dir": str(run), "total_steps": 4}
    manager._follow(job)
    assert [e["data"]["step"] for e in store.events] == [1]
    with open(run / "metrics.jsonl", "a") as f:  # the rest of step 3 arrives
        f.write('0}\n')
    manager._follow(job)
    assert [e["data"]["step"] for e in store.events] == [1, 3]


def _failing(monkeypatch, call, when, error):
    """Make ``os.<call>`` raise ``error`` for the paths ``when(path)`` picks."""
    real = getattr(os, call)

    def patched(target, *args, **kwargs):
        path = os.readlink(f"/proc/self/fd/{target}") if call == "write" else os.fspath(target)
        if when(str(path)):
            raise error
        return real(target, *args, **kwargs)

    monkeypatch.setattr(os, call, patched)


@pytest.mark.parametrize("call, when, error, named, reason", [
    ("write", lambda p: p.endswith(".tmp") and "/.step-4.tmp/.trainer_state.pt." in p,
     OSError(errno.ENOSPC, "No space left on device"), "checkpoints/step-4/trainer_state.pt",
     "No space left on device (errno 28); free space or set output_dir elsewhere"),
    ("write", lambda p: p.endswith("metrics.jsonl"),
     OSError(errno.ENOSPC, "No space left on device"), "metrics.jsonl",
     "No space left on device (errno 28); free space or set output_dir elsewhere"),
    # as a read-only checkpoints/ folder refuses the new file (root ignores permissions: patched)
    ("open", lambda p: "/checkpoints/.step-4.tmp/adapter/" in p,
     PermissionError(errno.EACCES, "Permission denied"),
     "checkpoints/step-4/adapter/adapter_model.safetensors",
     "Permission denied (errno 13); make the folder writable or set output_dir elsewhere"),
])
def test_failed_writes_are_one_line_errors_naming_the_file(
        call, when, error, named, reason, tiny_model_dir, arithmetic_data, tmp_path, capsys,
        monkeypatch):
    run = tmp_path / "run"
    if named == "metrics.jsonl":  # the log fails at step 3, after step 2's checkpoint
        calls = {"n": 0}
        inner = when

        def when(p):
            calls["n"] += inner(p)
            return inner(p) and calls["n"] >= 3
    _failing(monkeypatch, call, when, error)
    code = main(["train", *_overrides(tiny_model_dir, arithmetic_data, run), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert lines == [f"error: could not write {run / named}: {reason}"], err
    # the previous checkpoint is whole, the half-written one is gone, and resume continues
    assert checkpoint_problem(run / "checkpoints" / "step-2") is None
    assert not list((run / "checkpoints").glob(".*"))
    assert not (run / "checkpoints" / "step-4").exists()
    monkeypatch.undo()
    assert main(["train", *_overrides(tiny_model_dir, arithmetic_data, run), "resume=true",
                 "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4]
