"""Request log (SQLite) and drift of live prompts against an adapter's training data.

Every request the server answers becomes one row: time, model/adapter, prompt and completion
token counts, latency, HTTP status, finish reason; prompt and completion texts only when the
server runs with ``--log-text``. ``lorakit monitor drift`` reads this log and compares its
prompts with the training data (:func:`drift`, below).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

from lorakit.data.tokenize import prompt_ids

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


# ---------------------------------------------------------------------- drift
# Thresholds of the verdict. PSI's 0.1 / 0.25 are the usual credit-scoring rule of thumb;
# the others are ours, chosen so that prompts drawn from the training file read "ok".
PSI_WARN, PSI_DRIFT = 0.1, 0.25
JS_WARN, JS_DRIFT = 0.1, 0.2  # Jensen-Shannon divergence, base 2 (0 = same, 1 = disjoint)
OOD_WARN, OOD_DRIFT = 0.1, 0.25  # share of out-of-distribution prompts
OOD_UNSEEN = 0.3  # a prompt is OOD when more than this share of its distinct tokens never
#                   occur in the training prompts, or its length is outside their 1st-99th
#                   percentile range
_EPS = 1e-4


def psi(reference, live, bins: int = 10) -> float:
    """Population stability index of ``live`` against ``reference`` (e.g. prompt lengths).

    Bins are the reference's quantiles (at most ``bins``), open at both ends; empty bins get a
    small floor so the index stays finite: ``sum((a - e) * ln(a / e))``.
    """
    import numpy as np

    ref, cur = np.asarray(reference, dtype=float), np.asarray(live, dtype=float)
    if len(ref) == 0 or len(cur) == 0:
        return float("nan")
    edges = np.unique(np.quantile(ref, np.linspace(0, 1, bins + 1))[1:-1])
    e = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=len(edges) + 1) / len(ref)
    a = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=len(edges) + 1) / len(cur)
    e, a = np.maximum(e, _EPS), np.maximum(a, _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def js_divergence(p_counts: dict, q_counts: dict) -> float:
    """Jensen-Shannon divergence (base 2) between two token-count dictionaries."""
    import numpy as np

    keys = sorted(set(p_counts) | set(q_counts))
    if not keys:
        return float("nan")
    p = np.array([p_counts.get(k, 0) for k in keys], dtype=float)
    q = np.array([q_counts.get(k, 0) for k in keys], dtype=float)
    if p.sum() == 0 or q.sum() == 0:
        return float("nan")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(x, y):
        mask = x > 0
        return float(np.sum(x[mask] * np.log2(x[mask] / y[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _render_prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the server sees it: chat messages through the chat template
    (as ``/v1/chat/completions`` renders them), a text as ``/v1/completions`` tokenizes it."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return prompt_ids(tokenizer, prompt)


def _logged_prompt(text: str | None):
    if text is None:
        return None
    try:
        value = json.loads(text)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            return value
    except json.JSONDecodeError:
        pass
    return text


def reference_prompts(path, tokenizer) -> list[list[int]]:
    """Token ids of the prompts in a training file (any format ``lorakit data`` reads)."""
    from lorakit.data.formats import load_examples

    result = load_examples(path)
    ids = []
    for ex in result.examples:
        prompt = ex.text if ex.kind == "text" else ex.prompt_messages()
        ids.append(_render_prompt_ids(tokenizer, prompt or ""))
    if not ids:
        from lorakit.errors import DataError

        raise DataError(f"{path}: no usable examples to compare with")
    return ids


def drift(rows: list[dict], reference: list[list[int]], tokenizer, windows: int = 6) -> dict:
    """Compare logged requests with the training prompts.

    Args:
        rows: :meth:`RequestLog.rows` (successful requests are used).
        reference: token ids of the training prompts (:func:`reference_prompts`).
        tokenizer: to tokenize logged prompt texts (only present with ``--log-text``).
        windows: time windows for the over-time view.

    Returns:
        ``{"requests", "psi_length", "js_tokens", "ood_share", "verdict", "reasons",
        "windows": [{"start", "end", "requests", "psi_length", "js_tokens", "ood_share"}]}``;
        ``js_tokens`` and ``ood_share`` are None when the log has no prompt texts.
    """
    import numpy as np

    from collections import Counter

    rows = [r for r in rows if r["status"] == 200]
    ref_lengths = [len(ids) for ids in reference]
    ref_counts = Counter(t for ids in reference for t in ids)
    lo, hi = np.quantile(ref_lengths, [0.01, 0.99])

    live = []
    for r in rows:
        prompt = _logged_prompt(r.get("prompt_text"))
        ids = _render_prompt_ids(tokenizer, prompt) if prompt is not None else None
        live.append((r["time"], r["prompt_tokens"], ids))

    def measure(items) -> dict:
        lengths = [n for _, n, _ in items]
        texts = [ids for _, _, ids in items if ids is not None]
        out = {"requests": len(items), "psi_length": psi(ref_lengths, lengths) if items else None,
               "js_tokens": None, "ood_share": None}
        if texts:
            out["js_tokens"] = js_divergence(ref_counts, Counter(t for ids in texts for t in ids))
            ood = 0
            for ids in texts:
                distinct = set(ids)
                unseen = sum(1 for t in distinct if t not in ref_counts) / max(1, len(distinct))
                ood += unseen > OOD_UNSEEN or not lo <= len(ids) <= hi
            out["ood_share"] = ood / len(texts)
        return out

    report = measure(live)
    verdict, reasons = "ok", []
    for key, warn, bad in (("psi_length", PSI_WARN, PSI_DRIFT), ("js_tokens", JS_WARN, JS_DRIFT),
                           ("ood_share", OOD_WARN, OOD_DRIFT)):
        value = report[key]
        if value is None or value != value:
            continue
        if value > bad:
            verdict = "drift"
            reasons.append(f"{key} {value:.3f} > {bad}")
        elif value > warn:
            verdict = "warn" if verdict == "ok" else verdict
            reasons.append(f"{key} {value:.3f} > {warn}")
    report["verdict"], report["reasons"] = verdict, reasons
    report["thresholds"] = {"psi_length": [PSI_WARN, PSI_DRIFT], "js_tokens": [JS_WARN, JS_DRIFT],
                            "ood_share": [OOD_WARN, OOD_DRIFT]}
    report["windows"] = []
    if live:
        t0, t1 = live[0][0], live[-1][0]
        step = (t1 - t0) / windows or 1.0
        for w in range(windows):
            start, end = t0 + w * step, t0 + (w + 1) * step
            items = [x for x in live if start <= x[0] < end or (w == windows - 1 and x[0] == end)]
            if items:
                report["windows"].append({"start": start, "end": end, **measure(items)})
    return report


def plot_drift(report: dict, path: str | Path) -> Path:
    """A PNG of the drift measures per time window, with the verdict thresholds drawn."""
    import datetime as dt

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.lora.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(8, 4))
    times = [dt.datetime.fromtimestamp((w["start"] + w["end"]) / 2) for w in report["windows"]]
    for key, label, (warn, bad), color in (
            ("psi_length", "prompt length PSI", (PSI_WARN, PSI_DRIFT), "tab:blue"),
            ("js_tokens", "token JS divergence", (JS_WARN, JS_DRIFT), "tab:orange"),
            ("ood_share", "out-of-distribution share", (OOD_WARN, OOD_DRIFT), "tab:green")):
        values = [w[key] for w in report["windows"]]
        if any(v is not None for v in values):
            ax.plot(times, [float("nan") if v is None else v for v in values], "o-", label=label,
                    color=color)
            ax.axhline(bad, color=color, linestyle="--", linewidth=0.8)
    ax.set_title(f"drift vs training data: {report['verdict']} ({report['requests']} requests)")
    ax.set_xlabel("time window")
    ax.legend(loc="upper left", fontsize=8)
    fig.autofmt_xdate()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def parse_since(value: str | None, now: float | None = None) -> float | None:
    """``--since``: ``30m``, ``24h``, ``7d``, an ISO date/time, or unix seconds -> unix seconds.

    Raises:
        ConfigError: none of those forms.
    """
    import datetime as dt
    import re

    from lorakit.errors import ConfigError

    if value is None:
        return None
    now = time.time() if now is None else now
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", value)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(value)
    except ValueError:
        pass
    try:
        return dt.datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ConfigError(f"--since {value!r}: use 30m, 24h, 7d, an ISO date such as 2026-01-31 "
                          f"or 2026-01-31T12:00, or unix seconds") from None
