"""Build the bundled preference example: answer with valid JSON (chosen) vs broken JSON (rejected).

Each prompt states a small record in words and asks for it as a JSON object with given keys.
The chosen answer is that object, compact and valid; the rejected one is the same content in a
way that breaks the stated format (single quotes, unquoted keys, a missing brace, a trailing
comma, or prose around it). So the preferred behaviour is checkable: the model's whole answer
must ``json.loads`` to an object with the requested keys (bench/dpo_json.py also reports how
often it equals the record, which these pairs do not teach: chosen and rejected hold the same
content).

    python lorakit/examples/json_pref/build.py      # rewrites train.jsonl and eval.jsonl
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).parent
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emil", "Fatima", "Goran", "Hana", "Ivan", "Julia",
         "Kofi", "Lena", "Mateo", "Nora", "Omar", "Priya", "Quinn", "Rosa", "Sven", "Tara",
         "Umar", "Vera", "Wen", "Ximena", "Yusuf", "Zoe"]
CITIES = ["Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Quito", "Dakar", "Seoul", "Porto", "Riga",
          "Hanoi", "Accra", "Bern", "Austin", "Perth", "Lyon"]
JOBS = ["nurse", "baker", "pilot", "teacher", "chemist", "plumber", "editor", "farmer", "judge",
        "welder"]
TEMPLATES = [
    "{name} is {age} years old and lives in {city}.",
    "{name}, aged {age}, is based in {city}.",
    "Meet {name} from {city}; {name} is {age}.",
    "{name} ({age}) moved to {city} last year.",
]


def _record(rng: random.Random) -> dict:
    rec = {"name": rng.choice(NAMES), "age": rng.randint(18, 79), "city": rng.choice(CITIES)}
    if rng.random() < 0.5:
        rec["job"] = rng.choice(JOBS)
    return rec


def _prompt(rec: dict, rng: random.Random) -> str:
    text = rng.choice(TEMPLATES).format(**rec)
    if "job" in rec:
        text += f" {rec['name']} works as a {rec['job']}."
    keys = ", ".join(rec)
    return f"Reply with only a JSON object with the keys {keys}. {text}"


def _broken(rec: dict, rng: random.Random) -> str:
    good = json.dumps(rec)
    kind = rng.randrange(5)
    if kind == 0:  # single quotes
        return good.replace('"', "'")
    if kind == 1:  # unquoted keys and strings
        return "{" + ", ".join(f"{k}: {v}" for k, v in rec.items()) + "}"
    if kind == 2:  # missing closing brace
        return good[:-1]
    if kind == 3:  # trailing comma
        return good[:-1] + ",}"
    return "Sure! Here is the record: " + ", ".join(f"{k} = {v}" for k, v in rec.items()) + "."


def build(n_train: int = 240, n_eval: int = 48, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n_train + n_eval):
        rec = _record(rng)
        rows.append({"prompt": _prompt(rec, rng), "chosen": json.dumps(rec),
                     "rejected": _broken(rec, rng), "expected": rec})
    for name, part in (("train", rows[:n_train]), ("eval", rows[n_train:])):
        (HERE / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))


if __name__ == "__main__":
    build()
