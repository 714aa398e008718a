"""Few-shot example selection: lorakit's sparse TF-IDF index against the dense documents x
vocabulary matrices it replaced (lorakit 3dc8b3c), one run, peak RSS and time as ratios.

Each side runs in a fresh process (its peak RSS, VmHWM after a reset, is its own) and selects
``--k`` shots for ``--queries`` questions among ``--shots`` training prompts of the bundled
SQL example (cycled, each made distinct by its index, the way a real training set differs).

    .venv/bin/python bench/bench_fewshot.py [--shots 2000] [--queries 200] [--k 3]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _prompts(n: int) -> list[str]:
    from lorakit.examples import SQL_DIR

    rows = [json.loads(line) for line in
            (SQL_DIR / "train.jsonl").read_text().splitlines() if line.strip()]
    texts = [r.get("prompt") or r["messages"][0]["content"] for r in rows]
    return [f"{texts[i % len(texts)]} (case {i})" for i in range(n)]


def worker(side: str, shots: int, queries: int, k: int) -> dict:
    import numpy as np

    from lorakit.plan.measure import reset_peak_rss, rss_bytes

    docs = _prompts(shots)
    questions = _prompts(shots + queries)[shots:]
    reset_peak_rss()
    before = rss_bytes("VmRSS")
    t0 = time.perf_counter()
    if side == "lorakit":
        from lorakit.eval.fewshot import Shot, select_shots

        shots_ = [Shot([{"role": "user", "content": d}], "", ("train", i)) for i, d in enumerate(docs)]
        picked = select_shots(shots_, questions, k)
    else:  # the dense implementation it replaced, from git history (3dc8b3c)
        sys.path.insert(0, sys.argv[sys.argv.index("--old") + 1])
        from old_fewshot import tfidf_similarity

        sims = tfidf_similarity(questions, docs)
        picked = [[int(i) for i in np.argsort(-np.round(row, 12), kind="stable")[:k][::-1]]
                  for row in sims]  # the tie rule as lorakit applies it
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_extra_bytes": rss_bytes("VmHWM") - before, "picked": picked}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shots", type=int, default=2000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--old", help="folder holding old_fewshot.py (git show 3dc8b3c:lorakit/eval/"
                                 "fewshot.py > DIR/old_fewshot.py)")
    p.add_argument("--worker", choices=["lorakit", "dense"])
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.shots, args.queries, args.k)))
        return
    sides = ["lorakit"] + (["dense"] if args.old else [])
    results = {}
    for side in sides:
        cmd = [sys.executable, __file__, "--worker", side, "--shots", str(args.shots),
               "--queries", str(args.queries), "--k", str(args.k)]
        if args.old:
            cmd += ["--old", args.old]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        results[side] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{args.shots} shots, {args.queries} questions, k={args.k}")
    for side, r in results.items():
        print(f"{side:8s} {r['seconds']:7.2f} s  peak +{r['peak_extra_bytes'] / 2**20:8.1f} MiB")
    if "dense" in results:
        ours, theirs = results["lorakit"], results["dense"]
        same = ours["picked"] == theirs["picked"]
        print(f"lorakit / dense: time {ours['seconds'] / theirs['seconds']:.2f}x, peak memory "
              f"{ours['peak_extra_bytes'] / max(theirs['peak_extra_bytes'], 1):.3f}x; "
              f"same shots picked: {same}")


if __name__ == "__main__":
    main()
