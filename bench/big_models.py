"""Peak memory of LoRA vs QLoRA training on big random-weight Llama checkpoints, against
``lorakit estimate``.

The checkpoint is written once by ``tests/checkpoints.py`` (bf16 safetensors shards, shard by
shard, never the whole model in memory). Each run is a fresh process
(``lorakit.plan.measure``): the model is loaded as ``lorakit train`` loads it
(``lorakit.train.sft.setup_model``: streaming 4-bit load for QLoRA), lorakit's AdamW, random
rows of ``--seq-len`` tokens, every token supervised. Reported: the load's peak and the steps'
peak RSS above the process's size before loading (torch and lorakit imported), their max
(the run's peak), the absolute peak, and the estimate for the same settings.

    .venv/bin/python bench/big_models.py --ckpt /work/bigckpt/tinyllama   # ~5-15 min on 2 cores
    .venv/bin/python bench/big_models.py --ckpt /work/bigckpt/llama2-7b --preset llama2-7b \\
        --methods qlora --grad-checkpointing --steps 2 --max-rss-gib 20

Measured (CPU, fp32 compute; docs/benchmarks.md): TinyLlama shapes (1.1B parameters) at 128
tokens LoRA 5.0 GiB / QLoRA 2.4 GiB; Llama-2-7B shapes QLoRA + checkpointing 5.8 GiB, which also
needs 13.5 GB of disk for the bf16 checkpoint (27 GB in fp32: more than a 24 GiB machine holds).
Prints a Markdown table and writes JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GIB = 2**30


def ensure_checkpoint(path: Path, preset: str, shard_mib: int) -> dict:
    from checkpoints import PRESETS, llama_config, write_llama_checkpoint

    index = path / "model.safetensors.index.json"
    if index.is_file() and (path / "config.json").is_file():
        total = json.loads(index.read_text())["metadata"]["total_size"]
        return {"path": path, "total_bytes": total, "written": False}
    started = time.perf_counter()
    info = write_llama_checkpoint(path, llama_config(**PRESETS[preset]),
                                  shard_bytes=shard_mib * 2**20)
    info["written"] = True
    info["seconds"] = round(time.perf_counter() - started, 1)
    return info


def run(args) -> list[dict]:
    from lorakit.plan.estimate import estimate
    from lorakit.plan.measure import MeasureSpec, measure_in_subprocess

    ckpt = ensure_checkpoint(Path(args.ckpt), args.preset, args.shard_mib)
    print(f"checkpoint {ckpt['path']}: {ckpt['total_bytes'] / 1e9:.2f} GB bf16"
          + (f" (written in {ckpt['seconds']} s)" if ckpt["written"] else ""), file=sys.stderr)
    rows = []
    for method in args.methods.split(","):
        est = estimate(str(ckpt["path"]), method=method, r=args.r, target_modules="all-linear",
                       seq_len=args.seq_len, batch_size=args.batch_size,
                       grad_checkpointing=args.grad_checkpointing, optimizer="adamw",
                       precision="fp32", lora_dropout=args.dropout, device="cpu")
        spec = MeasureSpec(model=str(ckpt["path"]), method=method, r=args.r,
                           target_modules="all-linear", lora_dropout=args.dropout,
                           seq_len=args.seq_len, batch_size=args.batch_size,
                           grad_checkpointing=args.grad_checkpointing, steps=args.steps,
                           precision="fp32", max_rss_gib=args.max_rss_gib)
        print(f"{method}: estimate {est.memory_gib()['total']:.2f} GiB; measuring...",
              file=sys.stderr)
        started = time.perf_counter()
        got = measure_in_subprocess(spec, timeout=args.timeout)
        run_peak = max(got["peak_delta_bytes"], got["load_peak_delta_bytes"])
        row = {"method": method, "parameters": est.parameters,
               "adapter_parameters": est.adapter_parameters,
               "settings": {"seq_len": args.seq_len, "batch_size": args.batch_size, "r": args.r,
                            "target_modules": "all-linear", "lora_dropout": args.dropout,
                            "grad_checkpointing": args.grad_checkpointing, "optimizer": "adamw",
                            "precision": "fp32", "steps": args.steps},
               "load_peak_gib": got["load_peak_delta_bytes"] / GIB,
               "step_peak_gib": got["peak_delta_bytes"] / GIB, "run_peak_gib": run_peak / GIB,
               "absolute_peak_gib": (run_peak + got["baseline_bytes"]) / GIB,
               "baseline_gib": got["baseline_bytes"] / GIB,
               "estimate_gib": est.memory_bytes["total"] / GIB,
               "estimate_parts_gib": est.memory_gib(),
               "error": est.memory_bytes["total"] / run_peak - 1,
               "load_seconds": got["load_seconds"], "step_seconds": got["step_seconds"],
               "losses": got["losses"], "wall_seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (written if absent)")
    parser.add_argument("--preset", default="tinyllama-1.1b",
                        choices=["tinyllama-1.1b", "llama2-7b"])
    parser.add_argument("--shard-mib", type=int, default=1024)
    parser.add_argument("--methods", default="lora,qlora")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--max-rss-gib", type=float, default=20.0)
    parser.add_argument("--timeout", type=float, default=7200)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    print("| method | load peak | step peak | run peak (absolute) | estimate | error | load s | step s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['load_peak_gib']:.2f} GiB | {r['step_peak_gib']:.2f} GiB | "
              f"{r['run_peak_gib']:.2f} GiB ({r['absolute_peak_gib']:.2f}) | "
              f"{r['estimate_gib']:.2f} GiB | {r['error']:+.1%} | {r['load_seconds']:.0f} | "
              f"{r['step_seconds']:.0f} |")
    if len(rows) == 2:
        print(f"\nQLoRA / LoRA run peak: {rows[1]['run_peak_gib'] / rows[0]['run_peak_gib']:.2f}")


if __name__ == "__main__":
    main()
