"""The training process of one fine-tuning job: ``python -m lorakit.jobs.worker STATE JOB``.

Started by :class:`lorakit.jobs.manager.JobManager`; never by hand. It builds a run config from
the job row, runs the recipe in its run folder with ``resume=true`` (so a job interrupted by a
crash continues from its last checkpoint), optionally evaluates the adapter on the validation
file, and writes ``result.json`` (``succeeded`` / ``interrupted`` / ``failed``) for the manager.
The recipe runs in this process's main thread, so SIGTERM (cancel) reaches its stop flag: the
current step finishes, a checkpoint is written and the recipe returns.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import sys
import threading
import time
import traceback
from pathlib import Path

from lorakit.errors import ConfigError, DataError, LorakitError

_STEPS = re.compile(r", (\d+) steps, ")


def build_config(job: dict, store) -> "RunConfig":  # noqa: F821
    """The recipe's run config for ``job`` (its run folder, data files, hyperparameters)."""
    from lorakit.config import load_config
    from lorakit.jobs.protocol import BASE_LR

    hp, opts = json.loads(job["hyperparameters"]), json.loads(job["lorakit"])
    method = json.loads(job["method"])
    r = opts.get("lora_r", 16)
    every = opts.get("checkpoint_every", 10)
    data = {"train": store.get_file(job["training_file"], None)["path"],
            "max_length": opts.get("max_length", 1024), "packing": opts.get("packing", True)}
    train = {"epochs": hp["n_epochs"], "batch_size": hp["batch_size"],
             "lr": BASE_LR * hp["learning_rate_multiplier"], "seed": job["seed"],
             "save_every": every, "keep_checkpoints": 3, "log_every": 1}
    if opts.get("max_steps"):
        train["max_steps"] = opts["max_steps"]
    if job["validation_file"]:
        data["eval"] = store.get_file(job["validation_file"], None)["path"]
        train["eval_every"] = every
    # resume from the last checkpoint when there is one; otherwise start clean (a crash before
    # the first checkpoint leaves a config.yaml the recipe would refuse to overwrite)
    from lorakit.train.common import list_checkpoints

    resume = bool(list_checkpoints(Path(job["run_dir"])))
    if not resume:
        for name in ("config.yaml", "metrics.jsonl"):
            (Path(job["run_dir"]) / name).unlink(missing_ok=True)
    base = {"model": job["base_model"],
            "method": "qlora" if opts.get("quantization") == "nf4" else "lora",
            "lora": {"r": r, "alpha": opts.get("lora_alpha", 2 * r),
                     **({"dropout": opts["lora_dropout"]} if "lora_dropout" in opts else {})},
            "data": data, "train": train, "output_dir": job["run_dir"], "resume": resume}
    if method["type"] == "dpo":
        beta = (method.get("dpo") or {}).get("hyperparameters", {}).get("beta")
        return _dpo_config({**base, "quantization_nf4": opts.get("quantization") == "nf4"}, beta)
    return load_config(base=base)


def _dpo_config(base: dict, beta) -> "RunConfig":  # noqa: F821
    """``method: dpo`` (a fresh adapter; the reference is the base with adapters off); a
    ``quantization`` section makes it QLoRA-DPO (see lorakit.train.dpo)."""
    from lorakit.config import load_config

    base = {**base, "method": "dpo"}
    if base.get("quantization_nf4"):
        base["quantization"] = {"type": "nf4"}
    base.pop("quantization_nf4", None)
    if beta not in (None, "auto"):
        base["dpo"] = {"beta": float(beta)}
    return load_config(base=base)


def run_recipe(cfg, method: str, log):
    if method == "dpo":
        from lorakit.train.dpo import train
    else:
        from lorakit.train.sft import train
    return train(cfg, log=log, progress=False)


def evaluate(job: dict, store, adapter_dir: Path, run_dir: Path, log) -> Path | None:
    """Base vs fine-tuned on the validation file -> ``eval/report.html`` (best effort)."""
    from lorakit.eval.compare import compare
    from lorakit.eval.report import write_report
    from lorakit.jobs.protocol import fine_tuned_name
    from lorakit.models.load import load_model

    opts = json.loads(job["lorakit"])
    model, tokenizer = load_model(job["base_model"])
    result = compare(model, tokenizer, store.get_file(job["validation_file"], None)["path"],
                     adapters=[f"{fine_tuned_name(job)}={adapter_dir}"],
                     metrics=["exact", "rouge-l"], max_new_tokens=64, batch_size=8,
                     limit=opts.get("eval_limit", 50), forgetting=False, safety=False,
                     seed=job["seed"], log=log, progress=False)
    return write_report(result, run_dir / "eval")["html"]


def _watch_parent(ppid: int) -> None:
    while True:
        if os.getppid() != ppid:  # the server died: stop (the next server resumes the job)
            os._exit(3)
        time.sleep(0.5)


def main(argv: list[str]) -> int:
    from lorakit.jobs.store import JobStore
    from lorakit.lora.io import atomic_write_json

    state_dir, job_id = argv
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    try:
        os.nice(10)  # serving requests come first
    except OSError:
        pass
    store = JobStore(state_dir)
    job = store.get_job(job_id)
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = open(run_dir / ".lock", "w")
    deadline = time.monotonic() + 60
    while True:  # a worker of a killed server may still be exiting
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

    def log(message: str) -> None:
        print(message, flush=True)
        match = _STEPS.search(message)
        if match:
            store.update_job(job_id, total_steps=int(match.group(1)))
        store.add_event(job_id, message)

    result: dict
    try:
        method = json.loads(job["method"])["type"]
        cfg = build_config(job, store)
        trained = run_recipe(cfg, method, log)
        if trained.interrupted:
            result = {"status": "interrupted"}
        else:
            result = {"status": "succeeded", "summary": trained.summary}
            if job["validation_file"] and method == "supervised" and \
                    json.loads(job["lorakit"]).get("eval", True):
                try:
                    report = evaluate(job, store, trained.adapter_dir, run_dir, log)
                    store.add_event(job_id, f"Evaluation report written: {report.name}",
                                    data={"report": str(report)})
                except Exception as exc:  # noqa: BLE001 - the adapter is still good
                    store.add_event(job_id, f"Evaluation on the validation file failed: {exc}",
                                    level="warn")
    except (DataError, ConfigError) as exc:
        result = {"status": "failed", "error": {"code": "invalid_training_file"
                                                if isinstance(exc, DataError) else "invalid_config",
                                                "message": str(exc), "param": None}}
    except LorakitError as exc:
        result = {"status": "failed", "error": {"code": "training_error", "message": str(exc),
                                                "param": None}}
    except Exception as exc:  # noqa: BLE001 - reported on the job, with the traceback in the log
        traceback.print_exc()
        result = {"status": "failed", "error": {
            "code": "internal_error", "param": None,
            "message": f"{type(exc).__name__}: {exc} (see {run_dir / 'worker.log'})"}}
    atomic_write_json(run_dir / "result.json", result)
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
