r"""Direct Preference Optimisation (DPO) with LoRA or QLoRA. Read top to bottom:

1. setup: the base (4-bit when a ``quantization`` section is given), the policy adapter, and
   the reference, which shares the base's weights (no second model copy):
   - a fresh adapter: the reference is the base with adapters switched off;
   - ``init_adapter: runs/sft/adapter``: the SFT adapter is loaded twice on the one base, as
     ``reference`` (frozen) and ``default`` (the policy, trained). The reference is then
     base + SFT adapter, never the plain base, so an SFT-then-DPO run cannot silently
     measure its rewards against the wrong model.
2. data: preference pairs, tokenised as prompt + chosen and prompt + rejected, labels on the
   answers only (``lorakit.data.preference``)
3. optionally the reference log-probabilities of every pair, computed once and cached in the
   run folder (``dpo.precompute_reference``), so training runs only the policy
4. the loop: chosen and rejected rows in one forward, summed answer log-probs, DPO loss,
   rewards and accuracy logged; checkpoints, resume, stop and NaN guards from ``common``
5. finish: the policy adapter, loss and reward plots, summary

The loss, for a pair with answer log-probs summed over the answer tokens (prompt masked)::

    r_c = beta (log pi(y_c|x) - log ref(y_c|x))      r_r likewise      (the "rewards")
    sigmoid  -(1-e) log sigmoid(r_c - r_r) - e log sigmoid(r_r - r_c)   (e: label_smoothing, cDPO)
    hinge    relu(1 - (r_c - r_r))
    ipo      ((d_c/n_c - d_r/n_r) - 1/(2 beta))^2,  d = log pi - log ref, n = answer tokens
    + sft_weight x (mean NLL of the chosen answer tokens)                                 (RPO)

With ``data.replay`` (rehearsal against forgetting, lorakit/data/replay.py) a few replay rows
ride along in every micro-batch and join that SFT term: it becomes the mean, over the chosen
answer tokens and the replay positions of the step, of their NLL and the replay loss (``kl``:
KL(reference || policy) at every replay position; ``ce``: the replay answers' NLL), weighted
by ``sft_weight`` (ORPO: 1). With ``sft_weight`` 0 the replay positions form the term alone,
weight 1. The replay rows are spread so one pass over the pairs sees each of them once.

These are TRL's definitions (``trl.DPOTrainer``; IPO length-normalised as TRL does, rewards
unnormalised); tests/train/test_dpo.py checks values and gradients against TRL itself.

The same recipe runs the other preference objectives (``lorakit.train.preference_losses``,
checked against TRL's ORPO / CPO-SimPO / KTO losses): ``method: orpo`` and ``simpo`` score
the same pairs without a reference pass (reference-free), ``method: kto`` scores unpaired
answers labelled desirable or not (``lorakit.data.kto``), with its reference point estimated
from mismatched (prompt, answer) pairs of the same batch.
Our own loop rather than TRL's trainer for the same reasons as ``sft.py``: the output head
runs only on answer tokens, resume is exact mid-epoch, and the reference needs no copy.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from lorakit.config import PREFERENCE_METHODS, RunConfig
from lorakit.errors import AdapterError, ConfigError, DataError
from lorakit.train import common, preference_losses, report
from lorakit.train.common import IGNORE_INDEX, LoopState, TrainResult

POLICY = "default"  # the trained adapter (saved as the run's adapter/)
REFERENCE = "reference"  # the frozen init_adapter copy, when there is one
CACHE_NAME = "reference_logps.safetensors"


# ---------------------------------------------------------------------- the maths
def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each row's labelled tokens, summed, and how many there are.

    The output head runs only where the next token is labelled (the answer), as in
    ``common.supervised_loss``.

    Returns:
        ``(logps, n_tokens)``: (R,) float32 sums of log p(token) over the labelled tokens of
        each row, and (R,) long counts.
    """
    labels = batch["labels"]
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state  # (R, T, H)
    targets = labels[:, 1:]  # (R, T-1): position t predicts token t+1
    mask = targets != IGNORE_INDEX
    logits = common.head_logits(model, hidden[:, :-1][mask])  # (N, V)
    token_logps = -F.cross_entropy(logits, targets[mask], reduction="none")  # (N,)
    rows = mask.nonzero()[:, 0]  # (N,) the row of each labelled token
    logps = torch.zeros(labels.shape[0], device=logits.device, dtype=torch.float32)
    return logps.index_add(0, rows, token_logps), mask.sum(dim=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, *, beta: float,
             loss: str = "sigmoid", label_smoothing: float = 0.0,
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The per-pair DPO loss and the implicit rewards.

    Args:
        policy_chosen, policy_rejected, ref_chosen, ref_rejected: (B,) summed answer log-probs.
        beta: the KL strength (IPO's tau).
        loss: ``sigmoid`` (DPO), ``hinge`` (SLiC) or ``ipo``.
        label_smoothing: cDPO's share of flipped labels (sigmoid only).
        chosen_tokens, rejected_tokens: (B,) answer lengths, needed by ``ipo``.

    Returns:
        ``(losses, chosen_rewards, rejected_rewards)``, each (B,); rewards are detached.
    """
    chosen_logratios = policy_chosen - ref_chosen  # (B,)
    rejected_logratios = policy_rejected - ref_rejected
    delta = chosen_logratios - rejected_logratios
    if loss == "sigmoid":
        losses = (-F.logsigmoid(beta * delta) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * delta) * label_smoothing)
    elif loss == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("the ipo loss needs chosen_tokens and rejected_tokens")
        ipo_delta = (chosen_logratios / chosen_tokens.clamp(min=1)
                     - rejected_logratios / rejected_tokens.clamp(min=1))
        losses = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss {loss!r}; choose sigmoid, ipo or hinge")
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ---------------------------------------------------------------------- 1. setup
def setup_model(cfg: RunConfig, device: torch.device, precision: str, log=print):
    """Load the base once and put the policy (and, with ``init_adapter``, the reference)
    adapter on it.

    Returns:
        ``(model, tokenizer, counts, has_reference_adapter)``.

    Raises:
        AdapterError: ``init_adapter`` is missing or was trained on another base model.
    """
    from lorakit.lora.inject import add_adapter, set_adapter, trainable_parameters
    from lorakit.lora.io import load_adapter

    model, tokenizer = common.load_base_for_config(cfg, device, precision)
    if cfg.init_adapter:
        folder = Path(cfg.init_adapter)
        # A manifest that names another base is an error here, not a warning: rewards measured
        # against the wrong reference train silently wrong.
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            try:
                for name in (REFERENCE, POLICY):  # the policy last: it is the active, trained one
                    load_adapter(model, folder, name, tokenizer=tokenizer)
            except UserWarning as exc:
                raise AdapterError(f"init_adapter {folder}: {exc}") from None
        set_adapter(model, POLICY)  # only the policy's parameters train
        if "lora" in cfg.model_fields_set:
            log(f"init_adapter: the adapter's own settings ({folder / 'adapter_config.json'}) "
                f"are used; the lora: section is ignored")
    else:
        add_adapter(model, cfg.lora.to_lora_config(), name=POLICY)
    # No dropout (TRL's disable_dropout default): the policy's log-probs must be comparable with
    # the reference's, so a pair's step-0 loss is exactly log 2 and rewards measure the adapter.
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    common.ready_to_train(model, cfg)
    return model, tokenizer, trainable_parameters(model), bool(cfg.init_adapter)


@contextmanager
def reference(model, has_reference_adapter: bool):
    """Within this block ``model`` is the reference: the base with adapters switched off, or
    the frozen ``reference`` adapter. Eval mode and no gradients, so the reference log-probs
    do not depend on when or how often they are computed."""
    from lorakit.lora.inject import disable_adapters, lora_layers
    from lorakit.lora.layers import ModulesToSaveWrapper

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if not has_reference_adapter:
                with disable_adapters(model):
                    yield model
            else:
                # switch the active adapter of every layer without touching requires_grad
                # (set_adapter would unfreeze the reference and freeze the policy)
                layers = [l for _, l in lora_layers(model)] + [
                    m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
                before = [l.active_adapter for l in layers]
                for layer in layers:
                    layer.active_adapter = REFERENCE
                try:
                    yield model
                finally:
                    for layer, name in zip(layers, before):
                        layer.active_adapter = name
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- 2. data
def prepare_pairs(cfg: RunConfig, tokenizer, log) -> tuple[list[dict], list[dict]]:
    """Load, validate, split and tokenise the train and eval preference pairs (for
    ``method: kto``, the labelled answers of :func:`lorakit.data.kto.tokenize_kto`)."""
    from lorakit.data.kto import tokenize_kto
    from lorakit.data.preference import tokenize_pairs

    kto = cfg.method == "kto"
    train, evals = common.load_train_and_eval(
        cfg, log, expected=('a JSONL file of {"prompt", "completion", "label"} records, '
                            'e.g. data.train=answers.jsonl') if kto else
                           ('a JSONL file of {"prompt", "chosen", "rejected"} records, '
                            'e.g. data.train=pairs.jsonl'))

    def pairs_of(examples, what):
        pairs, dropped = (tokenize_kto if kto else tokenize_pairs)(examples, tokenizer,
                                                                   cfg.data.max_length)
        if dropped:
            log(f"{what}: {len(dropped)} {'examples' if kto else 'pairs'} have no answer "
                f"token within data.max_length="
                f"{cfg.data.max_length} and are skipped (first: {dropped[0].source[0]}:"
                f"{dropped[0].source[1]})")
        return pairs

    train_pairs = pairs_of(train, "train")
    if not train_pairs:
        raise DataError(f"{cfg.data.train}: no usable "
                        f"{'labelled example' if kto else 'preference pair'}")
    return train_pairs, pairs_of(evals, "eval") if evals else []


def make_batch(pairs: list[dict], idx: list[int], pad_id: int, device,
               max_length: int | None = None) -> dict:
    """2B rows: chosen then rejected answers of B pairs, or (KTO) B answers then their B
    mismatched pairs (``lorakit.data.kto``), with a ``label`` (B,) bool tensor."""
    from lorakit.data.kto import collate_kto
    from lorakit.data.preference import collate_pairs

    chosen = [pairs[i] for i in idx]
    batch = (collate_kto(chosen, pad_id, max_length) if "prompt_ids" in chosen[0]
             else collate_pairs(chosen, pad_id))
    return {k: v.to(device) for k, v in batch.items()}


@dataclass
class SpreadOrder:
    """``n_rows`` rows spread over the ``n_micro`` micro-batches of each epoch (of the pairs):
    epoch ``e`` is a seeded permutation, micro-batch ``m`` takes its next ``n_rows / n_micro``
    rows (rounded, so some take none when there are fewer rows than micro-batches). One pass
    over the pairs sees every row once, and resume needs only the micro-batch index."""

    n_rows: int
    n_micro: int
    seed: int

    def rows(self, micro_index: int) -> list[int]:
        epoch, offset = divmod(micro_index, self.n_micro)
        lo = -(-offset * self.n_rows // self.n_micro)
        hi = -(-(offset + 1) * self.n_rows // self.n_micro)
        if lo == hi:
            return []
        return common.epoch_permutation(self.n_rows, self.seed, epoch)[lo:hi].tolist()


def prepare_replay(cfg: RunConfig, train_pairs: list[dict], tokenizer, model,
                   order: common.DataOrder, log) -> tuple[list[dict], SpreadOrder | None]:
    """``data.replay``'s rows for the SFT term and which micro-batch takes which
    (:class:`SpreadOrder`, seeded apart from the pairs' order)."""
    if not cfg.data.replay.fraction:
        return [], None
    from lorakit.data.replay import replay_rows_for_pairs

    rows = replay_rows_for_pairs(cfg, train_pairs, tokenizer, model, log)
    if not rows:
        raise DataError("data.replay: no replay example has a token to train on within "
                        f"data.max_length={cfg.data.max_length}")
    return rows, SpreadOrder(len(rows), order.micro_per_epoch, cfg.train.seed + 1)


def replay_batch(rows: list[dict], replay_order: SpreadOrder, micro_index: int, pad_id: int,
                 device) -> dict | None:
    """The replay rows of micro-batch ``micro_index``, padded (``sft.make_batch``, unpacked),
    or None when it takes none."""
    from lorakit.train.sft import make_batch as sft_batch

    idx = replay_order.rows(micro_index)
    return sft_batch(rows, idx, pad_id, False, device) if idx else None


# ---------------------------------------------------------------------- 3. reference log-probs
@torch.no_grad()
def reference_logps(model, pairs: list[dict], idx_batches, pad_id, device, precision,
                    has_reference_adapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs of the chosen and rejected answers of ``pairs``, (N,) each."""
    chosen = torch.zeros(len(pairs))
    rejected = torch.zeros(len(pairs))
    with reference(model, has_reference_adapter):
        for idx in idx_batches:
            batch = make_batch(pairs, idx, pad_id, device)
            with common.autocast(precision, device):
                logps, _ = sequence_logps(model, batch)
            c, r = logps.float().cpu().chunk(2)
            chosen[idx], rejected[idx] = c, r
    return chosen, rejected


def cached_reference(cfg, model, run_dir: Path, splits: dict[str, list[dict]], pad_id, device,
                     precision, has_reference_adapter, log) -> dict[str, torch.Tensor]:
    """``dpo.precompute_reference``: every pair's reference log-probs, computed once and kept
    in ``run_dir/reference_logps.safetensors`` (reused on resume when the data, model and
    reference are unchanged)."""
    from safetensors.torch import load_file

    from lorakit.lora.io import atomic_save_safetensors

    digest = hashlib.sha256()
    for name, pairs in splits.items():
        digest.update(name.encode())
        for p in pairs:
            digest.update(json.dumps([p["chosen_input_ids"], p["chosen_labels"],
                                      p["rejected_input_ids"], p["rejected_labels"]]).encode())
    digest.update(json.dumps([cfg.model, cfg.init_adapter, cfg.quantized, precision,
                              cfg.quantization.model_dump() if cfg.quantized else None]).encode())
    if cfg.init_adapter:
        digest.update((Path(cfg.init_adapter) / "adapter_model.safetensors").read_bytes())
    fingerprint = digest.hexdigest()
    path = run_dir / CACHE_NAME
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") == fingerprint:
                log(f"reference log-probs: reusing {path}")
                return load_file(str(path))
    started = time.perf_counter()
    out = {}
    step = cfg.train.batch_size
    for name, pairs in splits.items():
        batches = [list(range(s, min(s + step, len(pairs)))) for s in range(0, len(pairs), step)]
        out[f"{name}_chosen"], out[f"{name}_rejected"] = reference_logps(
            model, pairs, batches, pad_id, device, precision, has_reference_adapter)
    with common.write_errors():
        atomic_save_safetensors(out, path, metadata={"fingerprint": fingerprint})
    log(f"reference log-probs of {sum(map(len, splits.values()))} pairs computed in "
        f"{time.perf_counter() - started:.1f} s and cached in {path}")
    return out


# ---------------------------------------------------------------------- scoring a batch
def score_batch(model, batch, ref: tuple[torch.Tensor, torch.Tensor] | None, cfg: RunConfig,
                precision, device, has_reference_adapter):
    """Policy (and, unless cached or reference-free, reference) log-probs of a batch and the
    terms of the run's objective (``cfg.method``: dpo, orpo, simpo or kto).

    Returns:
        dict: ``losses`` (B,) with grad; ``chosen_rewards`` / ``rejected_rewards`` (the chosen
        and rejected answers' rewards; for KTO the desirable and undesirable examples');
        ``correct`` (B,) (chosen reward > rejected reward; KTO: the reward's sign matches the
        label); ``chosen_logps`` (with grad) / ``rejected_logps`` (summed answer log-probs);
        ``chosen_tokens``; ``extras``: method-specific (B,) values logged as their means.
    """
    method, d = cfg.method, cfg.dpo
    if method in ("dpo", "kto") and ref is None:
        with reference(model, has_reference_adapter), common.autocast(precision, device):
            ref_logps, _ = sequence_logps(model, batch)
        ref = ref_logps.float().chunk(2)
    with common.autocast(precision, device), common.activation_offload(cfg, device):
        logps, n_tokens = sequence_logps(model, batch)  # (2B,): chosen rows, then rejected
    first, second = logps.chunk(2)
    first_tokens, second_tokens = n_tokens.chunk(2)
    extras = {}
    if method == "kto":  # second half: the mismatched pairs of the reference point
        labels = batch["label"]
        kl = preference_losses.kto_kl(second, ref[1].to(logps.device))
        out = preference_losses.kto_loss(first, ref[0].to(logps.device), labels, kl, beta=d.beta,
                                         desirable_weight=d.desirable_weight,
                                         undesirable_weight=d.undesirable_weight)
        return {"losses": out["losses"], "chosen_rewards": out["chosen_rewards"],
                "rejected_rewards": out["rejected_rewards"],
                "correct": (out["rewards"] > 0) == labels,
                "chosen_logps": first[labels], "rejected_logps": first[~labels].detach(),
                "chosen_tokens": first_tokens[labels],
                "extras": {"kl": kl.expand(len(labels))}}
    if method in ("orpo", "simpo"):  # reference-free, on mean token log-probs
        mean_c = first / first_tokens.clamp(min=1)
        mean_r = second / second_tokens.clamp(min=1)
        if method == "orpo":
            out = preference_losses.orpo_loss(mean_c, mean_r, beta=d.beta)
            extras = {"log_odds_ratio": out["log_odds_ratio"],
                      "log_odds_chosen": out["log_odds_chosen"]}
        else:
            out = preference_losses.simpo_loss(mean_c, mean_r, beta=d.beta, gamma=d.simpo_gamma,
                                               label_smoothing=d.label_smoothing)
        losses, chosen_rewards, rejected_rewards = (out["losses"], out["chosen_rewards"],
                                                    out["rejected_rewards"])
    else:
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            first, second, ref[0].to(logps.device), ref[1].to(logps.device),
            beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing,
            chosen_tokens=first_tokens, rejected_tokens=second_tokens)
    return {"losses": losses, "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards, "correct": chosen_rewards > rejected_rewards,
            "chosen_logps": first, "rejected_logps": second.detach(),
            "chosen_tokens": first_tokens, "extras": extras}


class _Stats:
    """Sums of the per-example numbers over a step or an evaluation -> the logged means.

    Rewards are averaged over the chosen and the rejected answers separately (for KTO a batch
    may hold more of one kind), the margin is the difference of those means (for pairs the
    mean of the per-pair margins), and ORPO's loss adds the chosen answers' NLL per token."""

    def __init__(self, method: str = "dpo"):
        self.method = method
        self.n = self.n_chosen = self.n_rejected = 0
        self.sums = dict.fromkeys(("loss", "chosen", "rejected", "accuracy", "logps_chosen",
                                   "logps_rejected", "tokens_chosen"), 0.0)
        self.extras: dict[str, float] = {}

    def add(self, s: dict) -> None:
        c, r = s["chosen_rewards"], s["rejected_rewards"]
        self.n += len(s["losses"])
        self.n_chosen += len(c)
        self.n_rejected += len(r)
        for key, value in (("loss", s["losses"]), ("chosen", c), ("rejected", r),
                           ("accuracy", s["correct"].float()),
                           ("logps_chosen", s["chosen_logps"]),
                           ("logps_rejected", s["rejected_logps"]),
                           ("tokens_chosen", s["chosen_tokens"])):
            self.sums[key] += float(value.detach().float().sum())
        for key, value in s.get("extras", {}).items():
            self.extras[key] = self.extras.get(key, 0.0) + float(value.detach().float().sum())

    def nll(self) -> float:
        """Mean NLL per token of the chosen answers seen (RPO's and ORPO's SFT term)."""
        return -self.sums["logps_chosen"] / max(self.sums["tokens_chosen"], 1)

    def record(self, prefix: str = "") -> dict:
        n, nc, nr = max(self.n, 1), max(self.n_chosen, 1), max(self.n_rejected, 1)
        chosen, rejected = self.sums["chosen"] / nc, self.sums["rejected"] / nr
        out = {f"{prefix}loss": self.sums["loss"] / n, f"{prefix}rewards/chosen": chosen,
               f"{prefix}rewards/rejected": rejected,
               f"{prefix}rewards/accuracy": self.sums["accuracy"] / n,
               f"{prefix}rewards/margin": chosen - rejected,
               f"{prefix}logps/chosen": self.sums["logps_chosen"] / nc,
               f"{prefix}logps/rejected": self.sums["logps_rejected"] / nr}
        if self.method == "orpo":  # ORPO's loss: NLL + the odds-ratio term
            out[f"{prefix}nll_loss"] = self.nll()
            out[f"{prefix}loss"] += out[f"{prefix}nll_loss"]
        out.update({f"{prefix}{k}": v / n for k, v in self.extras.items()})
        return out


@torch.no_grad()
def evaluate(model, pairs, cfg, pad_id, device, precision, has_reference_adapter,
             cache: dict | None = None, prefix: str = "eval_") -> dict | None:
    """Mean DPO loss, rewards, reward accuracy, margin and log-probs over held-out pairs."""
    if not pairs:
        return None
    was_training = model.training
    model.eval()
    stats = _Stats(cfg.method)
    for start in range(0, len(pairs), cfg.train.batch_size):
        idx = list(range(start, min(start + cfg.train.batch_size, len(pairs))))
        ref = (cache["eval_chosen"][idx], cache["eval_rejected"][idx]) if cache else None
        batch = make_batch(pairs, idx, pad_id, device, cfg.data.max_length)
        stats.add(score_batch(model, batch, ref, cfg, precision, device, has_reference_adapter))
    model.train(was_training)
    return stats.record(prefix)


# ---------------------------------------------------------------------- the recipe
def train(cfg: RunConfig, *, log=None, progress: bool | None = None) -> TrainResult:
    """Run the preference objective ``cfg`` describes (``method: dpo | orpo | simpo | kto``).
    Returns the run folder and summary.

    Raises:
        ConfigError / DataError / AdapterError: bad settings, data or init_adapter (no run
            folder is left behind).
        TrainingError: NaN loss or out of memory (the last good checkpoint is kept).
    """
    from lorakit.data.tokenize import pad_token_id
    from lorakit.lora.io import load_adapter_weights, save_adapter

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if cfg.method not in PREFERENCE_METHODS:
        raise ConfigError(f"lorakit.train.dpo runs method: {', '.join(PREFERENCE_METHODS)}, "
                          f"not {cfg.method!r}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(f"method: {cfg.method} runs in one process; drop --nproc / torchrun")
    if cfg.method == "kto" and cfg.train.batch_size < 2:
        raise ConfigError("method: kto estimates its reference point from mismatched pairs "
                          "within a batch: set train.batch_size to 2 or more")
    device = common.default_device()
    precision, precision_reason = common.precision_choice(cfg.train.precision, device, cfg.quantized)
    run_dir = cfg.resolved_output_dir()
    resume_from = common.resume_point(run_dir, cfg.resume, log)
    torch.manual_seed(cfg.train.seed)

    # 1-2. model, reference and data, before anything is written
    model, tokenizer, counts, has_ref_adapter = setup_model(cfg, device, precision, log)
    if cfg.device_map is not None:
        device = model.get_input_embeddings().weight.device
    train_pairs, eval_pairs = prepare_pairs(cfg, tokenizer, log)
    pad_id = pad_token_id(tokenizer)
    order = common.DataOrder(len(train_pairs), cfg.train.batch_size, cfg.train.seed)
    replay_rows, replay_order = prepare_replay(cfg, train_pairs, tokenizer, model, order, log)
    micro_total, total_steps = common.count_steps(cfg, order)
    ref_name = f"base + {cfg.init_adapter} (frozen)" if has_ref_adapter else "base, adapters off"
    if cfg.method in ("orpo", "simpo"):
        ref_name = "none (reference-free)"
    what = {"dpo": f"dpo ({cfg.dpo.loss}, beta {cfg.dpo.beta})",
            "simpo": f"simpo (beta {cfg.dpo.beta}, gamma {cfg.dpo.simpo_gamma})"
            }.get(cfg.method, f"{cfg.method} (beta {cfg.dpo.beta})")
    log(f"{what} on {cfg.model}"
        f"{' (4-bit)' if cfg.quantized else ''}: {counts['trainable']:,} trainable of "
        f"{counts['total']:,} parameters, {len(train_pairs)} "
        f"{'examples' if cfg.method == 'kto' else 'pairs'}, {total_steps} steps, "
        f"reference = {ref_name}, precision {precision}, device {device}")
    tensorboard = report.summary_writer_class(cfg)
    report.write_config(run_dir, cfg)

    # 3. reference cache, weights to resume from, optimizer, schedule
    cache = None
    if cfg.dpo.precompute_reference:
        splits = {"train": train_pairs, **({"eval": eval_pairs} if eval_pairs else {})}
        cache = cached_reference(cfg, model, run_dir, splits, pad_id, device, precision,
                                 has_ref_adapter, log)
    if resume_from is not None:
        load_adapter_weights(model, resume_from / "adapter", POLICY)
    optimizer, scheduler = common.optimizer_and_scheduler(model, cfg, total_steps)
    loop = LoopState()
    if resume_from is not None:
        loop = common.load_checkpoint(resume_from, optimizer, scheduler)
        log(f"resumed from {resume_from} (step {loop.step})")
    loop.micro_rows = order.batch_size
    steps = report.StepReport(run_dir, cfg, loop, total_steps, resumed=resume_from is not None,
                              progress=progress, log=log, line=_line, tensorboard=tensorboard,
                              scalars=(cfg.method, None))

    def checkpoint() -> Path:
        return common.save_checkpoint(
            run_dir, model, optimizer, scheduler, loop,
            lambda folder: save_adapter(model, folder / "adapter", POLICY, tokenizer=tokenizer),
            cfg.train.keep_checkpoints)

    def clip() -> float:
        return float(torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], cfg.train.max_grad_norm))

    # 4. the loop
    nll_weight = 1.0 if cfg.method == "orpo" else cfg.dpo.sft_weight
    sft_weight = nll_weight or 1.0  # the SFT term's, also when replay rows form it alone
    frozen = lambda: reference(model, has_ref_adapter)  # what kl replay matches
    started = time.perf_counter()
    elapsed_before = loop.elapsed
    stopped_early = interrupted = False
    last_eval = last_replay_loss = None
    with common.StopFlag() as stop, common.out_of_memory_explained(cfg), steps:
        while loop.step < total_steps:
            micro = min(cfg.train.grad_accum, micro_total - loop.micro_index)
            micro_idx = list(common.micro_batches(order, loop.micro_index, micro))
            chosen_idx = [rows for _, rows in micro_idx]
            batches = [make_batch(train_pairs, idx, pad_id, device, cfg.data.max_length)
                       for idx in chosen_idx]
            replay_batches = [replay_batch(replay_rows, replay_order, m, pad_id, device)
                              for m, _ in micro_idx] if replay_rows else [None] * len(batches)
            n_pairs = sum(len(idx) for idx in chosen_idx)  # the step's, for the mean
            n_chosen_tokens = sum(int((b["labels"][:len(b["labels"]) // 2, 1:] != IGNORE_INDEX)
                                      .sum()) for b in batches)  # paired methods only
            n_replay = sum(common.count_supervised(b) for b in replay_batches if b is not None)
            sft_tokens = max((n_chosen_tokens if nll_weight else 0) + n_replay, 1)
            loop.tokens_seen += sum(int(b["attention_mask"].sum())
                                    for b in batches + replay_batches if b is not None)
            stats = _Stats(cfg.method)
            replay_sum = 0.0
            for idx, batch, rbatch in zip(chosen_idx, batches, replay_batches):
                ref = (cache["train_chosen"][idx], cache["train_rejected"][idx]) if cache else None
                s = score_batch(model, batch, ref, cfg, precision, device, has_ref_adapter)
                objective = s["losses"].sum() / n_pairs
                if nll_weight:  # RPO / ORPO: NLL of the chosen answers, per token
                    objective = objective - nll_weight * s["chosen_logps"].sum() / sft_tokens
                objective.backward()
                stats.add(s)
                if rbatch is not None:  # the replay rows' part of the SFT term
                    with common.autocast(precision, device), common.activation_offload(cfg, device):
                        r_sum, _ = common.supervised_loss(model, rbatch, frozen=frozen)
                    (sft_weight * r_sum / sft_tokens).backward()
                    replay_sum += float(r_sum.detach())
            record = stats.record()  # ORPO's loss includes its NLL term
            loss = record["loss"]
            if cfg.dpo.sft_weight:
                record["sft_loss"] = stats.nll()
            objective_value = loss + cfg.dpo.sft_weight * record.get("sft_loss", 0.0)
            if replay_rows:  # mean replay loss per position (kl: nats of KL to the reference)
                record["replay_loss"] = last_replay_loss = replay_sum / max(n_replay, 1)
                objective_value += record["replay_loss"]
            if not math.isfinite(objective_value):
                optimizer.zero_grad(set_to_none=True)
                common.check_finite(objective_value, loop.step + 1, run_dir, cfg.train.lr)
            lr, grad_norm = common.optimizer_step(optimizer, scheduler,
                                                  clip if cfg.train.max_grad_norm else None)
            loop.count_step(micro, n_pairs, loss)  # pairs, for DPO
            now = loop.elapsed = elapsed_before + time.perf_counter() - started
            record = {"step": loop.step, "epoch": round(order.epoch_of(loop.micro_index), 4),
                      **record, "lr": lr, "grad_norm": grad_norm,
                      "pairs_per_s": loop.supervised_seen / max(now, 1e-9)}
            eval_loss = None
            if eval_pairs and cfg.train.eval_every and loop.step % cfg.train.eval_every == 0:
                last_eval = evaluate(model, eval_pairs, cfg, pad_id, device, precision,
                                     has_ref_adapter, cache)
                record.update(last_eval)
                eval_loss = loop.last_eval_loss = last_eval["eval_loss"]
                stopped_early = common.early_stopping(loop, eval_loss, cfg)
            steps.step(loop, record, eval_loss, loop.tokens_seen / max(now, 1e-9))
            interrupted, stopped_early = common.end_of_step(
                loop, cfg, checkpoint, log, stop_requested=stop.requested,
                stopped_early=stopped_early)
            if interrupted or stopped_early:
                break

    # 5. finish
    if interrupted:
        steps.finish_trackers(None)
        return TrainResult(run_dir, run_dir / "adapter", {}, interrupted=True)
    if eval_pairs and (last_eval is None or loop.step % (cfg.train.eval_every or loop.step + 1)):
        last_eval = evaluate(model, eval_pairs, cfg, pad_id, device, precision, has_ref_adapter,
                             cache)
        steps.final_eval(loop, last_eval)
    summary = _summary(cfg, loop, order, last_eval, counts, precision, precision_reason, device,
                       stopped_early, len(train_pairs), len(eval_pairs), ref_name)
    if replay_rows:
        summary["replay"] = {"rows": len(replay_rows), "loss": cfg.data.replay.loss_for(cfg.method),
                             "final_replay_loss": last_replay_loss}
    _write_final(cfg, model, tokenizer, run_dir, loop, summary)
    steps.finish_trackers(run_dir / "adapter")  # wandb / mlflow: the adapter as an artifact
    return TrainResult(run_dir, run_dir / "adapter", summary, stopped_early=stopped_early)


def _write_final(cfg, model, tokenizer, run_dir: Path, loop: LoopState, summary: dict) -> None:
    """The policy adapter, loss and reward plots, summary.json."""
    from lorakit.lora.io import save_adapter

    common.save_final(run_dir, lambda folder: save_adapter(
        model, folder, POLICY, tokenizer=tokenizer,
        extra_manifest={"run": str(run_dir), "steps": loop.step, "method": cfg.method,
                        "init_adapter": cfg.init_adapter}))
    title = f"{cfg.method} on {cfg.model}"
    report.plot_losses(loop.history, run_dir / "loss.png", title)
    report.plot_metrics(run_dir / "metrics.jsonl",
                        ["rewards/chosen", "rewards/rejected", "rewards/margin",
                         "eval_rewards/chosen", "eval_rewards/rejected", "eval_rewards/margin"],
                        run_dir / "rewards.png", title, "implicit reward (beta x log-ratio)")
    report.plot_metrics(run_dir / "metrics.jsonl", ["rewards/accuracy", "eval_rewards/accuracy"],
                        run_dir / "reward_accuracy.png", title, "reward accuracy")
    report.write_summary(run_dir, summary)


def _summary(cfg, loop, order, last_eval, counts, precision, precision_reason, device,
             stopped_early, n_train, n_eval, ref_name) -> dict:
    return {
        "method": cfg.method, "model": cfg.model, "quantized": cfg.quantized,
        "loss_type": cfg.dpo.loss if cfg.method == "dpo" else cfg.method, "beta": cfg.dpo.beta,
        "reference": ref_name,
        "precompute_reference": cfg.dpo.precompute_reference,
        "steps": loop.step, "epochs": round(order.epoch_of(loop.micro_index), 4),
        "wall_time_s": round(loop.elapsed, 2), "tokens_seen": loop.tokens_seen,
        "pairs_seen": loop.supervised_seen,
        "pairs_per_s": round(loop.supervised_seen / max(loop.elapsed, 1e-9), 3),
        "tokens_per_s": round(loop.tokens_seen / max(loop.elapsed, 1e-9), 2),
        "peak_memory_bytes": common.peak_memory_bytes(device),
        "final_train_loss": loop.last_loss,
        "final_eval_loss": last_eval["eval_loss"] if last_eval else None,
        "final_eval_reward_accuracy": last_eval["eval_rewards/accuracy"] if last_eval else None,
        "final_eval_reward_margin": last_eval["eval_rewards/margin"] if last_eval else None,
        "trainable_parameters": counts["trainable"], "total_parameters": counts["total"],
        "precision": precision, "device": str(device), "stopped_early": stopped_early,
        "precision_reason": precision_reason,
        "train_pairs": n_train, "eval_pairs": n_eval,
    }


def _line(record: dict, total: int) -> str:
    text = (f"step {record['step']}/{total} loss {record['loss']:.4f} "
            f"acc {record['rewards/accuracy']:.2f} margin {record['rewards/margin']:.3f} "
            f"lr {record['lr']:.2e}")
    if record.get("replay_loss") is not None:
        text += f" replay {record['replay_loss']:.4f}"
    if record.get("eval_loss") is not None:
        text += (f" eval_loss {record['eval_loss']:.4f} "
                 f"eval_acc {record['eval_rewards/accuracy']:.2f}")
    return text
