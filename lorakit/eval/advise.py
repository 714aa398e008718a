"""``lorakit advise``: should I fine-tune, or is a prompt enough?

In a few minutes on the embedded model, before any training:

1. **the data** — ``lorakit data check``'s summary: examples, exact / near duplicates,
   answer diversity, its warnings;
2. **the prompt baselines** — the base model zero-shot and with K training examples in the
   prompt (``fewshot.py``, never a held-out question) on a held-out split: ``--eval FILE``, or
   :func:`lorakit.data.split.split_train_eval` with :data:`EVAL_FRACTION` of the data (seed 0,
   duplicate groups kept on one side); at most ``--limit`` questions (default 40), greedy,
   ``--max-new-tokens`` (default 64);
3. **the cost of a run** — :func:`lorakit.plan.estimate.estimate` for LoRA and QLoRA (r 16,
   all linear layers, 3 epochs, rows as long as the data's 95th-percentile example) on this
   machine: memory against what the device has free, and time (on a GPU from the card's
   peak; on CPU from the measured float32 matmul peak at :data:`CPU_MFU`, lorakit's measured
   utilisation on CPU, docs/benchmarks.md);
4. **the recommendation**, by this rule (:func:`recommend`):

   * fewer than :data:`MIN_EXAMPLES` (50) training examples -> ``prompt`` (too few to learn
     from reliably; show them in the prompt instead);
   * the best prompt baseline reaches ``--target`` (default 0.9), or its 95% bootstrap CI
     reaches the ceiling 1.0 (the held-out set cannot tell it from perfect) -> ``prompt``;
   * otherwise -> ``fine-tune``, with the gap the run has to close.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from lorakit.errors import ConfigError, DataError

MIN_EXAMPLES = 50
EVAL_FRACTION = 0.2
DEFAULT_TARGET = 0.9
CEILING = 1.0
CPU_MFU = 0.5  # lorakit LoRA on 2 CPU cores: 54-58% of the matmul peak (docs/benchmarks.md)
RULE = (f"prompt when there are fewer than {MIN_EXAMPLES} training examples, or the best prompt "
        f"baseline (zero- or few-shot) scores at least the target or its 95% CI reaches "
        f"{CEILING}; else fine-tune")


def _held_out(train_examples, eval_data, limit: int, seed: int):
    """``(train, eval EvalExamples, how)``."""
    from lorakit.data.split import split_train_eval
    from lorakit.eval.compare import EvalExample, load_eval_examples

    if eval_data is not None:
        return train_examples, load_eval_examples(eval_data, limit), f"{eval_data}"
    train, held = split_train_eval(train_examples, EVAL_FRACTION, seed=seed)
    items = []
    for ex in held:
        prompt = ex.prompt_messages()
        if ex.kind != "chat" or any(m["role"] == "assistant" for m in prompt):
            continue
        items.append(EvalExample(prompt, ex.answer_text(), {}, ex.source))
    if not items:
        raise DataError("the held-out split has no prompt/answer example to score; give --eval FILE")
    return train, items[:limit], f"{len(held)} examples split off ({EVAL_FRACTION:.0%}, seed {seed})"


def prompt_baselines(model, tokenizer, items, shots_source, *, k: int, select: str,
                     metrics: Sequence[str], sql_db=None, max_new_tokens: int = 64,
                     batch_size: int = 16, seed: int = 0, log: Callable = print) -> dict:
    """Zero-shot and K-shot headline scores of the base on ``items``:
    ``{"base": {"score", "score_ci", "scores"}, "base-<K>shot": {...}}``."""
    from lorakit.eval import metrics as M
    from lorakit.eval.compare import few_shot_items, _mean, _score_all, check_references, generate_answers
    from lorakit.eval.generate import generate_batch

    scorers = [M.get_metric(m, sql_db=sql_db) for m in metrics]
    check_references(items, scorers)
    headline = scorers[0].name
    outputs = {"base": generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size)}
    shots = None
    if k:
        shots = few_shot_items(tokenizer, items, k, shots_source, select, {}, seed, log)
        outputs[shots["name"]] = generate_batch(model, tokenizer, shots["prompts"],
                                                max_new_tokens=max_new_tokens, batch_size=batch_size)
    out = {}
    for name, answers in outputs.items():
        scores = [_score_all(scorers, a, ex) for a, ex in zip(answers, items)]
        per = [s[headline] for s in scores]
        out[name] = {"score": _mean(per), "score_ci": list(M.bootstrap_ci(per, seed=seed)),
                     "scores": {c: _mean([s[c] for s in scores]) for c in scores[0]}}
    if shots:
        out[shots["name"]]["few_shot"] = {key: shots[key] for key in ("k", "select", "excluded")}
    return out


def _matmul_flops(seconds: float = 0.3, n: int = 512) -> float:
    """Measured float32 matmul throughput of this CPU, FLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - start)


