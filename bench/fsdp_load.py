"""Per-rank memory of an FSDP run against one process, on a big random-weight Llama checkpoint
(issue 18: "a rank never holds more than its share of the base plus one layer in flight").

Writes the checkpoint once (``tests/checkpoints.py``, bf16 shards; TinyLlama-1.1B shapes by
default), then trains one step of LoRA or QLoRA (``--method``; r=16 all-linear, batch 1 per process, 128-token rows)
twice, each as a user runs it: ``lorakit train`` (one process) and ``lorakit train --nproc N
train.strategy=fsdp`` (N processes, gloo on CPU). Reports from each run's summary.json the
load's peak above the resident size before it (model built, adapter added, sharded) and the
whole run's peak, per rank.

    .venv/bin/python bench/fsdp_load.py --ckpt /tmp/bigckpt/tinyllama [--nproc 2] [--precision fp32]
    .venv/bin/python bench/fsdp_load.py --ckpt /tmp/bigckpt/tinyllama --method qlora

``--mmap-threshold BYTES`` runs both with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed (torchrun's
ranks inherit it; docs/hardware.md); ``--steps N`` trains N steps, and each run's training-loop
time (summary.json ``wall_time_s``) is reported beside its peaks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
GIB = 2**30


def main() -> None:
    from checkpoints import PRESETS, llama_config, write_llama_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", default="/tmp/bigckpt/tinyllama")
    ap.add_argument("--preset", default="tinyllama-1.1b", choices=sorted(PRESETS))
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--method", default="lora", choices=["lora", "qlora"],
                    help="qlora: an NF4 base, which each rank also loads sharded")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--mmap-threshold", type=int, default=None, metavar="BYTES",
                    help="fix glibc's mmap threshold (MALLOC_MMAP_THRESHOLD_) for both runs")
    ap.add_argument("--out", default=None,
                    help="default bench/results/fsdp_load.json (lora), fsdp_load_qlora.json")
    args = ap.parse_args()
    args.out = args.out or str(ROOT / "bench" / "results" / (
        "fsdp_load.json" if args.method == "lora" else f"fsdp_load_{args.method}.json"))
    ckpt = Path(args.ckpt)
    if not (ckpt / "model.safetensors.index.json").is_file():
        t = time.perf_counter()
        write_llama_checkpoint(ckpt, llama_config(**PRESETS[args.preset]), shard_bytes=500 * 2**20)
        print(f"wrote {ckpt} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    vocab = PRESETS[args.preset]["vocab_size"]
    data = ckpt.parent / "fsdp_load_train.jsonl"
    rows = [{"prompt": " ".join(f"w{3 + (i * 37 + j * 11) % (vocab - 3)}" for j in range(96)),
             "completion": " ".join(f"w{3 + (i * 53 + j * 7) % (vocab - 3)}" for j in range(31))}
            for i in range(16)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    params = sum(json.loads((ckpt / "model.safetensors.index.json").read_text())["metadata"]
                 .values()) // 2  # bf16 bytes / 2
    common = [f"model={ckpt}", f"method={args.method}", f"data.train={data}", "data.max_length=128", "data.packing=false",
              "train.grad_accum=1", f"train.precision={args.precision}", "lora.r=16",
              "lora.alpha=32", f"train.max_steps={args.steps}", "train.save_every=null",
              "train.eval_every=null", "eval.after_train=false", "--no-progress"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.mmap_threshold)
    runs = {}
    for name, extra, nproc in (("one process", ["train.batch_size=" + str(args.nproc)], None),
                               (f"fsdp x{args.nproc}", ["train.batch_size=1",
                                                        "train.strategy=fsdp"], args.nproc)):
        out = ckpt.parent / f"fsdp_load_run_{nproc or 1}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        cmd = [sys.executable, "-m", "lorakit", "train", f"output_dir={out}", *common, *extra]
        if nproc:
            cmd += ["--nproc", str(nproc)]
        t = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stderr[-4000:])
        summary = json.loads((out / "summary.json").read_text())
        per = summary.get("per_rank") or {"load_peak_memory_bytes": [summary["load_peak_memory_bytes"]],
                                          "peak_memory_bytes": [summary["peak_memory_bytes"]]}
        runs[name] = {"seconds": round(time.perf_counter() - t, 1),
                      "loop_seconds": summary.get("wall_time_s"),
                      "sharded_load": summary.get("fsdp_sharded_load"),
                      "load_peak_gib": [round(b / GIB, 3) for b in per["load_peak_memory_bytes"]],
                      "run_peak_gib": [round(b / GIB, 3) for b in per["peak_memory_bytes"]]}
        print(name, runs[name], file=sys.stderr)
    result = {"checkpoint": str(ckpt), "parameters": params, "precision": args.precision,
              "method": args.method, "steps": args.steps, "mmap_threshold": args.mmap_threshold,
              "fp32_base_gib": round(params * 4 / GIB, 3), "runs": runs}
    Path(args.out).parent.mkdir(exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    one, many = runs["one process"], runs[f"fsdp x{args.nproc}"]
    print(f"| run | load peak per rank (GiB) | run peak per rank (GiB) | loop s |\n|---|---|---|---|")
    for name, r in runs.items():
        print(f"| {name} | {', '.join(map(str, r['load_peak_gib']))} | "
              f"{', '.join(map(str, r['run_peak_gib']))} | {r['loop_seconds']} |")
    print(f"load peak per rank / one process: "
          f"{max(many['load_peak_gib']) / one['load_peak_gib'][0]:.2f}x")


if __name__ == "__main__":
    main()
