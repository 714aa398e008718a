"""Fine-tuning as a service: files, jobs, events and checkpoints in SQLite, training in a
separate worker process, finished adapters served by the running engine at once.

State lives under ``--state-dir``::

    STATE/jobs.db                    files, jobs, events, checkpoints (SQLite, WAL)
    STATE/files/file-XXXX.jsonl      uploaded training / validation files
    STATE/jobs/ftjob-XXXX/           the job's run folder: config.yaml, checkpoints/,
                                     metrics.jsonl, adapter/ (the fine-tuned model), loss.png,
                                     eval/report.html, worker.log, result.json

:class:`JobManager` is a thread in the server process. It never trains: it starts one
``python -m lorakit.serve.jobs_worker STATE JOB`` process per running job (at most
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

Why SQLite and a process per job rather than a task queue (Celery, RQ): nothing else to run or
configure, and the state survives ``kill -9`` with the guarantees SQLite gives.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import ConfigError, LorakitError

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_OWNER = "default"
BASE_LR = 2.0e-4  # learning_rate_multiplier multiplies this (lorakit's SFT default)
AUTO = {"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 1.0}
# lorakit's own settings, under the request's `lorakit` key (docs/service.md)
LORAKIT_KEYS = {"lora_r": int, "lora_alpha": float, "lora_dropout": float, "quantization": str,
                "max_steps": int, "max_length": int, "checkpoint_every": int, "eval": bool,
                "eval_limit": int, "beta": float, "packing": bool}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL, status TEXT NOT NULL,
    status_details TEXT, path TEXT NOT NULL, kind TEXT, examples INTEGER, report TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, model TEXT NOT NULL, base_model TEXT NOT NULL,
    training_file TEXT NOT NULL,
    validation_file TEXT, suffix TEXT, seed INTEGER NOT NULL, method TEXT NOT NULL,
    hyperparameters TEXT NOT NULL, lorakit TEXT NOT NULL, metadata TEXT, status TEXT NOT NULL,
    created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
    fine_tuned_model TEXT, trained_tokens INTEGER, error TEXT, run_dir TEXT NOT NULL,
    cancel_requested INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0,
    total_steps INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL, job_id TEXT NOT NULL,
    created_at INTEGER NOT NULL, level TEXT NOT NULL, message TEXT NOT NULL, data TEXT,
    type TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, seq);
CREATE TABLE IF NOT EXISTS checkpoints (
    id TEXT PRIMARY KEY, job_id TEXT NOT NULL, step INTEGER NOT NULL, created_at INTEGER NOT NULL,
    metrics TEXT, path TEXT NOT NULL, UNIQUE (job_id, step));
"""


class NotFound(LorakitError):
    """No such file or job for this owner (answered as 404)."""


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def load_keys(path: str | os.PathLike) -> dict[str, str]:
    """Read a keys file: ``KEY OWNER`` per line (``#`` comments), or a JSON object
    ``{"KEY": "OWNER"}``.

    Raises:
        ConfigError: missing file, a malformed line (with its number), or no key at all.
    """
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"--keys-file {file}: no such file")
    text = file.read_text()
    if text.lstrip().startswith("{"):
        try:
            keys = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc})") from None
        if not all(isinstance(k, str) and isinstance(v, str) and k and v for k, v in keys.items()):
            raise ConfigError(f"{file}: the JSON object must map API key strings to owner names")
    else:
        keys = {}
        for n, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.replace(":", " ", 1).split() if " " not in line else line.split()
            if len(parts) != 2:
                raise ConfigError(f"{file}:{n}: expected 'KEY OWNER', got {line!r}")
            keys[parts[0]] = parts[1]
    if not keys:
        raise ConfigError(f"{file}: no API keys in it")
    return keys


