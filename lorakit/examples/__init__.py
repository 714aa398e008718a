"""The bundled example: text-to-SQL over a small SQLite shop database.

``lorakit train`` with no config trains on it, and ``lorakit demo`` (what ``make demo`` runs)
scores the base model, fine-tunes it, and scores the adapter, by execution accuracy.
"""

from __future__ import annotations

from pathlib import Path

SQL_DIR = Path(__file__).parent / "sql"  # shop.db, train.jsonl, eval.jsonl, build.py
SQL_CONFIG = Path(__file__).parent / "sql.yaml"  # the run config (examples/sql.yaml is a copy)
# the paths in SQL_CONFIG are relative to the folder holding the lorakit package
_PACKAGE_PARENT = Path(__file__).parent.parent.parent
_PATH_KEYS = (("data", "train"), ("data", "eval"), ("eval", "sql_db"))


def example_config() -> dict:
    """The bundled example's run config (a dict, before overrides and validation): the YAML
    file ``SQL_CONFIG``, with its data and database paths made absolute for this install."""
    import yaml

    config = yaml.safe_load(SQL_CONFIG.read_text())
    for section, key in _PATH_KEYS:
        value = config[section][key]
        if value and not Path(value).is_absolute():
            config[section][key] = str(_PACKAGE_PARENT / value)
    return config


def _read_jsonl(path: Path, limit: int | None = None) -> list[dict]:
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows[:limit] if limit else rows


def run_demo(overrides: list[str] | None = None, limit: int | None = None, out=None) -> int:
    """Base vs LoRA-tuned execution accuracy on the held-out text-to-SQL questions.

    Returns 0; prints a table and writes ``demo.json`` into the run folder.
    """
    import sys
    import time

    from rich.console import Console
    from rich.table import Table

    from lorakit.config import load_config
    from lorakit.fileio import atomic_write_json
    from lorakit.eval.generate import generate_batch
    from lorakit.eval.sql import execution_match, extract_sql
    from lorakit.lora.io import load_adapter
    from lorakit.models.load import load_model
    from lorakit.train.common import base_dtype, default_device, resolve_precision
    from lorakit.train.sft import train

    console = Console(file=out or sys.stdout)
    cfg = load_config(None, list(overrides or []), base=example_config())
    eval_rows = _read_jsonl(Path(cfg.data.eval or SQL_DIR / "eval.jsonl"), limit)
    db = SQL_DIR / "shop.db"
    prompts = [r["prompt"] for r in eval_rows]
    refs = [r["completion"] for r in eval_rows]

    def score(model, tokenizer, label):
        t0 = time.perf_counter()
        # 50 rows a batch: the 100 questions in two (25 s vs 38 s in batches of 16, bf16 base;
        # bench/demo_scoring.py)
        with console.status(f"[bold]{label}: generating SQL for {len(prompts)} held-out questions"):
            preds = generate_batch(model, tokenizer, prompts, max_new_tokens=64, batch_size=50)
        hits = [execution_match(extract_sql(p), r, db) for p, r in zip(preds, refs)]
        console.print(f"{label}: execution accuracy {100 * sum(hits) / len(hits):.1f}% "
                      f"({int(sum(hits))}/{len(hits)}) in {time.perf_counter() - t0:.0f} s")
        return preds, hits

    started = time.perf_counter()
    # score in the dtype the run trains its frozen base in (train.precision)
    precision = resolve_precision(cfg.train.precision, default_device(), cfg.quantized)
    model, tokenizer = load_model(cfg.model, dtype=base_dtype(precision))
    base_preds, base_hits = score(model, tokenizer, "base model")
    console.print(f"fine-tuning {cfg.model} with LoRA r={cfg.lora.r} on "
                  f"{cfg.data.train} ...")
    result = train(cfg)
    load_adapter(model, result.adapter_dir, tokenizer=tokenizer)
    tuned_preds, tuned_hits = score(model, tokenizer, "tuned adapter")

    base_acc = 100 * sum(base_hits) / len(base_hits)
    tuned_acc = 100 * sum(tuned_hits) / len(tuned_hits)
    table = Table(title="text-to-SQL, held-out questions (execution accuracy)")
    for col in ("model", "accuracy", "eval loss", "train time"):
        table.add_column(col)
    table.add_row("base SmolLM2-135M-Instruct", f"{base_acc:.1f}%", "", "")
    table.add_row("+ LoRA adapter", f"{tuned_acc:.1f}%",
                  f"{result.summary.get('final_eval_loss') or float('nan'):.3f}",
                  f"{result.summary['wall_time_s']:.0f} s")
    console.print(table)
    console.print(f"improvement: [bold]{tuned_acc - base_acc:+.1f} points[/bold]; "
                  f"adapter in {result.adapter_dir}; total {time.perf_counter() - started:.0f} s")
    for i in range(min(3, len(prompts))):
        console.print(f"\n[dim]Q:[/dim] {prompts[i].splitlines()[-1]}\n[dim]base:[/dim]  "
                      f"{base_preds[i][:120]}\n[dim]tuned:[/dim] {tuned_preds[i][:120]}\n"
                      f"[dim]ref:[/dim]   {refs[i]}")
    report = {"base_accuracy": base_acc, "tuned_accuracy": tuned_acc,
              "improvement_points": tuned_acc - base_acc, "eval_questions": len(prompts),
              "train_summary": result.summary,
              "examples": [{"prompt": p, "reference": r, "base": b, "tuned": t,
                            "base_correct": bh, "tuned_correct": th}
                           for p, r, b, t, bh, th in zip(prompts, refs, base_preds, tuned_preds,
                                                         base_hits, tuned_hits)]}
    atomic_write_json(result.run_dir / "demo.json", report)
    return 0
