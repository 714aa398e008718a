"""``lorakit data check``: validate training files and report on their quality.

:func:`check_data` reads the files (skipping and recording bad records), tokenises every
example with the model's tokenizer and chat template, and returns a plain dict (the
``--json`` output): counts per format, token length percentiles, truncation at
``max_length``, the share of supervised tokens, exact and near-duplicates, prompts with
conflicting answers, answer diversity, train/eval leakage, and plain-language warnings.
Everything is vectorised or a single pass, so 100k examples take seconds.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from lorakit.data.dedup import connected_groups, duplicate_edges, normalize_text, word_ids
from lorakit.data.formats import DataIssue, Example, load_examples
from lorakit.data.split import example_key
from lorakit.data.tokenize import IGNORE_INDEX, supervised_segments, tokenize_examples
from lorakit.errors import DataError

FEW_EXAMPLES = 50
NEAR_DUPLICATE_WARN = 0.05
PERCENTILES = (50, 90, 95, 99)


def _paths(paths) -> list[str]:
    if isinstance(paths, (str, Path)):
        return [str(paths)]
    return [str(p) for p in paths]


def _pct(part: float, whole: float) -> str:
    share = 100.0 * part / whole if whole else 0.0
    return f"{share:.0f}%" if share >= 1 or share == 0 else f"{share:.1f}%"


def _load(paths: list[str], format: str, strict: bool, layout: str = "auto",
          ) -> tuple[list[Example], list[DataIssue], Counter, int]:
    examples, errors, formats, records = [], [], Counter(), 0
    for path in paths:
        result = load_examples(path, format=format, strict=strict, layout=layout)
        examples += result.examples
        errors += result.errors
        formats.update(result.formats)
        records += result.records
    return examples, errors, formats, records


def _token_stats(lengths: np.ndarray, unit: str) -> dict:
    if lengths.size == 0:
        return {"unit": unit, "count": 0}
    stats = {"unit": unit, "count": int(lengths.size), "min": int(lengths.min())}
    for q in PERCENTILES:
        stats[f"p{q}"] = int(np.percentile(lengths, q))
    stats.update(max=int(lengths.max()), mean=round(float(lengths.mean()), 1), total=int(lengths.sum()))
    return stats


def _tokenize(examples: list[Example], tokenizer, train_on: str, errors: list[DataIssue],
              ) -> tuple[list[Example], list[dict]]:
    """Tokenise all examples; those the chat template cannot render become errors."""
    try:
        return examples, tokenize_examples(examples, tokenizer, None, train_on)
    except DataError:
        pass
    good, items = [], []  # slow path: find the offending examples one by one
    for ex in examples:
        try:
            items.append(tokenize_examples([ex], tokenizer, None, train_on)[0])
            good.append(ex)
        except DataError as exc:
            message = str(exc).split(": ", 1)[-1]
            errors.append(DataIssue(ex.source[0], ex.source[1], "messages", message))
    return good, items


def _conflicts(examples: Sequence[Example]) -> dict:
    answers: dict[str, set] = defaultdict(set)
    counts: Counter = Counter()
    for ex in examples:
        if ex.kind != "chat":
            continue
        prompt = "\x00".join(f"{m['role']}:{normalize_text(m['content'])}" for m in ex.prompt_messages())
        answers[prompt].add(normalize_text(ex.answer_text()))
        counts[prompt] += 1
    conflicting = [p for p, a in answers.items() if len(a) > 1]
    return {"prompts": len(conflicting), "examples": sum(counts[p] for p in conflicting)}


def _diversity(examples: Sequence[Example]) -> dict:
    ids, lengths, vocab = word_ids([ex.answer_text() for ex in examples])
    if ids.size == 0:
        return {"distinct_1": 0.0, "distinct_2": 0.0}
    distinct_1 = np.unique(ids).size / ids.size
    ends = np.cumsum(lengths)
    # bigram (j, j+1) is inside one text unless j is the last word of its text
    last = np.zeros(ids.size, dtype=bool)
    last[ends[lengths > 0] - 1] = True
    first = np.flatnonzero(~last[:-1])
    bigrams = ids[first] * max(vocab, 1) + ids[first + 1]
    distinct_2 = np.unique(bigrams).size / bigrams.size if bigrams.size else 0.0
    return {"distinct_1": round(float(distinct_1), 4), "distinct_2": round(float(distinct_2), 4)}


def _duplicates(train: Sequence[Example], evals: Sequence[Example], threshold: float,
                ) -> tuple[dict, dict | None]:
    """Duplicates within train, and eval examples that duplicate a train example.

    One MinHash pass over train + eval serves both: train's own groups use only the edges
    between train examples.
    """
    both = list(train) + list(evals)
    keys = [example_key(ex) for ex in both]
    left, right, exact = duplicate_edges([ex.all_text() for ex in both], threshold=threshold,
                                         exact_keys=keys)
    n = len(train)
    group = connected_groups(n, left, right)
    n_exact = n - np.unique(exact[:n]).size
    n_near = n - np.unique(group).size - n_exact
    duplicates = {"exact": int(n_exact), "near": int(n_near), "threshold": threshold}
    if not evals:
        return duplicates, None
    joint = connected_groups(len(both), left, right)
    train_groups = set(joint[:n].tolist())
    leaked_exact = int((exact[n:] < n).sum())  # first copy of the key is a train example
    leaked = sum(1 for g in joint[n:].tolist() if g in train_groups)
    return duplicates, {"eval_examples": len(evals), "exact": leaked_exact, "near": leaked - leaked_exact}


def check_data(paths, tokenizer=None, max_length: int = 2048, eval_path=None,
               format: str = "auto", train_on: str = "all_assistant", strict: bool = False,
               near_threshold: float = 0.8, preview: int = 0, layout: str = "auto") -> dict[str, Any]:
    """Validate data files and measure what matters before training on them.

    Args:
        paths: one path or several (JSONL or JSON list), read as one training set.
        tokenizer: the model's tokenizer; without one, lengths are counted in words and
            truncation / supervised share are not reported.
        max_length: the training sequence length, for the truncation count.
        eval_path: an eval file (or several) to check for leakage from train.
        format: ``"auto"`` or a format from :data:`lorakit.data.formats.FORMATS`.
        train_on: which tokens are supervised (see :mod:`lorakit.data.tokenize`).
        strict: raise on the first bad record instead of skipping it.
        near_threshold: estimated Jaccard similarity (word 3-grams) that counts as near-duplicate.
        preview: include this many rendered examples with their supervised spans.
        layout: how the files are laid out: ``"auto"`` (from the suffix), ``"jsonl"`` or
            ``"json"`` (see :func:`lorakit.data.jsonl.read_jsonl_records`); give it when a
            path is a temporary name without the real suffix.

    Returns:
        The report dict: ``examples``, ``records``, ``skipped``, ``errors`` (list of
        ``{"file", "line", "field", "message"}``), ``formats``, ``tokens`` (percentiles),
        ``truncated``, ``no_supervised_tokens``, ``supervised_share``, ``duplicates``
        (``{"exact", "near"}``), ``conflicts``, ``diversity``, ``leakage``, ``warnings``,
        ``preview``.

    Raises:
        DataError: a file is missing, or ``strict`` and a record is bad.
    """
    files = _paths(paths)
    examples, errors, formats, records = _load(files, format, strict, layout)
    eval_files = _paths(eval_path) if eval_path else []
    evals, eval_errors, _, eval_records = (_load(eval_files, format, strict, layout) if eval_files
                                           else ([], [], None, 0))
    errors += eval_errors

    report: dict[str, Any] = {"files": files, "eval_files": eval_files, "records": records}
    items: list[dict] = []
    if tokenizer is not None and examples:
        examples, items = _tokenize(examples, tokenizer, train_on, errors)
        if strict and len(errors) > len(eval_errors):
            raise DataError(str(errors[len(eval_errors)]))
    n = len(examples)
    kinds = Counter(ex.kind for ex in examples)
    report.update(examples=n, skipped=records - n, errors=[e.to_dict() for e in errors],
                  formats=dict(formats), kinds=dict(kinds))
    if kinds.get("kto"):  # method kto: unpaired answers labelled desirable or not
        good = sum(1 for ex in examples if ex.kind == "kto" and ex.label)
        report["kto_labels"] = {"desirable": good, "undesirable": kinds["kto"] - good}

    # lengths, truncation, supervision
    if items:
        lengths = np.fromiter((len(it["input_ids"]) for it in items), dtype=np.int64, count=n)
        report["tokens"] = _token_stats(lengths, "tokens")
        report["max_length"] = max_length
        report["truncated"] = int((lengths > max_length).sum())
        supervised = total = lost = 0
        for it in items:
            labels = it["labels"][1:max_length]  # position 0 is never a target
            sup = len(labels) - labels.count(IGNORE_INDEX)
            supervised += sup
            total += len(labels) + 1
            lost += sup == 0
        report["supervised_share"] = round(supervised / total, 4) if total else 0.0
        report["no_supervised_tokens"] = int(lost)
    else:
        lengths = np.fromiter((len(ex.all_text().split()) for ex in examples), dtype=np.int64, count=n)
        report["tokens"] = _token_stats(lengths, "words")
        report.update(max_length=max_length, truncated=None, supervised_share=None,
                      no_supervised_tokens=None)

    # duplicates, conflicts, diversity, leakage
    report["duplicates"], report["leakage"] = _duplicates(examples, evals if eval_files else [],
                                                          near_threshold)
    report["conflicts"] = _conflicts(examples)
    report["diversity"] = _diversity(examples) if n else {"distinct_1": 0.0, "distinct_2": 0.0}
    report["warnings"] = _warnings(report, kinds)
    report["preview"] = [
        {"file": ex.source[0], "line": ex.source[1],
         "segments": [[text, sup] for text, sup in supervised_segments(it, tokenizer)]}
        for ex, it in list(zip(examples, items))[:preview]
    ] if items else []
    return report


def _warnings(r: dict, kinds: Counter) -> list[str]:
    n, out = r["examples"], []
    if r["skipped"]:
        out.append(f"{r['skipped']} of {r['records']} records were skipped because of errors "
                   "(listed under errors; --strict makes them fatal)")
    if n == 0:
        out.append("no valid examples")
        return out
    if n < FEW_EXAMPLES:
        out.append(f"fewer than {FEW_EXAMPLES} examples: prompt engineering may suffice")
    dup = r["duplicates"]
    if dup["exact"]:
        out.append(f"{_pct(dup['exact'], n)} of examples are exact duplicates ({dup['exact']}): "
                   "they are trained on more than once")
    if dup["near"] and dup["near"] / n >= NEAR_DUPLICATE_WARN:
        out.append(f"{_pct(dup['near'], n)} of examples are near-duplicates ({dup['near']})")
    if r["truncated"]:
        out.append(f"{r['truncated']} examples ({_pct(r['truncated'], n)}) are longer than "
                   f"max_length {r['max_length']} tokens and will be truncated "
                   f"(p99 length is {r['tokens'].get('p99')})")
    if r["no_supervised_tokens"]:
        out.append(f"{r['no_supervised_tokens']} examples have no supervised token within "
                   f"max_length {r['max_length']}: they teach nothing")
    if r["supervised_share"] is not None and r["supervised_share"] < 0.1:
        out.append(f"only {_pct(r['supervised_share'], 1)} of tokens are supervised: prompts "
                   "and templates dominate the sequence length")
    if r["conflicts"]["prompts"]:
        k = r["conflicts"]["prompts"]
        out.append(f"{k} {'prompt appears' if k == 1 else 'prompts appear'} with different answers "
                   f"({r['conflicts']['examples']} examples): the model is taught contradictory targets")
    if n >= FEW_EXAMPLES and r["diversity"]["distinct_2"] < 0.2:
        out.append(f"low diversity: only {_pct(r['diversity']['distinct_2'], 1)} of answer word "
                   "pairs are distinct")
    if len(kinds) > 1:
        mix = ", ".join(f"{k} {v}" for k, v in sorted(kinds.items()))
        out.append(f"the data mixes example kinds ({mix}); SFT trains on chat and text, "
                   "DPO / ORPO / SimPO need preference, KTO needs kto records")
    labels = r.get("kto_labels")
    if labels and not (labels["desirable"] and labels["undesirable"]):
        missing = "undesirable (label false)" if labels["desirable"] else "desirable (label true)"
        out.append(f"no {missing} examples: KTO learns from both kinds")
    leak = r["leakage"]
    if leak and (leak["exact"] or leak["near"]):
        bad = leak["exact"] + leak["near"]
        out.append(f"{bad} eval examples ({_pct(bad, leak['eval_examples'])}) also appear in "
                   "train (exact or near-duplicate): eval scores will be optimistic")
    return out
