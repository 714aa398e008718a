"""Training on more than one device, on PyTorch's own distributed stack.

``torchrun --nproc-per-node N -m lorakit train CONFIG`` (or ``lorakit train CONFIG --nproc N``,
which runs that torchrun command for you) starts N copies of the recipe. Each reads
``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` from the environment torchrun sets, and :func:`setup`
joins them into one process group: gloo on CPU (what the tests use), NCCL on GPUs.

Two strategies (``train.strategy``):

* ``ddp``: every rank holds the whole model; ``DistributedDataParallel`` all-reduces the
  gradients of the trainable (adapter) parameters only: the frozen base is neither broadcast
  nor synchronised, since every rank loads the same weights.
* ``fsdp``: FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every decoder block, and the
  rest of the model, across ranks, so a base that does not fit one device is spread over all
  of them. Parameters keep the dtype they were loaded in (a bf16 base, float32 adapters;
  FSDP2 shards each parameter on its own, so mixed dtypes in one block are fine). A QLoRA
  base shards too: its packed 4-bit ``Params4bit`` weights are split row-wise like any
  other parameter (checked on CPU/gloo: the sharded forward equals the unsharded one), and it
  loads sharded like a 16-bit base (:func:`materialize_sharded`).

What the recipe asks of this module, and why the maths stays that of one process:

* data: the recipe's :class:`~lorakit.train.common.DataOrder` hands out *global*
  micro-batches of ``batch_size * world_size`` rows; :meth:`Dist.shard` gives each rank its
  contiguous slice. A rank whose slice is empty (the short last batch of an epoch) runs a
  row with no supervised token, so collective calls stay in step.
* loss: the supervised-token count of the whole step is all-reduced first, and each rank
  back-propagates ``loss_sum * world_size / n_global``; DDP and FSDP average gradients over
  ranks, so every rank ends with the gradient a single process would compute for the whole
  global batch. Gradients are synchronised only on the last micro-step of an accumulation.
* decisions: the logged loss is all-reduced (so a NaN stops every rank), and stop requests
  (Ctrl-C / SIGTERM) and early stopping are agreed with one all-reduce per step.
* files: only rank 0 writes the run folder and logs. Checkpoints gather every rank's shard of
  the adapter and of the optimizer state first (never rank 0's shard alone), so a checkpoint
  is the same file whether 1, 2 or 8 processes wrote it and resumes with any number.

``model.device_map`` (one process, layers placed across several GPUs by accelerate) is the
third way to use several devices; :func:`placement_plan` shows where each layer would go.
"""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorakit.errors import ConfigError

STRATEGIES = ("ddp", "fsdp")


# ---------------------------------------------------------------------- launching
def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command that runs ``lorakit <argv>`` in ``nproc`` processes on this machine.

    ``--standalone`` makes torchrun pick a free rendezvous port, so two runs on one machine
    do not collide.
    """
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", "-m", "lorakit", *argv]


def launch(nproc: int, argv: list[str]) -> int:
    """Run ``lorakit <argv>`` under torchrun with ``nproc`` processes; returns its exit code.

    torchrun runs in its own session, so Ctrl-C reaches this process only; it is passed on as
    one SIGTERM, which torchrun forwards once to every worker: they agree to stop, write a
    checkpoint and exit (torchrun kills workers still running 30 s later). A second Ctrl-C
    kills them all at once.
    """
    import signal

    env = dict(os.environ)
    if not torch.cuda.is_available():
        # torchrun sets 1 thread per process; on CPU share the cores out instead
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    proc = subprocess.Popen(torchrun_command(nproc, argv), env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        print("\nstop requested: every process saves a checkpoint after this step "
              "(Ctrl-C again to abort)", file=sys.stderr)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        return 130


def launched_rank() -> int:
    """This process's rank under torchrun (0 when not launched by torchrun)."""
    return int(os.environ.get("RANK", "0"))


