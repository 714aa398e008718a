"""Replay against forgetting: general examples mixed back into the training data.

``data.replay: {fraction: F, file: null}`` in a run config adds rehearsal examples until they
make up about ``F`` of all training tokens (``replay / (train + replay)``, counted with the
run's tokenizer, chat template and ``max_length``; ``0 <= F < 1``). Where they come from:

* ``file: null`` — **self-generated**: the base model's own greedy answers to lorakit's bundled
  general instructions (``lorakit/data/replay/instructions.jsonl``, 151 short everyday,
  writing, maths, code and translation requests written for lorakit). Rehearsing what the
  base already says keeps its behaviour on general requests without any outside data. The
  set is distinct from the forgetting probe ``lorakit/eval/probe/general.jsonl`` (no shared
  prompt, every pair below 0.8 TF-IDF cosine; ``tests/eval/test_replay.py``), so the probe
  still measures forgetting on text the run never saw. Generated once per base model
  (greedy, batched) and cached under the lorakit cache folder:
  ``<cache>/replay/<model-fingerprint>-<instruction-set hash>-t<max_new_tokens>.jsonl``.
  ``lorakit data replay --model M --out FILE`` makes (or shows) the same file.
* ``file: PATH`` — your own replay file, in any training format lorakit reads.

Selection is seeded (``train.seed``): the replay examples are shuffled and taken in turn,
cycling when more tokens are needed than the set holds, and appended after the training
examples (the training loop shuffles rows itself).

Preference runs (``method: dpo | orpo | simpo``) train on pairs, not on SFT rows: there the
replay examples join the objective's SFT term (RPO's ``dpo.sft_weight``, ORPO's NLL), a few
in every micro-batch, and the fraction is taken of the pairs' chosen rows
(:func:`replay_rows_for_pairs`; lorakit/train/dpo.py has the arithmetic).

How they are trained on (``data.replay.loss``):

* ``ce`` (the default for ``method: full``) — as any training example: cross-entropy on the replay answers. With
  self-generated answers that is the base's greedy token at each step, a one-hot target:
  it pulls the model towards its own argmax and sharpens its distribution, so a large
  fraction can raise the forgetting KL rather than lower it (docs/eval.md, measured).
* ``kl`` (the default for adapters) — self-distillation: at every position of a replay example (instruction, template
  and answer) the tuned model's next-token distribution ``q`` is pulled towards the frozen
  base's ``p`` by ``KL(p || q)`` summed over the vocabulary, the quantity the forgetting
  probe measures (lorakit/eval/forgetting.py). The base's ``p`` comes from a no-grad forward
  of the same rows with the adapters switched off, so it costs one extra forward of the
  replay rows and no stored targets. :func:`distill_rows` marks those positions; the loss is
  :func:`lorakit.train.common.supervised_loss`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from lorakit import fileio
from lorakit.data.formats import Example, load_examples
from lorakit.errors import ConfigError, DataError

INSTRUCTIONS = Path(__file__).parent / "replay" / "instructions.jsonl"
DEFAULT_MAX_NEW_TOKENS = 128


def instructions() -> list[str]:
    """The bundled general instructions, in file order."""
    return [json.loads(line)["instruction"] for line in INSTRUCTIONS.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def instruction_set_hash() -> str:
    return hashlib.sha256(INSTRUCTIONS.read_bytes()).hexdigest()[:16]


def model_fingerprint(model) -> str:
    """Base model id: its spec, its architecture config hash and a few of its weights."""
    import torch

    from lorakit.lora.io import base_config_hash

    emb = model.get_input_embeddings().weight
    probe = emb[: min(4, emb.shape[0])].detach().float().cpu().contiguous()
    h = hashlib.sha256()
    h.update(str(getattr(model, "lorakit_spec", "")).encode())
    h.update((base_config_hash(model) or "").encode())
    h.update(str(getattr(model, "lorakit_quantization", None)).encode())
    h.update(probe.numpy().tobytes() if probe.dtype == torch.float32 else b"")
    return h.hexdigest()[:16]


def cache_path(model, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Path:
    from lorakit.models.cache import cache_root

    return (cache_root() / "replay" /
            f"{model_fingerprint(model)}-{instruction_set_hash()}-t{max_new_tokens}.jsonl")


def generate_replay(model, tokenizer, n: int | None = None, *,
                    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, batch_size: int = 16,
                    ) -> list[dict]:
    """The base model's greedy answers to the first ``n`` bundled instructions (all by
    default), as ``{"prompt", "completion"}`` records; adapters on ``model`` are switched off.
    Empty answers are left out."""
    from lorakit.eval.generate import generate_batch
    from lorakit.lora.inject import adapter_configs, disable_adapters

    prompts = instructions()[:n] if n else instructions()
    with disable_adapters(model) if adapter_configs(model) else contextlib.nullcontext():
        answers = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size)
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers) if a.strip()]


def write_records(path: Path, records: Sequence[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return path


def self_generated(model, tokenizer, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                   batch_size: int = 16, log: Callable[[str], None] = print) -> tuple[list[dict], Path]:
    """The cached self-generated replay set of this base model, generated on first use."""
    path = cache_path(model, max_new_tokens)
    if path.is_file():
        return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()], path
    log(f"replay: generating the base model's answers to {len(instructions())} general "
        f"instructions (once; cached in {path})")
    records = generate_replay(model, tokenizer, max_new_tokens=max_new_tokens, batch_size=batch_size)
    write_records(path, records)
    return records, path


def choose_replay(train_tokens: int, replay: Sequence[Example], fraction: float,
                  lengths: Sequence[int], seed: int = 0) -> tuple[list[Example], dict]:
    """The replay examples that make up about ``fraction`` of ``train_tokens`` + theirs.

    Args:
        lengths: tokens of each replay example (as training will see them).

    Returns:
        ``(chosen, stats)``: the replay examples in their seeded order (cycling when more
        tokens are needed than the set holds) and ``{"train_tokens", "replay_tokens",
        "replay_examples", "fraction"}`` (the share reached).

    Raises:
        ConfigError: ``fraction`` outside [0, 1). DataError: no replay example to mix in.
    """
    if not 0 <= fraction < 1:
        raise ConfigError(f"data.replay.fraction must be in [0, 1), got {fraction}")
    stats = {"train_tokens": int(train_tokens), "replay_tokens": 0, "replay_examples": 0,
             "fraction": 0.0}
    if fraction == 0:
        return [], stats
    if not replay:
        raise DataError("data.replay: no replay example to mix in")
    if not any(n > 0 for n in lengths):
        raise DataError("data.replay: every replay example is empty after tokenisation")
    target = fraction / (1 - fraction) * train_tokens
    order = np.random.default_rng(seed).permutation(len(replay))
    chosen, total, i = [], 0, 0
    while True:
        j = int(order[i % len(order)])
        if lengths[j] > 0:
            if total + lengths[j] / 2 > target:  # stop where the share is closest to the target
                break
            chosen.append(replay[j])
            total += lengths[j]
        i += 1
    stats.update(replay_tokens=total, replay_examples=len(chosen),
                 fraction=round(total / (total + train_tokens), 4) if total + train_tokens else 0.0)
    return chosen, stats


def mix_replay(train: Sequence[Example], replay: Sequence[Example], fraction: float,
               count_tokens: Callable[[Sequence[Example]], list[int]], seed: int = 0,
               ) -> tuple[list[Example], dict]:
    """``train`` plus replay examples making up about ``fraction`` of all tokens.

    Args:
        count_tokens: tokens of each example (as training will see them).

    Returns:
        ``(examples, stats)``: the training examples followed by the chosen replay ones, and
        the stats of :func:`choose_replay`.

    Raises:
        ConfigError: ``fraction`` outside [0, 1). DataError: no replay example to mix in.
    """
    train_tokens = int(sum(count_tokens(train)))
    lengths = count_tokens(replay) if fraction and replay else []
    chosen, stats = choose_replay(train_tokens, replay, fraction, lengths, seed)
    return list(train) + chosen, stats


def distill_rows(tokenized: Sequence[dict]) -> list[dict]:
    """Tokenised replay rows for ``data.replay.loss=kl``: no cross-entropy label, and a
    ``distill`` flag aligned like ``labels`` (``distill[t] = 1``: the prediction of token
    ``t`` from position ``t - 1`` is matched to the base), set on every token but the first."""
    from lorakit.data.tokenize import IGNORE_INDEX

    return [{**t, "labels": [IGNORE_INDEX] * len(t["input_ids"]),
             "distill": [0] + [1] * (len(t["input_ids"]) - 1)} for t in tokenized]


def token_counter(tokenizer, max_length: int | None, train_on: str = "all_assistant"):
    """``count_tokens`` for :func:`mix_replay`: token rows as training tokenizes them."""
    from lorakit.data.tokenize import tokenize_examples

    def count(examples: Sequence[Example]) -> list[int]:
        return [len(r["input_ids"]) for r in tokenize_examples(list(examples), tokenizer, max_length, train_on)]

    return count


def replay_source(cfg, tokenizer, model, log: Callable[[str], None] = print,
                  ) -> tuple[list[Example], str]:
    """``cfg.data.replay``'s examples (the user's file, or the base model's self-generated
    answers) and where they came from, for the log line."""
    replay_cfg = cfg.data.replay
    if replay_cfg.file:
        if not Path(replay_cfg.file).is_file():
            raise DataError(f"data.replay.file {replay_cfg.file} does not exist")
        return load_examples(replay_cfg.file, format=cfg.data.format).examples, replay_cfg.file
    if model is None:
        raise ConfigError("data.replay.file is null (self-generated replay) but no model was "
                          "given to generate it with; pass the base model or a replay file")
    records, path = self_generated(model, tokenizer, log=log)
    return load_examples(records).examples, f"self-generated ({path})"


def _log_mix(cfg, stats: dict, where: str, log: Callable[[str], None], what: str = "") -> None:
    replay_cfg = cfg.data.replay
    log(f"replay: {stats['replay_examples']} examples, {stats['replay_tokens']:,} tokens from "
        f"{where} = {100 * stats['fraction']:.1f}% of training tokens{what} (target "
        f"{100 * replay_cfg.fraction:.0f}%), data.replay.loss={replay_cfg.loss_for(cfg.method)}")


def apply_replay(cfg, train: Sequence[Example], tokenizer, model, log: Callable[[str], None] = print,
                 ) -> list[Example]:
    """What a training recipe calls: ``train`` with ``cfg.data.replay`` mixed in (unchanged
    when the fraction is 0)."""
    if not cfg.data.replay.fraction:
        return list(train)
    replay, where = replay_source(cfg, tokenizer, model, log)
    replay = [ex for ex in replay if ex.kind == "chat"] if any(ex.kind == "chat" for ex in train) else replay
    mixed, stats = mix_replay(train, replay, cfg.data.replay.fraction,
                              token_counter(tokenizer, cfg.data.max_length, cfg.data.train_on),
                              seed=cfg.train.seed)
    _log_mix(cfg, stats, where, log)
    return mixed


def replay_rows_for_pairs(cfg, pairs: Sequence[dict], tokenizer, model,
                          log: Callable[[str], None] = print) -> list[dict]:
    """Tokenised replay rows for a preference run (``method: dpo | orpo | simpo``), where they
    join the SFT term of the objective (lorakit/train/dpo.py, docs/dpo.md).

    ``fraction`` is taken of the tokens of the pairs' chosen rows (prompt + chosen answer),
    the rows that term is computed on. The rows are as SFT tokenises them: cross-entropy
    labels on the answers (``data.replay.loss=ce``) or, for ``kl``, every position matched to
    the reference (:func:`distill_rows`)."""
    from lorakit.data.tokenize import IGNORE_INDEX, tokenize_examples

    if not cfg.data.replay.fraction:
        return []
    replay, where = replay_source(cfg, tokenizer, model, log)
    replay = [ex for ex in replay if ex.kind in ("chat", "text")]
    if not replay:
        raise DataError(f"data.replay: {where} holds no SFT example (prompt/completion, chat, "
                        f"instruction or text records)")
    tokenized = tokenize_examples(replay, tokenizer, cfg.data.max_length, cfg.data.train_on)
    train_tokens = sum(len(p["chosen_input_ids"]) for p in pairs)
    chosen, stats = choose_replay(train_tokens, list(range(len(replay))), cfg.data.replay.fraction,
                                  [len(t["input_ids"]) for t in tokenized], seed=cfg.train.seed)
    _log_mix(cfg, stats, where, log, " (the chosen rows')")
    rows = [tokenized[i] for i in chosen]
    if cfg.data.replay.loss_for(cfg.method) == "kl":
        return distill_rows(rows)
    return [r for r in rows if any(l != IGNORE_INDEX for l in r["labels"][1:])]
