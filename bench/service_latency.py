"""Chat latency of `lorakit serve` while a fine-tuning job trains, against idle.

One real server on loopback (uvicorn, the jobs API, a worker process per job). First N chat
requests one after another with nothing training (idle); then a job is started on the bundled
SQL example data and, once its first step is logged, the same N requests run while it trains;
the job is then cancelled. Prints p50 / p95 / max latency of both phases and the number of
training steps done meanwhile, as JSON.

    .venv/bin/python bench/service_latency.py [--model smollm2-135m-instruct] [--requests 20]

Bounded in count and time; never leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=600)
    args = parser.parse_args()

    import numpy as np
    import openai

    from lorakit.jobs.api import create_service_app
    from lorakit.jobs.manager import JobManager
    from lorakit.models.load import load_model
    from lorakit.serve.api import ServerThread
    from lorakit.serve.engine import Engine

    data = Path(__file__).resolve().parent.parent / "lorakit" / "examples" / "sql" / "train.jsonl"
    state = Path(tempfile.mkdtemp(prefix="lorakit-service-bench-"))
    model, tokenizer = load_model(args.model)
    engine = Engine(model, tokenizer, base_name="base")
    manager = JobManager(state, engine, base_model=args.model, base_name="base")
    app = create_service_app(engine, manager, ui=False)
    started = time.monotonic()
    with ServerThread(app) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0,
                               timeout=600)
        prompts = [f"Write a SQL query that counts the rows of table t{i}." for i in
                   range(args.requests)]

        def phase() -> list[float]:
            out = []
            for prompt in prompts:
                t0 = time.perf_counter()
                client.chat.completions.create(model="base", max_tokens=args.tokens,
                                               temperature=0, extra_body={"ignore_eos": True},
                                               messages=[{"role": "user", "content": prompt}])
                out.append(time.perf_counter() - t0)
            return out

        phase()  # warm-up
        idle = phase()
        file = client.files.create(file=open(data, "rb"), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model="base", training_file=file.id, seed=0,
                                             hyperparameters={"batch_size": 2, "n_epochs": 1},
                                             extra_body={"lorakit": {"checkpoint_every": 1000,
                                                                     "packing": False,
                                                                     "max_length": 256}})
        while not any(e.type == "metrics" for e in client.fine_tuning.jobs.list_events(job.id)):
            if time.monotonic() - started > args.time_limit:
                raise SystemExit("the job did not start training in time")
            time.sleep(0.5)
        steps_before = _steps(client, job.id)
        busy = phase()
        steps_after = _steps(client, job.id)
        still = client.fine_tuning.jobs.retrieve(job.id).status
        client.fine_tuning.jobs.cancel(job.id)

    def stats(xs):
        return {"p50_s": round(float(np.percentile(xs, 50)), 3),
                "p95_s": round(float(np.percentile(xs, 95)), 3), "max_s": round(max(xs), 3)}

    manager.stop()
    engine.stop()
    print(json.dumps({"model": args.model, "requests": args.requests, "max_tokens": args.tokens,
                      "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 1),
                      "idle": stats(idle), "while_training": stats(busy),
                      "training_steps_during_phase": steps_after - steps_before,
                      "job_status_at_end_of_phase": still}, indent=2))


def _steps(client, job_id: str) -> int:
    steps = [e.data["step"] for e in client.fine_tuning.jobs.list_events(job_id, limit=1000)
             if e.type == "metrics"]
    return max(steps, default=0)


if __name__ == "__main__":
    main()
