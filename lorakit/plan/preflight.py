"""Will this run fit? ``lorakit train`` asks :func:`estimate` before it loads anything.

The estimate of the run's configuration (model, method, r, targets, max_length, batch,
gradient checkpointing, precision, processes and strategy) is compared with the memory of the
device it will run on: free memory of the current CUDA device, or ``MemAvailable`` of the
machine on CPU (where all the processes of a ``--nproc`` run share it). A run that will not fit
gets a message naming the part that is too big and the changes that would make it fit, each
with its own estimate (QLoRA, a smaller batch, shorter rows, gradient checkpointing, CPU offload,
more GPUs); with ``--strict-memory`` it is refused before the model is loaded or anything is
written.
"""

from __future__ import annotations

from lorakit.errors import ConfigError

GIB = 2 ** 30
_PART_NAMES = {"weights": "the base model's weights", "activations": "the activations",
               "optimizer": "the optimizer state", "gradients": "the gradients",
               "adapter": "the adapter"}


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


def estimate_run(cfg, device, precision: str, **changes):
    """The :class:`~lorakit.plan.estimate.Estimate` of one run config on ``device``.

    ``changes`` override the settings taken from ``cfg`` (``method``, ``seq_len``,
    ``batch_size``, ``grad_checkpointing``): what :func:`preflight` tries when a run does not fit.
    """
    from lorakit.plan.estimate import estimate

    preference = cfg.method in ("dpo", "orpo", "simpo", "kto")
    method = cfg.method if not preference else ("qlora" if cfg.quantized else "lora")
    rows = cfg.train.batch_size * (2 if preference else 1)  # chosen + rejected
    settings = dict(method=method, r=cfg.lora.r, target_modules=cfg.lora.target_modules,
                    seq_len=cfg.data.max_length, batch_size=rows,
                    grad_checkpointing=cfg.train.grad_checkpointing,
                    precision=precision if precision in ("bf16", "fp16", "fp32") else "fp32",
                    lora_dropout=cfg.lora.dropout, use_dora=cfg.lora.dora,
                    device="cuda" if device.type == "cuda" else "cpu",
                    distill=bool(cfg.data.replay.fraction)
                    and cfg.data.replay.loss_for(cfg.method) == "kl")
    optimizer = getattr(cfg.train, "optimizer", None)
    if optimizer:  # the optimizer the run will use (train.optimizer, where the config has it)
        settings["optimizer"] = optimizer
    if "batch_size" in changes and preference:
        changes["batch_size"] *= 2
    return estimate(cfg.model, **{**settings, **changes})


def process_need(est, *, processes: int = 1, strategy: str = "ddp", cpu: bool = False,
                 sharded_load: bool = False) -> float:
    """Bytes a run needs on the device it is compared with: per GPU, or the whole machine on
    CPU (every process there shares it). FSDP splits weights, adapter, gradients and optimizer
    state over the processes; each still holds its own activations. Loading: with
    ``sharded_load`` (``lorakit.train.distributed.sharded_load_blocker`` is None) each process
    reads only its shard, so it needs at least ``est.load_bytes / N``; otherwise it loads the
    whole base first and needs at least ``est.load_bytes``."""
    m = est.memory_bytes
    state = m["weights"] + m["adapter"] + m["gradients"] + m["optimizer"]
    n = max(processes, 1)
    if strategy == "fsdp" and n > 1:
        per_process = state / n + m["activations"] + m["overhead"]
    else:
        per_process = m["total"]
    load = est.load_bytes or 0.0
    if sharded_load and strategy == "fsdp" and n > 1:
        load /= n
    per_process = max(per_process, load)
    return per_process * n if cpu else per_process


def _sharded_load(cfg, processes: int, strategy: str) -> bool:
    """Whether the ranks of this run will each read only their FSDP shard of the base."""
    from lorakit.train import distributed

    d = distributed.Dist(world_size=max(processes, 1), strategy=strategy)
    return distributed.sharded_load_blocker(cfg, d) is None


