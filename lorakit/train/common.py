"""What every training recipe shares: the base model for a config, the train / eval data
files, precision, the loss, optimizer and schedule, the data order, checkpoints that resume
exactly, the end of a step (periodic checkpoint, stop on request or by early stopping), the
NaN guard, stop signals, out-of-memory advice, and the finished run's adapter folder.

The recipes (``sft.py``, ``dpo.py``) read top to bottom and call into here, and into
``report.py`` for the metrics log, TensorBoard, progress and plots; nothing in this file
knows which method is running.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import ConfigError, DataError, LorakitError

IGNORE_INDEX = -100


class TrainingError(LorakitError):
    """Training stopped on a problem the user must fix (NaN loss, out of memory, bad data)."""


class CheckpointError(TrainingError):
    """A run file (checkpoint, adapter, metrics log, summary) could not be written (disk full,
    no permission) or a checkpoint could not be read back."""


def write_errors(aliases: dict | None = None):
    """Within this block a failed write (:class:`OSError`) becomes a one-line
    :class:`CheckpointError` naming the file and what to do; ``aliases`` maps temporary
    folders to the names the user knows (``.step-20.tmp`` -> ``step-20``)."""
    import errno

    from lorakit import fileio

    def hint(exc: OSError) -> str:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return "free space or set output_dir elsewhere"
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return "make the folder writable or set output_dir elsewhere"
        return "check the disk or set output_dir elsewhere"

    return fileio.explain_write_errors(CheckpointError, hint=hint, aliases=aliases)


@dataclass
class TrainResult:
    """What a recipe's ``train`` returns: the run folder, its adapter (or full model) folder,
    the summary written to ``summary.json`` (empty when interrupted), and how it ended."""

    run_dir: Path
    adapter_dir: Path
    summary: dict
    stopped_early: bool = False
    interrupted: bool = False


# ---------------------------------------------------------------------- the base model
def load_base_for_config(cfg, device: torch.device | None = None, precision: str = "fp32",
                         defer_weights: bool = False):
    """The base model and tokenizer a run trains on (or is scored on after training): the one
    place that turns a run config into a :func:`lorakit.models.load.load_model` call.

    Args:
        cfg: the :class:`~lorakit.config.RunConfig`: ``model``, ``model.device_map``, and
            ``quantization`` when ``cfg.quantized`` (QLoRA, or DPO with a quantization section).
        device: where the weights go (None: CUDA when available, else CPU); ignored when
            ``model.device_map`` places them.
        precision: the resolved ``train.precision`` (see :func:`resolve_precision`).
        defer_weights: parameters left on the meta device for FSDP's sharded load
            (``lorakit.train.distributed.materialize_sharded``); see ``load_model``.

    Returns:
        ``(model, tokenizer)``: the base in bf16 / fp16 for those precisions and float32
        otherwise, and always float32 for ``method: full`` (the optimizer updates those
        weights); 4-bit linear layers when quantized. No adapter yet.

    Raises:
        ModelLoadError / ConfigError: as :func:`~lorakit.models.load.load_model` does.
    """
    from lorakit.models.load import load_model

    check_optimizer(cfg, device)  # before the (slow, large) load
    check_activation_offload(cfg, device)
    dtype = base_dtype(precision) if cfg.method != "full" else torch.float32
    kwargs = {}
    if cfg.quantized:
        q = cfg.quantization
        kwargs = dict(quantization=q.type, double_quant=q.double_quant,
                      compute_dtype=q.compute_dtype)
    return load_model(cfg.model, dtype=dtype, device=device, device_map=cfg.device_map,
                      defer_weights=defer_weights, **kwargs)


def ready_to_train(model: nn.Module, cfg) -> None:
    """Gradient checkpointing when ``train.grad_checkpointing``, NEFTune's noise on the input
    embeddings when ``train.neftune_alpha``, then train mode."""
    if cfg.train.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    alpha = getattr(cfg.train, "neftune_alpha", None)
    if alpha:
        add_neftune(model, alpha)
    model.train()


def add_neftune(model: nn.Module, alpha: float):
    """NEFTune (arXiv 2310.05914): transformers' own forward hook on the input embeddings
    adds uniform(-1, 1) x alpha / sqrt(L x d) noise (L: the batch's padded length, d: the
    hidden size) while the embedding module is in train mode; eval and generation (eval
    mode) see clean embeddings. Returns the hook's handle."""
    from transformers.integrations.neftune import activate_neftune

    return activate_neftune(model, alpha)


