"""lorakit vs TRL ``SFTTrainer`` + PEFT: the same LoRA fine-tune, one run, reported as ratios.

Both sides train the embedded default (SmolLM2-135M-Instruct) on the bundled text-to-SQL
train split with the same hyperparameters: LoRA r=16, alpha=32, dropout ``--dropout`` (default
0.05, lorakit's and PEFT's default; the bundled example config uses 0), all linear layers
of the decoder, 2 epochs, batch 8, lr 2e-4, cosine with 3% warm-up, max_length 256, AdamW,
no gradient checkpointing, seed 0; precision (``--precision``) each tool's default (lorakit
``train.precision=auto``, a bf16 frozen base on CPUs with native bf16; TRL's ``bf16`` default,
bf16 mixed precision over fp32 weights) or both float32. Both render the examples with the model's
chat template and put the loss on the answer only.

* lorakit: ``lorakit.train.sft.train`` with the bundled example config and ``data.packing=true``, and
  ``lorakit-unpacked`` (``data.packing=false``: one example per row, batch 8 examples, the
  same steps as TRL's unpacked run).
* TRL: ``SFTTrainer`` with ``peft_config=LoraConfig(...)`` on conversational prompt/completion
  data (``completion_only_loss``), run twice by default: ``packing=True`` (TRL's best-fit
  packing with position ids, the same rows-of-256 batches as lorakit) and ``packing=False``
  (what most people run).

Each side runs in its own Python process, started one after another, so that peak RSS
(``ru_maxrss`` of that process from ``os.wait4``) and wall time belong to it alone. Both
adapters are then scored by the *same* code: loaded into lorakit (whose PEFT loading is
tested to give PEFT's logits exactly) and evaluated on the 100 held-out examples, mean
cross-entropy per answer token.

Model FLOP utilisation: ``4 x parameters x tokens/s`` (forward 2, backward to the
activations 2; the frozen base gets no weight gradients) over the matmul peak of the dtype the
side's matmuls ran in, measured on this machine (a 2048^3 ``torch.mm``, best of 10).

Usage::

    .venv/bin/python bench/sft_vs_trl.py                  # all four sides (~35 min on 2 idle cores)
    .venv/bin/python bench/sft_vs_trl.py --epochs 0.25    # a quick look
    .venv/bin/python bench/sft_vs_trl.py --sides lorakit,trl-packed --json out.json
    .venv/bin/python bench/sft_vs_trl.py --sides lorakit-unpacked,trl-unpacked
    .venv/bin/python bench/sft_vs_trl.py --dropout 0      # the tuned setting (docs/benchmarks.md)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HP = {"r": 16, "alpha": 32, "batch_size": 8, "lr": 2e-4, "warmup": 0.03,
      "max_length": 256, "seed": 0}
SIDES = ("lorakit", "trl-packed", "trl-unpacked", "lorakit-unpacked")
# like for like: each TRL side is compared with the lorakit side that batches the same way
COUNTERPART = {"trl-packed": "lorakit", "trl-unpacked": "lorakit-unpacked"}


# ---------------------------------------------------------------------- shared measurement
def _examples(split: str) -> list[dict]:
    from lorakit.examples import SQL_DIR

    return [json.loads(line) for line in (SQL_DIR / f"{split}.jsonl").read_text().splitlines()
            if line.strip()]


def _token_counts(tokenizer) -> dict:
    """Tokens and answer tokens of one pass over the train split, as lorakit renders it."""
    from lorakit.data.formats import load_examples
    from lorakit.data.tokenize import tokenize_examples
    from lorakit.examples import SQL_DIR

    rows = tokenize_examples(load_examples(SQL_DIR / "train.jsonl").examples, tokenizer,
                             HP["max_length"], "all_assistant")
    return {"tokens": sum(len(r["input_ids"]) for r in rows),
            "supervised": sum(sum(l != -100 for l in r["labels"][1:]) for r in rows)}


def eval_loss_of(adapter_dir: Path) -> float:
    """Mean answer-token cross-entropy of an adapter (ours or PEFT's) on the held-out split."""
    import torch

    from lorakit.data.formats import load_examples
    from lorakit.data.tokenize import collate, pad_token_id, tokenize_examples
    from lorakit.examples import SQL_DIR
    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model
    from lorakit.train.common import supervised_loss

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    load_adapter(model, adapter_dir)
    model.eval()
    rows = tokenize_examples(load_examples(SQL_DIR / "eval.jsonl").examples, tokenizer,
                             HP["max_length"], "all_assistant")
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(rows), 8):
            batch = collate(rows[i:i + 8], pad_token_id(tokenizer))
            batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "attention_mask")}
            loss, n = supervised_loss(model, batch)
            total, count = total + float(loss), count + n
    return total / count


