"""DPO on the bundled JSON preference example with the embedded SmolLM2-135M-Instruct.

Measures what issue #7 asks:
  - held-out reward accuracy before (all rewards tie at 0 with a fresh adapter: chance is 0.5,
    strict TRL-style accuracy is 0) and after training;
  - how often greedy answers to the held-out prompts follow the preferred format (the whole
    answer one valid JSON object with the requested keys), base vs tuned, and, stricter, how
    often they also equal the stated record;
  - peak memory and time per step with and without ``dpo.precompute_reference``
    (``--memory``: two short runs, each in its own process).

    .venv/bin/python bench/dpo_json.py                 # train + generation comparison
    .venv/bin/python bench/dpo_json.py --limit 16 train.max_steps=20 train.eval_every=10
    .venv/bin/python bench/dpo_json.py --memory        # precompute vs not, 12 steps each

Writes bench/results/dpo_json.json (and dpo_memory.json).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "lorakit" / "examples" / "json_pref"
RESULTS = ROOT / "bench" / "results"


def _parsed(answer: str):
    try:
        return json.loads(answer.strip())
    except (json.JSONDecodeError, ValueError):
        return None


def follows_format(parsed, expected: dict) -> bool:
    """The behaviour the pairs prefer: the whole answer is one valid JSON object with exactly
    the requested keys (the record's keys; chosen answers always are such an object, rejected
    ones are prose or broken JSON)."""
    return isinstance(parsed, dict) and parsed.keys() == expected.keys()


def score_generations(model, tokenizer, rows) -> tuple[float, float, list[str]]:
    """Share of answers that follow the format and, stricter (not what the pairs teach), share
    that also equal the stated record."""
    from lorakit.eval.generate import generate_batch

    answers = generate_batch(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens=48,
                             batch_size=16)
    parsed = [_parsed(a) for a in answers]
    fmt = sum(follows_format(p, r["expected"]) for p, r in zip(parsed, rows))
    exact = sum(p == r["expected"] for p, r in zip(parsed, rows))
    return fmt / len(rows), exact / len(rows), answers


def run_training(out: Path, overrides: list[str]) -> dict:
    from lorakit.config import load_config
    from lorakit.train.dpo import train

    cfg = load_config(ROOT / "examples" / "dpo.yaml", [f"output_dir={out}", *overrides])
    return train(cfg, progress=False).summary


def main_quality(overrides: list[str], limit: int | None = None) -> None:
    import torch

    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model

    rows = [json.loads(l) for l in (DATA / "eval.jsonl").read_text().splitlines()][:limit]
    model, tokenizer = load_model("smollm2-135m-instruct", dtype=torch.float32)
    t0 = time.perf_counter()
    base_rate, base_exact, base_answers = score_generations(model, tokenizer, rows)
    gen_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = run_training(Path(tmp) / "run", overrides)
        train_s = time.perf_counter() - t0
        records = [json.loads(l) for l in (Path(tmp) / "run" / "metrics.jsonl").read_text()
                   .splitlines()]
        load_adapter(model, Path(tmp) / "run" / "adapter")
    tuned_rate, tuned_exact, tuned_answers = score_generations(model, tokenizer, rows)
    evals = [(r["step"], r["eval_rewards/accuracy"], r["eval_rewards/margin"]) for r in records
             if "eval_rewards/accuracy" in r]
    result = {
        "overrides": overrides, "generation_prompts": len(rows),
        "eval_reward_accuracy_by_step": evals,
        "final_eval_reward_accuracy": summary["final_eval_reward_accuracy"],
        "base_follows_format": base_rate, "tuned_follows_format": tuned_rate,
        "base_exact_record": base_exact, "tuned_exact_record": tuned_exact,
        "train_seconds": round(train_s, 1), "generation_seconds_base": round(gen_s, 1),
        "steps": summary["steps"], "peak_memory_bytes": summary["peak_memory_bytes"],
        "examples": [{"prompt": r["prompt"], "base": b, "tuned": t}
                     for r, b, t in zip(rows, base_answers, tuned_answers)],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dpo_json.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=2))


def main_memory(steps: int) -> None:
    results = {}
    for precompute in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            code = (f"import json,sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                    f"from dpo_json import run_training; from pathlib import Path; "
                    f"s = run_training(Path({tmp!r}) / 'run', ['train.max_steps={steps}', "
                    f"'train.eval_every=1000', 'dpo.precompute_reference={str(precompute).lower()}']); "
                    f"print('RESULT', json.dumps(s))")
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 cwd=ROOT, check=True).stdout
            summary = json.loads(out.split("RESULT", 1)[1])
            results[f"precompute_reference={precompute}"] = {
                "peak_memory_bytes": summary["peak_memory_bytes"],
                "wall_time_s": summary["wall_time_s"], "steps": summary["steps"],
                "seconds_per_step": round(summary["wall_time_s"] / summary["steps"], 3)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dpo_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--limit", type=int, default=None,
                        help="greedy-generate for the first N held-out prompts only")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    if args.memory:
        main_memory(args.steps)
    else:
        main_quality(args.overrides, args.limit)