# ---------------------------------------------------------------------- the process group
@dataclass
class Dist:
    """This process's place in the run. With ``world_size == 1`` every method is a no-op and
    the recipe behaves exactly as it does without torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "ddp"
    owns_group: bool = False  # setup() created the process group, so teardown() ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def _tensor(self, values, dtype=torch.float64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.enabled:
            return list(values)
        import torch.distributed as dist

        t = self._tensor(values)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.tolist()

    def any(self, flags: list[bool]) -> list[bool]:
        """Element-wise OR over ranks: one rank asking to stop stops them all."""
        if not self.enabled:
            return [bool(f) for f in flags]
        import torch.distributed as dist

        t = self._tensor([float(f) for f in flags])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [bool(v) for v in t.tolist()]

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    # ------------------------------------------------------------------ data
    def shard(self, rows: list[int]) -> list[int]:
        """This rank's contiguous share of a global micro-batch (may be empty)."""
        if not self.enabled:
            return rows
        per = math.ceil(len(rows) / self.world_size)
        return rows[self.rank * per:(self.rank + 1) * per]

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module) -> "LossModule | nn.Module":
        """The module the recipe calls for the loss: ``module(batch) -> (loss_sum, n)``.

        One process: :class:`LossModule` around ``model``. DDP: that, wrapped in
        ``DistributedDataParallel`` over the trainable parameters only. FSDP: decoder blocks
        and then the whole :class:`LossModule` ``fully_shard``-ed, so the embedding, final norm
        and output head are gathered for the duration of the loss computation.
        """
        loss_module = LossModule(model)
        if not self.enabled:
            return loss_module
        if self.strategy == "fsdp":
            loss_module.same_forwards = True  # see LossModule
            _shard_fsdp(loss_module, self)
            deferred = getattr(model, "lorakit_deferred", None)
            if deferred is not None:
                materialize_sharded(loss_module, deferred)
                del model.lorakit_deferred
            return loss_module
        from torch.nn.parallel import DistributedDataParallel as DDP

        frozen = [name for name, p in loss_module.named_parameters() if not p.requires_grad]
        frozen += [name for name, _ in loss_module.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(loss_module, frozen)
        loss_module.touch_all_trainable = True
        ids = [self.local_rank] if self.device.type == "cuda" else None
        return DDP(loss_module, device_ids=ids, broadcast_buffers=False)

    @contextlib.contextmanager
    def sync_gradients(self, wrapped: nn.Module, sync: bool):
        """Gradient accumulation: synchronise only when ``sync`` (the last micro-step)."""
        if not self.enabled:
            yield
        elif self.strategy == "fsdp":
            wrapped.set_requires_gradient_sync(sync)
            yield
        elif sync:
            yield
        else:
            with wrapped.no_sync():
                yield

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> float:
        """Clip the trainable parameters' gradient norm; returns the norm before clipping.

        Under FSDP the gradients are sharded DTensors and torch computes the global norm."""
        params = [p for p in model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)

    # ------------------------------------------------------------------ checkpoints
    def gather_adapter(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole adapter on every rank, under PEFT's key names (a collective under FSDP:
        every rank must call it)."""
        from lorakit.lora.io import adapter_parameters

        return {k: _full(v).detach().contiguous().cpu()
                for k, v in adapter_parameters(model).items()}

    def gather_optimizer_state(self, optimizer) -> dict:
        """``optimizer.state_dict()`` with every sharded tensor gathered whole (collective)."""
        state = optimizer.state_dict()
        return {"state": {i: {k: _full(v).cpu() if torch.is_tensor(v) else v
                              for k, v in s.items()} for i, s in state["state"].items()},
                "param_groups": state["param_groups"]}

    def load_optimizer_state(self, optimizer, state: dict) -> None:
        """Load a whole (gathered) optimizer state, re-sharding it like the parameters."""
        if self.enabled and self.strategy == "fsdp":
            from torch.distributed.tensor import DTensor, distribute_tensor

            params = [p for group in optimizer.param_groups for p in group["params"]]
            for index, values in state["state"].items():
                param = params[int(index)]
                if not isinstance(param, DTensor):
                    continue
                for key, value in values.items():
                    if torch.is_tensor(value) and value.shape == param.shape:
                        values[key] = distribute_tensor(value.to(self.device), param.device_mesh,
                                                        param.placements, src_data_rank=None)
        optimizer.load_state_dict(state)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


class LossModule(nn.Module):
    """``forward(batch) -> (loss_sum, n_supervised)`` around a causal LM.

    The recipe's loss (:func:`lorakit.train.common.supervised_loss`) calls the decoder and the
    output head separately; DDP and FSDP only see what runs inside a wrapped module's
    ``forward``, so the whole loss runs inside this one.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.touch_all_trainable = False  # set for DDP, see forward
        # set for FSDP: every rank runs the same forwards, as each one all-gathers the
        # shards; with data.replay.loss=kl a rank runs the base's no-grad forward even when
        # its share of the batch has no replay row (another rank's may)
        self.same_forwards = False

    def forward(self, batch: dict[str, torch.Tensor]):
        from lorakit.train import common

        loss_sum, n = common.supervised_loss(self.model, batch, always_base=self.same_forwards)
        if n == 0 and self.touch_all_trainable and torch.is_grad_enabled():
            # a rank with no supervised token (an empty share of the batch) still has to give
            # every trainable parameter a (zero) gradient, or DDP waits for it forever
            loss_sum = loss_sum + sum(p.reshape(-1)[0] * 0.0 for p in self.parameters()
                                      if p.requires_grad)
        return loss_sum, n


def _shard_fsdp(loss_module: LossModule, d: Dist) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    for block in fsdp_units(loss_module.model):
        fully_shard(block, mesh=mesh)
    for module in _own_unit_embeddings(loss_module.model):
        fully_shard(module, mesh=mesh)
    fully_shard(loss_module, mesh=mesh)
    return loss_module


def _own_unit_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head, when each can be its own FSDP unit: untied
    (a tied pair is one parameter and stays with the root) and plain ``nn.Embedding`` /
    ``nn.Linear`` modules. In the root they would stay gathered for the whole loss (measured
    on TinyLlama-1.1B shapes, 2 ranks: their 0.5 GiB in float32 gathered from the first
    forward to the end of backward); as units, each is gathered only around its own forward
    and backward."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if type(emb) is not nn.Embedding or type(head) is not nn.Linear or head.weight is emb.weight:
        return []
    return [emb, head]


def sharded_load_blocker(cfg, d: Dist) -> str | None:
    """Why this run's ranks each load the whole base instead of only their FSDP shard, or
    None when they load their shard only (:func:`materialize_sharded`).

    The sharded load builds the model on the meta device, adds the adapter, shards, and only
    then reads weights; everything that needs the base's values before sharding rules it out.
    """
    if not d.enabled or d.strategy != "fsdp":
        return "not an FSDP run"
    lora = cfg.lora.to_lora_config()
    if lora.init_lora_weights not in (True, False, "gaussian"):
        return f"lora.init={lora.init_lora_weights} computes the adapter from the base weights"
    if lora.use_dora:
        return "DoRA's magnitude vector starts as the base weights' row norms"
    if lora.modules_to_save:
        return "lora.modules_to_save copies base modules before sharding"
    if lora.bias != "none":
        return f"lora.bias={lora.bias} trains base biases"
    if cfg.data.replay.fraction and cfg.data.replay.file is None:
        return "data.replay with self-generated data needs the whole base to generate it"
    return None


@torch.no_grad()
def materialize_sharded(module: nn.Module, deferred) -> None:
    """Give an FSDP-sharded model whose base is still on the meta device its weights: each
    rank allocates its own shard of every parameter and reads the checkpoint one tensor at a
    time, reading only its own rows (safetensors slices along dim 0, cut as FSDP2 cuts; any
    other placement is read whole and cut by ``distribute_tensor(..., src_data_rank=None)``):
    no communication. Peak memory on a rank: its share of the base, the adapter, and its share
    of one checkpoint tensor in flight. A 4-bit base's linear weights are read whole and
    quantized (``stream.read_deferred``: the codes a one-process load makes, the quant state
    put on the layer, kept whole on every rank); the rank keeps its rows of the packed codes.

    What was already real (the adapter's shards, buffers such as RoPE's inv_freq) is kept:
    ``to_empty`` reallocates every tensor, so those are copied back.

    Raises:
        ModelLoadError: a tensor cannot be read, or the checkpoint left a parameter unset.
    """
    from torch.distributed.tensor import DTensor, distribute_tensor

    from lorakit.errors import ModelLoadError
    from lorakit.models import stream

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    keep = {name: local(t).detach().clone() for name, t in tensors.items() if not t.is_meta}
    module.to_empty(device=deferred.device)
    # FSDP2 swaps tensors in place, so tied aliases stay one parameter; a plain module's
    # to_empty gives each alias a tensor of its own: tie them again
    for _, _, homes in deferred.slots.values():
        first = stream.home_tensor(*homes[0])
        for m, a in homes[1:]:
            if stream.home_tensor(m, a) is not first:
                (m._parameters if a in m._parameters else m._buffers)[a] = first
    tensors = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    for name, value in keep.items():
        local(tensors[name]).copy_(value)
    # what was real before (the adapter) counts as set; the rest must come from the checkpoint
    filled: set[int] = {id(tensors[name]) for name in keep}
    del keep

    def home(homes):
        return stream.home_tensor(*homes[0])

    def my_rows(homes, shape):
        """This rank's rows of a tensor FSDP sharded along dim 0 (torch.chunk's split, as
        FSDP2 cuts), so only they are read; None (read it whole) otherwise."""
        target = home(homes)
        if not isinstance(target, DTensor) or not shape or \
                [type(p).__name__ for p in target.placements] != ["Shard"] or \
                target.placements[0].dim != 0:
            return None
        n, world, rank = shape[0], target.device_mesh.size(), target.device_mesh.get_local_rank()
        size = -(-n // world)
        start = min(rank * size, n)
        return start, min(start + size, n)

    for name, full, homes in stream.read_deferred(deferred, rows=my_rows):
        target = home(homes)
        if isinstance(target, DTensor) and full.shape != local(target).shape:
            piece = distribute_tensor(full, target.device_mesh, target.placements,
                                      src_data_rank=None).to_local()
        else:
            piece = full  # already this rank's rows (or a tensor FSDP does not shard)
        dest = local(target)
        if dest.shape != piece.shape:
            raise ModelLoadError(f"{deferred.layout.folder}: FSDP shard of {name!r} is "
                                 f"{list(dest.shape)}, the checkpoint's piece {list(piece.shape)}")
        dest.copy_(piece)
        filled.update(id(stream.home_tensor(m, a)) for m, a in homes)
        del full, piece
    stream.release_freed_memory()
    unset = [n for n, p in module.named_parameters() if id(p) not in filled]
    if unset:
        raise ModelLoadError(f"{deferred.layout.folder}: the checkpoint holds no tensor for "
                             f"{unset[0]!r} ({len(unset)} missing); re-download it")


def held_bytes(model: nn.Module) -> int:
    """The bytes of parameters and buffers this process holds: under FSDP its shard of each
    (``DTensor.to_local``), otherwise the whole tensor; storage shared by tied weights counts
    once. The deterministic half of "each rank holds only its shard" (peak memory adds what
    was in flight and the allocator's slack)."""
    from torch.distributed.tensor import DTensor

    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        t = t.to_local() if isinstance(t, DTensor) else t
        if t.is_meta or t.untyped_storage().data_ptr() in seen:
            continue
        seen.add(t.untyped_storage().data_ptr())
        total += t.untyped_storage().nbytes()
    return total


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the decoder blocks (transformers names their
    classes in ``model._no_split_modules``). Whatever is left (embeddings, final norm, the
    output head) is sharded with the root.

    Raises:
        ConfigError: the model names no block class, or none of its modules is one.
    """
    from lorakit.models.modules import decoder_blocks

    units = decoder_blocks(model)
    if not units:
        raise ConfigError(f"train.strategy=fsdp: cannot find the decoder blocks of "
                          f"{type(model).__name__} (no _no_split_modules); use train.strategy=ddp")
    return units


def setup(strategy: str = "ddp") -> Dist:
    """Join the process group torchrun describes in the environment, or describe a single
    process when there is none.

    Returns:
        A :class:`Dist` with this rank's device: ``cuda:LOCAL_RANK`` with NCCL on GPUs, the CPU
        with gloo otherwise.

    Raises:
        ConfigError: an unknown strategy.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"), strategy=strategy)
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                device_id=device if cuda else None)
    return Dist(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                device=device, strategy=strategy, owns_group=owns)


def teardown(d: Dist) -> None:
    if d.owns_group:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- resume across sizes
def convert_position(micro_index: int, n_rows: int, old_rows: int, new_rows: int
                     ) -> tuple[int, bool]:
    """Map a data position counted in global micro-batches of ``old_rows`` rows to one counted
    in ``new_rows`` rows (a run resumed with another ``world_size * batch_size``).

    Returns:
        (new micro index, exact): ``exact`` is False when the rows already seen do not end on
        a new micro-batch boundary; the position is then rounded up to the next one (the rest
        of those rows are skipped for this epoch).
    """
    if old_rows == new_rows:
        return micro_index, True
    old_per_epoch, new_per_epoch = math.ceil(n_rows / old_rows), math.ceil(n_rows / new_rows)
    epoch, offset = divmod(micro_index, old_per_epoch)
    done = min(offset * old_rows, n_rows)
    return epoch * new_per_epoch + math.ceil(done / new_rows), done % new_rows == 0


def empty_row(row: dict) -> dict:
    """A copy of ``row`` with no supervised token (for a rank with nothing to do this step)."""
    out = {**row, "labels": [-100] * len(row["labels"])}
    if "distill" in row:  # nor a position matched to the base (data.replay.loss=kl)
        out["distill"] = [0] * len(row["distill"])
    return out


def reseed(seed: int, step: int, rank: int) -> None:
    """Per-rank, per-step RNG (dropout masks differ across ranks, and a resumed run draws the
    same masks as an uninterrupted one whatever the checkpoint's RNG state)."""
    torch.manual_seed((seed * 1_000_003 + step * 7_919 + rank) % (2**63 - 1))


# ---------------------------------------------------------------------- device_map
def placement_plan(model: nn.Module, max_memory: dict, dtype: torch.dtype | None = None
                   ) -> dict[str, int | str]:
    """Where ``model.device_map: auto`` puts each module, for the given per-device budget.

    accelerate's ``infer_auto_device_map`` does the work (the same call transformers makes
    for ``device_map="auto"``); decoder blocks are never split across devices.

    Args:
        model: a model, best built on the meta device (no memory is touched).
        max_memory: device -> bytes or "40GiB", e.g. ``{0: "70GiB", 1: "70GiB", "cpu": "100GiB"}``.
        dtype: the dtype the weights will be loaded in (None: as they are).

    Returns:
        Module path -> device (GPU index, "cpu" or "disk"), in model order.
    """
    from accelerate import infer_auto_device_map

    return infer_auto_device_map(model, max_memory=max_memory, dtype=dtype,
                                 no_split_module_classes=list(model._no_split_modules or []))


def check_compatible(cfg, d: Dist) -> None:
    """Reject combinations that cannot work, before anything is loaded or written."""
    device_map = getattr(cfg, "device_map", None)
    if d.enabled and device_map is not None:
        raise ConfigError("model.device_map places one process's model across several GPUs; it "
                          "does not combine with torchrun/--nproc. Use train.strategy=fsdp to "
                          "spread a model over the processes, or drop --nproc")
    if d.enabled and d.strategy == "fsdp" and cfg.method == "full":
        raise ConfigError("method=full with train.strategy=fsdp is not supported yet (lorakit "
                          "gathers adapters, not whole models, for checkpoints); use "
                          "train.strategy=ddp or method=lora")
    optimizer = getattr(cfg.train, "optimizer", "adamw")
    if d.enabled and d.strategy == "fsdp" and optimizer != "adamw":
        # bitsandbytes' 8-bit update kernels get FSDP's DTensor shards and refuse them
        # ("got mixed torch.Tensor and DTensor"), checked with bitsandbytes 0.50.2
        raise ConfigError(f"train.optimizer={optimizer} cannot step FSDP's sharded (DTensor) "
                          f"parameters; use train.optimizer=adamw with train.strategy=fsdp "
                          f"(FSDP already splits the optimizer state across processes), or "
                          f"train.strategy=ddp")


Logger = Callable[[str], None]


def main_only(log: Logger, d: Dist) -> Logger:
    """``log`` on rank 0, a no-op elsewhere (one copy of every line)."""
    return log if d.is_main else (lambda msg: None)


# ---------------------------------------------------------------------- small adapters
class OptimizerView:
    """What :mod:`lorakit.train.common`'s checkpoint functions call on an optimizer, with
    sharded state gathered whole on save and re-sharded on load."""

    def __init__(self, d: Dist, optimizer):
        self.d, self.optimizer = d, optimizer

    def state_dict(self) -> dict:
        if not self.d.enabled:
            return self.optimizer.state_dict()
        return self.d.gather_optimizer_state(self.optimizer)

    def load_state_dict(self, state: dict) -> None:
        self.d.load_optimizer_state(self.optimizer, state)


class GatheredOptimizerState:
    """An optimizer state already gathered whole from every rank (a plain dict), offering the
    ``state_dict()`` that rank 0's checkpoint writer calls on an optimizer."""

    def __init__(self, state: dict):
        self._state = state

    def state_dict(self) -> dict:
        return self._state