def run_estimates(model_spec: str, *, examples: int, avg_tokens: float, p95_tokens: int,
                  epochs: float = 3.0) -> dict:
    """LoRA and QLoRA estimates on this machine's device: memory, whether it fits, time."""
    import torch

    from lorakit.plan.estimate import GIB, estimate
    from lorakit.plan.preflight import available_memory_bytes

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    free = available_memory_bytes(device)
    seq_len = max(64, int(math.ceil(p95_tokens / 64) * 64))
    cpu_peak = None if cuda else _matmul_flops()
    out = {"device": device.type, "free_gib": None if free is None else round(free / GIB, 2),
           "settings": {"r": 16, "target_modules": "all-linear", "epochs": epochs,
                        "seq_len": seq_len, "batch_size": 8, "examples": examples}}
    for method in ("lora", "qlora"):
        try:
            est = estimate(model_spec, method=method, r=16, seq_len=seq_len, batch_size=8,
                           precision="bf16" if cuda else "fp32", device=device.type,
                           examples=max(1, examples), avg_tokens=max(1.0, avg_tokens), epochs=epochs)
        except ConfigError as exc:
            out[method] = {"error": str(exc)}
            continue
        total = est.memory_bytes["total"]
        if cuda:
            hours, where = est.hours, est.time_gpu
        else:
            hours, where = est.flops / (cpu_peak * CPU_MFU) / 3600, "this CPU"
        out[method] = {"memory_gib": round(total / GIB, 3),
                       "fits": None if free is None else bool(total <= free),
                       "minutes": None if hours is None else round(60 * hours, 1),
                       "time_on": where, "gpu_hours": est.hours, "gpu": est.time_gpu}
    return out


def recommend(n_train: int, baselines: dict, *, target: float = DEFAULT_TARGET) -> tuple[str, list[str]]:
    """``("prompt" | "fine-tune", reasons)`` by the documented rule (module docstring)."""
    best = max(baselines, key=lambda n: baselines[n]["score"])
    score, (lo, hi) = baselines[best]["score"], baselines[best]["score_ci"]
    shown = f"{best} scores {score:.3f} (95% CI {lo:.3f}-{hi:.3f})"
    if n_train < MIN_EXAMPLES:
        return "prompt", [f"only {n_train} training examples (fewer than {MIN_EXAMPLES}): too few "
                          f"to fine-tune reliably; use them as few-shot examples in the prompt",
                          f"best prompt baseline: {shown}"]
    if score >= target:
        return "prompt", [f"the best prompt baseline already reaches the target: {shown} >= {target}"]
    if hi >= CEILING:
        return "prompt", [f"the best prompt baseline is within its CI of a perfect score: {shown}; "
                          f"a larger held-out set (--eval, --limit) could tell them apart"]
    return "fine-tune", [f"{n_train} training examples (>= {MIN_EXAMPLES})",
                         f"the best prompt baseline falls short: {shown} < target {target}, "
                         f"leaving {target - score:.3f} for fine-tuning to gain"]


