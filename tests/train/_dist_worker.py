"""Run by tests/train/test_distributed.py under ``torchrun --nproc-per-node 2`` (gloo, CPU).

One launch does several runs, because starting processes is the expensive part:

    python -m torch.distributed.run --standalone --nproc-per-node 2 _dist_worker.py PLAN.json

PLAN.json lists ``{"name": ..., "overrides": [...]}``; each is trained with
``lorakit.train.sft.train`` in both processes. Every log line goes to stdout prefixed with the
rank that printed it, so the test can check that only rank 0 speaks.

A run may also say ``"rank1_call": N, "rank1_does": "sigint" | "nan"``: on rank 1 only, the
N-th loss computation sends this process SIGINT (as Ctrl-C would) or returns NaN, to check
that both ranks stop together.
"""

import json
import os
import signal
import sys

import torch.distributed as dist

from lorakit.config import load_config
from lorakit.train import common
from lorakit.train.common import TrainingError
from lorakit.train.sft import train


def _sabotage(rank: int, run: dict):
    """Replace the loss on rank 1 so that its N-th call misbehaves; returns the original."""
    real = common.supervised_loss
    if rank != 1 or "rank1_call" not in run:
        return real
    calls = {"n": 0}

    def loss(model, batch, **kwargs):
        loss_sum, n = real(model, batch, **kwargs)
        calls["n"] += 1
        if calls["n"] == run["rank1_call"]:
            if run["rank1_does"] == "sigint":
                signal.raise_signal(signal.SIGINT)
            else:
                loss_sum = loss_sum * float("nan")
        return loss_sum, n

    common.supervised_loss = loss
    return real


def main(plan_path: str) -> None:
    rank = int(os.environ["RANK"])
    # one process group for all the runs (the recipe reuses it and leaves it open)
    dist.init_process_group("gloo")
    for run in json.loads(open(plan_path).read()):
        cfg = load_config(None, run["overrides"])
        real = _sabotage(rank, run)
        try:
            result = train(cfg, progress=False,
                           log=lambda m: print(f"[rank{rank}] {m}", flush=True))
        except TrainingError as exc:
            print(f"[error rank{rank}] {run['name']}: {exc}", flush=True)
            continue
        finally:
            common.supervised_loss = real
        if result.interrupted:
            print(f"[interrupted rank{rank}] {run['name']}", flush=True)
            continue
        print(f"[done rank{rank}] {run['name']} steps={result.summary['steps']} "
              f"world_size={result.summary['world_size']}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
