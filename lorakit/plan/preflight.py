"""Will this run fit? ``lorakit train`` asks :func:`estimate` before it starts.

The estimate of the run's configuration (model, method, r, targets, max_length, batch,
gradient checkpointing, precision) is compared with the memory of the device it will run on:
free memory of the current CUDA device, or ``MemAvailable`` of the machine on CPU. A run
that will not fit gets a warning that says what to change, or, with ``--strict-memory``, is
refused before anything is written.
"""

from __future__ import annotations

from lorakit.errors import ConfigError

GIB = 2 ** 30


def available_memory_bytes(device) -> int | None:
    """Free memory of ``device`` (CUDA: ``mem_get_info``; CPU: ``MemAvailable``), or None."""
    import torch

    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def estimate_run(cfg, device, precision: str):
    """The :class:`~lorakit.plan.estimate.Estimate` of one run config on ``device``."""
    from lorakit.plan.estimate import estimate

    method = cfg.method if cfg.method != "dpo" else ("qlora" if cfg.quantized else "lora")
    rows = cfg.train.batch_size * (2 if cfg.method == "dpo" else 1)  # chosen + rejected
    return estimate(cfg.model, method=method, r=cfg.lora.r, target_modules=cfg.lora.target_modules,
                    seq_len=cfg.data.max_length, batch_size=rows,
                    grad_checkpointing=cfg.train.grad_checkpointing,
                    precision=precision if precision in ("bf16", "fp16", "fp32") else "fp32",
                    lora_dropout=cfg.lora.dropout, use_dora=cfg.lora.dora,
                    device="cuda" if device.type == "cuda" else "cpu")


def preflight(cfg, *, strict: bool = False, log=print) -> dict | None:
    """Warn (or, when ``strict``, raise ConfigError) if the run will not fit its device.

    Returns ``{"estimate_bytes", "available_bytes", "fits"}``, or None when either side is
    unknown (an estimate that cannot be made never stops a run).
    """
    from lorakit.train import common

    device = common.default_device()
    precision = common.resolve_precision(cfg.train.precision, device)
    available = available_memory_bytes(device)
    try:
        est = estimate_run(cfg, device, precision)
    except Exception as exc:  # noqa: BLE001 - a planning aid must not block training
        log(f"memory estimate unavailable ({exc}); starting anyway")
        return None
    need = est.memory_bytes["total"]
    if available is None:
        return None
    fits = need <= available
    if not fits:
        msg = (f"this run needs about {need / GIB:.1f} GiB ({cfg.method}, batch "
               f"{cfg.train.batch_size} x {cfg.data.max_length} tokens) but {device.type} has "
               f"{available / GIB:.1f} GiB free. Try a smaller train.batch_size or data.max_length, "
               f"train.grad_checkpointing=true" + (", method=qlora" if cfg.method == "lora" else "")
               + ". See `lorakit estimate --from-config CONFIG`.")
        if strict:
            raise ConfigError(msg + " (refused because of --strict-memory)")
        log("warning: " + msg)
    return {"estimate_bytes": need, "available_bytes": available, "fits": fits}
