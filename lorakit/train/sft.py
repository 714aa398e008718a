"""Supervised fine-tuning (SFT) with LoRA, QLoRA or full fine-tuning. Read top to bottom:

1. setup: model (quantized for QLoRA), adapter, run folder, resolved config
2. data: load + validate, tokenize with completion-only labels, pack into rows
3. optimizer, schedule, and the checkpoint to resume from, if any
4. the loop: accumulate micro-batches, loss = mean over supervised tokens of the whole step,
   clip, step; log, evaluate, checkpoint, stop on request / NaN / early stopping
5. finish: final adapter, loss plot, summary

Our own loop rather than transformers' Trainer: the loss is computed only where it is
supervised (the output head is skipped elsewhere), resume is exact mid-epoch, and each step
is visible here.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from lorakit.config import RunConfig
from lorakit.errors import DataError
from lorakit.train import common, distributed, report
from lorakit.train.common import LoopState, TrainingError, TrainResult


# ---------------------------------------------------------------------- 1. setup
def setup_model(cfg: RunConfig, device: torch.device, precision: str, *,
                defer_weights: bool = False):
    """Load the base (4-bit for QLoRA), add the adapter (or unfreeze everything for full).

    ``defer_weights``: the base stays on the meta device, its weights read after FSDP shards
    it, each rank its own shard (``distributed.sharded_load_blocker`` says when that works)."""
    from lorakit.lora.inject import add_adapter, trainable_parameters

    model, tokenizer = common.load_base_for_config(cfg, device, precision,
                                                   defer_weights=defer_weights)
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        add_adapter(model, cfg.lora.to_lora_config(), name="default")
    common.ready_to_train(model, cfg)
    return model, tokenizer, trainable_parameters(model)


# ---------------------------------------------------------------------- 2. data
def prepare_rows(cfg: RunConfig, tokenizer, log, model=None) -> tuple[list[dict], list[dict], dict]:
    """Load, validate, split, tokenize and (optionally) pack the train and eval data; with
    ``data.replay.fraction`` > 0, rehearsal examples are mixed into train (``model``: the base
    that self-generates them, lorakit/data/replay.py)."""
    from lorakit.data.packing import pack_examples
    from lorakit.data.tokenize import tokenize_examples

    train, evals = common.load_train_and_eval(
        cfg, log, expected="a JSONL/JSON file, e.g. data.train=train.jsonl")
    distill_from = None  # data.replay.loss=kl: the replay examples, appended after train
    if cfg.data.replay.fraction:
        from lorakit.data.replay import apply_replay

        n_task = len(train)
        train = apply_replay(cfg, train, tokenizer, model, log)
        distill_from = n_task if cfg.data.replay.loss_for(cfg.method) == "kl" else None

    def rows_of(examples, what, distill_from=None):
        tokenized = tokenize_examples(examples, tokenizer, cfg.data.max_length, cfg.data.train_on)
        if distill_from is not None:
            from lorakit.data.replay import distill_rows

            # every row carries the mask (zeros for the task's), so every batch has one
            tokenized = ([{**t, "distill": [0] * len(t["input_ids"])} for t in tokenized[:distill_from]]
                         + distill_rows(tokenized[distill_from:]))
        usable = [t for t in tokenized if any(l != common.IGNORE_INDEX for l in t["labels"][1:])
                  or any(t.get("distill", ())[1:])]
        if len(usable) < len(tokenized):
            log(f"{what}: {len(tokenized) - len(usable)} examples have no supervised token "
                f"within max_length={cfg.data.max_length} and are skipped")
        if cfg.data.packing:
            return pack_examples(usable, cfg.data.max_length), usable
        return usable, usable

    train_rows, train_tok = rows_of(train, "train", distill_from)
    if not train_rows:
        raise DataError(f"{cfg.data.train}: no usable training example")
    eval_rows, _ = rows_of(evals, "eval") if evals else ([], [])
    stats = {"train_examples": len(train_tok), "eval_examples": len(evals),
             "train_rows": len(train_rows),
             "train_tokens": sum(len(t["input_ids"]) for t in train_tok)}
    return train_rows, eval_rows, stats


def make_batch(rows: list[dict], idx: list[int], pad_id: int, packed: bool, device) -> dict:
    from lorakit.data.packing import collate_packed
    from lorakit.data.tokenize import collate

    # a process whose share of the batch is empty runs one row with nothing supervised
    chosen = [rows[i] for i in idx] if idx else [distributed.empty_row(rows[0])]
    batch = collate_packed(chosen, pad_id) if packed else collate(chosen, pad_id)
    return {k: v.to(device) for k, v in batch.items() if k in
            ("input_ids", "labels", "position_ids", "attention_mask", "distill")}


@torch.no_grad()
def evaluate(model, rows, cfg, pad_id, device, precision, *, loss_module=None,
             dist: distributed.Dist | None = None) -> float | None:
    """Mean loss over every supervised token of the eval rows (each process scores its share
    of every batch when ``dist`` spans several)."""
    if not rows:
        return None
    dist = dist or distributed.Dist()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    step = cfg.train.batch_size * dist.world_size
    for start in range(0, len(rows), step):
        idx = dist.shard(list(range(start, min(start + step, len(rows)))))
        batch = make_batch(rows, idx, pad_id, cfg.data.packing, device)
        with common.autocast(precision, device):
            loss_sum, n = (loss_module(batch) if loss_module is not None
                           else common.supervised_loss(model, batch))
        total += float(loss_sum)
        count += n
    total, count = dist.all_sum([total, count])
    model.train(was_training)
    return total / max(count, 1)


# ---------------------------------------------------------------------- the recipe
def train(cfg: RunConfig, *, log=None, progress: bool | None = None) -> TrainResult:
    """Run supervised fine-tuning as ``cfg`` describes. Returns the run folder and summary.

    Under torchrun every process calls this; they form one process group for the run
    (``lorakit.train.distributed``) and only rank 0 writes the run folder and logs.

    Raises:
        ConfigError / DataError: bad settings or data (no run folder is left behind).
        TrainingError: NaN loss or out of memory (the last good checkpoint is kept).
    """
    dist = distributed.setup(cfg.train.strategy)
    try:
        distributed.check_compatible(cfg, dist)
        return _run(cfg, dist, log or (lambda msg: print(msg, file=sys.stderr)), progress)
    finally:
        distributed.teardown(dist)


def _run(cfg: RunConfig, dist: distributed.Dist, log, progress: bool | None) -> TrainResult:
    from lorakit.data.tokenize import pad_token_id
    from lorakit.lora.io import load_adapter_weights, save_adapter

    log = distributed.main_only(log, dist)
    device = dist.device
    precision, precision_reason = common.precision_choice(cfg.train.precision, device, cfg.quantized)
    run_dir = cfg.resolved_output_dir()
    resume_from = common.resume_point(run_dir, cfg.resume, log)
    torch.manual_seed(cfg.train.seed)

    # 1-2. model and data, before anything is written: bad input leaves no half-written run
    blocker = distributed.sharded_load_blocker(cfg, dist)
    common.import_heavy_modules(cfg.model, dist.enabled and dist.strategy == "fsdp",
                                cfg.quantized)
    before_load = common.reset_peak_memory(device)  # the load's peak: read once the model is ready
    model, tokenizer, counts = setup_model(cfg, device, precision, defer_weights=blocker is None)
    sharded = getattr(model, "lorakit_deferred", None) is not None
    if dist.enabled and dist.strategy == "fsdp":
        log("FSDP load: " + ("each process reads only its shard of the base" if sharded else
                             f"every process loads the whole base ({blocker or 'this checkpoint does not stream: .bin weights or names that need transformers conversions'})"))
    if cfg.device_map is not None:  # layers spread over devices: batches go where the input is
        device = model.get_input_embeddings().weight.device
    train_rows, eval_rows, data_stats = prepare_rows(cfg, tokenizer, log, model)
    pad_id = pad_token_id(tokenizer)
    # one global micro-batch = batch_size rows on each process
    order = common.DataOrder(len(train_rows), cfg.train.batch_size * dist.world_size,
                             cfg.train.seed)
    micro_total, total_steps = common.count_steps(cfg, order)
    log(f"{cfg.method} on {cfg.model}: {counts['trainable']:,} trainable of {counts['total']:,} "
        f"parameters ({counts['percent']:.2f}%), {data_stats['train_examples']} examples in "
        f"{len(train_rows)} rows, {total_steps} steps, precision {precision} "
        f"({precision_reason}), device {device}"
        + (f", {dist.world_size} processes ({cfg.train.strategy}, batch {order.batch_size} rows "
           f"per micro-step)" if dist.enabled else ""))

    tensorboard = report.summary_writer_class(cfg)
    dist.barrier()  # every process has checked the run folder before rank 0 writes to it
    if dist.is_main:
        report.write_config(run_dir, cfg)

    # 3. weights to resume from (before sharding), optimizer, schedule, resume
    if resume_from is not None:
        if cfg.method == "full":
            _load_full_weights(model, resume_from)
        else:
            load_adapter_weights(model, resume_from / "adapter")
    loss_module = dist.wrap(model)  # DDP / FSDP when several processes; the loss otherwise
    load_peak = common.peak_since_reset(device) - before_load  # what loading (and sharding) added
    optimizer, scheduler = common.optimizer_and_scheduler(model, cfg, total_steps)
    loop = LoopState()
    if resume_from is not None:
        loop = common.load_checkpoint(resume_from, distributed.OptimizerView(dist, optimizer),
                                      scheduler)
        if loop.micro_rows and loop.micro_rows != order.batch_size:
            loop.micro_index, exact = distributed.convert_position(
                loop.micro_index, order.n_rows, loop.micro_rows, order.batch_size)
            log(f"the checkpoint was written with {loop.micro_rows} rows per micro-step, this run "
                f"uses {order.batch_size}: data position converted"
                + ("" if exact else " (rounded up to the next micro-batch)"))
        log(f"resumed from {resume_from} (step {loop.step})")
    loop.micro_rows = order.batch_size
    steps = report.StepReport(run_dir, cfg, loop, total_steps, resumed=resume_from is not None,
                              progress=progress, log=log, line=_line, tensorboard=tensorboard,
                              scalars=("train", ("loss", "lr", "grad_norm", "eval_loss")),
                              enabled=dist.is_main)

    def save_weights(folder: Path, adapter_state=None) -> None:
        if cfg.method == "full":
            _save_full_weights(model, folder)
        else:
            save_adapter(model, folder / "adapter", tokenizer=tokenizer, state=adapter_state)

    def checkpoint() -> Path:
        if not dist.enabled:
            return common.save_checkpoint(run_dir, model, optimizer, scheduler, loop, save_weights,
                                          cfg.train.keep_checkpoints)
        # every process hands in its shards; rank 0 writes one whole checkpoint
        opt_state = distributed.OptimizerView(dist, optimizer).state_dict()
        adapter_state = dist.gather_adapter(model) if cfg.method != "full" else None
        path = run_dir / "checkpoints" / f"step-{loop.step}"
        if dist.is_main:
            path = common.save_checkpoint(run_dir, model,
                                          distributed.GatheredOptimizerState(opt_state), scheduler,
                                          loop, lambda f: save_weights(f, adapter_state),
                                          cfg.train.keep_checkpoints)
        dist.barrier()
        return path

    def clip() -> float:
        return dist.clip_grad_norm(model, cfg.train.max_grad_norm)

    # 4. the loop
    started = time.perf_counter()
    elapsed_before = loop.elapsed
    stopped_early = interrupted = False
    with common.StopFlag() as stop, common.out_of_memory_explained(cfg), steps:
        while loop.step < total_steps:
            if dist.enabled:
                distributed.reseed(cfg.train.seed, loop.step, dist.rank)
            micro = min(cfg.train.grad_accum, micro_total - loop.micro_index)
            chosen = [rows for _, rows in common.micro_batches(order, loop.micro_index, micro)]
            batches = [make_batch(train_rows, dist.shard(rows), pad_id, cfg.data.packing, device)
                       for rows in chosen]
            loop.tokens_seen += sum(len(train_rows[i]["input_ids"]) for r in chosen for i in r)
            n_sup = sum(common.count_supervised(b) for b in batches)
            n_sup = int(dist.all_sum([n_sup])[0])  # the whole step's, over all processes
            step_loss = 0.0
            for i, batch in enumerate(batches):
                # gradients are averaged over processes, hence x world_size; synced once
                with dist.sync_gradients(loss_module, i == len(batches) - 1):
                    with common.autocast(precision, device), common.activation_offload(cfg, device):
                        loss_sum, _ = loss_module(batch)
                    (loss_sum * dist.world_size / max(n_sup, 1)).backward()
                step_loss += float(loss_sum.detach())
            loss = dist.all_sum([step_loss])[0] / max(n_sup, 1)  # every process sees a NaN
            if not math.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)
                common.check_finite(loss, loop.step + 1, run_dir, cfg.train.lr)
            lr, grad_norm = common.optimizer_step(optimizer, scheduler,
                                                  clip if cfg.train.max_grad_norm else None)
            loop.count_step(micro, n_sup, loss)
            now = loop.elapsed = elapsed_before + time.perf_counter() - started
            record = {"step": loop.step, "epoch": round(order.epoch_of(loop.micro_index), 4),
                      "loss": loss, "lr": lr, "grad_norm": grad_norm,
                      "tokens_per_s": loop.supervised_seen / max(now, 1e-9)}
            eval_loss = None
            if eval_rows and cfg.train.eval_every and loop.step % cfg.train.eval_every == 0:
                eval_loss = evaluate(model, eval_rows, cfg, pad_id, device, precision,
                                     loss_module=loss_module, dist=dist)
                record["eval_loss"] = loop.last_eval_loss = eval_loss
                stopped_early = common.early_stopping(loop, eval_loss, cfg)
            steps.step(loop, record, eval_loss, record["tokens_per_s"])
            interrupted, stopped_early = common.end_of_step(
                loop, cfg, checkpoint, log, stop_requested=stop.requested,
                stopped_early=stopped_early, agree=dist.any)
            if interrupted or stopped_early:
                break

    # 5. finish
    if interrupted:
        steps.finish_trackers(None)
        return TrainResult(run_dir, run_dir / "adapter", {}, interrupted=True)
    final_eval = loop.last_eval_loss
    if eval_rows and (not cfg.train.eval_every or loop.step % cfg.train.eval_every):
        final_eval = evaluate(model, eval_rows, cfg, pad_id, device, precision,
                              loss_module=loss_module, dist=dist)
        steps.final_eval(loop, {"eval_loss": final_eval})
    adapter_state = dist.gather_adapter(model) if dist.enabled and cfg.method != "full" else None
    summary = _summary(cfg, loop, order, final_eval, counts, precision, precision_reason, device,
                       stopped_early, data_stats, dist)
    summary.update(_memory_summary(dist, device, load_peak, sharded, model))
    if dist.is_main:
        _write_final(cfg, model, tokenizer, run_dir, loop, adapter_state, summary)
        steps.finish_trackers(run_dir / "adapter")  # wandb / mlflow: the adapter as artifact
    dist.barrier()
    return TrainResult(run_dir, run_dir / "adapter", summary, stopped_early=stopped_early)


def _write_final(cfg, model, tokenizer, run_dir, loop, adapter_state, summary) -> None:
    """Final adapter (or model), loss plot and summary.json (rank 0 only)."""
    from lorakit.lora.io import save_adapter

    def save(folder: Path) -> None:
        if cfg.method == "full":
            _save_full_model(model, tokenizer, folder)
        else:
            save_adapter(model, folder, tokenizer=tokenizer, state=adapter_state,
                         extra_manifest={"run": str(run_dir), "steps": loop.step})

    common.save_final(run_dir, save)
    report.plot_losses(loop.history, run_dir / "loss.png", f"{cfg.method} on {cfg.model}")
    report.write_summary(run_dir, summary)


def _summary(cfg, loop, order, final_eval, counts, precision, precision_reason, device,
             stopped_early, data_stats, dist) -> dict:
    return {
        "method": cfg.method, "model": cfg.model, "steps": loop.step,
        "epochs": round(order.epoch_of(loop.micro_index), 4),
        "wall_time_s": round(loop.elapsed, 2), "tokens_seen": loop.tokens_seen,
        "supervised_tokens": loop.supervised_seen,
        "supervised_tokens_per_s": round(loop.supervised_seen / max(loop.elapsed, 1e-9), 2),
        "tokens_per_s": round(loop.tokens_seen / max(loop.elapsed, 1e-9), 2),
        "peak_memory_bytes": common.peak_memory_bytes(device),
        "final_train_loss": loop.last_loss, "final_eval_loss": final_eval,
        "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
        "precision": precision, "device": str(device), "stopped_early": stopped_early,
        "precision_reason": precision_reason,
        "world_size": dist.world_size, "strategy": cfg.train.strategy if dist.enabled else None,
        **data_stats,
    }


def _memory_summary(dist, device, load_peak: int, sharded: bool, model) -> dict:
    """The load's peak above the memory in use before it (the model built, the adapter added,
    sharded), the bytes of weights held and, with several processes, every rank's load peak,
    run peak and weights held (a collective: every rank calls it)."""
    from lorakit.train.distributed import held_bytes

    held = held_bytes(model)
    out = {"load_peak_memory_bytes": load_peak, "model_bytes": held}
    if dist.enabled:
        run_peak = common.peak_memory_bytes(device)
        w = dist.world_size
        mine = [0.0] * (3 * w)
        mine[dist.rank], mine[w + dist.rank] = float(load_peak), float(run_peak)
        mine[2 * w + dist.rank] = float(held)
        both = [int(v) for v in dist.all_sum(mine)]
        out["per_rank"] = {"load_peak_memory_bytes": both[:w],
                           "peak_memory_bytes": both[w:2 * w], "model_bytes": both[2 * w:]}
        if dist.strategy == "fsdp":
            out["fsdp_sharded_load"] = sharded
    return out


# ---------------------------------------------------------------------- helpers
def _line(record: dict, total: int) -> str:
    text = f"step {record['step']}/{total} loss {record['loss']:.4f} lr {record['lr']:.2e}"
    if record.get("eval_loss") is not None:
        text += f" eval_loss {record['eval_loss']:.4f}"
    return text + f" {record['tokens_per_s']:.0f} sup-tok/s"


def _save_full_weights(model, folder: Path) -> None:
    from lorakit.lora.io import atomic_save_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    # tied weights share storage: keep one name
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), v.shape)
        if key not in seen:
            seen[key] = k
            unique[k] = v.clone()
    atomic_save_safetensors(unique, folder / "model.safetensors")


def _load_full_weights(model, folder: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)


def _save_full_model(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