def advise(data: str | Path, eval_data: str | Path | None = None, *, model: str = "smollm2-135m-instruct",
           metrics: Sequence[str] = ("exact",), sql_db=None, limit: int = 40, few_shot: int = 3,
           select: str = "similar", max_new_tokens: int = 64, batch_size: int = 16,
           target: float = DEFAULT_TARGET, seed: int = 0, dtype: str = "float32",
           log: Callable[[str], None] | None = None) -> dict:
    """Everything ``lorakit advise --json`` prints (see the module docstring).

    Raises:
        ConfigError / DataError: a bad metric, file or setting, with what to fix.
    """
    from lorakit.data.check import check_data
    from lorakit.data.formats import load_examples
    from lorakit.models.load import load_model

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if limit < 1:
        raise ConfigError(f"--limit must be at least 1, got {limit}")
    if not 0 < target <= 1:
        raise ConfigError(f"--target is a score in (0, 1], got {target}")
    started = time.perf_counter()
    log(f"loading {model}")
    loaded, tokenizer = load_model(model, dtype=dtype)
    report = check_data(str(data), tokenizer=tokenizer)
    examples = load_examples(str(data)).examples
    if not examples:
        raise DataError(f"{data}: no valid example (see `lorakit data check {data}`)")
    train, items, held_how = _held_out(examples, eval_data, limit, seed)
    log(f"prompt baselines on {len(items)} held-out questions ({held_how})")
    baselines = prompt_baselines(loaded, tokenizer, items, train, k=few_shot if len(train) else 0,
                                 select=select, metrics=metrics, sql_db=sql_db,
                                 max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed,
                                 log=log)
    tokens = report.get("tokens", {})
    estimates = run_estimates(model, examples=len(train), avg_tokens=float(tokens.get("mean", 1) or 1),
                              p95_tokens=int(tokens.get("p95", 64) or 64))
    recommendation, reasons = recommend(len(examples), baselines, target=target)
    lora = estimates.get("lora", {})
    if recommendation == "fine-tune" and lora.get("minutes") is not None:
        fits = {True: "fits in", False: "does not fit in", None: "vs"}[lora.get("fits")]
        reasons.append(f"a LoRA run (r 16, 3 epochs) takes about {lora['minutes']} min on "
                       f"{lora['time_on']} and needs {lora['memory_gib']} GiB ({fits} the "
                       f"{estimates['free_gib']} GiB free on {estimates['device']}"
                       + ("; try QLoRA" if lora.get("fits") is False else "") + ")")
    dup = report["duplicates"]
    data_summary = {"file": str(data), "examples": report["examples"], "skipped": report["skipped"],
                    "duplicates": dup, "diversity": report["diversity"], "tokens": tokens,
                    "few": report["examples"] < MIN_EXAMPLES, "warnings": report["warnings"]}
    return {"recommendation": recommendation, "reasons": reasons, "rule": RULE,
            "target": target, "metric": metrics[0], "model": model, "data": data_summary,
            "held_out": {"examples": len(items), "from": held_how}, "baselines": baselines,
            "estimate": estimates, "wall_time_s": round(time.perf_counter() - started, 1)}


def format_advice(result: dict) -> str:
    """The plain-text report of ``lorakit advise``."""
    d = result["data"]
    lines = [f"data: {d['examples']} examples ({d['skipped']} skipped), duplicates "
             f"{d['duplicates']['exact']} exact / {d['duplicates']['near']} near, diversity "
             f"distinct-2 {d['diversity']['distinct_2']:.3f}"
             + (f"; fewer than {MIN_EXAMPLES} examples" if d["few"] else "")]
    lines += [f"  warning: {w}" for w in d["warnings"]]
    lines.append(f"prompt baselines ({result['metric']}, {result['held_out']['examples']} held-out "
                 f"questions from {result['held_out']['from']}):")
    for name, b in result["baselines"].items():
        lo, hi = b["score_ci"]
        lines.append(f"  {name:<12} {b['score']:.3f}  (95% CI {lo:.3f}-{hi:.3f})")
    est = result["estimate"]
    for method in ("lora", "qlora"):
        e = est.get(method, {})
        if "error" in e:
            lines.append(f"{method}: no estimate ({e['error']})")
        elif e:
            lines.append(f"{method}: ~{e['memory_gib']} GiB on {est['device']} (free "
                         f"{est['free_gib']} GiB), ~{e['minutes']} min on {e['time_on']}")
    lines.append(f"recommendation: {result['recommendation'].upper()}")
    lines += [f"  - {r}" for r in result["reasons"]]
    lines.append(f"(rule: {result['rule']})")
    return "\n".join(lines) + "\n"
