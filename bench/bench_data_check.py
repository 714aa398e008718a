"""Benchmark ``lorakit data check`` on 100k synthetic examples.

Writes a JSONL file of mixed formats (prompt/completion, multi-turn chat, alpaca, sharegpt),
with ~2% exact duplicates, ~3% near-duplicates and a few hundred malformed lines, plus a
small eval file, to a temp dir; then times the whole command (process start, tokenizer
load, report) and the stages of ``check_data`` in-process. Prints a table.

    .venv/bin/python bench/bench_data_check.py [--examples 100000] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOPICS = ["python", "rust", "baking", "physics", "chess", "gardening", "finance", "music",
          "history", "astronomy", "cycling", "photography", "linguistics", "chemistry"]
VERBS = ["explain", "summarise", "compare", "describe", "list", "outline", "define", "justify"]


def _vocabulary(rng: random.Random, size: int = 20_000) -> tuple[list[str], list[float]]:
    """English words (the tokenizer's whole-word tokens) with Zipf frequencies, so the text
    tokenises like natural prose (~1.3 tokens a word)."""
    from lorakit.models.load import load_tokenizer

    vocab = load_tokenizer("smollm2-135m-instruct").get_vocab()
    words = sorted(w[1:] for w in vocab if w.startswith("\u0120") and w[1:].isalpha() and w[1:].islower())
    words = words[:size] if len(words) > size else words
    rng.shuffle(words)
    return words, list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(words))))


_VOCAB: tuple[list[str], list[float]] | None = None


def _sentence(rng: random.Random, n: int) -> str:
    global _VOCAB
    if _VOCAB is None:
        _VOCAB = _vocabulary(random.Random(1))
    words = rng.choices(_VOCAB[0], cum_weights=_VOCAB[1], k=n)
    if rng.random() < 0.3:
        words[rng.randrange(n)] = str(rng.randint(0, 9999))
    return " ".join(words).capitalize() + "."


def _record(rng: random.Random, i: int) -> dict:
    question = f"{rng.choice(VERBS).capitalize()} {rng.choice(TOPICS)} item {i}: {_sentence(rng, rng.randint(8, 30))}"
    answer = " ".join(_sentence(rng, rng.randint(10, 25)) for _ in range(rng.randint(1, 6)))
    kind = rng.random()
    if kind < 0.4:
        return {"prompt": question, "completion": answer}
    if kind < 0.7:
        messages = [{"role": "system", "content": "You are a concise assistant."}]
        for _ in range(rng.randint(1, 3)):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
            question, answer = _sentence(rng, 12), _sentence(rng, 20)
        return {"messages": messages}
    if kind < 0.9:
        return {"instruction": question, "input": _sentence(rng, 6) if rng.random() < 0.5 else "",
                "output": answer}
    return {"conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]}


def write_data(folder: Path, n: int, seed: int = 0) -> tuple[Path, Path]:
    rng = random.Random(seed)
    lines = []
    records = []
    for i in range(n):
        r = rng.random()
        if r < 0.02 and records:
            record = rng.choice(records)  # exact duplicate
        elif r < 0.05 and records:
            record = json.loads(json.dumps(rng.choice(records)))  # near duplicate: upper-cased
            for key in ("completion", "output"):
                if key in record:
                    record[key] = record[key].upper()
        else:
            record = _record(rng, i)
        records.append(record)
        lines.append(json.dumps(record))
    for k in range(300):  # malformed lines, skipped and counted
        lines[rng.randrange(n)] = '{"prompt": "broken' if k % 2 else '{"prompt": "no completion"}'
    train = folder / "train.jsonl"
    train.write_text("\n".join(lines) + "\n", encoding="utf-8")
    evals = folder / "eval.jsonl"
    evals.write_text("\n".join(json.dumps(rng.choice(records)) if j % 10 == 0 else
                               json.dumps(_record(rng, n + j)) for j in range(1000)) + "\n",
                     encoding="utf-8")
    return train, evals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-length", type=int, default=512)
    args = parser.parse_args()

    from lorakit.data.check import check_data
    from lorakit.data.formats import load_examples
    from lorakit.data.split import example_groups
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.models.load import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        train, evals = write_data(Path(tmp), args.examples)
        size_mb = train.stat().st_size / 1e6
        print(f"wrote {args.examples} records ({size_mb:.1f} MB) in {time.perf_counter() - t:.1f} s")

        # 1. the command end to end, as a user runs it
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "lorakit", "data", "check", str(train),
                               "--eval", str(evals), "--model", args.model,
                               "--max-length", str(args.max_length), "--json"],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        wall = time.perf_counter() - t
        if proc.returncode not in (0, 1):
            raise SystemExit(proc.stderr)
        report = json.loads(proc.stdout)

        # 2. the stages, in-process
        stages = {}
        t = time.perf_counter()
        tokenizer = load_tokenizer(args.model)
        stages["load tokenizer"] = time.perf_counter() - t
        t = time.perf_counter()
        examples = load_examples(train).examples
        stages["read + validate"] = time.perf_counter() - t
        t = time.perf_counter()
        tokenize_examples(examples, tokenizer)
        stages["render + tokenise + labels"] = time.perf_counter() - t
        t = time.perf_counter()
        example_groups(examples)
        stages["exact + near duplicates"] = time.perf_counter() - t
        t = time.perf_counter()
        check_data(train, tokenizer=tokenizer, max_length=args.max_length, eval_path=evals)
        stages["check_data total (tokenizer loaded)"] = time.perf_counter() - t

    print(f"\n`lorakit data check` on {args.examples} records + 1000 eval, end to end: {wall:.1f} s")
    print(f"  valid {report['examples']}, errors {len(report['errors'])}, "
          f"duplicates {report['duplicates']['exact']} exact / {report['duplicates']['near']} near, "
          f"leakage {report['leakage']['exact']} exact / {report['leakage']['near']} near, "
          f"token p50/p99 {report['tokens']['p50']}/{report['tokens']['p99']}")
    print("\nstage                                   seconds")
    for name, seconds in stages.items():
        print(f"  {name:<38}{seconds:7.2f}")
    print(f"\ncpu cores: {os.cpu_count()}")


if __name__ == "__main__":
    main()
