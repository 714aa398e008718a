"""Batched prefill in the serving engine: time to first token and throughput when many
requests arrive at once, prefilled together (``max_prefill_tokens`` 4096, the default) or one
prompt at a time (``max_prefill_tokens=1``), side by side in one run on the same engine model.

N requests (default 8 and 32) are queued at once, each on its own adapter of 8 (r=16
all-linear, random B so each changes the output), a chat-templated prompt of ~60-120 tokens,
``--tokens`` greedy tokens each (``ignore_eos``). Reported per setting: time to first token
(mean, p50, max over the requests), wall time until the last request ends, and generated
tokens/s; the ratio batched / one-by-one. Tokens are checked equal between the two settings.

    .venv/bin/python bench/serve_prefill.py [--model smollm2-135m-instruct] [--tokens 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = [
    "Explain in a few sentences why the sky looks blue during the day and red at sunset.",
    "Write a short SQL query that lists the ten customers with the most orders last year.",
    "What are three practical tips for keeping a small vegetable garden healthy in summer?",
    "Summarise the plot of a detective story in which the butler did not do it.",
    "Translate into French: the train leaves at nine and arrives before noon tomorrow.",
    "List the planets of the solar system in order of their distance from the sun.",
    "Give me a recipe for a quick weeknight pasta with tomatoes, garlic and basil.",
    "Why do programmers write tests, and what makes a test useful rather than noise?",
]


def run(engine, prompts, adapters, tokens: int) -> dict:
    from lorakit.serve.engine import Request, SamplingParams

    done, lock = [], threading.Lock()
    finished = threading.Event()

    def sink_for(i):
        def sink(event):
            if event[0] in ("done", "error"):
                with lock:
                    done.append((i, event))
                    if len(done) == len(prompts):
                        finished.set()
        return sink

    reqs = [Request(list(p), a, SamplingParams(max_tokens=tokens, temperature=0,
                                                ignore_eos=True), sink_for(i))
            for i, (p, a) in enumerate(zip(prompts, adapters))]
    before = dict(engine.stats)
    started = time.perf_counter()
    with engine._lock:  # queue all of them before the loop's next admission
        for r in reqs:
            r.params.validate()
            r.slot = engine._registry[r.adapter].slot if r.adapter else None
            r.submitted = started
            engine._waiting.append(r)
    engine._wakeup.set()
    assert finished.wait(1800), "requests did not finish"
    wall = time.perf_counter() - started
    errors = [e for _, e in done if e[0] == "error"]
    assert not errors, errors[:2]
    ttft = [r.first_token_at - r.submitted for r in reqs]
    return {"requests": len(reqs), "wall_s": round(wall, 2),
            "tokens_per_s": round(len(reqs) * tokens / wall, 1),
            "ttft_mean_s": round(statistics.mean(ttft), 3),
            "ttft_p50_s": round(statistics.median(ttft), 3), "ttft_max_s": round(max(ttft), 3),
            "prefill_forwards": engine.stats["prefills"] - before["prefills"],
            "token_ids": [r.output_ids for r in reqs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--counts", default="8,32")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_prefill.json"))
    args = parser.parse_args()

    from serve_mixed import make_adapters

    from lorakit.models.load import load_model
    from lorakit.serve.engine import Engine

    model, tokenizer = load_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="lorakit-prefill-"))
    paths = make_adapters(model, tokenizer, folder, 8, 16)
    engine = Engine(model, tokenizer, max_loaded_adapters=8, max_batch_size=32).start()
    try:
        names = []
        for i, path in enumerate(paths):
            engine.add_adapter(f"a{i}", path)
            names.append(f"a{i}")
        results = {}
        for count in (int(c) for c in args.counts.split(",")):
            prompts = [tokenizer.apply_chat_template(
                [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" (case {i})"}],
                add_generation_prompt=True, tokenize=True) for i in range(count)]
            prompts = [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]
            adapters = [names[i % len(names)] for i in range(count)]
            run(engine, prompts[:2], adapters[:2], 2)  # warm-up
            row = {}
            for label, budget in (("one_by_one", 1), ("batched", 4096)):
                engine.max_prefill_tokens = budget
                row[label] = run(engine, prompts, adapters, args.tokens)
            same = row["one_by_one"].pop("token_ids") == row["batched"].pop("token_ids")
            row["same_tokens"] = same
            row["ttft_mean_ratio"] = round(row["one_by_one"]["ttft_mean_s"]
                                           / row["batched"]["ttft_mean_s"], 2)
            row["throughput_ratio"] = round(row["batched"]["tokens_per_s"]
                                            / row["one_by_one"]["tokens_per_s"], 2)
            results[str(count)] = row
            print(count, json.dumps(row), file=sys.stderr)
    finally:
        engine.stop()
    out = {"model": args.model, "tokens": args.tokens, "adapters": 8, "results": results}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print("| requests | prefill | TTFT mean / p50 / max (s) | wall (s) | tokens/s |")
    print("|---|---|---|---|---|")
    for count, row in results.items():
        for label in ("one_by_one", "batched"):
            r = row[label]
            print(f"| {count} | {label} ({r['prefill_forwards']} forwards) | {r['ttft_mean_s']} / "
                  f"{r['ttft_p50_s']} / {r['ttft_max_s']} | {r['wall_s']} | {r['tokens_per_s']} |")


if __name__ == "__main__":
    main()