# ---------------------------------------------------------------------- the store
class JobStore:
    """SQLite rows for files, jobs, events and checkpoints. Safe across threads (one
    connection behind a lock) and processes (WAL, busy timeout): the worker opens its own."""

    def __init__(self, state_dir: str | os.PathLike):
        self.root = Path(state_dir)
        for sub in ("files", "jobs"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.root / "jobs.db", timeout=30, check_same_thread=False,
                                   isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _all(self, sql: str, args=()) -> list[dict]:
        with self._lock:
            return [dict(r) for r in self._db.execute(sql, args).fetchall()]

    def _exec(self, sql: str, args=()) -> None:
        with self._lock:
            self._db.execute(sql, args)

    # files
    def add_file(self, row: dict) -> None:
        cols = ", ".join(row)
        self._exec(f"INSERT INTO files ({cols}) VALUES ({', '.join('?' * len(row))})",
                   tuple(row.values()))

    def get_file(self, file_id: str, owner: str | None) -> dict:
        rows = self._all("SELECT * FROM files WHERE id = ?", (file_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            raise NotFound(f"No such File object: {file_id}")
        return rows[0]

    def list_files(self, owner: str | None, purpose: str | None = None) -> list[dict]:
        rows = self._all("SELECT * FROM files ORDER BY created_at DESC, rowid DESC")
        return [r for r in rows if (owner is None or r["owner"] == owner)
                and (purpose is None or r["purpose"] == purpose)]

    def delete_file(self, file_id: str) -> None:
        self._exec("DELETE FROM files WHERE id = ?", (file_id,))

    # jobs
    def add_job(self, row: dict) -> None:
        cols = ", ".join(row)
        self._exec(f"INSERT INTO jobs ({cols}) VALUES ({', '.join('?' * len(row))})",
                   tuple(row.values()))

    def get_job(self, job_id: str, owner: str | None = None) -> dict:
        rows = self._all("SELECT * FROM jobs WHERE id = ?", (job_id,))
        if not rows or (owner is not None and rows[0]["owner"] != owner):
            raise NotFound(f"Could not find fine-tuning job {job_id!r}")
        return rows[0]

    def list_jobs(self, owner: str | None = None, status: tuple = ()) -> list[dict]:
        rows = self._all("SELECT * FROM jobs ORDER BY created_at DESC, rowid DESC")
        return [r for r in rows if (owner is None or r["owner"] == owner)
                and (not status or r["status"] in status)]

    def update_job(self, job_id: str, **fields) -> None:
        sets = ", ".join(f"{k} = ?" for k in fields)
        self._exec(f"UPDATE jobs SET {sets} WHERE id = ?", (*fields.values(), job_id))

    def set_status(self, job_id: str, status: str, *, only_from: tuple = (), **fields) -> bool:
        """Move a job to ``status`` (only from ``only_from`` states, when given); True if it
        moved. The check and the write are one statement, so a cancel cannot be overwritten."""
        fields = {"status": status, **fields}
        sets = ", ".join(f"{k} = ?" for k in fields)
        sql, args = f"UPDATE jobs SET {sets} WHERE id = ?", [*fields.values(), job_id]
        if only_from:
            sql += f" AND status IN ({', '.join('?' * len(only_from))})"
            args += list(only_from)
        with self._lock:
            return self._db.execute(sql, args).rowcount > 0

    # events
    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict | None = None,
                  type: str = "message") -> None:
        self._exec("INSERT INTO events (id, job_id, created_at, level, message, data, type) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (new_id("ftevent"), job_id, int(time.time()), level, message,
                    json.dumps(data) if data is not None else None, type))

    def events(self, job_id: str) -> list[dict]:
        """Oldest first."""
        return self._all("SELECT * FROM events WHERE job_id = ? ORDER BY seq", (job_id,))

    def last_metric_step(self, job_id: str) -> int:
        rows = self._all("SELECT data FROM events WHERE job_id = ? AND type = 'metrics' "
                         "ORDER BY seq DESC LIMIT 1", (job_id,))
        return json.loads(rows[0]["data"])["step"] if rows else 0

    # checkpoints
    def add_checkpoint(self, job_id: str, step: int, path: str, metrics: dict) -> None:
        self._exec("INSERT OR IGNORE INTO checkpoints (id, job_id, step, created_at, metrics, path)"
                   " VALUES (?, ?, ?, ?, ?, ?)",
                   (new_id("ftckpt"), job_id, step, int(time.time()), json.dumps(metrics), path))

    def checkpoints(self, job_id: str) -> list[dict]:
        """Newest first; only those still on disk (older ones are pruned by the recipe)."""
        rows = self._all("SELECT * FROM checkpoints WHERE job_id = ? ORDER BY step DESC", (job_id,))
        return [r for r in rows if Path(r["path"]).is_dir()]


# ---------------------------------------------------------------------- OpenAI shapes
def file_object(row: dict) -> dict:
    return {"id": row["id"], "object": "file", "bytes": row["bytes"],
            "created_at": row["created_at"], "filename": row["filename"],
            "purpose": row["purpose"], "status": row["status"],
            "status_details": row["status_details"], "expires_at": None}


def job_object(row: dict) -> dict:
    hp = json.loads(row["hyperparameters"])
    method = json.loads(row["method"])
    error = json.loads(row["error"]) if row["error"] else None
    run_dir = Path(row["run_dir"])
    result_files = [f"{row['id']}/metrics.jsonl"] if (run_dir / "metrics.jsonl").is_file() else []
    return {"id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
            "error": error, "fine_tuned_model": row["fine_tuned_model"],
            "finished_at": row["finished_at"],
            "hyperparameters": {k: hp[k] for k in AUTO}, "model": row["model"],
            "organization_id": row["owner"], "result_files": result_files, "seed": row["seed"],
            "status": row["status"], "trained_tokens": row["trained_tokens"],
            "training_file": row["training_file"], "validation_file": row["validation_file"],
            "estimated_finish": None, "integrations": [],
            "metadata": json.loads(row["metadata"]) if row["metadata"] else None,
            "method": method, "user_provided_suffix": row["suffix"],
            "lorakit": json.loads(row["lorakit"])}


def event_object(row: dict) -> dict:
    return {"id": row["id"], "object": "fine_tuning.job.event", "created_at": row["created_at"],
            "level": row["level"], "message": row["message"],
            "data": json.loads(row["data"]) if row["data"] else {}, "type": row["type"]}


def checkpoint_object(row: dict, job: dict) -> dict:
    name = job["fine_tuned_model"] or fine_tuned_name(job)
    return {"id": row["id"], "object": "fine_tuning.job.checkpoint",
            "created_at": row["created_at"], "fine_tuning_job_id": job["id"],
            "fine_tuned_model_checkpoint": f"{name}:ckpt-step-{row['step']}",
            "step_number": row["step"], "metrics": json.loads(row["metrics"] or "{}")}


def fine_tuned_name(job: dict) -> str:
    """OpenAI's naming: ``ft:<base>:<suffix>:<id>`` (suffix may be empty)."""
    return f"ft:{job['model']}:{job['suffix'] or ''}:{job['id'].split('-', 1)[1][:12]}"


# ---------------------------------------------------------------------- the manager
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
        self._owners: dict[str, str] = {}  # fine-tuned model name -> owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()
        self.on_finish: list[Callable[[dict], None]] = []

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

    # ------------------------------------------------------------------ ownership
    def model_owner(self, name: str) -> str | None:
        """The owner of fine-tuned model ``name`` (None: not a fine-tuned model)."""
        return self._owners.get(name)

    def visible(self, owner: str | None, model: str) -> bool:
        """May ``owner`` see / use ``model``? Fine-tuned models belong to their job's owner."""
        who = self._owners.get(model)
        return who is None or owner is None or who == owner

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
                [sys.executable, "-m", "lorakit.serve.jobs_worker", str(self.root), job["id"]],
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
            for line in complete.decode().splitlines():
                record = json.loads(line)
                if record.get("loss") is None or record["step"] <= last:
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
        for hook in self.on_finish:
            hook(self.store.get_job(job["id"]))

    def _register(self, job: dict) -> None:
        """Serve a finished job's adapter under its fine-tuned model name."""
        name, adapter = job["fine_tuned_model"], Path(job["run_dir"]) / "adapter"
        if not name or not adapter.is_dir():
            return
        self._owners[name] = job["owner"]
        if self.engine is None or name in self.engine.adapters():
            return
        try:
            self.engine.add_adapter(name, adapter, wait=False)
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


def resolve_hyperparameters(requested: dict, n_examples: int) -> dict:
    """``"auto"`` / missing -> lorakit's defaults (batch size at most the example count).

    Raises:
        ConfigError: a value of the wrong type or out of range.
    """
    out = {}
    for key, default in AUTO.items():
        value = requested.get(key, "auto")
        if value in ("auto", None):
            value = min(default, max(1, n_examples)) if key == "batch_size" else default
        kind = float if key == "learning_rate_multiplier" else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (
                kind is int and not float(value).is_integer()):
            raise ConfigError(f"hyperparameters.{key} must be 'auto' or a "
                              f"{'number' if kind is float else 'whole number'}, got {value!r}")
        value = kind(value)
        low, high = {"n_epochs": (1, 50), "batch_size": (1, 256),
                     "learning_rate_multiplier": (1e-3, 100)}[key]
        if not low <= value <= high:
            raise ConfigError(f"hyperparameters.{key} must be between {low} and {high}, got "
                              f"{value}")
        out[key] = value
    return out


def check_lorakit_options(options: Any) -> dict:
    """Validate the request's ``lorakit`` object (lorakit's own settings).

    Raises:
        ConfigError: unknown key (with the nearest valid one) or a wrong type.
    """
    from lorakit.errors import did_you_mean

    if options is None:
        return {}
    if not isinstance(options, dict):
        raise ConfigError("lorakit must be an object, e.g. {\"lora_r\": 8}")
    out = {}
    for key, value in options.items():
        if key not in LORAKIT_KEYS:
            raise ConfigError(f"unknown lorakit option {key!r}{did_you_mean(key, LORAKIT_KEYS)}; "
                              f"valid: {', '.join(LORAKIT_KEYS)}")
        kind = LORAKIT_KEYS[key]
        if value is None:
            continue
        if kind is bool and not isinstance(value, bool) or kind is not bool and isinstance(value, bool):
            raise ConfigError(f"lorakit.{key} must be {kind.__name__}, got {value!r}")
        try:
            value = kind(value)
        except (TypeError, ValueError):
            raise ConfigError(f"lorakit.{key} must be {kind.__name__}, got {value!r}") from None
        if kind in (int, float) and key != "lora_dropout" and value <= 0:
            raise ConfigError(f"lorakit.{key} must be > 0, got {value}")
        out[key] = value
    if out.get("quantization") not in (None, "nf4"):
        raise ConfigError(f"lorakit.quantization must be 'nf4' or null, got "
                          f"{out['quantization']!r}")
    return out
