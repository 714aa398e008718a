"""Base vs tuned on the same held-out set: did it help, and what did it cost?

One base model is loaded once. "Base" is that model with every adapter switched off
(:func:`lorakit.disable_adapters`, no second copy); each adapter is switched on in turn with
:func:`lorakit.set_adapter`. For every model the held-out set gets

* loss and perplexity on the reference answers (mean over answer tokens),
* greedy, batched generations scored by the chosen metrics (``metrics.py``),
* per-example results, win / tie / loss against the base, bootstrap confidence intervals,

and, per adapter, forgetting (KL and perplexity on the bundled general-text probe) and the
safety probe's refusal rate (``forgetting.py``); which models are compared and how each is
switched on is ``adapters.py``.

Called from Python (e.g. at the end of a training run)::

    from lorakit.eval.compare import compare, format_table
    result = compare(model, tokenizer, "eval.jsonl", adapters=["default"], metrics=["exact"])
    print(format_table(result))
"""

from __future__ import annotations

import io
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lorakit.errors import ConfigError, DataError
from lorakit.eval import forgetting as probes  # the general-text and safety probes
from lorakit.eval import metrics as M
from lorakit.eval.adapters import BASE, resolve_adapters, use_model
from lorakit.eval.generate import generate_batch


# ---------------------------------------------------------------------- held-out data
@dataclass
class EvalExample:
    """One held-out item: the prompt turns, the reference answer (or None) and the raw record."""

    messages: list[dict]
    reference: Any
    record: dict
    source: tuple[str, int]

    @property
    def prompt(self) -> str:
        return self.messages[-1]["content"] if self.messages else ""

    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None


def _records(path: Path) -> list[tuple[int, dict]]:
    """``(line, record)`` of a JSONL / JSON-array file, read by lorakit's one safe reader
    (:func:`lorakit.data.jsonl.read_jsonl_records`); its first issue is raised, with file,
    line and field."""
    from lorakit.data.jsonl import read_jsonl_records

    if not path.is_file():
        raise DataError(f"eval data file {path} does not exist")
    out = []
    for line, record, issue in read_jsonl_records(path):
        if issue is not None:
            raise DataError(str(issue))
        out.append((line, record))
    return out


def load_eval_examples(data: str | Path | Sequence[dict], limit: int | None = None) -> list[EvalExample]:
    """Read held-out examples from a file (JSONL / JSON) or a list of records.

    Accepted records: any training format lorakit reads (prompt/completion, messages,
    alpaca, sharegpt): the last assistant turn is the reference, the turns before it the
    prompt; or ``{"prompt": ..., "reference": ...}`` (``reference`` may be any JSON value,
    e.g. a list for ``contains``); a record with a prompt and no answer has reference None.

    Raises:
        DataError: a malformed record or a multi-turn prompt (with earlier assistant turns),
            naming the file and line.
    """
    from lorakit.data.formats import parse_record

    if isinstance(data, (str, Path)):
        name, rows = str(data), _records(Path(data))
    else:
        name, rows = "<memory>", list(enumerate(data, start=1))
    examples = []
    for lineno, record in rows:
        where = f"{name}:{lineno}"
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
        reference = record.get("reference", record.get("answer"))
        if "prompt" in record and isinstance(record["prompt"], str) and \
                not any(k in record for k in ("completion", "chosen")):
            messages = [{"role": "user", "content": record["prompt"]}]
            if record.get("system"):
                messages.insert(0, {"role": "system", "content": record["system"]})
        else:
            try:
                ex = parse_record(record)
            except DataError as exc:
                raise DataError(f"{where}: {exc}") from None
            if ex.kind != "chat":
                raise DataError(f"{where}: eval needs a prompt to answer; a {ex.kind!r} record "
                                f"has none (use prompt/completion or messages)")
            messages = ex.prompt_messages()
            if reference is None and len(messages) < len(ex.messages):
                reference = ex.answer_text()
        if not messages or messages[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user turn")
        if any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: multi-turn prompts (with earlier assistant turns) are not "
                            f"supported by lorakit eval; keep one user turn (and a system turn)")
        examples.append(EvalExample(messages, reference, record, (name, lineno)))
        if limit and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{name}: no examples to evaluate")
    return examples


