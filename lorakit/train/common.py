"""What every training recipe shares: precision, the loss, optimizer and schedule,
checkpoints that resume exactly, the metrics log, progress, and stop signals.

Recipes (``sft.py``, later ``dpo.py``) read top to bottom and call into here; nothing in
this file knows which method is running.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, LorakitError

IGNORE_INDEX = -100


class TrainingError(LorakitError):
    """Training stopped on a problem the user must fix (NaN loss, out of memory, bad data)."""


# ---------------------------------------------------------------------- precision
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX)."""
    checks = [getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None)]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` where the hardware runs it natively, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    # On CPUs fp32 won where we measured: SmolLM2-135M LoRA steps ran at ~380 tokens/s in fp32
    # and ~220 with bf16 autocast on a 2-core AVX512-BF16 machine (docs/benchmarks.md).
    # bf16 stays available explicitly (train.precision=bf16), e.g. for memory.
    return "fp32"


def autocast(precision: str, device: torch.device):
    """Mixed-precision context: matmuls in bf16/fp16, adapter weights and optimizer in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- loss
def supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised tokens of ``batch`` and their count.

    The output head (a vocabulary-sized matmul, a large share of a small model's compute)
    runs only at positions whose next token is supervised, instead of at every position as
    ``model(..., labels=...)`` does. The maths is the same.

    Returns:
        (loss_sum, n_tokens): divide by the tokens of the whole accumulated step, so the loss
        is the mean over supervised tokens across gradient accumulation.
    """
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    if n_tokens == 0:
        return hidden.sum() * 0.0, 0
    logits = head_logits(model, hidden[:, :-1][mask])  # (N, V)
    return F.cross_entropy(logits, targets[mask], reduction="sum"), n_tokens


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on selected hidden states (N, H) -> float32 logits (N, V), with the
    final logit soft-capping some models (Gemma 2) apply."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------- optimizer / schedule
def build_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no decay on biases, norms and DoRA magnitudes."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer, kind: str, warmup: float, total_steps: int):
    """Linear warmup then cosine / linear decay to 0, or constant. ``warmup`` < 1 is a
    fraction of ``total_steps``, otherwise a step count."""
    warmup_steps = int(round(warmup * total_steps)) if warmup < 1 else int(warmup)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        if kind == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------- data order
@dataclass
class DataOrder:
    """Which rows each micro-batch holds: epoch ``e`` is a seeded permutation, so a run can
    resume from a micro-batch index alone."""

    n_rows: int
    batch_size: int
    seed: int

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_rows / self.batch_size)

    def rows(self, micro_index: int) -> list[int]:
        epoch, offset = divmod(micro_index, self.micro_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.n_rows, generator=g)
        return order[offset * self.batch_size:(offset + 1) * self.batch_size].tolist()

    def epoch_of(self, micro_index: int) -> float:
        return micro_index / self.micro_per_epoch


# ---------------------------------------------------------------------- state and checkpoints
@dataclass
class LoopState:
    """Everything besides weights and optimizer that a resumed run needs."""

    step: int = 0  # optimizer steps done
    micro_index: int = 0  # micro-batches consumed
    tokens_seen: int = 0
    supervised_seen: int = 0
    elapsed: float = 0.0  # training seconds before this process
    best_eval: float | None = None
    evals_without_improvement: int = 0
    last_loss: float | None = None
    last_eval_loss: float | None = None
    history: list = field(default_factory=list)  # (step, loss, eval_loss) for the plot
    micro_rows: int | None = None  # rows per global micro-batch (batch_size x processes)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(),
             "python": torch.tensor(_flatten_python_rng(random.getstate()), dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _flatten_python_rng(state) -> list[int]:
    version, internal, gauss = state
    return [version, *internal, -1 if gauss is None else 1]


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    flat = state["python"].tolist()
    random.setstate((flat[0], tuple(flat[1:-1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, loop: LoopState,
                    save_weights, keep: int) -> Path:
    """Write ``checkpoints/step-N/`` atomically (built under a temporary name, then renamed)
    and prune all but the newest ``keep``.

    ``save_weights(folder)`` writes the trainable weights (adapter or full model).
    """
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{loop.step}"
    tmp = ckpt_root / f".step-{loop.step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_weights(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": _rng_state(), "loop": json.dumps(asdict(loop))}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps({"step": loop.step, "micro_index": loop.micro_index,
                                                "loss": loop.last_loss}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporaries of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None when it has none yet."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resume_point(run_dir: Path, resume: bool, log) -> Path | None:
    """The checkpoint a run continues from (None: start at step 0).

    ``resume`` on a folder with no checkpoint yet starts from scratch (said in the log);
    without ``resume``, a folder that already holds a run is refused, so nothing is overwritten.
    """
    if not resume:
        if (Path(run_dir) / "config.yaml").exists():
            raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it, "
                              f"or choose another output_dir")
        return None
    found = last_checkpoint(run_dir)
    if found is None:
        log(f"resume=true but {run_dir} has no checkpoint yet: starting from scratch")
    return found


def load_checkpoint(folder: Path, optimizer, scheduler) -> LoopState:
    """Restore optimizer, scheduler and RNG from ``folder``; weights are the caller's job."""
    state = torch.load(folder / "trainer_state.pt", weights_only=True, map_location="cpu")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"])
    return LoopState(**json.loads(state["loop"]))


# ---------------------------------------------------------------------- metrics log
class MetricsLog:
    """``metrics.jsonl``: one JSON object per logged step, flushed as it is written. On
    resume, records after the checkpoint's step are dropped so the log has no duplicates."""

    def __init__(self, path: Path, resume_step: int | None = None):
        self.path = path
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, path)
        elif resume_step is None and path.exists():
            path.unlink()
        self._file = open(path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def plot_losses(history: list, path: Path, title: str) -> None:
    """Train and eval loss curves to a PNG (matplotlib, headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
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
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def plot_metrics(metrics_path: Path, keys: list[str], path: Path, title: str,
                 ylabel: str) -> bool:
    """Curves of ``keys`` read back from ``metrics.jsonl`` (so a resumed run plots its whole
    history) to a PNG. Returns False, writing nothing, when no record holds any of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines()
               if line.strip()]
    series = {k: [(r["step"], r[k]) for r in records if r.get(k) is not None] for k in keys}
    if not any(series.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, points in series.items():
        if points:
            ax.plot(*zip(*points), label=key, marker="o" if key.startswith("eval") else None,
                    linewidth=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def check_finite(loss: float, step: int, run_dir: Path, lr: float) -> None:
    """The NaN guard: raise :class:`TrainingError` naming the last good checkpoint when the
    step's loss is not finite (call it before the optimizer step)."""
    if math.isfinite(loss):
        return
    last = last_checkpoint(run_dir)
    raise TrainingError(f"loss became {loss} at step {step}; training stopped. "
                        + (f"The last good checkpoint is {last}. " if last else "")
                        + f"Lower train.lr (now {lr}) or check the data.")


# ---------------------------------------------------------------------- signals and memory
class StopFlag:
    """Turns Ctrl-C / SIGTERM into a request to checkpoint and stop after the current step.
    A second Ctrl-C stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a worker): no handler
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstop requested: saving a checkpoint after this step (Ctrl-C again to abort)",
              file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def peak_memory_bytes(device: torch.device) -> int:
    """Peak device memory (CUDA) or peak resident set size of this process (CPU)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def out_of_memory_error(exc: BaseException, cfg) -> TrainingError:
    return TrainingError(
        f"out of memory ({exc.__class__.__name__}). Try a smaller train.batch_size "
        f"(now {cfg.train.batch_size}) with a larger train.grad_accum, a smaller data.max_length "
        f"(now {cfg.data.max_length}), train.grad_checkpointing=true"
        + (", or method=qlora" if cfg.method != "qlora" else ""))


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


def micro_batches(order: DataOrder, start: int, count: int) -> Iterator[tuple[int, list[int]]]:
    for i in range(start, start + count):
        yield i, order.rows(i)
