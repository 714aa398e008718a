"""Small learnable data files the tests train and evaluate on (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_digit_data(folder: str | Path) -> Path:
    """``train.jsonl`` (48) and ``eval.jsonl`` (12) prompt/completion records in ``folder``:
    "Spell the digit D (N)" -> the digit's word. Returns ``folder``."""
    folder = Path(folder)
    rows = [{"prompt": f"Spell the digit {i % 10} ({i})", "completion": DIGIT_WORDS[i % 10]}
            for i in range(60)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:48]))
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[48:]))
    return folder