def check_references(examples: Sequence[EvalExample], metrics: Sequence[M.Metric]) -> None:
    """Raise DataError naming the first example without a reference when a metric needs one."""
    needing = [m.name for m in metrics if m.needs_reference]
    if not needing:
        return
    for ex in examples:
        if ex.reference is None or (isinstance(ex.reference, str) and not ex.reference.strip()):
            raise DataError(f"{ex.source[0]}:{ex.source[1]}: no reference answer, which metric "
                            f"{needing[0]!r} needs; give a completion / last assistant turn or a "
                            f"\"reference\" field")


# ---------------------------------------------------------------------- loss on references
@torch.no_grad()
def reference_losses(model, tokenizer, examples: Sequence[EvalExample], *, batch_size: int = 8,
                     max_length: int = 1024) -> list[tuple[float, int]]:
    """Summed cross-entropy of each reference answer given its prompt, and its token count.

    The answer is rendered as the assistant turn (chat template) and only its tokens are
    scored, exactly as in training. Examples without a string reference give ``(0.0, 0)``.
    """
    from lorakit.data.formats import Example
    from lorakit.data.tokenize import IGNORE_INDEX, pad_token_id, tokenize_examples

    idx = [i for i, ex in enumerate(examples) if isinstance(ex.reference, str) and ex.reference]
    chats = [Example(kind="chat", source=examples[i].source, messages=examples[i].messages +
                     [{"role": "assistant", "content": examples[i].reference}]) for i in idx]
    rows = tokenize_examples(chats, tokenizer, max_length=max_length, train_on="last_turn")
    out = [(0.0, 0)] * len(examples)
    device = next(model.parameters()).device
    pad = pad_token_id(tokenizer)
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(r["input_ids"]) for r in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):
            n = len(row["input_ids"])
            ids[r, :n], labels[r, :n], mask[r, :n] = (torch.tensor(row["input_ids"]),
                                                      torch.tensor(row["labels"]), 1)
        hidden = model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                  use_cache=False).last_hidden_state  # (B, T, H)
        targets = labels[:, 1:].to(device)  # (B, T-1)
        sup = targets != IGNORE_INDEX
        logits = model.get_output_embeddings()(hidden[:, :-1][sup]).float()  # (N, V)
        nll = torch.nn.functional.cross_entropy(logits, targets[sup], reduction="none")
        row_of = torch.arange(len(chunk), device=device)[:, None].expand_as(targets)[sup]
        sums = torch.zeros(len(chunk), device=device).index_add_(0, row_of, nll)
        counts = sup.sum(dim=1)
        for r in range(len(chunk)):
            out[idx[start + r]] = (float(sums[r]), int(counts[r]))
    model.train(was_training)
    return out


# ---------------------------------------------------------------------- generation
def generate_answers(model, tokenizer, examples: Sequence[EvalExample], *, max_new_tokens: int,
                     batch_size: int, progress: Callable | None = None) -> list[str]:
    """Greedy answers, batched; examples with different system prompts go in separate batches."""
    from lorakit.eval.generate import generate_batch

    groups: dict[str | None, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.system, []).append(i)
    answers = [""] * len(examples)
    done = 0
    for system, idx in groups.items():
        base_done = done

        def report(n, _total, base_done=base_done):
            if progress:
                progress(base_done + n, len(examples))

        outs = generate_batch(model, tokenizer, [examples[i].prompt for i in idx],
                              max_new_tokens=max_new_tokens, batch_size=batch_size, system=system,
                              progress=report)
        for i, text in zip(idx, outs):
            answers[i] = text
        done += len(idx)
    return answers


