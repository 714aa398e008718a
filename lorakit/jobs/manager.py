"""The scheduler of the fine-tuning service: training in worker processes, finished adapters
served by the running engine at once.

State lives under ``--state-dir`` (rows in ``store.py``)::

    STATE/jobs.db                    files, jobs, events, checkpoints (SQLite, WAL)
    STATE/files/file-XXXX.jsonl      uploaded training / validation files
    STATE/jobs/ftjob-XXXX/           the job's run folder: config.yaml, checkpoints/,
                                     metrics.jsonl, adapter/ (the fine-tuned model), loss.png,
                                     eval/report.html, worker.log, result.json

:class:`JobManager` is a thread in the server process. It never trains: it starts one
``python -m lorakit.jobs.worker STATE JOB`` process per running job (at most
``max_concurrent``), turns the run folder's ``metrics.jsonl`` and ``checkpoints/`` into events
and checkpoint rows, and, when a worker finishes, registers ``adapter/`` with the engine as
``ft:<base>:<suffix>:<id>``. Training in another process keeps the request path (and the GIL)
free; the worker also runs at a lower CPU priority.

Crash safety: every state change is a committed SQLite row and every file is written under a
temporary name and renamed. A worker dies with the server (``PR_SET_PDEATHSIG`` plus a parent
watchdog); on the next start, jobs still marked ``running`` are queued again and their worker
continues from the last checkpoint (the SFT recipe's exact mid-epoch resume). Cancelling sends
the worker SIGTERM: the recipe's stop flag finishes the current step, writes a checkpoint and
returns.

Why a process per job rather than a task queue (Celery, RQ): nothing else to run or configure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lorakit.errors import ConfigError, LorakitError
from lorakit.jobs.protocol import fine_tuned_name
from lorakit.jobs.store import TERMINAL, JobStore


class JobManager:
    """Runs queued jobs in worker processes and hands finished adapters to the engine.

    Args:
        state_dir: where the database, files and run folders live.
        engine: the serving :class:`lorakit.serve.engine.Engine` (None: train only).
        base_model: the spec workers load (alias, folder, ...); the engine's base.
        base_name: the served base id, the only ``model`` a job may name.
        max_concurrent: jobs trained at once (each in its own process).
        poll_s: how often the manager looks at workers and run folders.
        worker_env: extra environment variables for the worker processes.
        max_length: sequence length the upload check reports truncation against.
    """

    def __init__(self, state_dir, engine=None, *, base_model: str, base_name: str,
                 max_concurrent: int = 1, poll_s: float = 0.25, worker_env: dict | None = None,
                 max_length: int = 1024):
        if max_concurrent < 1:
            raise ConfigError(f"--max-concurrent-jobs must be >= 1, got {max_concurrent}")
        self.root = Path(state_dir).resolve()
        self.store = JobStore(self.root)
        self.engine, self.base_model, self.base_name = engine, base_model, base_name
        self.max_concurrent, self.poll_s = max_concurrent, poll_s
        self.max_length = max_length  # the data check's truncation report (data.max_length)
        self.worker_env = worker_env or {}
        self._procs: dict[str, subprocess.Popen] = {}
        self._signalled: set[str] = set()
        self._tails: dict[str, tuple[int, int]] = {}  # job -> (inode, offset) of metrics.jsonl
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "JobManager":
        """Recover from a previous run (re-queue interrupted jobs, serve finished adapters),
        then start the scheduling thread."""
        if self._thread is not None:
            return self
        for job in self.store.list_jobs(status=("running",)):
            self.store.set_status(job["id"], "queued", only_from=("running",))
            self.store.add_event(job["id"], "The server restarted while this job was running; "
                                            "it will resume from its last checkpoint.",
                                 level="warn")
        for job in reversed(self.store.list_jobs(status=("succeeded",))):
            self._register(job)
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lorakit-jobs", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 60) -> None:
        """Stop scheduling; running workers checkpoint and exit (their jobs stay ``running``
        and resume on the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self._procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
        self._procs.clear()
        self.store.close()

    def wake(self) -> None:
        self._wake.set()

    # ------------------------------------------------------------------ cancel
    def cancel(self, job: dict) -> dict:
        """Cancel a job: queued jobs stop at once; a running worker is told to stop after its
        current step (it writes a checkpoint first).

        Raises:
            ConfigError: the job already finished.
        """
        if job["status"] in TERMINAL:
            raise ConfigError(f"Job {job['id']} has already {job['status']}; it cannot be "
                              f"cancelled")
        moved = self.store.set_status(job["id"], "cancelled", only_from=("validating_files",
                                                                          "queued", "running"),
                                      cancel_requested=1, finished_at=int(time.time()))
        if moved:
            self.store.add_event(job["id"], "Job cancelled"
                                 + (" (the worker stops after its current step and keeps a "
                                    "checkpoint)" if job["status"] == "running" else ""))
        self._wake.set()
        return self.store.get_job(job["id"])

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as exc:  # noqa: BLE001 - keep scheduling; say what happened
                print(f"lorakit jobs: {type(exc).__name__}: {exc}", file=sys.stderr)
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def _tick(self) -> None:
        for job in reversed(self.store.list_jobs(status=("validating_files",))):
            if self.store.set_status(job["id"], "queued", only_from=("validating_files",)):
                self.store.add_event(job["id"], "Files validated, moving job to queued state")
        for job_id, proc in list(self._procs.items()):
            job = self.store.get_job(job_id)
            self._follow(job)
            if job["status"] == "cancelled" and job_id not in self._signalled:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)  # stop after this step, with a checkpoint
                self._signalled.add(job_id)
            if proc.poll() is not None:
                del self._procs[job_id]
                self._signalled.discard(job_id)
                self._finish(self.store.get_job(job_id), proc.returncode)
        if self._stop.is_set():
            return
        queued = list(reversed(self.store.list_jobs(status=("queued",))))
        while queued and len(self._procs) < self.max_concurrent:
            self._launch(queued.pop(0))

    def _launch(self, job: dict) -> None:
        if not self.store.set_status(job["id"], "running", only_from=("queued",),
                                     started_at=job["started_at"] or int(time.time()),
                                     attempts=job["attempts"] + 1):
            return
        run_dir = Path(job["run_dir"])
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "result.json").unlink(missing_ok=True)
        resumed = bool(list((run_dir / "checkpoints").glob("step-*")))
        self.store.add_event(job["id"], "Fine-tuning job started" if not resumed else
                             "Fine-tuning job resumed from its last checkpoint")
        env = {**os.environ, **self.worker_env}
        log = open(run_dir / "worker.log", "ab")
        try:
            self._procs[job["id"]] = subprocess.Popen(
                [sys.executable, "-m", "lorakit.jobs.worker", str(self.root), job["id"]],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                preexec_fn=_die_with_parent, close_fds=True)
        finally:
            log.close()

    def _follow(self, job: dict) -> None:
        """New lines of metrics.jsonl -> metrics events; new checkpoints -> checkpoint rows."""
        run_dir = Path(job["run_dir"])
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            stat = metrics.stat()
            inode, offset = self._tails.get(job["id"], (stat.st_ino, 0))
            if inode != stat.st_ino or stat.st_size < offset:  # rewritten on resume
                offset = 0
            last = self.store.last_metric_step(job["id"])
            with open(metrics, "rb") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[:chunk.rfind(b"\n") + 1]
            self._tails[job["id"]] = (stat.st_ino, offset + len(complete))
            for line in complete.decode("utf-8", errors="replace").splitlines():
                try:  # a line torn by a crash (then continued on resume) is skipped
                    record = json.loads(line)
                except ValueError:
                    continue
                if (not isinstance(record, dict) or record.get("loss") is None
                        or not isinstance(record.get("step"), int) or record["step"] <= last):
                    continue
                last = record["step"]
                total = job["total_steps"]
                data = {"step": record["step"], "train_loss": record["loss"],
                        "total_steps": total, "epoch": record.get("epoch"), "lr": record.get("lr"),
                        "tokens_per_s": record.get("tokens_per_s")}
                if record.get("eval_loss") is not None:
                    data["valid_loss"] = record["eval_loss"]
                data.update({k: v for k, v in record.items() if k.startswith("rewards/")})
                self.store.add_event(job["id"], f"Step {record['step']}"
                                     f"{'/' + str(total) if total else ''}: training loss="
                                     f"{record['loss']:.4f}", data=data, type="metrics")
        known = {c["step"] for c in self.store.checkpoints(job["id"])}
        for folder in sorted((run_dir / "checkpoints").glob("step-*")):
            if not (folder / "trainer_state.pt").is_file():
                continue
            step = int(folder.name.split("-")[1])
            if step not in known:
                self.store.add_checkpoint(job["id"], step, str(folder),
                                          self._metrics_at(job["id"], step))

    def _metrics_at(self, job_id: str, step: int) -> dict:
        for event in reversed(self.store.events(job_id)):
            if event["type"] == "metrics":
                data = json.loads(event["data"])
                if data["step"] <= step:
                    return {"step": step, "train_loss": data["train_loss"],
                            **({"valid_loss": data["valid_loss"]} if "valid_loss" in data else {})}
        return {"step": step}

    def _finish(self, job: dict, returncode: int) -> None:
        run_dir = Path(job["run_dir"])
        self._follow(job)
        try:
            result = json.loads((run_dir / "result.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            result = {"status": "failed", "error": {
                "code": "worker_died", "param": None,
                "message": f"the training process exited with code {returncode} without a "
                           f"result; see {run_dir / 'worker.log'}"}}
        if job["status"] == "cancelled":
            last = self.store.checkpoints(job["id"])
            self.store.add_event(job["id"], "Training stopped" + (
                f" at step {last[0]['step']}; checkpoint kept at {last[0]['path']}" if last else ""))
            return
        if self._stop.is_set():
            return  # shutting down: the job stays `running` and resumes on the next start
        status = result["status"]
        if status == "interrupted":  # stopped by a signal not from us: run it again
            self.store.set_status(job["id"], "queued", only_from=("running",))
            self.store.add_event(job["id"], "The worker was interrupted; the job is queued again "
                                            "and resumes from its last checkpoint", level="warn")
        elif status == "succeeded":
            name = fine_tuned_name(job)
            summary = result.get("summary", {})
            moved = self.store.set_status(job["id"], "succeeded", only_from=("running",),
                                          fine_tuned_model=name, finished_at=int(time.time()),
                                          trained_tokens=summary.get("tokens_seen"))
            if moved:
                job = self.store.get_job(job["id"])
                self._register(job)
                self.store.add_event(job["id"], f"New fine-tuned model created: {name}",
                                     data={"summary": summary})
                self.store.add_event(job["id"], "The job has successfully completed")
        else:
            error = result.get("error") or {"code": "error", "message": "training failed",
                                            "param": None}
            if self.store.set_status(job["id"], "failed", only_from=("running",),
                                     error=json.dumps(error), finished_at=int(time.time())):
                self.store.add_event(job["id"], f"Fine-tuning job failed: {error['message']}",
                                     level="error")

    def _register(self, job: dict) -> None:
        """Serve a finished job's adapter under its fine-tuned model name."""
        name, adapter = job["fine_tuned_model"], Path(job["run_dir"]) / "adapter"
        if not name or not adapter.is_dir():
            return
        if self.engine is None or name in self.engine.adapters():
            return
        try:
            self.engine.add_adapter(name, adapter, wait=False, owner=job["owner"],
                                    source="fine-tuned")
        except LorakitError as exc:
            self.store.add_event(job["id"], f"The adapter could not be served: {exc}",
                                 level="error")


def _die_with_parent() -> None:
    """In the child before exec: get SIGKILL when the server process dies (Linux)."""
    os.setpgid(0, 0)  # own process group: a Ctrl-C for the server is not also the worker's
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker's parent watchdog still stops it
