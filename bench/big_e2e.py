"""The whole QLoRA workflow on a model this machine cannot hold in 16-bit: ``lorakit train``
(QLoRA + gradient checkpointing, a few steps, the adapter written) and ``lorakit merge`` of
that adapter (merged layer by layer, parity gate included), each command in a process of its
own, with its peak RSS.

The base is a random-weight checkpoint written once by ``tests/checkpoints.py`` (bf16
safetensors shards; Llama-2-7B shapes: 6.74B parameters, 13.5 GB, 27 GB in float32, more than
a 24 GiB machine holds). The data are random sentences over the checkpoint's word-level
tokenizer, so every row has ``--seq-len`` tokens. Peak RSS is each command's own high-water
mark (``getrusage(RUSAGE_CHILDREN)`` of a wrapper that runs only that command), absolute, not
above a baseline: what ``ps`` would show at its worst, imports included.

    .venv/bin/python bench/big_e2e.py --ckpt /work/bigckpt/llama2-7b --preset llama2-7b \\
        --out bench/results/big_e2e_7b.json          # ~45 min on 2 cores

Results in docs/hardware.md and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
GIB = 2**30

# runs argv in a child and prints the child's peak RSS (KiB on Linux) as the last line
_WRAP = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
         "print(f'MAXRSS {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss} {rc}', "
         "file=sys.stderr)")


def timed(cmd: list[str], log: Path) -> dict:
    """Run ``cmd``; its wall time, exit status and peak RSS; output to ``log``."""
    started = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-c", _WRAP, *cmd], stdout=f,
                              stderr=subprocess.STDOUT, cwd=ROOT)
    wall = time.perf_counter() - started
    last = [line for line in log.read_text().splitlines() if line.startswith("MAXRSS ")][-1]
    kib, rc = (int(x) for x in last.split()[1:])
    if done.returncode or rc:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return {"command": " ".join(cmd), "wall_seconds": round(wall, 1),
            "peak_rss_gib": kib * 1024 / GIB}


def write_data(path: Path, vocab: int, rows: int, words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(rows):
            say = lambda n: " ".join(f"w{rng.randrange(3, vocab)}" for _ in range(n))  # noqa: E731
            f.write(json.dumps({"prompt": say(words // 2), "completion": say(words // 2)}) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True, help="checkpoint folder (written if absent)")
    parser.add_argument("--preset", default="llama2-7b")
    parser.add_argument("--work", default="/tmp/big_e2e", help="run folder, data, merged model")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--merge-dtype", default="bf16")
    parser.add_argument("--out", default=None, help="write the result as JSON here")
    args = parser.parse_args()

    from big_models import ensure_checkpoint

    from lorakit.plan.estimate import estimate

    ckpt = ensure_checkpoint(Path(args.ckpt), args.preset, 1024)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    vocab = json.loads((Path(args.ckpt) / "config.json").read_text())["vocab_size"]
    # the word-level tokenizer: one token per word; ~2 template tokens per row besides
    write_data(work / "train.jsonl", vocab, rows=8 * args.steps, words=args.seq_len - 4)
    settings = {"model": str(ckpt["path"]), "method": "qlora",
                "lora.r": args.r, "lora.target_modules": "all-linear", "lora.dropout": 0.05,
                "data.train": str(work / "train.jsonl"), "data.max_length": args.seq_len,
                "data.packing": "false", "train.batch_size": 1, "train.max_steps": args.steps,
                "train.grad_checkpointing": "true", "train.precision": "fp32",
                "eval.after_train": "false", "output_dir": str(work / "run")}
    est = estimate(str(ckpt["path"]), method="qlora", r=args.r, target_modules="all-linear",
                   seq_len=args.seq_len, batch_size=1, grad_checkpointing=True,
                   optimizer="adamw", precision="fp32", lora_dropout=0.05, device="cpu")
    lorakit = str(Path(sys.executable).with_name("lorakit"))
    train = timed([lorakit, "train", "--no-progress", *(f"{k}={v}" for k, v in settings.items())],
                  work / "train.log")
    summary = json.loads((work / "run" / "summary.json").read_text())
    adapter = work / "run" / "adapter"
    print(f"train: {train}", file=sys.stderr)
    merge = timed([lorakit, "merge", "--adapter", str(adapter), "--out", str(work / "merged"),
                   "--dtype", args.merge_dtype, "--overwrite", "--json"], work / "merge.log")
    log = (work / "merge.log").read_text()
    report = json.loads(log[log.index("{"):log.rindex("}") + 1])
    print(f"merge: {merge}", file=sys.stderr)
    result = {"checkpoint": {"path": str(ckpt["path"]), "bytes": ckpt["total_bytes"],
                             "preset": args.preset, "parameters": est.parameters},
              "settings": settings, "estimate_gib": est.memory_bytes["total"] / GIB,
              "estimate_parts_gib": est.memory_gib(), "train": train,
              "train_summary": {k: summary.get(k) for k in (
                  "steps", "final_train_loss", "precision", "precision_reason", "wall_time_s",
                  "tokens_per_s", "peak_memory_bytes", "load_peak_memory_bytes",
                  "trainable_parameters")},
              "losses": [json.loads(line)["loss"] for line in
                         (work / "run" / "metrics.jsonl").read_text().splitlines()
                         if '"loss"' in line and '"step"' in line],
              "adapter_bytes": sum(p.stat().st_size for p in adapter.iterdir()),
              "merge": merge, "merge_report": report,
              "merged_bytes": sum(p.stat().st_size for p in (work / "merged").iterdir())}
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