# ---------------------------------------------------------------------- data files
def load_train_and_eval(cfg, log, *, expected: str) -> tuple[list, list]:
    """The examples of ``data.train`` and the held-out ones: ``data.eval``, else a seeded
    ``data.eval_fraction`` split of the train file, else none. Bad lines are skipped (the
    first five named in the log).

    Args:
        expected: what ``data.train`` should be, for the error when it is not set.

    Raises:
        ConfigError: ``data.train`` is not set.
        DataError: a file is missing or holds no valid example.
    """
    from lorakit.data.split import split_train_eval

    if not cfg.data.train:
        raise ConfigError(f"data.train is not set: give {expected}")
    train = _read_examples(cfg.data.train, cfg, log)
    if cfg.data.eval:
        return train, _read_examples(cfg.data.eval, cfg, log)
    if cfg.data.eval_fraction:
        return split_train_eval(train, cfg.data.eval_fraction, seed=cfg.train.seed)
    return train, []


def _read_examples(path, cfg, log) -> list:
    from lorakit.data.formats import load_examples

    if not Path(path).is_file():
        raise DataError(f"data file {path} does not exist")
    result = load_examples(path, format=cfg.data.format)
    for issue in result.errors[:5]:
        log(f"skipped: {issue}")
    if len(result.errors) > 5:
        log(f"... {len(result.errors) - 5} more bad lines skipped (see `lorakit data check {path}`)")
    if not result.examples:
        first = f"; the first: {result.errors[0]}" if result.errors else ""
        raise DataError(f"{path}: no valid example (checked {len(result.errors)} bad lines{first})")
    return result.examples


# ---------------------------------------------------------------------- precision
def resolve_precision(precision: str, device: torch.device, quantized: bool = False) -> str:
    """``auto`` -> ``bf16`` on CUDA with bf16 (``fp16`` without) and on CPUs with native bf16
    (dense bases), else ``fp32``; see :func:`precision_choice` for the reason given in the run
    summary."""
    return precision_choice(precision, device, quantized)[0]


def precision_choice(precision: str, device: torch.device,
                     quantized: bool = False) -> tuple[str, str]:
    """``(resolved train.precision, why)``, the why for the log and ``summary.json``.

    ``bf16`` stores the frozen base in bfloat16 (adapters and optimizer state stay float32) and
    runs the step under bf16 autocast. ``auto`` picks it on CUDA with bf16, and on CPUs with
    native bf16 (AVX512-BF16 or AMX) for a dense base: measured there 1.34x fp32 on the bundled
    demo's training at the same accuracy (76 vs 77 of 100) and 1.45-1.97x per step
    (docs/benchmarks.md, "Precision and dropout"). A CPU without native bf16 emulates it (100x
    slower than fp32 on one such machine) and keeps fp32; so does a 4-bit (``quantized``) base on
    CPUs, whose bf16 compute is not measured. ``train.precision=...`` forces either way.
    """
    from lorakit.models.load import native_bf16_support

    if precision != "auto":
        return precision, f"train.precision={precision}"
    native, why = native_bf16_support(device)
    if device.type == "cuda":
        return ("bf16" if native else "fp16"), f"auto: {why}"
    if native and quantized:
        return "fp32", (f"auto: {why}, but a 4-bit base's bf16 compute on CPUs is not measured "
                        f"faster, so auto keeps fp32; train.precision=bf16 forces it")
    if native:
        return "bf16", (f"auto: {why}: a bf16 frozen base trains faster than fp32 on such CPUs "
                        f"(1.3-2x measured); train.precision=fp32 forces fp32")
    return "fp32", f"auto: {why}"


