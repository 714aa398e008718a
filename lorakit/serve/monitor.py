"""Request log (SQLite) and drift of live prompts against an adapter's training data.

Every request the server answers becomes one row: time, model/adapter, prompt and completion
token counts, latency, HTTP status, finish reason; prompt and completion texts only when the
server runs with ``--log-text``. ``lorakit monitor drift`` reads this log (see ``drift.py``).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,             -- unix seconds when the request arrived
    endpoint TEXT NOT NULL,         -- chat.completions | completions
    adapter TEXT,                   -- NULL = the base model
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    status INTEGER NOT NULL,        -- HTTP status returned
    finish_reason TEXT,
    prompt_text TEXT,               -- only with --log-text (chat: JSON of the messages)
    completion_text TEXT            -- only with --log-text
);
CREATE INDEX IF NOT EXISTS requests_time ON requests(time);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
"""


class RequestLog:
    """Append-only request log in a SQLite file (WAL mode; safe from several threads).

    Args:
        path: the database file (created with its tables when missing).
        log_text: also store prompt and completion texts.
        base_model: the served base's spec, stored so ``monitor drift`` can load its tokenizer.
    """

    def __init__(self, path: str | Path, *, log_text: bool = False, base_model: str | None = None):
        self.path = Path(path)
        self.log_text = log_text
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        if base_model:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('base_model', ?)", (base_model,))
        self._db.commit()

    def log(self, *, endpoint: str, adapter: str | None, prompt_tokens: int,
            completion_tokens: int, latency_s: float, status: int,
            finish_reason: str | None = None, prompt=None, completion: str | None = None,
            at: float | None = None) -> None:
        """Record one request; ``prompt`` (str or messages) and ``completion`` are kept only
        with ``log_text``."""
        if self.log_text and prompt is not None and not isinstance(prompt, str):
            prompt = json.dumps(prompt, ensure_ascii=False)
        row = (at if at is not None else time.time(), endpoint, adapter, int(prompt_tokens),
               int(completion_tokens), float(latency_s), int(status), finish_reason,
               prompt if self.log_text else None, completion if self.log_text else None)
        with self._lock:
            self._db.execute("INSERT INTO requests (time, endpoint, adapter, prompt_tokens, "
                             "completion_tokens, latency_s, status, finish_reason, prompt_text, "
                             "completion_text) VALUES (?,?,?,?,?,?,?,?,?,?)", row)
            self._db.commit()

    def rows(self, adapter: str | None = None, since: float | None = None) -> list[dict]:
        """Logged requests, oldest first (``adapter="base"`` or None selects all)."""
        query, args = "SELECT * FROM requests WHERE 1=1", []
        if adapter is not None:
            query += " AND adapter IS ?"
            args.append(adapter)
        if since is not None:
            query += " AND time >= ?"
            args.append(since)
        with self._lock:
            cur = self._db.execute(query + " ORDER BY time", args)
            names = [c[0] for c in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def close(self) -> None:
        with self._lock:
            self._db.close()
