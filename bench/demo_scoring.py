"""How long the demo's scoring takes by generation batch size (``lorakit demo`` uses 50).

Greedy answers (64 new tokens) of the embedded SmolLM2 for the 100 held-out text-to-SQL
questions, through ``lorakit.eval.generate.generate_batch``, once per ``--batch-sizes`` value,
in ``--dtype`` (the demo scores in its run's dtype: bfloat16 on CPUs with native bf16), and
the execution accuracy of those answers (base model: ~0).

    .venv/bin/python bench/demo_scoring.py [--dtype bfloat16] [--batch-sizes 16 50 100]
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 50, 100])
    p.add_argument("--adapter", default=None, help="score this adapter instead of the base")
    args = p.parse_args()

    from lorakit.eval.generate import generate_batch
    from lorakit.eval.sql import execution_match, extract_sql
    from lorakit.examples import SQL_DIR, _read_jsonl
    from lorakit.models.load import load_model

    rows = _read_jsonl(SQL_DIR / "eval.jsonl")
    prompts = [r["prompt"] for r in rows]
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=args.dtype)
    if args.adapter:
        from lorakit.lora.io import load_adapter

        load_adapter(model, args.adapter, tokenizer=tokenizer)
    for size in args.batch_sizes:
        t0 = time.perf_counter()
        preds = generate_batch(model, tokenizer, prompts, max_new_tokens=64, batch_size=size)
        took = time.perf_counter() - t0
        hits = sum(execution_match(extract_sql(p), r["completion"], SQL_DIR / "shop.db")
                   for p, r in zip(preds, rows))
        print(f"{args.dtype} batch {size}: {took:.1f} s for {len(prompts)} questions, "
              f"{int(hits)}/{len(prompts)} correct", flush=True)


if __name__ == "__main__":
    main()
