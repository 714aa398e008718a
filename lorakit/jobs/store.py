"""The fine-tuning service's state: files, jobs, events and checkpoints as SQLite rows.

``STATE/jobs.db`` (WAL, ``synchronous=NORMAL``): every state change is one committed
statement, so the state survives ``kill -9`` with SQLite's guarantees. The server's
:class:`~lorakit.jobs.manager.JobManager` and each worker process open their own
:class:`JobStore` on the same file.

Why SQLite rather than a task queue (Celery, RQ): nothing else to run or configure.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path

from lorakit.errors import LorakitError

TERMINAL = ("succeeded", "failed", "cancelled")

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
