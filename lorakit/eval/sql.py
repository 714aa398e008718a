"""Execution accuracy for text-to-SQL: run predicted and reference SQL, compare the results.

Two queries match when both execute on the same database and return the same rows: as a
multiset, or as a list when the reference asks for an order (``ORDER BY``). Comparing results
rather than SQL text credits every correct way of writing a query.

Queries run on a read-only connection (``mode=ro``) with an authorizer that allows only reads,
and a progress handler that stops them after ``timeout_s``, so a model's output can neither
change the database nor hang the evaluation.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections import Counter
from pathlib import Path
from urllib.request import pathname2url

EXAMPLE_DIR = Path(__file__).resolve().parents[1] / "examples" / "sql"
EXAMPLE_DB = EXAMPLE_DIR / "shop.db"

_FENCE = re.compile(r"```[ \t]*(?:sqlite|sql)?[ \t]*\n?(.*?)(?:```|$)", re.IGNORECASE | re.DOTALL)
_PREFIX = re.compile(r"^\s*(?:sql(?:ite)?\s*(?:query)?\s*:|query\s*:|answer\s*:)\s*", re.IGNORECASE)
# "WITH" only as a CTE head ("WITH name AS"), so prose such as "With this schema" is skipped
_STATEMENT_START = re.compile(r"\bSELECT\b|\bWITH\s+(?:RECURSIVE\s+)?\w+\s*(?:\(|AS\b)",
                              re.IGNORECASE)
_ORDER_BY = re.compile(r"\bORDER\s+BY\b", re.IGNORECASE)
_FLOAT_DIGITS = 6  # AVG(x) and SUM(x)/COUNT(x) differ in the last bits; both are right

# sqlite3 authorizer action codes a SELECT needs; everything else (writes, ATTACH, PRAGMA) is denied
_READ_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION,
                 getattr(sqlite3, "SQLITE_RECURSIVE", 33)}


def extract_sql(text: str) -> str:
    """Pull the first SQL statement out of a model's answer.

    Takes the first fenced code block if there is one, drops a leading ``SQL:`` style label,
    skips prose before the first ``SELECT``/``WITH``, and cuts after the first ``;`` outside
    a string literal (or, with no ``;``, at the first blank line).

    Args:
        text: the generated completion (or a plain SQL string).

    Returns:
        The statement, stripped, ending with ``;`` when the text had one; "" when nothing is left.
    """
    fence = _FENCE.search(text)
    if fence:
        text = fence.group(1)
    text = _PREFIX.sub("", text.strip())
    start = _STATEMENT_START.search(text)
    if start:
        text = text[start.start():]
    in_quote = None
    for i, ch in enumerate(text):
        if in_quote:
            if ch == in_quote:
                in_quote = None
        elif ch in ("'", '"'):
            in_quote = ch
        elif ch == ";":
            return text[: i + 1].strip()
    return re.split(r"\n\s*\n", text, maxsplit=1)[0].strip()


def _authorize(action, *_args) -> int:
    return sqlite3.SQLITE_OK if action in _READ_ACTIONS else sqlite3.SQLITE_DENY


def run_sql(db_path: str | os.PathLike, sql: str, timeout_s: float = 2.0) -> list[tuple] | None:
    """Execute one read-only query.

    Args:
        db_path: the SQLite file; it is opened read-only and never created.
        sql: a single statement.
        timeout_s: wall-clock limit; a query still running then is interrupted.

    Returns:
        All result rows, or None when the query fails, is not read-only, or runs too long.
    """
    if not sql.strip():
        return None
    uri = f"file:{pathname2url(str(Path(db_path).resolve()))}?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True, timeout=timeout_s)
    except sqlite3.Error:
        return None
    try:
        con.set_authorizer(_authorize)
        deadline = time.monotonic() + timeout_s
        # a non-zero return interrupts the query (checked every 1000 VM instructions)
        con.set_progress_handler(lambda: int(time.monotonic() > deadline), 1000)
        return [tuple(row) for row in con.execute(sql).fetchall()]
    except (sqlite3.Error, sqlite3.Warning, ValueError, OverflowError):
        return None
    finally:
        con.close()


def _normalise(row: tuple) -> tuple:
    return tuple(round(v, _FLOAT_DIGITS) if isinstance(v, float) else v for v in row)


def execution_match(prediction: str, reference: str, db_path: str | os.PathLike) -> float:
    """Score one prediction against its reference by the rows they return.

    Args:
        prediction: the model's answer; the SQL is taken out with :func:`extract_sql`.
        reference: the gold SQL.
        db_path: the database both run on.

    Returns:
        1.0 when both execute and return the same rows (in the same order if the reference
        has ``ORDER BY``, else as multisets); 0.0 otherwise.
    """
    gold = run_sql(db_path, extract_sql(reference))
    if gold is None:
        return 0.0
    predicted = run_sql(db_path, extract_sql(prediction))
    if predicted is None:
        return 0.0
    gold = [_normalise(r) for r in gold]
    predicted = [_normalise(r) for r in predicted]
    if _ORDER_BY.search(reference):
        return float(predicted == gold)
    return float(Counter(predicted) == Counter(gold))


def execution_accuracy(predictions: list[str], references: list[str],
                       db_path: str | os.PathLike) -> float:
    """Mean :func:`execution_match` over paired predictions and references.

    Args:
        predictions: model answers.
        references: gold SQL, one per prediction.
        db_path: the database both run on.

    Returns:
        The share of matches, 0..1 (0.0 for empty lists).

    Raises:
        ValueError: the two lists differ in length.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return 0.0
    scores = [execution_match(p, r, db_path) for p, r in zip(predictions, references)]
    return sum(scores) / len(scores)


def load_sql_example(split: str) -> list[dict]:
    """Read ``lorakit/examples/sql/{split}.jsonl`` (``{"prompt", "completion"}`` records).

    Args:
        split: "train" or "eval".

    Returns:
        The records in file order. The matching database is :data:`EXAMPLE_DB`.

    Raises:
        ValueError: an unknown split name.
        FileNotFoundError: the example files are missing (run ``lorakit/examples/sql/build.py``).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    with open(EXAMPLE_DIR / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
