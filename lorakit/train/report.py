"""Where a run's numbers go: ``metrics.jsonl``, TensorBoard (``train.report_to``), the progress
bar or log lines, the loss and metric plots, and ``summary.json``.

:class:`StepReport` is what a recipe's loop calls once per optimizer step; the rest are its
parts and the plots a finished run draws.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lorakit import fileio
from lorakit.errors import ConfigError
from lorakit.train.common import LoopState, write_errors


# ---------------------------------------------------------------------- metrics log
def read_metrics(path: Path, log=None) -> list[dict]:
    """The records of ``metrics.jsonl``. A line that is not a JSON object (the torn last line a
    crash mid-write leaves) is skipped, with a warning through ``log`` when given."""
    records = []
    text = Path(path).read_bytes().decode("utf-8", errors="replace")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            if log is not None:
                log(f"warning: {path}:{number} is not a whole JSON record (a write cut short); "
                    f"skipped")
            continue
        records.append(record)
    return records


class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, each line appended with one write.
    On resume, records after the checkpoint's step are dropped so the log has no duplicates,
    and a torn last line (a crash mid-write) is cut off; the log is rewritten durably.

    Raises:
        CheckpointError: the log cannot be written (disk full, no permission), naming it.
    """

    def __init__(self, path: Path, resume_step: int | None = None, log=None):
        self.path, self._fd = Path(path), None
        with write_errors():
            if resume_step is not None and self.path.exists():
                kept = [r for r in read_metrics(self.path, log) if r.get("step", 0) <= resume_step]
                fileio.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
            elif resume_step is None and self.path.exists():
                self.path.unlink()
            self._fd = fileio.open_append(self.path)

    def write(self, record: dict) -> None:
        with write_errors():
            fileio.append_line(self._fd, json.dumps(record) + "\n", self.path)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def summary_writer_class(cfg):
    """TensorBoard's SummaryWriter when ``train.report_to`` asks for it, else None. Call it
    before the run folder is written, so a missing package leaves nothing behind.

    Raises:
        ConfigError: tensorboard (or wandb / mlflow: ``lorakit.train.trackers``) is asked for
            but not installed.
    """
    from lorakit.train.trackers import check_installed

    check_installed(cfg)
    if "tensorboard" not in cfg.train.report_to:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("train.report_to=[tensorboard] needs the tensorboard package: "
                          "pip install 'lorakit[tensorboard]'") from None
    return SummaryWriter


