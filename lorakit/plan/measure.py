"""Measure the peak memory of a few real training steps, to check :mod:`lorakit.plan.estimate`.

``lorakit estimate --measure`` (and the calibration tests) run :func:`measure_in_subprocess`:
a fresh Python process loads the model exactly as ``lorakit train`` does
(``lorakit.train.sft.setup_model``), builds lorakit's optimizer, and runs a few optimizer
steps on random token rows of ``seq_len`` tokens, every token supervised (the worst case the
estimate assumes). It reports the peak memory *delta*:

* CPU: peak resident set size during the steps (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before them, after ``malloc_trim`` has returned the heap the
  loader freed) minus the resident size before the model was loaded (torch and lorakit already
  imported);
* CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before the model was loaded
  (the CUDA context is not in either number).

It also reports the peak of the load itself (``load_peak_delta_bytes``: ``VmHWM`` after the
model is ready, minus the same baseline; CUDA: ``max_memory_allocated`` over the load), so a
run's whole-process peak is the larger of the two.

A subprocess, because a process's peak resident size only ever grows: measuring two settings in
one process would report the larger for both. ``max_rss_gib`` stops the run (exit 3) when its
resident size passes that much, for big checkpoints on a machine other jobs share.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

from lorakit.errors import ConfigError, LorakitError
from lorakit.memory import reset_peak_rss, rss_bytes


@dataclass
class MeasureSpec:
    """What to run: a lorakit model spec and the training settings the estimate also takes."""

    model: str
    method: str = "lora"
    r: int = 16
    target_modules: str | list[str] = "all-linear"
    lora_dropout: float = 0.05
    seq_len: int = 256
    batch_size: int = 1
    grad_checkpointing: bool = False
    steps: int = 3
    precision: str = "auto"
    seed: int = 0
    max_rss_gib: float | None = None


def _guard_rss(limit_bytes: int) -> None:
    """Exit this process (code 3) as soon as its resident size passes ``limit_bytes``."""
    import threading
    import time

    def watch():
        while True:
            rss = rss_bytes()
            if rss > limit_bytes:
                print(f"error: resident size {rss / 2**30:.2f} GiB passed the limit "
                      f"{limit_bytes / 2**30:.2f} GiB (max_rss_gib); stopped", file=sys.stderr,
                      flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True, name="rss-guard").start()


def run_measurement(spec: MeasureSpec) -> dict:
    """Run ``spec`` in this process and return the measured peak delta (see module docstring).

    Returns:
        ``{"peak_delta_bytes", "load_peak_delta_bytes", "baseline_bytes", "after_setup_bytes",
        "device", "precision", "steps", "losses", "kind", "load_seconds", "step_seconds"}``.
    """
    import gc
    import time

    import torch

    from lorakit.config import RunConfig
    from lorakit.models.stream import release_freed_memory
    from lorakit.train import common
    from lorakit.train.sft import setup_model

    device = common.default_device()
    precision = common.resolve_precision(spec.precision, device, spec.method == "qlora")
    cfg = RunConfig(model=spec.model, method=spec.method,
                    lora={"r": spec.r, "target_modules": spec.target_modules,
                          "dropout": spec.lora_dropout},
                    train={"batch_size": spec.batch_size, "grad_checkpointing": spec.grad_checkpointing,
                           "precision": precision, "seed": spec.seed})
    torch.manual_seed(spec.seed)
    # libraries the load imports (bitsandbytes alone is +116 MB resident) are not the run's
    # memory: the baseline is taken with them loaded, as lorakit train measures its load
    common.import_heavy_modules(spec.model, quantized=cfg.quantized)
    if spec.max_rss_gib:
        _guard_rss(int(spec.max_rss_gib * 2**30))
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        baseline = rss_bytes()
        reset_peak_rss()
    started = time.perf_counter()
    model, _, _ = setup_model(cfg, device, precision)
    load_seconds = time.perf_counter() - started
    load_peak = torch.cuda.max_memory_allocated(device) if cuda else rss_bytes("VmHWM")
    optimizer = common.build_optimizer(model, 1e-4, 0.0)
    vocab = model.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, vocab, (spec.batch_size, spec.seq_len), generator=g)
    batch = {"input_ids": ids.to(device), "labels": ids.to(device),
             "position_ids": torch.arange(spec.seq_len).repeat(spec.batch_size, 1).to(device)}
    gc.collect()
    if not cuda:
        release_freed_memory()  # the heap the loader freed (glibc keeps it otherwise)
    after_setup = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        kind = "cuda max_memory_allocated"
    else:
        kind = "cpu peak RSS (VmHWM)" if reset_peak_rss() else "cpu peak RSS (ru_maxrss, not reset)"
    losses = []
    started = time.perf_counter()
    for _ in range(spec.steps):
        with common.autocast(precision, device):
            loss_sum, n = common.supervised_loss(model, batch)
        (loss_sum / max(n, 1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss_sum) / max(n, 1))
    step_seconds = (time.perf_counter() - started) / max(spec.steps, 1)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
    elif kind.endswith("(VmHWM)"):
        peak = rss_bytes("VmHWM")
    else:
        peak = common.peak_memory_bytes(device)
    return {"peak_delta_bytes": int(peak - baseline),
            "load_peak_delta_bytes": int(load_peak - baseline), "baseline_bytes": int(baseline),
            "load_seconds": round(load_seconds, 1), "step_seconds": round(step_seconds, 1),
            "after_setup_bytes": int(after_setup - baseline), "device": str(device),
            "precision": precision, "steps": spec.steps, "losses": losses, "kind": kind}


def measure_in_subprocess(spec: MeasureSpec, timeout: float = 900) -> dict:
    """Run :func:`run_measurement` in a fresh Python process (see the module docstring).

    Raises:
        LorakitError: the run failed (its last lines of output are in the message).
    """
    cmd = [sys.executable, "-m", "lorakit.plan.measure", json.dumps(asdict(spec))]
    env = dict(os.environ)
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise LorakitError(f"the measurement run did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        if done.returncode == 2 and tail.startswith("error:"):
            raise ConfigError(tail.removeprefix("error: "))
        raise LorakitError(f"the measurement run failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    spec = MeasureSpec(**json.loads(argv[0]))
    try:
        result = run_measurement(spec)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
