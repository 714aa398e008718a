"""The quality table (issue 23): full fine-tuning, LoRA, QLoRA, QLoRA + LoftQ, DoRA and LoRA+
on the bundled text-to-SQL example, same data, same epochs and batches (so the same steps).

Each row is one ``lorakit train`` of lorakit/examples/sql.yaml (SmolLM2-135M-Instruct, 2
epochs, batch 8, max_length 256, r=16 all-linear, the example's own settings) with the row's
overrides and ``eval.after_train=false``, in its own process (so the summary's peak RSS is that
run's); then execution accuracy on the 100 held-out questions (greedy, 64 new tokens), each
adapter on the base it trained on (the 4-bit base for the QLoRA rows), the full fine-tune
loaded from its own folder. Writes bench/results/quality_table.json and prints the table
(docs/benchmarks.md).

    .venv/bin/python bench/quality_table.py [--rows lora,qlora,...] [--out-dir /tmp/quality]

Learning rates: the adapter rows use the example's 2e-4; full fine-tuning uses 2e-5 (full
fine-tuning at an adapter's learning rate diverges; 1e-5..5e-5 is the usual range). LoRA+
multiplies B's learning rate by 16 (the paper's recommended ratio), A's stays 2e-4.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROWS = {
    "full": ["method=full", "train.lr=2e-5"],
    "lora": ["method=lora"],
    "qlora": ["method=qlora"],
    "qlora-loftq": ["method=qlora", "lora.init=loftq"],
    "dora": ["method=lora", "lora.dora=true"],
    "lora-plus": ["method=lora", "lora.lr_ratio=16"],
    # not in the issue's table: LoRA with the frozen base stored in bf16 (issue 20's quality
    # check before `train.precision: auto` may pick bf16 on CPUs)
    "lora-bf16": ["method=lora", "train.precision=bf16"],
}


def train(name: str, overrides: list[str], out_dir: Path, extra: list[str]) -> dict:
    run_dir = out_dir / name
    if (run_dir / "summary.json").exists():
        print(f"[{name}] already trained: {run_dir}", flush=True)
    else:
        cmd = [sys.executable, "-m", "lorakit", "train", f"output_dir={run_dir}",
               "eval.after_train=false", *overrides, *extra]
        print("$", " ".join(cmd), flush=True)
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        print(f"[{name}] trained in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads((run_dir / "summary.json").read_text())


def accuracy(name: str, run_dir: Path, limit: int | None) -> dict:
    import torch

    from lorakit.config import load_config
    from lorakit.eval import metrics as M
    from lorakit.eval.adapters import use_model
    from lorakit.eval.compare import generate_answers, load_eval_examples
    from lorakit.eval.sql import EXAMPLE_DB, EXAMPLE_DIR
    from lorakit.models.load import load_model
    from lorakit.train import common

    cfg = load_config(run_dir / "config.yaml")
    items = load_eval_examples(EXAMPLE_DIR / "eval.jsonl", limit)
    t = time.perf_counter()
    if cfg.method == "full":
        model, tok = load_model(run_dir / "adapter", dtype=torch.float32)
        answers = generate_answers(model, tok, items, max_new_tokens=64, batch_size=16)
    else:
        from lorakit.lora.io import load_adapter

        device = common.default_device()
        model, tok = common.load_base_for_config(cfg, device, common.resolve_precision(
            cfg.train.precision, device))
        load_adapter(model, run_dir / "adapter", name="tuned", tokenizer=tok)
        with use_model(model, "tuned"):
            answers = generate_answers(model, tok, items, max_new_tokens=64, batch_size=16)
    sql = M.get_metric("sql", sql_db=EXAMPLE_DB)
    per = [sql.score(a, ex.reference)["sql"] for a, ex in zip(answers, items)]
    del model
    return {"accuracy": sum(per) / len(per), "ci": list(M.bootstrap_ci(per)),
            "correct": int(sum(per)), "n": len(per), "eval_seconds": round(time.perf_counter() - t, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated, from: " + ", ".join(ROWS))
    ap.add_argument("--out-dir", default="/tmp/quality")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--extra", nargs="*", default=[],
                    help="overrides added to every row (recorded as rows of their own, e.g. "
                         "--extra lora.dropout=0.05 for the default dropout)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    results_file = Path(__file__).parent / "results" / "quality_table.json"
    results = json.loads(results_file.read_text())["rows"] if results_file.exists() else {}
    for row in args.rows.split(","):
        # rows run with --extra are kept beside the plain ones, e.g. "lora lora.dropout=0.05"
        name = " ".join([row, *args.extra])
        folder = name.replace(" ", "_").replace("=", "-")
        summary = train(folder, ROWS[row], out_dir, args.extra)
        acc = accuracy(folder, out_dir / folder, args.limit)
        results[name] = {"overrides": ROWS[row] + args.extra, **acc,
                         "final_eval_loss": summary["final_eval_loss"],
                         "wall_time_s": summary["wall_time_s"], "steps": summary["steps"],
                         "peak_rss_gib": round(summary["peak_memory_bytes"] / 2**30, 2),
                         "trainable_parameters": summary["trainable_parameters"],
                         "precision": summary["precision"]}
        results_file.parent.mkdir(exist_ok=True)
        results_file.write_text(json.dumps({"rows": results}, indent=2) + "\n")
        r = results[name]
        print(f"[{name}] {100 * r['accuracy']:.0f}% (CI {100 * r['ci'][0]:.0f}-{100 * r['ci'][1]:.0f}) "
              f"eval loss {r['final_eval_loss']:.4f} {r['wall_time_s']:.0f} s {r['peak_rss_gib']} GiB",
              flush=True)
    full = results.get("full")
    print(f"\n{'row':<28} {'exec acc':>9} {'of full':>8} {'eval loss':>10} {'time s':>7} {'peak GiB':>9}")
    for name, r in results.items():
        rel = f"{100 * r['accuracy'] / full['accuracy']:.0f}%" if full and full["accuracy"] else "-"
        print(f"{name:<28} {100 * r['accuracy']:8.0f}% {rel:>8} {r['final_eval_loss']:10.4f} "
              f"{r['wall_time_s']:7.0f} {r['peak_rss_gib']:9.2f}")
    print(f"wrote {results_file}")


if __name__ == "__main__":
    main()