def matmul_peak_flops(n: int = 2048, repeats: int = 10, dtype=None) -> float:
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


# ---------------------------------------------------------------------- the two workers
def worker_lorakit(out: Path, epochs: float, packing: bool, dropout: float,
                   precision: str) -> dict:
    from lorakit.config import load_config
    from lorakit.examples import example_config
    from lorakit.train.sft import train

    run_dir = out.parent / "lorakit-run"
    cfg = load_config(None, [f"train.epochs={epochs}", f"output_dir={run_dir}",
                             f"data.packing={str(packing).lower()}", f"lora.dropout={dropout}",
                             f"train.precision={'fp32' if precision == 'fp32' else 'auto'}"],
                      base=example_config())
    t0 = time.perf_counter()
    result = train(cfg, progress=False, log=lambda m: None)
    setup_and_train = time.perf_counter() - t0
    s = result.summary
    return {"adapter": str(result.adapter_dir), "train_loop_s": s["wall_time_s"],
            "setup_and_train_s": setup_and_train, "steps": s["steps"],
            "final_train_loss": s["final_train_loss"], "parameters": s["total_parameters"],
            "precision": s["precision"]}


def worker_trl(out: Path, epochs: float, packing: bool, dropout: float, precision: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from lorakit.models.load import load_model

    torch.manual_seed(HP["seed"])
    # The same weights lorakit trains (the GGUF, dequantized once into lorakit's cache), as a
    # stock transformers model: TRL and PEFT see nothing of lorakit.
    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    train = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}],
         "completion": [{"role": "assistant", "content": r["completion"]}]}
        for r in _examples("train")])
    args = SFTConfig(
        output_dir=str(out.parent / "trl-run"), num_train_epochs=epochs,
        per_device_train_batch_size=HP["batch_size"], gradient_accumulation_steps=1,
        learning_rate=HP["lr"], lr_scheduler_type="cosine", warmup_steps=HP["warmup"],
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", max_length=HP["max_length"],
        packing=packing, completion_only_loss=True, gradient_checkpointing=False,
        # None: TRL's default (bf16 mixed precision unless fp16 is set, on CPU too)
        bf16=False if precision == "fp32" else None, use_cpu=True, seed=HP["seed"], data_seed=HP["seed"],
        save_strategy="no", eval_strategy="no", logging_steps=10, report_to="none",
        dataloader_num_workers=0, disable_tqdm=True)
    peft_config = LoraConfig(r=HP["r"], lora_alpha=HP["alpha"], lora_dropout=dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
    t0 = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=train,
                         processing_class=tokenizer, peft_config=peft_config)
    t1 = time.perf_counter()
    result = trainer.train()
    t2 = time.perf_counter()
    adapter = out.parent / "trl-adapter"
    trainer.model.save_pretrained(str(adapter))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {"adapter": str(adapter), "train_loop_s": t2 - t1, "setup_and_train_s": t2 - t0,
            "steps": result.global_step, "final_train_loss": losses[-1] if losses else None,
            "parameters": sum(p.numel() for p in trainer.model.parameters()),
            "precision": "bf16 autocast, fp32 weights" if args.bf16 else "fp32"}


