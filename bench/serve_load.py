"""A small load test of the real server on loopback: 200 requests from 16 concurrent clients
(official openai client), random adapters, greedy; reports errors and p50/p99 latency.

Bounded in count and time; never leaves 127.0.0.1.

    .venv/bin/python bench/serve_load.py [--model smollm2-135m-instruct] [--requests 200]
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=900, help="seconds, then stop")
    args = parser.parse_args()

    import numpy as np
    import openai

    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread, create_app
    from lorakit.serve.engine import Engine
    from serve_mixed import make_adapters

    base, tokenizer = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(base, tokenizer, Path(tmp), args.adapters, 16)
        engine = Engine(copy.deepcopy(base), tokenizer, base_name="base",
                        max_loaded_adapters=args.adapters, max_batch_size=args.clients)
        for i, path in enumerate(paths):
            engine.add_adapter(f"ad{i}", path, wait=False)
        server = ServerThread(create_app(engine, api_key="bench")).start()
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="bench", max_retries=0,
                               timeout=args.time_limit)
        rng = random.Random(0)
        models = ["base"] + [f"ad{i}" for i in range(args.adapters)]
        jobs = [(rng.choice(models), f"Question {i}: what is {rng.randint(2, 99)} squared?")
                for i in range(args.requests)]
        deadline = time.monotonic() + args.time_limit

        def one(job):
            if time.monotonic() > deadline:
                return None, "skipped: time limit"
            start = time.perf_counter()
            try:
                client.chat.completions.create(model=job[0], max_tokens=args.tokens, temperature=0,
                                               messages=[{"role": "user", "content": job[1]}])
            except Exception as exc:  # noqa: BLE001 - counted
                return None, repr(exc)
            return time.perf_counter() - start, None

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, jobs))
        wall = time.perf_counter() - start
        server.stop()
        engine.stop()
    latencies = np.array([r[0] for r in results if r[0] is not None])
    errors = [r[1] for r in results if r[1]]
    print(json.dumps({
        "model": args.model, "requests": args.requests, "clients": args.clients,
        "adapters": args.adapters, "max_tokens": args.tokens, "errors": len(errors),
        "first_errors": errors[:3], "wall_seconds": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_p50_s": round(float(np.percentile(latencies, 50)), 2) if len(latencies) else None,
        "latency_p99_s": round(float(np.percentile(latencies, 99)), 2) if len(latencies) else None,
    }, indent=2))


if __name__ == "__main__":
    main()