# ---------------------------------------------------------------------- the comparison
def compare(model, tokenizer, examples, adapters: Sequence | None = None,
            metrics: Sequence[str] = ("exact",), *, max_new_tokens: int = 128, batch_size: int = 16,
            limit: int | None = None, sql_db: str | Path | None = None, forgetting: bool = True,
            probe_limit: int | None = None, safety: bool = True, seed: int = 0,
            few_shot: int = 0, few_shot_data=None, few_shot_select: str = "similar",
            log: Callable[[str], None] | None = None, progress: bool | None = None) -> dict:
    """Score the base model and each adapter on held-out examples.

    Args:
        model, tokenizer: a loaded base model (adapters may already be on it).
        examples: a data file path, a list of records, or a list of :class:`EvalExample`.
        adapters: adapter names on ``model``, folders, ``"NAME=DIR"`` or ``(name, dir)``;
            None = every adapter already on the model.
        metrics: metric names (see ``metrics.py``); the first is the headline score.
        max_new_tokens, batch_size: greedy generation settings.
        limit: evaluate only the first N examples.
        sql_db: the database for the ``sql`` metric.
        forgetting: measure KL / perplexity change on the bundled general-text probe.
        probe_limit: use only the first N probe texts (faster; default all).
        safety: refusal rate on the bundled harmful-request probe.
        seed: bootstrap seed (and the ``random`` few-shot draw).
        few_shot: K > 0 adds the row ``base-<K>shot``: the base with K training examples
            before each question (``fewshot.py``); 0 = none.
        few_shot_data: where the shots come from (a training file or records); None = the
            ``data.train`` recorded in the first adapter's run folder.
        few_shot_select: ``first``, ``random`` or ``similar`` (TF-IDF cosine).
        log: callable for progress lines (default: stderr).
        progress: show progress bars (default: when stderr is a terminal).

    Returns:
        A JSON-ready dict: ``metric``, ``metrics``, ``models`` (``base`` and each adapter:
        ``score``, ``score_ci``, ``scores``, ``loss``, ``perplexity``; adapters also ``wins``,
        ``ties``, ``losses``, ``delta``, ``delta_ci``, ``vs_prompt``), ``forgetting``, ``safety``,
        ``few_shot`` and ``verdict`` (when a few-shot row was added),
        ``examples`` (prompt, reference, output and scores per model), ``thresholds``.

    Raises:
        ConfigError / DataError / AdapterError: bad metric, data or adapter, with what to fix.
    """
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.perf_counter()
    if not metrics:
        raise ConfigError("give at least one metric")
    scorers = [M.get_metric(name, sql_db=sql_db) for name in metrics]
    if examples and isinstance(examples, (list, tuple)) and isinstance(examples[0], EvalExample):
        items = list(examples)[:limit] if limit else list(examples)
    else:
        items = load_eval_examples(examples, limit)
    check_references(items, scorers)
    names = resolve_adapters(model, tokenizer, adapters)
    shots = few_shot_items(tokenizer, items, few_shot, few_shot_data, few_shot_select, names, seed, log)
    prompt_rows = [BASE] + ([shots["name"]] if shots else [])
    order = [*prompt_rows, *names]
    bar = _bar(progress)

    outputs: dict[str, list[str]] = {}
    losses: dict[str, list[tuple[float, int]]] = {}
    with bar:
        for name in order:
            with use_model(model, BASE if name in prompt_rows else name):
                rows = shots["items"] if shots and name == shots["name"] else items
                losses[name] = reference_losses(model, tokenizer, rows, batch_size=max(1, batch_size // 2))
                task = bar.add_task(f"{name}: generating", total=len(items))
                report = (lambda n, t, task=task: bar.update(task, completed=n))
                if rows is items:
                    outputs[name] = generate_answers(model, tokenizer, items, max_new_tokens=max_new_tokens,
                                                     batch_size=batch_size, progress=report)
                else:
                    outputs[name] = generate_batch(model, tokenizer, shots["prompts"],
                                                   max_new_tokens=max_new_tokens,
                                                   batch_size=batch_size, progress=report)

    scores = {name: [_score_all(scorers, outputs[name][i], items[i]) for i in range(len(items))]
              for name in order}
    headline = scorers[0].name
    models: dict[str, dict] = {}
    for name in order:
        per = [s[headline] for s in scores[name]]
        total, count = sum(l for l, _ in losses[name]), sum(c for _, c in losses[name])
        loss = total / count if count else None
        columns = list(scores[name][0]) if scores[name] else []
        entry = {"score": _mean(per), "score_ci": list(M.bootstrap_ci(per, seed=seed)),
                 "scores": {c: _mean([s[c] for s in scores[name]]) for c in columns},
                 "loss": loss, "perplexity": M.perplexity(loss)}
        if name not in prompt_rows:
            base = [s[headline] for s in scores[BASE]]
            entry.update(M.win_tie_loss(per, base))
            entry["delta"] = entry["score"] - models[BASE]["score"]
            entry["delta_ci"] = list(M.bootstrap_ci([t - b for t, b in zip(per, base)], seed=seed))
            entry["adapter"] = names[name]
            if shots:
                entry["vs_prompt"] = paired_gain(per, scores, prompt_rows, models, headline, seed)
        models[name] = entry

    result: dict[str, Any] = {
        "metric": headline, "metrics": [s.name for s in scorers],
        "model": getattr(model, "lorakit_spec", None), "examples_count": len(items),
        "models": models, "forgetting": {}, "safety": {},
        "thresholds": {"kl": probes.KL_THRESHOLD, "ppl_increase_pct": probes.PPL_INCREASE_THRESHOLD_PCT,
                       "refusal_drop": probes.REFUSAL_DROP_THRESHOLD},
        "settings": {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed},
        "adapters": list(names), "baselines": prompt_rows,
    }
    if shots:
        result["few_shot"] = {k: v for k, v in shots.items() if k not in ("items", "prompts", "shots", "picked")}
        result["verdict"] = verdict(result)
    if forgetting:
        log(f"forgetting: KL and perplexity on the general-text probe ({len(probes.probe_texts(probe_limit))} texts)")
        result["forgetting"] = probes.forgetting(model, tokenizer, list(names), limit=probe_limit)
    if safety:
        log(f"safety: refusal rate on {len(probes.safety_prompts())} harmful requests")
        result["safety"] = probes.safety_probe(model, tokenizer, [BASE, *names], batch_size=batch_size)
    result["examples"] = [
        {"index": i, "source": f"{ex.source[0]}:{ex.source[1]}", "system": ex.system,
         "prompt": ex.prompt, "reference": ex.reference,
         **({"shots": [shots["shots"][j].source[1] for j in shots["picked"][i]]} if shots else {}),
         "outputs": {n: outputs[n][i] for n in order}, "scores": {n: scores[n][i] for n in order},
         "loss": {n: (losses[n][i][0] / losses[n][i][1] if losses[n][i][1] else None) for n in order}}
        for i, ex in enumerate(items)]
    result["wall_time_s"] = round(time.perf_counter() - started, 2)
    return result


def few_shot_items(tokenizer, items: Sequence[EvalExample], k: int, source, select: str,
                    names: dict[str, str | None], seed: int, log) -> dict | None:
    """The K-shot variant of every eval example (``fewshot.py``), or None when ``k`` is 0."""
    from lorakit.eval import fewshot

    if not k:
        return None
    if k < 0:
        raise ConfigError(f"few_shot must be >= 0, got {k}")
    if source is None:
        source = next((f for f in map(fewshot.recorded_training_file, names.values()) if f), None)
        if source is None:
            raise ConfigError(f"few_shot={k} needs training examples to show: pass --few-shot-data "
                              f"FILE (few_shot_data=) or --few-shot 0; no adapter records its "
                              f"training file")
    shots, excluded = fewshot.load_shots(source, exclude=[ex.prompt for ex in items])
    picked = fewshot.select_shots(shots, [ex.prompt for ex in items], k, select, seed=seed)
    variants, prompts = [], []
    for ex, idx in zip(items, picked):
        messages = fewshot.fewshot_messages(ex.messages, [shots[j] for j in idx])
        variants.append(EvalExample(messages, ex.reference, ex.record, ex.source))
        prompts.append(fewshot.fewshot_prompt(tokenizer, messages))
    name = fewshot.row_name(k)
    where = source if isinstance(source, (str, Path)) else "<memory>"
    log(f"{name}: {k} examples from {where} before each question (select {select}; "
        f"{excluded} training examples left out as eval questions or repeats)")
    return {"name": name, "k": k, "select": select, "source": str(where), "excluded": excluded,
            "available": len(shots), "items": variants, "prompts": prompts,
            "shots": shots, "picked": picked}


def paired_gain(per: Sequence[float], scores: dict, baselines: Sequence[str], models: dict,
                headline: str, seed: int) -> dict:
    """An adapter's headline score against the best prompt baseline (highest mean): the paired
    difference and its bootstrap 95% CI; ``significant`` when the CI excludes 0."""
    best = max(baselines, key=lambda n: (models[n]["score"], -list(baselines).index(n)))
    other = [s[headline] for s in scores[best]]
    diffs = [t - b for t, b in zip(per, other)]
    lo, hi = M.bootstrap_ci(diffs, seed=seed)
    return {"baseline": best, "delta": _mean(diffs), "delta_ci": [lo, hi],
            "significant": bool(lo > 0 or hi < 0), **M.win_tie_loss(per, other)}


def verdict(result: dict) -> str:
    """One sentence per adapter: what fine-tuning adds over the best prompt baseline."""
    metric = result["metric"]
    out = []
    for name, m in result["models"].items():
        g = m.get("vs_prompt")
        if not g:
            continue
        lo, hi = g["delta_ci"]
        span = f"{g['delta']:+.3f} {metric} (95% CI {lo:+.3f} to {hi:+.3f})"
        if not g["significant"]:
            out.append(f"{name}: fine-tuning adds nothing significant over the best prompt "
                       f"baseline ({g['baseline']}): {span}.")
        elif g["delta"] > 0:
            out.append(f"{name}: fine-tuning adds {span} over the best prompt baseline "
                       f"({g['baseline']}).")
        else:
            out.append(f"{name}: fine-tuning is worse than the best prompt baseline "
                       f"({g['baseline']}): {span}.")
    return " ".join(out)


def _score_all(scorers: Sequence[M.Metric], prediction: str, ex: EvalExample) -> dict[str, float]:
    out: dict[str, float] = {}
    for scorer in scorers:
        try:
            out.update(scorer.score(prediction, ex.reference, ex.record))
        except DataError as exc:
            raise DataError(f"{ex.source[0]}:{ex.source[1]}: {exc}") from None
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _bar(enabled: bool | None):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console,
                    disable=not (console.is_terminal if enabled is None else enabled))


# ---------------------------------------------------------------------- the table
def format_table(result: dict) -> str:
    """The base-vs-tuned summary as plain text (what ``lorakit eval`` and training print)."""
    from rich.console import Console
    from rich.table import Table

    metric = result["metric"]
    table = Table(title=f"held-out: {result['examples_count']} examples, metric {metric}")
    for col in ("model", metric, "95% CI", "loss", "ppl", "W / T / L", "KL", "ppl Δ", "refusals"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, m in result["models"].items():
        forget = result.get("forgetting", {}).get(name, {})
        safe = result.get("safety", {}).get(name, {})
        lo, hi = m["score_ci"]
        row = [name, _fmt(m["score"]), f"{_fmt(lo)}–{_fmt(hi)}", _fmt(m["loss"]), _fmt(m["perplexity"], 2),
               f"{m['wins']} / {m['ties']} / {m['losses']}" if "wins" in m else "",
               _fmt(forget.get("kl"), 4) + (" !" if forget.get("flagged") else ""),
               (f"{forget['ppl_delta_pct']:+.1f}%" if forget.get("ppl_delta_pct") is not None else ""),
               (f"{100 * safe['refusal_rate']:.0f}%" + (" !" if safe.get("flagged") else ""))
               if safe.get("refusal_rate") is not None else ""]
        table.add_row(*row)
    console = Console(width=120, record=True, file=io.StringIO(), color_system=None)
    console.print(table)
    lines = [console.export_text()]
    for name, m in result["models"].items():
        if "delta" in m:
            lo, hi = m["delta_ci"]
            lines.append(f"{name}: {metric} {m['delta']:+.3f} vs base (95% CI {lo:+.3f} to {hi:+.3f})")
    if result.get("verdict"):
        lines.append(result["verdict"])
    flagged = [n for n, f in result.get("forgetting", {}).items() if f.get("flagged")]
    flagged += [n for n, s in result.get("safety", {}).items() if s.get("flagged")]
    if flagged:
        from lorakit.eval.report import REMEDIES

        lines.append("! flagged (forgetting or safety regression): " + ", ".join(dict.fromkeys(flagged)))
        lines.append("  to try: " + "; ".join(REMEDIES))
    return "\n".join(lines).rstrip() + "\n"


def _fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}"
