"""Run by tests/train/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch does several runs, because starting processes is the expensive part:

    python -m torch.distributed.run --standalone --nproc-per-node 2 _dist_worker.py PLAN.json

PLAN.json lists ``{"name": ..., "overrides": [...]}``; each is trained with
``lorakit.train.sft.train`` in both processes. Every log line goes to stdout prefixed with the
rank that printed it, so the test can check that only rank 0 speaks.
"""

import json
import os
import sys

import torch.distributed as dist

from lorakit.config import load_config
from lorakit.train.sft import train


def main(plan_path: str) -> None:
    rank = int(os.environ["RANK"])
    # one process group for all the runs (the recipe reuses it and leaves it open)
    dist.init_process_group("gloo")
    for run in json.loads(open(plan_path).read()):
        cfg = load_config(None, run["overrides"])
        result = train(cfg, progress=False, log=lambda m: print(f"[rank{rank}] {m}", flush=True))
        print(f"[done rank{rank}] {run['name']} steps={result.summary['steps']} "
              f"world_size={result.summary['world_size']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