def run_worker(side: str, out: Path, epochs: float, dropout: float, precision: str) -> None:
    t0 = time.perf_counter()
    if side.startswith("lorakit"):
        record = worker_lorakit(out, epochs, packing=side == "lorakit", dropout=dropout,
                                precision=precision)
    else:
        record = worker_trl(out, epochs, packing=side == "trl-packed", dropout=dropout,
                            precision=precision)
    record["process_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(record))


# ---------------------------------------------------------------------- the driver
def run_side(side: str, epochs: float, dropout: float, precision: str, workdir: Path) -> dict:
    out = workdir / side / "result.json"
    out.parent.mkdir(parents=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--worker", side, "--out", str(out),
                             "--epochs", str(epochs), "--dropout", str(dropout),
                             "--precision", precision])
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"{side} failed (wait status {status})")
    record = json.loads(out.read_text())
    record.update(side=side, wall_s=wall, peak_rss_bytes=usage.ru_maxrss * 1024)
    # scored in a process of its own, so the training process's peak RSS is training only
    scored = subprocess.run([sys.executable, __file__, "--eval-adapter", record["adapter"]],
                            check=True, capture_output=True, text=True)
    record["eval_loss"] = float(scored.stdout.strip().splitlines()[-1])
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--dropout", type=float, default=0.05,
                   help="lora.dropout on both sides (default 0.05, what users run)")
    p.add_argument("--precision", choices=["default", "fp32"], default="default",
                   help="default: each tool's own default (lorakit train.precision=auto: a bf16 "
                        "base on CPUs with native bf16; TRL: bf16 mixed precision); fp32: both "
                        "pinned to float32")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma list of {', '.join(SIDES)}")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--eval-adapter", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.eval_adapter:
        print(eval_loss_of(args.eval_adapter))
        return
    if args.worker:
        run_worker(args.worker, args.out, args.epochs, args.dropout, args.precision)
        return

    import torch

    from lorakit.models.load import load_tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    counts = _token_counts(load_tokenizer("smollm2-135m-instruct"))
    peak = matmul_peak_flops()
    peak_bf16 = matmul_peak_flops(dtype=torch.bfloat16)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    results = {}
    with tempfile.TemporaryDirectory(prefix="lorakit-bench-") as tmp:
        for side in sides:
            print(f"running {side} ...", file=sys.stderr, flush=True)
            r = run_side(side, args.epochs, args.dropout, args.precision, Path(tmp))
            r["supervised_tokens_per_s"] = counts["supervised"] * args.epochs / r["train_loop_s"]
            r["tokens_per_s"] = counts["tokens"] * args.epochs / r["train_loop_s"]
            # against the peak of the dtype its matmuls ran in
            r["mfu"] = 4 * r["parameters"] * r["tokens_per_s"] / (
                peak if r["precision"] == "fp32" else peak_bf16)
            results[side] = r

    print(f"\nSmolLM2-135M, LoRA r=16 all-linear, dropout {args.dropout:g}, {args.epochs:g} epochs on "
          f"{len(_examples('train'))} examples ({counts['tokens']:,} tokens, "
          f"{counts['supervised']:,} answer tokens per epoch); matmul peak float32 "
          f"{peak / 1e9:.0f} / bfloat16 {peak_bf16 / 1e9:.0f} GFLOP/s; {os.cpu_count()} CPU threads, torch {torch.__version__}\n")
    head = (f"{'side':<14}{'wall s':>8}{'loop s':>8}{'steps':>6}{'ans tok/s':>10}"
            f"{'tok/s':>8}{'MFU':>7}{'peak RSS':>10}{'train loss':>11}{'eval loss':>10}")
    print(head)
    for side, r in results.items():
        print(f"{side:<14}{r['wall_s']:>8.0f}{r['train_loop_s']:>8.0f}{r['steps']:>6}"
              f"{r['supervised_tokens_per_s']:>10.0f}{r['tokens_per_s']:>8.0f}"
              f"{100 * r['mfu']:>6.1f}%{r['peak_rss_bytes'] / 2**30:>8.2f}Gi"
              f"{(r['final_train_loss'] or float('nan')):>11.4f}{r['eval_loss']:>10.4f}"
              f"  {r['precision']}")
    for side, r in results.items():
        # its like-for-like lorakit side if that ran, else the packed lorakit side
        mine = next((m for m in (COUNTERPART.get(side), "lorakit") if m in results), None)
        if side in COUNTERPART and mine is not None:
            ours = results[mine]
            print(f"\n{mine} vs {side}: wall time {r['wall_s'] / ours['wall_s']:.2f}x faster, "
                  f"training loop {r['train_loop_s'] / ours['train_loop_s']:.2f}x faster, "
                  f"answer tokens/s {ours['supervised_tokens_per_s'] / r['supervised_tokens_per_s']:.2f}x, "
                  f"peak RSS {ours['peak_rss_bytes'] / r['peak_rss_bytes']:.2f}x, "
                  f"eval loss {ours['eval_loss']:.4f} vs {r['eval_loss']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"epochs": args.epochs, "dropout": args.dropout,
                                         "precision": args.precision,
                                         "matmul_peak_flops": peak,
                                         "matmul_peak_flops_bf16": peak_bf16,
                                         "counts": counts, "results": results}, indent=2))


if __name__ == "__main__":
    main()