def base_dtype(precision: str) -> torch.dtype:
    """The dtype a frozen base is stored in for a resolved ``train.precision``."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def autocast(precision: str, device: torch.device):
    """Mixed-precision context: matmuls in bf16/fp16, adapter weights and optimizer in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_activation_offload(cfg, device: torch.device | None = None) -> None:
    """Refuse ``train.activation_offload`` off CUDA: it moves the tensors autograd keeps for
    backward from GPU memory to pinned host memory, and on a CPU they are in host memory already.

    Raises:
        ConfigError: ``train.activation_offload`` on a device other than CUDA.
    """
    device = device or default_device()
    if getattr(cfg.train, "activation_offload", False) and device.type != "cuda":
        raise ConfigError(f"train.activation_offload moves activations from GPU to CPU memory; "
                          f"this run is on {device.type}, where they are in CPU memory already. "
                          f"Drop it, and use train.grad_checkpointing=true to lower activation "
                          f"memory")


def activation_offload(cfg, device: torch.device):
    """Within this block (a forward pass) the tensors saved for backward go to pinned CPU memory
    and come back in backward (``torch.autograd.graph.save_on_cpu``) when
    ``train.activation_offload`` is on and the run is on CUDA; otherwise nothing changes."""
    if getattr(cfg.train, "activation_offload", False) and device.type == "cuda":
        return torch.autograd.graph.save_on_cpu(pin_memory=True)
    return contextlib.nullcontext()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------------- loss
def supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor], *,
                    always_base: bool = False, frozen=None) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the supervised tokens of ``batch`` and their count.

    The output head (a vocabulary-sized matmul, a large share of a small model's compute)
    runs only at positions whose next token is supervised, instead of at every position as
    ``model(..., labels=...)`` does. The maths is the same.

    With a ``distill`` mask in the batch (``data.replay.loss=kl``, lorakit/data/replay.py),
    the positions it marks add ``KL(p_base || q)`` (nats, summed over the vocabulary) and
    count as tokens too; ``p_base`` comes from a no-grad forward of those rows with the
    adapters off. ``always_base`` (FSDP, where every rank must run the same forwards): run
    that forward whenever the batch carries a ``distill`` mask, even with no position marked.
    ``frozen``: what ``p_base`` comes from instead, a context manager factory in which the
    model is the frozen reference (DPO with ``init_adapter``: base + the SFT adapter).

    Returns:
        (loss_sum, n_tokens): divide by the tokens of the whole accumulated step, so the loss
        is the mean over supervised tokens across gradient accumulation.
    """
    labels = batch["labels"]
    distill = batch.get("distill")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "distill")}
    hidden = model.base_model(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
    targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    n_tokens = int(mask.sum())
    kl_mask = distill[:, 1:] if distill is not None else None
    n_kl = int(kl_mask.sum()) if kl_mask is not None else 0
    base_forward = bool(n_kl) or (always_base and kl_mask is not None)
    if n_tokens + n_kl == 0 and not base_forward:
        return hidden.sum() * 0.0, 0
    if n_tokens:
        logits = head_logits(model, hidden[:, :-1][mask])  # (N, V)
        loss = F.cross_entropy(logits, targets[mask], reduction="sum")
    else:  # only matched positions here (or, under FSDP, none at all)
        loss = hidden.sum() * 0.0
    if base_forward:
        loss = loss + distill_kl(model, inputs, hidden, kl_mask, frozen)
    return loss, n_tokens + n_kl


def distill_kl(model: nn.Module, inputs: dict[str, torch.Tensor], hidden: torch.Tensor,
               kl_mask: torch.Tensor, frozen=None) -> torch.Tensor:
    """``sum KL(p_base || q)`` over the positions ``kl_mask`` (B, T-1) marks: ``q`` from the
    tuned model's ``hidden`` (B, T, H), ``p_base`` from the same rows run again without
    gradient, with the adapters switched off and in eval mode (no dropout: the base as the
    forgetting probe sees it), only the rows that have such a position. ``frozen()``, when
    given, is a context in which ``model`` is the reference to match instead (it owns eval
    mode and no-grad)."""
    from lorakit.lora.inject import disable_adapters

    rows = kl_mask.any(dim=1)
    if not rows.any():  # always_base with nothing to match here: the forward on one row
        rows = rows.clone()
        rows[0] = True
    sub = {k: v[rows] for k, v in inputs.items()}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), (frozen() if frozen is not None else disable_adapters(model)):
            base_hidden = model.base_model(**sub, use_cache=False).last_hidden_state
            log_p = F.log_softmax(head_logits(model, base_hidden[:, :-1][kl_mask[rows]]), dim=-1)
    finally:
        model.train(was_training)
    log_q = F.log_softmax(head_logits(model, hidden[:, :-1][kl_mask]), dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="sum")


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The output head on selected hidden states (N, H) -> float32 logits (N, V), with the
    final logit soft-capping some models (Gemma 2) apply."""
    logits = model.get_output_embeddings()(hidden).float()
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def count_supervised(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the loss is taken over: supervised labels, plus positions matched to the base
    (``distill``, data.replay.loss=kl)."""
    n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    if batch.get("distill") is not None:
        n += int(batch["distill"][:, 1:].sum())
    return n


# ---------------------------------------------------------------------- optimizer / schedule
def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    lr_ratio: float | None = None, optimizer: str = "adamw") -> torch.optim.Optimizer:
    """AdamW over trainable parameters; no decay on biases, norms and DoRA magnitudes.

    ``optimizer`` (``train.optimizer``): ``adamw`` is torch's; ``adamw8bit`` /
    ``paged_adamw8bit`` are bitsandbytes' block-wise 8-bit AdamW (see :func:`optimizer_class`).

    ``lr_ratio`` (LoRA+, ``lora.lr_ratio``): the B matrices train at ``lr x lr_ratio`` and A
    at ``lr``; as PEFT's ``create_loraplus_optimizer``, 1-D parameters (biases, DoRA
    magnitudes) join B's rate. The groups at ``lr`` come first, so the logged rate is A's.
    """
    groups = {}  # (lr multiplier, decays) -> params
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        fast = lr_ratio is not None and ("lora_B" in name or "lora_embedding_B" in name
                                         or param.ndim == 1)
        groups.setdefault((lr_ratio if fast else 1.0, param.ndim >= 2), []).append(param)
    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, not kv[0][1]))
    return optimizer_class(optimizer)([{"params": params, "lr": lr * mult,
                               "weight_decay": weight_decay if decays else 0.0}
                              for (mult, decays), params in ordered],
                             lr=lr, betas=(0.9, 0.999), eps=1e-8)


def optimizer_class(name: str):
    """The optimizer class ``train.optimizer`` names: ``torch.optim.AdamW``, or bitsandbytes'
    ``AdamW8bit`` / ``PagedAdamW8bit`` (same arguments; 8-bit moments for tensors of at least
    4096 elements, fp32 below, as bitsandbytes' ``min_8bit_size``)."""
    if name == "adamw":
        return torch.optim.AdamW
    import bitsandbytes as bnb

    return {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]


def check_optimizer(cfg, device: torch.device | None = None) -> None:
    """Refuse, before anything is loaded, a ``train.optimizer`` this device or strategy cannot
    run, naming the alternative.

    bitsandbytes 0.50 runs ``adamw8bit`` on CPU and CUDA; paged optimizers page their state
    through CUDA unified memory, which a CPU does not have (bitsandbytes would silently fall back
    to the unpaged optimizer). (FSDP's DTensor shards are refused in
    :func:`lorakit.train.distributed.check_compatible`.)

    Raises:
        ConfigError: the optimizer cannot run here.
    """
    name = getattr(cfg.train, "optimizer", "adamw")
    if name == "adamw":
        return
    device = device or default_device()
    if name == "paged_adamw8bit" and device.type != "cuda":
        raise ConfigError(f"train.optimizer=paged_adamw8bit pages its state through CUDA unified "
                          f"memory, which this device ({device.type}) does not have; use "
                          f"train.optimizer=adamw8bit (the same 8-bit AdamW, unpaged) or adamw")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"train.optimizer={name} needs bitsandbytes ({exc}); install it "
                          f"(pip install bitsandbytes) or use train.optimizer=adamw") from None


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


def optimizer_and_scheduler(model: nn.Module, cfg, total_steps: int):
    """The optimizer and learning-rate schedule the ``train`` section describes."""
    t = cfg.train
    optimizer = build_optimizer(model, t.lr, t.weight_decay, cfg.lora.lr_ratio, t.optimizer)
    return optimizer, build_scheduler(optimizer, t.scheduler, t.warmup, total_steps)


def optimizer_step(optimizer, scheduler, clip_grad_norm=None) -> tuple[float, float | None]:
    """Clip (when ``clip_grad_norm`` is given: a function returning the norm before clipping),
    step the optimizer and the schedule, clear the gradients.

    Returns:
        ``(lr, grad_norm)``: the learning rate this step used, the gradient norm or None.
    """
    grad_norm = clip_grad_norm() if clip_grad_norm is not None else None
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return lr, grad_norm


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
        order = epoch_permutation(self.n_rows, self.seed, epoch)
        return order[offset * self.batch_size:(offset + 1) * self.batch_size].tolist()

    def epoch_of(self, micro_index: int) -> float:
        return micro_index / self.micro_per_epoch


def epoch_permutation(n_rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The seeded order of ``n_rows`` rows in epoch ``epoch`` (the same on every machine)."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def micro_batches(order: DataOrder, start: int, count: int) -> Iterator[tuple[int, list[int]]]:
    """``(micro index, rows)`` of the ``count`` micro-batches from ``start`` on."""
    for i in range(start, start + count):
        yield i, order.rows(i)


def count_steps(cfg, order: DataOrder) -> tuple[int, int]:
    """``(micro-batches, optimizer steps)`` of the whole run: ``train.max_steps`` if set, else
    ``train.epochs`` over the data; the last step may accumulate fewer micro-batches."""
    micro_total = (cfg.train.max_steps * cfg.train.grad_accum if cfg.train.max_steps
                   else max(1, round(cfg.train.epochs * order.micro_per_epoch)))
    return micro_total, -(-micro_total // cfg.train.grad_accum)


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

    def count_step(self, micro: int, supervised: int, loss: float) -> None:
        """An optimizer step is done: ``micro`` micro-batches holding ``supervised`` tokens
        (pairs, for DPO), with this loss."""
        self.step += 1
        self.micro_index += micro
        self.supervised_seen += supervised
        self.last_loss = loss


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


CHECKPOINT_MARKER = "checkpoint.json"  # written last: the checkpoint is complete


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer, scheduler, loop: LoopState,
                    save_weights, keep: int) -> Path:
    """Write ``checkpoints/step-N/`` so that a crash (even a power cut) leaves the previous
    checkpoint or the new one, then prune all but the newest ``keep``.

    Every file is written durably (:mod:`lorakit.fileio`: temporary name, fsync, rename) into
    ``.step-N.tmp/``; the marker ``checkpoint.json`` (each file's size) comes last, then the
    folder is renamed into place and its parent fsynced. ``save_weights(folder)`` writes the
    trainable weights (adapter or full model).

    Raises:
        CheckpointError: a write failed (disk full, no permission): one line naming the file.
            The half-written folder is removed; older checkpoints are untouched.
    """
    from lorakit import fileio

    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{loop.step}"
    tmp = ckpt_root / f".step-{loop.step}.tmp"
    with write_errors({tmp: final}):
        try:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            save_weights(tmp)
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "rng": _rng_state(), "loop": json.dumps(asdict(loop))}
            fileio.atomic_write(tmp / "trainer_state.pt", lambda f: torch.save(state, f))
            fileio.atomic_write_json(tmp / "state.json", {
                "step": loop.step, "micro_index": loop.micro_index, "loss": loop.last_loss})
            fileio.fsync_tree(tmp)  # what save_weights wrote, and its renames
            written = sorted(p for p in tmp.rglob("*") if p.is_file())
            fileio.atomic_write_json(tmp / CHECKPOINT_MARKER, {
                "step": loop.step,
                "files": {p.relative_to(tmp).as_posix(): p.stat().st_size for p in written}})
            fileio.replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _checkpoint_folders(run_dir: Path) -> list[Path]:
    """Every ``checkpoints/step-N/`` folder, complete or not, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints (their ``checkpoint.json`` marker written), oldest first;
    temporaries of an interrupted save are ignored."""
    return [p for p in _checkpoint_folders(run_dir) if (p / CHECKPOINT_MARKER).is_file()]


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of ``run_dir``, or None when it has none yet."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_problem(folder: Path) -> str | None:
    """Why the checkpoint ``folder`` cannot be resumed from (None: it looks whole): no marker
    (its write never finished), a file missing or of another size than the marker records
    (truncated, as a power cut leaves an un-fsynced file), or a ``trainer_state.pt`` that is
    not a whole torch archive. Cheap: sizes and the archive's directory, no tensor is read."""
    import zipfile

    marker = folder / CHECKPOINT_MARKER
    if not marker.is_file():
        return f"it has no {CHECKPOINT_MARKER} marker (its write did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its marker {marker} is unreadable ({exc})"
    if "trainer_state.pt" not in sizes:
        sizes["trainer_state.pt"] = -1
    for name, size in sizes.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if size >= 0 and actual != size:
            return f"{path} is truncated ({actual} of {size} bytes)"
    try:
        with zipfile.ZipFile(folder / "trainer_state.pt") as archive:
            archive.namelist()
    except (OSError, zipfile.BadZipFile) as exc:
        return f"{folder / 'trainer_state.pt'} is not a whole torch file ({exc})"
    return None


def resume_point(run_dir: Path, resume: bool, log) -> Path | None:
    """The checkpoint a run continues from (None: start at step 0).

    ``resume`` takes the newest checkpoint that is whole (:func:`checkpoint_problem`); each
    newer one that is not is skipped with a warning naming it and why. A folder with no
    (whole) checkpoint starts from scratch (said in the log). Without ``resume``, a folder
    that already holds a run is refused, so nothing is overwritten.
    """
    if not resume:
        if (Path(run_dir) / "config.yaml").exists():
            raise ConfigError(f"{run_dir} already holds a run; pass resume=true to continue it, "
                              f"or choose another output_dir")
        return None
    folders = _checkpoint_folders(run_dir)
    for folder in reversed(folders):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder
        log(f"warning: skipping checkpoint {folder}: {problem}; trying an older one")
    if folders:
        log(f"resume=true but {run_dir} has no whole checkpoint: starting from scratch")
    else:
        log(f"resume=true but {run_dir} has no checkpoint yet: starting from scratch")
    return None


def load_checkpoint(folder: Path, optimizer, scheduler) -> LoopState:
    """Restore optimizer, scheduler and RNG from ``folder``; weights are the caller's job."""
    path = folder / "trainer_state.pt"
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointError(f"could not read {path} ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}); delete "
                              f"{folder} to resume from the checkpoint before it") from None
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _restore_rng(state["rng"])
    return LoopState(**json.loads(state["loop"]))


# ---------------------------------------------------------------------- the end of a step
def check_finite(loss: float, step: int, run_dir: Path, lr: float) -> None:
    """The NaN guard: raise :class:`TrainingError` naming the last good checkpoint when the
    step's loss is not finite (call it before the optimizer step)."""
    if math.isfinite(loss):
        return
    last = last_checkpoint(run_dir)
    raise TrainingError(f"loss became {loss} at step {step}; training stopped. "
                        + (f"The last good checkpoint is {last}. " if last else "")
                        + f"Lower train.lr (now {lr}) or check the data.")


def early_stopping(loop: LoopState, eval_loss: float, cfg) -> bool:
    """Record an evaluation; True when the last ``train.early_stopping_patience`` evaluations
    have not improved on the best one."""
    if loop.best_eval is None or eval_loss < loop.best_eval:
        loop.best_eval, loop.evals_without_improvement = eval_loss, 0
        return False
    loop.evals_without_improvement += 1
    patience = cfg.train.early_stopping_patience
    return bool(patience and loop.evals_without_improvement >= patience)


def end_of_step(loop: LoopState, cfg, checkpoint, log, *, stop_requested: bool,
                stopped_early: bool, agree=None) -> tuple[bool, bool]:
    """What follows a reported step: the periodic checkpoint (``train.save_every``), then a
    stop on request (Ctrl-C / SIGTERM; checkpointed first, so ``resume=true`` continues) or
    by early stopping.

    Args:
        checkpoint: writes a checkpoint of the current step and returns its folder.
        agree: turns this process's ``[stop_requested, stopped_early]`` into the whole run's
            (:meth:`lorakit.train.distributed.Dist.any`), so every process stops at one step.

    Returns:
        ``(interrupted, stopped_early)``: the loop ends when either is true.
    """
    if cfg.train.save_every and loop.step % cfg.train.save_every == 0:
        checkpoint()
    if agree is not None:
        stop_requested, stopped_early = agree([stop_requested, stopped_early])
    if stop_requested:
        path = checkpoint()
        log(f"stopped at step {loop.step}; checkpoint {path}. Continue with resume=true")
        return True, stopped_early
    if stopped_early:
        log(f"early stopping at step {loop.step}: eval loss has not improved for "
            f"{cfg.train.early_stopping_patience} evaluations")
    return False, stopped_early


# ---------------------------------------------------------------------- the finished run
def save_final(run_dir: Path, save) -> Path:
    """The run's ``adapter/`` folder (a full model for ``method: full``): ``save(folder)``
    writes it under a temporary name, which is fsynced and then replaces any older one.

    Raises:
        CheckpointError: a write failed (disk full, no permission), naming the file.
    """
    from lorakit import fileio

    tmp, final = Path(run_dir) / ".adapter.tmp", Path(run_dir) / "adapter"
    with write_errors({tmp: final}):
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            save(tmp)
            fileio.fsync_tree(tmp)  # e.g. save_pretrained's files, not fsynced by it
            fileio.replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


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


def import_heavy_modules(spec, fsdp: bool = False, quantized: bool = False) -> None:
    """Import what loading ``spec`` imports (its transformers modeling code, the tokenizer
    classes; FSDP's modules; bitsandbytes for a 4-bit base: +116 MB resident on import,
    measured here), so that a load's measured peak is the weights', not ~150 MB of Python
    modules and native libraries."""
    from transformers import AutoTokenizer  # noqa: F401

    from lorakit.models.load import import_model_code

    import_model_code(spec)
    if quantized:
        from lorakit.models.quantize import import_bitsandbytes

        import_bitsandbytes()
    if fsdp:
        import torch.distributed.fsdp  # noqa: F401
        import torch.distributed.tensor  # noqa: F401
    # reading the config may have converted a GGUF file first (the embedded default's cache):
    # hand its freed heap back, or the load would reuse it unseen by the resident size
    from lorakit.models.stream import release_freed_memory

    release_freed_memory()


def reset_peak_memory(device: torch.device) -> int:
    """Start counting :func:`peak_since_reset` from now (CUDA's peak stats, or Linux's VmHWM);
    returns the memory in use now (allocated on CUDA, resident on CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return int(torch.cuda.memory_allocated(device))
    from lorakit.memory import reset_peak_rss, rss_bytes

    reset_peak_rss()
    return rss_bytes()


def peak_since_reset(device: torch.device) -> int:
    """Peak device memory (CUDA) or peak resident size (CPU, VmHWM) since
    :func:`reset_peak_memory`."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    from lorakit.memory import rss_bytes

    return rss_bytes("VmHWM")


def out_of_memory_error(exc: BaseException, cfg) -> TrainingError:
    return TrainingError(
        f"out of memory ({exc.__class__.__name__}). Try a smaller train.batch_size "
        f"(now {cfg.train.batch_size}) with a larger train.grad_accum, a smaller data.max_length "
        f"(now {cfg.data.max_length}), train.grad_checkpointing=true"
        + (", or method=qlora" if cfg.method != "qlora" else ""))


@contextlib.contextmanager
def out_of_memory_explained(cfg):
    """Within this block an out-of-memory error becomes a :class:`TrainingError` naming the
    settings that lower memory."""
    try:
        yield
    except Exception as exc:
        if is_oom(exc):
            raise out_of_memory_error(exc, cfg) from None
        raise


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, getattr(torch, "OutOfMemoryError", ())) or (
        isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())
