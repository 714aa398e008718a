"""Blind human rating: export A/B pairs for raters, then score the filled-in sheet.

``write_human_eval`` samples N held-out prompts and writes

* ``human_eval.csv``: ``id, prompt, answer_a, answer_b, choice, comment``; the rater fills
  ``choice`` with ``A``, ``B`` or ``tie`` (blank = not rated);
* ``human_eval.html``: the same pairs, readable in a browser;
* ``human_eval_key.json``: which model is A and which is B for each id, kept apart so the
  raters cannot see it. The order is random per item (seeded).

``score_human`` joins the filled CSV with the key and reports the tuned model's win rate
(ties count half) with a bootstrap confidence interval.
"""

from __future__ import annotations

import csv
import html
import io
import json
import random
from pathlib import Path

from lorakit.errors import DataError
from lorakit.eval.metrics import bootstrap_ci
from lorakit.lora.io import atomic_write_bytes, atomic_write_json

CSV_NAME, HTML_NAME, KEY_NAME = "human_eval.csv", "human_eval.html", "human_eval_key.json"
FIELDS = ["id", "prompt", "answer_a", "answer_b", "choice", "comment"]
_CHOICES = {"a": "A", "b": "B", "tie": "tie", "t": "tie", "=": "tie", "same": "tie", "both": "tie"}


def write_human_eval(result: dict, out_dir: str | Path, n: int, *, adapter: str | None = None,
                     seed: int = 0) -> dict[str, Path]:
    """Write the rating sheet, its HTML view and the A/B key for ``n`` sampled examples.

    Args:
        result: what :func:`lorakit.eval.compare.compare` returned.
        adapter: which adapter to pair with the base (default: the first).

    Returns:
        ``{"csv", "html", "key"}`` -> path.
    """
    adapters = result.get("adapters") or [a for a, m in result["models"].items() if "delta" in m]
    adapter = adapter or adapters[0]
    rng = random.Random(seed)
    examples = result["examples"]
    chosen = sorted(rng.sample(range(len(examples)), min(n, len(examples))))
    rows, key = [], {"adapter": adapter, "items": {}}
    for number, i in enumerate(chosen, start=1):
        ex = examples[i]
        pair = ["base", adapter]
        rng.shuffle(pair)
        item_id = f"h{number:03d}"
        key["items"][item_id] = {"A": pair[0], "B": pair[1], "example": ex["index"]}
        rows.append({"id": item_id, "prompt": ex["prompt"], "answer_a": ex["outputs"][pair[0]],
                     "answer_b": ex["outputs"][pair[1]], "choice": "", "comment": ""})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out / CSV_NAME, buf.getvalue().encode("utf-8"))
    atomic_write_json(out / KEY_NAME, key)
    e = html.escape
    body = "".join(
        f"<section><h2>{e(r['id'])}</h2><p class='prompt'>{e(r['prompt'])}</p><div class='pair'>"
        f"<div><h3>A</h3><pre>{e(r['answer_a'])}</pre></div><div><h3>B</h3><pre>{e(r['answer_b'])}"
        f"</pre></div></div></section>" for r in rows)
    page = ("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>Rate answers</title>"
            "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
            ".pair{display:grid;grid-template-columns:1fr 1fr;gap:1em}pre{white-space:pre-wrap;"
            "background:#f6f6f6;padding:0.6em}.prompt{font-weight:600}</style></head><body>"
            f"<h1>Which answer is better?</h1><p>For each item write <b>A</b>, <b>B</b> or <b>tie</b> in "
            f"the <code>choice</code> column of {CSV_NAME}. The two answers come in random order.</p>"
            f"{body}</body></html>")
    atomic_write_bytes(out / HTML_NAME, page.encode("utf-8"))
    return {"csv": out / CSV_NAME, "html": out / HTML_NAME, "key": out / KEY_NAME}


def score_human(csv_path: str | Path, key_path: str | Path | None = None, *, seed: int = 0) -> dict:
    """Tuned-vs-base win rate from a filled rating sheet.

    Args:
        csv_path: the filled ``human_eval.csv``.
        key_path: the A/B key (default: ``human_eval_key.json`` beside the CSV).

    Returns:
        ``{"adapter", "rated", "unrated", "wins", "ties", "losses", "win_rate", "ci"}``;
        ``win_rate`` = (wins + ties / 2) / rated, ``ci`` a 95% bootstrap interval.

    Raises:
        DataError: missing files or columns, an id not in the key, or a choice that is not
            A, B or tie (named with its line).
    """
    csv_path = Path(csv_path)
    key_path = Path(key_path) if key_path else csv_path.with_name(KEY_NAME)
    if not csv_path.is_file():
        raise DataError(f"{csv_path} does not exist")
    if not key_path.is_file():
        raise DataError(f"answer key {key_path} not found; pass it with --key (it was written "
                        f"beside the CSV as {KEY_NAME})")
    key = json.loads(key_path.read_text())
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"id", "choice"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))}")
        rows = list(reader)
    adapter = key["adapter"]
    points, wins, ties, losses, unrated = [], 0, 0, 0, 0
    for line, row in enumerate(rows, start=2):
        raw = (row.get("choice") or "").strip().lower()
        if not raw:
            unrated += 1
            continue
        choice = _CHOICES.get(raw)
        if choice is None:
            raise DataError(f"{csv_path}:{line}: choice {row['choice']!r} is not A, B or tie")
        item = key["items"].get(row["id"])
        if item is None:
            raise DataError(f"{csv_path}:{line}: id {row['id']!r} is not in {key_path}")
        if choice == "tie":
            ties += 1
            points.append(0.5)
        elif item[choice] == adapter:
            wins += 1
            points.append(1.0)
        else:
            losses += 1
            points.append(0.0)
    rated = len(points)
    return {"adapter": adapter, "rated": rated, "unrated": unrated, "wins": wins, "ties": ties,
            "losses": losses, "win_rate": sum(points) / rated if rated else None,
            "ci": list(bootstrap_ci(points, seed=seed)) if rated else None}
