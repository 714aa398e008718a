"""The prompt baseline on the bundled text-to-SQL example: zero-shot, 3-shot (first and
similar) and, given an adapter, tuned execution accuracy on the 100 held-out questions.

SmolLM2-135M-Instruct (embedded), greedy, 64 new tokens, batch 16, float32 on CPU; the shots
come from lorakit/examples/sql/train.jsonl (never an eval question: lorakit/eval/fewshot.py).
Writes bench/results/fewshot_sql.json and prints a table (docs/benchmarks.md).

    .venv/bin/python bench/fewshot_sql.py [--limit N] [--adapter runs/NAME/adapter]
"""

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from lorakit.eval import metrics as M
    from lorakit.eval.compare import few_shot_items, generate_answers, load_eval_examples
    from lorakit.eval.adapters import use_model
    from lorakit.eval.generate import generate_batch
    from lorakit.eval.sql import EXAMPLE_DB, EXAMPLE_DIR
    from lorakit.models.load import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--adapter", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()

    model, tok = load_model("smollm2-135m-instruct", dtype=torch.float32)
    items = load_eval_examples(EXAMPLE_DIR / "eval.jsonl", args.limit)
    sql = M.get_metric("sql", sql_db=EXAMPLE_DB)
    rows = {}

    def score(name, answers, seconds):
        per = [sql.score(a, ex.reference)["sql"] for a, ex in zip(answers, items)]
        rows[name] = {"accuracy": sum(per) / len(per), "ci": list(M.bootstrap_ci(per)),
                      "correct": int(sum(per)), "n": len(per), "seconds": round(seconds, 1),
                      "answers": answers}
        print(f"{name:<22} {100 * rows[name]['accuracy']:5.1f}%  ({rows[name]['correct']}/{len(per)}, "
              f"95% CI {100 * rows[name]['ci'][0]:.0f}-{100 * rows[name]['ci'][1]:.0f}%)  {seconds:.0f} s",
              flush=True)

    t = time.perf_counter()
    score("zero-shot", generate_answers(model, tok, items, max_new_tokens=args.max_new_tokens,
                                        batch_size=16), time.perf_counter() - t)
    for select in ("first", "similar"):
        t = time.perf_counter()
        shots = few_shot_items(tok, items, args.k, EXAMPLE_DIR / "train.jsonl", select, {}, 0,
                                lambda m: None)
        answers = generate_batch(model, tok, shots["prompts"], max_new_tokens=args.max_new_tokens,
                                 batch_size=16)
        score(f"{args.k}-shot {select}", answers, time.perf_counter() - t)
    if args.adapter:
        from lorakit.lora.io import load_adapter

        load_adapter(model, args.adapter, name="tuned", tokenizer=tok)
        t = time.perf_counter()
        with use_model(model, "tuned"):
            answers = generate_answers(model, tok, items, max_new_tokens=args.max_new_tokens, batch_size=16)
        score("tuned", answers, time.perf_counter() - t)
    out = Path(__file__).parent / "results" / "fewshot_sql.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