def _options(cfg, device, precision, processes, strategy, available) -> list[tuple[str, float]]:
    """(change, bytes it would need) for the changes that lower this run's memory."""
    from lorakit.errors import LorakitError

    cpu = device.type != "cuda"
    preference = cfg.method in ("dpo", "orpo", "simpo", "kto")
    method = cfg.method if not preference else ("qlora" if cfg.quantized else "lora")
    tries: list[tuple[str, dict, dict]] = []
    if method == "full":
        tries.append(("method=lora (train an adapter, freeze the base)", {"method": "lora"}, {}))
    if method in ("full", "lora") and not preference:
        tries.append(("method=qlora (4-bit NF4 base)", {"method": "qlora"}, {}))
    if not cfg.train.grad_checkpointing:
        tries.append(("train.grad_checkpointing=true", {"grad_checkpointing": True}, {}))
    if cfg.train.batch_size > 1:
        smaller = max(1, cfg.train.batch_size // 2)
        tries.append((f"train.batch_size={smaller} (with train.grad_accum="
                      f"{cfg.train.grad_accum * cfg.train.batch_size // smaller} for the same "
                      "effective batch)", {"batch_size": smaller}, {}))
    if cfg.data.max_length > 64:
        tries.append((f"data.max_length={cfg.data.max_length // 2}",
                      {"seq_len": cfg.data.max_length // 2}, {}))
    if not cpu:
        import torch

        gpus = torch.cuda.device_count()
        for n in (2, 4, 8):
            if n > processes:
                tries.append((f"more GPUs: --nproc {n} train.strategy=fsdp"
                              + ("" if n <= gpus else f" (this machine has {gpus})"), {},
                              {"processes": n, "strategy": "fsdp"}))
                break
        if cfg.device_map is None:
            tries.append(("CPU offload: model.device_map=auto (blocks that do not fit go to "
                          "CPU memory; slower)", {}, {"offload": True}))
    out = []
    for text, changes, run in tries:
        try:
            est = estimate_run(cfg, device, precision, **changes)
        except LorakitError:
            continue
        if run.get("offload"):
            # weights beyond the free memory stay in CPU RAM; the rest must still fit
            m = est.memory_bytes
            need = m["total"] - m["weights"] + min(m["weights"], 0.5 * available)
        else:
            n, how = run.get("processes", processes), run.get("strategy", strategy)
            need = process_need(est, processes=n, strategy=how, cpu=cpu,
                                sharded_load=_sharded_load(cfg, n, how))
        out.append((text, need))
    return out


def preflight(cfg, *, strict: bool = False, log=print, processes: int = 1) -> dict | None:
    """Warn (or, when ``strict``, raise ConfigError) if the run will not fit its device.

    Args:
        cfg: the run config.
        strict: refuse (ConfigError) instead of warning.
        log: where the warning goes.
        processes: how many processes the run will start (``lorakit train --nproc N``).

    Returns ``{"estimate_bytes", "available_bytes", "fits", "too_big", "options"}``, or None
    when either side is unknown (an estimate that cannot be made never stops a run).
    """
    from lorakit.train import common

    device = common.default_device()
    precision = common.resolve_precision(cfg.train.precision, device, cfg.quantized)
    available = available_memory_bytes(device)
    strategy = getattr(cfg.train, "strategy", "ddp")
    cpu = device.type != "cuda"
    try:
        est = estimate_run(cfg, device, precision)
    except Exception as exc:  # noqa: BLE001 - a planning aid must not block training
        log(f"memory estimate unavailable ({exc}); starting anyway")
        return None
    if available is None:
        return None
    need = process_need(est, processes=processes, strategy=strategy, cpu=cpu,
                        sharded_load=_sharded_load(cfg, processes, strategy))
    fits = need <= available
    report = {"estimate_bytes": need, "available_bytes": available, "fits": fits,
              "too_big": None, "options": []}
    if fits:
        return report
    m = est.memory_bytes
    too_big = max(_PART_NAMES, key=lambda k: m[k])
    options = _options(cfg, device, precision, processes, strategy, available)
    report.update(too_big=too_big, options=options)
    where = (f"{device.type} has {available / GIB:.1f} GiB free" if processes <= 1 or not cpu
             else f"the machine has {available / GIB:.1f} GiB free for {processes} processes")
    parts = ", ".join(f"{k} {m[k] / GIB:.1f}" for k in ("weights", "adapter", "gradients",
                                                         "optimizer", "activations", "overhead"))
    msg = (f"this run needs about {need / GIB:.1f} GiB ({cfg.method}, batch "
           f"{cfg.train.batch_size} x {cfg.data.max_length} tokens; GiB: {parts}) but {where}. "
           f"Too big: {_PART_NAMES[too_big]} ({m[too_big] / GIB:.1f} GiB).")
    fitting = [(t, n) for t, n in options if n <= available]
    others = [(t, n) for t, n in options if n > available]
    if fitting:
        msg += " These fit: " + "; ".join(f"{t} -> {n / GIB:.1f} GiB" for t, n in fitting) + "."
    if others:
        msg += (" These help but are not enough alone: "
                + "; ".join(f"{t} -> {n / GIB:.1f} GiB" for t, n in others) + ".")
    msg += " See `lorakit estimate --from-config CONFIG`."
    if strict:
        raise ConfigError(msg + " (refused because of --strict-memory)")
    log("warning: " + msg)
    return report
