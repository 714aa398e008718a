"""Scores for held-out evaluation: loss / perplexity on references, and generation metrics.

Generation metrics score one greedy prediction against its reference (and the whole example,
for a user function). Each returns a float in [0, 1] per example; some add secondary
columns (``json`` adds ``field_accuracy``). The names are the ``--metric`` values:

    exact      normalised exact match (Unicode NFKC, case-folded, punctuation dropped,
               whitespace collapsed)
    json       the first JSON value in the prediction parses and equals the reference's
               (extra column ``field_accuracy``: share of the reference's fields predicted exactly)
    rouge-l    ROUGE-L F1 over word tokens (longest common subsequence)
    contains   the normalised reference (or any of a list of them) occurs in the prediction
    regex      the prediction matches the reference, read as a regular expression
    sql        execution match against a SQLite database (``--sql-db``; see ``sql.py``)
    python:module:function   a user scorer ``f(prediction, reference, example) -> float``;
               ``module`` may also be a path to a ``.py`` file

Why an own ROUGE-L: ``rouge-score`` (Google's reference package) tokenises by dropping every
character outside ``[a-z0-9]``, so any non-Latin text (Chinese, Cyrillic, accented words)
scores 0, and it pulls in nltk and absl at run time. The LCS F-measure below is ~30 lines,
tokenises Unicode words, and the tests check it equals ``rouge_score`` on ASCII text.

Confidence intervals are percentile bootstraps over examples (numpy only; scipy's
``stats.bootstrap`` would add scipy as a dependency for twelve lines of resampling).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from lorakit.errors import ConfigError, DataError, did_you_mean

METRICS = ("exact", "json", "rouge-l", "contains", "regex", "sql")
_WORD = re.compile(r"[^\W_]+")  # Unicode letters and digits; "_" separates, as in rouge-score


# ---------------------------------------------------------------------- text helpers
def normalize_text(text: str) -> str:
    """NFKC, case-folded, punctuation and symbols removed, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).casefold()
    text = "".join(" " if unicodedata.category(ch)[0] in "PS" else ch for ch in text)
    return " ".join(text.split())


def words(text: str) -> list[str]:
    """Lower-cased Unicode word tokens (letters and digits)."""
    return _WORD.findall(unicodedata.normalize("NFKC", str(text)).lower())


# ---------------------------------------------------------------------- the metrics
def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the normalised texts are equal (see :func:`normalize_text`)."""
    return float(normalize_text(prediction) == normalize_text(reference))


def contains(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 when the normalised reference (or any of a list) occurs in the normalised prediction."""
    refs = [reference] if isinstance(reference, str) else list(reference)
    pred = f" {normalize_text(prediction)} "
    return float(any(f" {normalize_text(r)} " in pred for r in refs if normalize_text(r)))


def regex_match(prediction: str, pattern: str) -> float:
    """1.0 when ``re.search(pattern, prediction)`` finds a match.

    Raises:
        DataError: the pattern is not a valid regular expression.
    """
    try:
        return float(re.search(pattern, prediction) is not None)
    except re.error as exc:
        raise DataError(f"reference {pattern!r} is not a valid regular expression: {exc}") from None


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token lists (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: ``2PR / (P + R)`` with ``P = LCS / len(pred)``, ``R = LCS / len(ref)``."""
    pred, ref = words(prediction), words(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)(?:```|$)", re.DOTALL)


def extract_json(text: str) -> tuple[bool, Any]:
    """The first JSON value in ``text`` (inside a code fence if there is one).

    Returns:
        ``(True, value)`` or ``(False, None)`` when nothing parses.
    """
    fence = _FENCE.search(text)
    candidates = [fence.group(1)] if fence else []
    candidates.append(text)
    decoder = json.JSONDecoder()
    for candidate in candidates:
        stripped = candidate.strip()
        try:
            return True, json.loads(stripped)
        except (json.JSONDecodeError, ValueError):
            pass
        for match in re.finditer(r"[\[{]", stripped):
            try:
                value, _ = decoder.raw_decode(stripped, match.start())
                return True, value
            except json.JSONDecodeError:
                continue
    return False, None


def _json_equal(a: Any, b: Any) -> bool:
    # bool is an int in Python: keep true != 1
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_json_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def json_scores(prediction: str, reference: str | Any) -> dict[str, float]:
    """Parsed-JSON equality and per-field accuracy.

    Args:
        prediction: the model's text.
        reference: JSON text (or an already parsed value).

    Returns:
        ``{"json": 1.0|0.0, "field_accuracy": share}``: the share of the reference's top-level
        fields (object keys, or list positions) that the prediction has with an equal value;
        a scalar reference counts as one field. Unparseable predictions score 0 on both.

    Raises:
        DataError: the reference itself is not valid JSON.
    """
    if isinstance(reference, str):
        try:
            gold = json.loads(reference)
        except json.JSONDecodeError as exc:
            raise DataError(f"reference is not valid JSON ({exc.msg}): {reference[:80]!r}") from None
    else:
        gold = reference
    ok, pred = extract_json(prediction)
    if not ok:
        return {"json": 0.0, "field_accuracy": 0.0}
    if isinstance(gold, dict):
        hits = [isinstance(pred, dict) and k in pred and _json_equal(pred[k], v) for k, v in gold.items()]
    elif isinstance(gold, list):
        hits = [isinstance(pred, list) and i < len(pred) and _json_equal(pred[i], v)
                for i, v in enumerate(gold)]
    else:
        hits = [_json_equal(pred, gold)]
    return {"json": float(_json_equal(pred, gold)),
            "field_accuracy": sum(hits) / len(hits) if hits else float(_json_equal(pred, gold))}


# ---------------------------------------------------------------------- registry
@dataclass
class Metric:
    """A named scorer. ``fn(prediction, reference, example) -> float | dict``; a dict's first
    key is the metric's own score and the others are extra columns."""

    name: str
    fn: Callable[[str, Any, dict], float | dict]
    needs_reference: bool = True
    description: str = ""
    extras: tuple[str, ...] = field(default_factory=tuple)

    def score(self, prediction: str, reference: Any, example: dict | None = None) -> dict[str, float]:
        """``{name: score, extra: value, ...}`` for one example.

        Raises:
            DataError: the scorer returned something that is not a finite number.
        """
        out = self.fn(prediction, reference, example or {})
        if isinstance(out, dict) and out:
            values = dict(out)
            first = next(iter(values))
            values = {self.name: values.pop(first), **values}
        else:
            values = {self.name: out}
        for key, value in values.items():
            if isinstance(value, bool):
                value = float(value)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"metric {self.name!r} returned {value!r} for {key!r}; a scorer "
                                f"must return a finite number (or a dict of them)")
            values[key] = float(value)
        return values