class Progress:
    """A rich progress bar on a terminal; nothing otherwise (the recipe logs lines instead)."""

    def __init__(self, total: int, done: int, enabled: bool | None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total, self.done = total, done
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                      TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self._progress.__enter__()
            self._task = self._progress.add_task("train", total=self.total, completed=self.done,
                                                 info="")
        return self

    def update(self, step: int, loss: float, tok_s: float, eval_loss: float | None) -> None:
        if self._progress is not None:
            info = f"loss {loss:.4f}" + (f" eval {eval_loss:.4f}" if eval_loss is not None else "")
            self._progress.update(self._task, completed=step, info=f"{info} {tok_s:.0f} tok/s")

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
        return False


class StepReport:
    """Where each optimizer step's numbers go: ``metrics.jsonl`` (every ``train.log_every``
    steps and at every evaluation), TensorBoard (``train.report_to``), and a progress bar on a
    terminal, else a log line every 5% of the run and at evaluations. A context: leaving it
    closes the files. With ``enabled=False`` (processes other than rank 0) nothing is written.

    Args:
        loop: the state the run starts from (its step; on resume, later records are dropped).
        resumed: the run continues from a checkpoint (keep ``metrics.jsonl`` up to its step).
        progress: bar on / off; None: on when stderr is a terminal.
        line: ``line(record, total_steps) -> str``, the recipe's log line.
        tensorboard: the class :func:`summary_writer_class` returned (None: no TensorBoard).
        scalars: ``(prefix, keys)``: the record values TensorBoard gets, as ``prefix/key``;
            keys None: every value but step and epoch.
    """

    def __init__(self, run_dir: Path, cfg, loop: LoopState, total_steps: int, *, resumed: bool,
                 progress: bool | None, log, line, tensorboard=None,
                 scalars: tuple[str, tuple | None] = ("train", None), enabled: bool = True):
        self.run_dir, self.cfg, self.total, self.enabled = Path(run_dir), cfg, total_steps, enabled
        self.log, self.line, self.scalars = log, line, scalars
        self.metrics = (MetricsLog(self.run_dir / "metrics.jsonl",
                                   resume_step=loop.step if resumed else None, log=log)
                        if enabled else None)
        self.tb = tensorboard(str(self.run_dir / "tensorboard")) if tensorboard and enabled else None
        from lorakit.train.trackers import Trackers

        # wandb / mlflow (train.report_to): the same records as metrics.jsonl
        self.trackers = Trackers(cfg, self.run_dir) if enabled else None
        self.bar = Progress(total_steps, loop.step, enabled=progress if enabled else False)

    def __enter__(self):
        self.bar.__enter__()
        return self

    def step(self, loop: LoopState, record: dict, eval_loss: float | None, speed: float) -> None:
        """Report step ``loop.step``: ``record`` is its metrics line (with ``loss``), ``speed``
        the tokens/s the bar shows."""
        loop.history.append((loop.step, record["loss"], eval_loss))
        if not self.enabled:
            return
        if loop.step % self.cfg.train.log_every == 0 or eval_loss is not None:
            self.metrics.write(record)
            if self.trackers is not None:
                self.trackers.log(record, loop.step)
            if self.tb:
                prefix, keys = self.scalars
                for key in keys or [k for k in record if k not in ("step", "epoch")]:
                    if record.get(key) is not None:
                        self.tb.add_scalar(f"{prefix}/{key}", record[key], loop.step)
        self.bar.update(loop.step, record["loss"], speed, eval_loss)
        if not self.bar.enabled and (loop.step % max(1, self.total // 20) == 0 or eval_loss):
            self.log(self.line(record, self.total))

    def final_eval(self, loop: LoopState, record: dict) -> None:
        """The evaluation after the last step (``record`` holds ``eval_loss``), appended to
        ``metrics.jsonl`` once the loop is over."""
        loop.history.append((loop.step, None, record["eval_loss"]))
        if self.enabled:
            metrics = MetricsLog(self.run_dir / "metrics.jsonl", resume_step=loop.step)
            metrics.write({"step": loop.step, **record})
            metrics.close()
            if self.trackers is not None:
                self.trackers.log(record, loop.step)

    def finish_trackers(self, adapter_dir: Path | None) -> None:
        """Attach the finished run's adapter (None: none, e.g. interrupted) to the wandb /
        mlflow runs and close them."""
        if self.trackers is not None:
            self.trackers.finish(adapter_dir)

    def __exit__(self, *exc):
        try:
            self.bar.__exit__(*exc)
        finally:
            if self.metrics is not None:
                self.metrics.close()
            if self.tb:
                self.tb.close()
            if exc and exc[0] is not None and self.trackers is not None:
                self.trackers.finish(ok=False)  # the run failed: close the tracker runs
        return False


def write_config(run_dir: Path, cfg) -> None:
    """The run folder and its ``config.yaml``, the first file a run writes (durably)."""
    with write_errors():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        fileio.atomic_write_text(Path(run_dir) / "config.yaml", cfg.to_yaml())


def write_summary(run_dir: Path, summary: dict) -> None:
    """``summary.json``, the last file a finished run writes (durably: temporary name, fsync,
    rename)."""
    with write_errors():
        fileio.atomic_write_json(Path(run_dir) / "summary.json", summary)


def plot_losses(history: list, path: Path, title: str) -> None:
    """Train and eval loss curves to a PNG (matplotlib, headless)."""
    fig, ax = _pyplot().subplots(figsize=(7, 4), dpi=110)
    train = [(s, l) for s, l, _ in history if l is not None]
    evals = [(s, e) for s, _, e in history if e is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", color="#1f77b4", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="#d62728", marker="o", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over supervised tokens)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_png(fig, path)


def plot_metrics(metrics_path: Path, keys: list[str], path: Path, title: str,
                 ylabel: str) -> bool:
    """Curves of ``keys`` read back from ``metrics.jsonl`` (so a resumed run plots its whole
    history) to a PNG. Returns False, writing nothing, when no record holds any of them."""
    records = [r for r in read_metrics(metrics_path) if "step" in r]
    series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None] for k in keys}
    if not any(series.values()):
        return False
    fig, ax = _pyplot().subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None,
                    linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save_png(fig, path)
    return True


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed
    import matplotlib.pyplot as plt

    return plt


def _save_png(fig, path: Path) -> None:
    """Write the figure durably (:func:`lorakit.fileio.atomic_write`), then free it."""
    fig.tight_layout()
    try:
        with write_errors():
            fileio.atomic_write(path, lambda f: fig.savefig(f, format="png"))
    finally:
        _pyplot().close(fig)