def _load_python_scorer(spec: str) -> Callable:
    """``python:module:function`` or ``python:path/to/file.py:function``."""
    body = spec[len("python:"):]
    module_name, sep, func_name = body.rpartition(":")
    if not sep or not module_name or not func_name:
        raise ConfigError(f"metric {spec!r}: write a user scorer as python:module:function "
                          f"(or python:path/to/file.py:function)")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise ConfigError(f"metric {spec!r}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"lorakit_user_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except ConfigError:
        raise
    except Exception as exc:  # the user's module failed to import: say so, with its error
        raise ConfigError(f"metric {spec!r}: cannot import {module_name!r}: "
                          f"{type(exc).__name__}: {exc}") from None
    fn = getattr(module, func_name, None)
    if not callable(fn):
        raise ConfigError(f"metric {spec!r}: {module_name!r} has no function {func_name!r}")
    return fn


def get_metric(name: str, *, sql_db: str | Path | None = None) -> Metric:
    """The :class:`Metric` called ``name`` (one of :data:`METRICS` or ``python:...``).

    Raises:
        ConfigError: unknown name, ``sql`` without a database, or a user scorer that cannot
            be imported.
    """
    key = name.strip().lower().replace("_", "-")
    if name.startswith("python:"):
        fn = _load_python_scorer(name)
        return Metric(name, fn, description=f"user scorer {name[len('python:'):]}")
    if key in ("rougel", "rouge"):
        key = "rouge-l"
    if key in ("exact", "em", "exact-match"):
        return Metric("exact", lambda p, r, e: exact_match(p, r), description="normalised exact match")
    if key == "json":
        return Metric("json", lambda p, r, e: json_scores(p, r), extras=("field_accuracy",),
                      description="parsed JSON equal to the reference")
    if key == "rouge-l":
        return Metric("rouge-l", lambda p, r, e: rouge_l(p, r), description="ROUGE-L F1")
    if key == "contains":
        return Metric("contains", lambda p, r, e: contains(p, r),
                      description="reference contained in the answer")
    if key == "regex":
        return Metric("regex", lambda p, r, e: regex_match(p, r),
                      description="answer matches the reference regex")
    if key == "sql":
        if sql_db is None:
            raise ConfigError("metric 'sql' needs the database to run queries on: pass "
                              "--sql-db FILE.db (sql_db= in Python)")
        db = Path(sql_db)
        if not db.is_file():
            raise ConfigError(f"--sql-db {db}: no such SQLite file")
        from lorakit.eval.sql import execution_match

        return Metric("sql", lambda p, r, e: execution_match(p, r, db),
                      description=f"SQL execution match on {db.name}")
    raise ConfigError(f"unknown metric {name!r}{did_you_mean(key, METRICS)}; choose one of "
                      f"{', '.join(METRICS)} or python:module:function")


# ---------------------------------------------------------------------- statistics
def bootstrap_ci(values: Sequence[float], *, n_resamples: int = 2000, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for no values, ``(v, v)`` for one.
    """
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        return (math.nan, math.nan)
    if x.size == 1 or np.all(x == x[0]):
        return (float(x[0] if x.size == 1 else x.mean()),) * 2
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def win_tie_loss(tuned: Sequence[float], base: Sequence[float], tol: float = 1e-9) -> dict[str, int]:
    """Per-example comparison: the tuned score higher (win), equal (tie) or lower (loss)."""
    wins = ties = losses = 0
    for t, b in zip(tuned, base):
        if t > b + tol:
            wins += 1
        elif t < b - tol:
            losses += 1
        else:
            ties += 1
    return {"wins": wins, "ties": ties, "losses": losses}


def perplexity(mean_loss: float | None) -> float | None:
    """``exp(loss)`` (inf on overflow), None when there is no loss."""
    if mean_loss is None:
        return None
    try:
        return math.exp(mean_loss)
    except OverflowError:
        return math.inf
