"""``lorakit eval``: tuned vs base on held-out data; ``lorakit eval score-human FILE``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EVAL_HELP = """\
Compare LoRA adapters with their base model on held-out data: did it help, what did it cost?

  lorakit eval --adapter runs/sql/adapter                  # the bundled text-to-SQL eval set
  lorakit eval --adapter runs/a/adapter --data eval.jsonl --metric exact --metric rouge-l
  lorakit eval --adapter v1=runs/a/adapter --adapter v2=runs/b/adapter --data eval.jsonl
  lorakit eval --adapter DIR --data q.jsonl --metric sql --sql-db shop.db --json
  lorakit eval --adapter DIR --data eval.jsonl --human 50  # blind A/B sheet for raters
  lorakit eval score-human out/human_eval.csv              # tuned win rate from the filled sheet

The base is the same model with adapters disabled (loaded once). Metrics: exact, json,
rouge-l, contains, regex, sql, python:module:function (f(prediction, reference, example) ->
float); the first --metric is the headline. Also reported: loss and perplexity on the
references, win/tie/loss vs base with bootstrap 95% CIs, forgetting (KL and perplexity change
on a bundled general-text probe; flagged above 0.1 nats/token or +10% perplexity) and the
refusal rate on a bundled harmful-request probe (flagged on a drop of 10 points).
Writes report.html, report.md, results.json and PNG plots into --out.
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("eval", help="compare adapters with the base model on held-out data",
                       description=EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter folder to compare (repeat for several); NAME defaults to the "
                        "folder's name (the run's name for runs/NAME/adapter)")
    p.add_argument("--data", metavar="FILE", default=None,
                   help="held-out JSONL/JSON (prompt/completion, messages, alpaca, sharegpt, or "
                        "prompt/reference); default: the bundled text-to-SQL eval set")
    p.add_argument("--model", default=None,
                   help="base model (default: the one recorded in the adapter's manifest)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="exact, json, rouge-l, contains, regex, sql or python:module:function; "
                        "repeat for several (default: sql for the bundled set, else exact)")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="greedy generation length (default 128)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N examples")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="report folder (default: runs/NAME/eval for a run's adapter, else eval-NAME)")
    p.add_argument("--json", action="store_true", help="print machine-readable results to stdout")
    p.add_argument("--sql-db", default=None, metavar="FILE", help="SQLite database for --metric sql")
    p.add_argument("--human", type=int, default=0, metavar="N",
                   help="also write human_eval.csv/.html with N blind A/B pairs (key kept apart)")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks to run for base and tuned "
                        "(needs `pip install lm-eval` and the tasks' data available)")
    p.add_argument("--lm-eval-limit", type=int, default=None, metavar="N",
                   help="examples per lm-eval task")
    p.add_argument("--few-shot", type=int, default=None, metavar="K",
                   help="also score the base with K training examples before each question (row "
                        "base-<K>shot); default 3 when there is a training file (--few-shot-data "
                        "or the adapter's run), 0 turns it off")
    p.add_argument("--few-shot-data", default=None, metavar="FILE",
                   help="training file the few-shot examples come from (default: the data.train "
                        "recorded in the adapter's run folder); eval questions are never used")
    p.add_argument("--few-shot-select", default="similar", choices=["first", "random", "similar"],
                   help="which K examples: the first K, K random (--seed), or the K most similar "
                        "to each question by TF-IDF cosine on word 1-2-grams (default similar)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--probe-limit", type=int, default=None, metavar="N",
                   help="use only the first N general-text probe items for forgetting")
    p.add_argument("--no-forgetting", action="store_true", help="skip the forgetting probe")
    p.add_argument("--no-safety", action="store_true", help="skip the safety (refusal) probe")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default: bfloat16 where the device runs it natively, a GPU "
                        "with bf16 or a CPU with AVX512-BF16 / AMX; else float32)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap and A/B shuffle seed")
    p.set_defaults(func=run_eval)
    actions = p.add_subparsers(dest="action", metavar="score-human FILE",
                               title="instead of evaluating")
    human = actions.add_parser("score-human", help="score a filled human_eval.csv",
                               description="The tuned model's win rate from a filled "
                                           "human_eval.csv (the blind A/B sheet of --human).")
    human.add_argument("file", metavar="FILE", help="the filled human_eval.csv")
    human.add_argument("--key", default=None, help="the A/B key file (default: beside the CSV)")
    # SUPPRESS: `lorakit eval --json score-human FILE` keeps the --json given before the action
    human.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                       help="print machine-readable results to stdout")
    human.add_argument("--seed", type=int, default=argparse.SUPPRESS,
                       help="bootstrap seed of the confidence interval (default 0)")
    human.set_defaults(func=run_score_human)
    add_advise_parser(sub)


ADVISE_HELP = """\
Should I fine-tune? Before any training: a data check, the base model's zero-shot and
few-shot scores on held-out questions, the estimate of a LoRA / QLoRA run on this machine,
and a recommendation with its reasons.

  lorakit advise --data train.jsonl                       # held-out split made from the file
  lorakit advise --data train.jsonl --eval eval.jsonl --metric rouge-l --json
  lorakit advise                                          # the bundled text-to-SQL example

Rule: prompt when there are fewer than 50 examples, or when the best prompt baseline reaches
--target (default 0.9) or its 95% CI reaches 1.0; else fine-tune. See docs/eval.md.
"""


def add_advise_parser(sub) -> None:
    p = sub.add_parser("advise", help="should I fine-tune or prompt? baselines, cost, advice",
                       description=ADVISE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, metavar="FILE",
                   help="training data (default: the bundled text-to-SQL example)")
    p.add_argument("--eval", dest="eval_data", default=None, metavar="FILE",
                   help="held-out questions (default: 20%% split off --data, seed 0)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="base model (default smollm2-135m-instruct)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="as for lorakit eval (default: sql for the bundled example, else exact)")
    p.add_argument("--sql-db", default=None, metavar="FILE", help="SQLite database for --metric sql")
    p.add_argument("--limit", type=int, default=40, metavar="N",
                   help="held-out questions scored (default 40)")
    p.add_argument("--few-shot", type=int, default=3, metavar="K", help="examples in the prompt (default 3)")
    p.add_argument("--few-shot-select", default="similar", choices=["first", "random", "similar"],
                   help="which examples (default similar: TF-IDF cosine on word 1-2-grams)")
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N",
                   help="greedy answer length (default 64)")
    p.add_argument("--target", type=float, default=0.9,
                   help="a prompt baseline at or above this score is good enough (default 0.9)")
    p.add_argument("--batch-size", type=int, default=16, help="generation batch size (default 16)")
    p.add_argument("--dtype", default=None,
                   help="model dtype (default: bfloat16 where the device runs it natively, a GPU "
                        "with bf16 or a CPU with AVX512-BF16 / AMX; else float32)")
    p.add_argument("--seed", type=int, default=0, help="split, few-shot draw and bootstrap seed")
    p.add_argument("--json", action="store_true", help="print machine-readable results to stdout")
    p.set_defaults(func=run_advise)


def run_advise(args) -> int:
    from lorakit.eval.advise import advise, format_advice
    from lorakit.eval.sql import EXAMPLE_DB, EXAMPLE_DIR
    from lorakit.models.load import inference_dtype

    data, eval_data, metrics, sql_db = args.data, args.eval_data, list(args.metric), args.sql_db
    if data is None:
        data = EXAMPLE_DIR / "train.jsonl"
        eval_data = eval_data or EXAMPLE_DIR / "eval.jsonl"
        metrics = metrics or ["sql"]
        sql_db = sql_db or EXAMPLE_DB
    metrics = metrics or (["sql"] if sql_db else ["exact"])
    result = advise(data, eval_data, model=args.model, metrics=metrics, sql_db=sql_db,
                    limit=args.limit, few_shot=args.few_shot, select=args.few_shot_select,
                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                    target=args.target, seed=args.seed,
                    dtype=args.dtype or inference_dtype()[0])
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(format_advice(result), end="")
    return 0


def _adapter_dir(entry: str) -> Path:
    name, sep, rest = entry.partition("=")
    return Path(rest) if sep and name and not Path(entry).exists() else Path(entry)


def _default_out(entries: list[str]) -> Path:
    first = _adapter_dir(entries[0]).resolve()
    if first.name == "adapter" and (first.parent / "config.yaml").exists():
        return first.parent / "eval"
    return Path(f"eval-{first.name}")


def run_eval(args) -> int:
    from lorakit.errors import ConfigError

    if not args.adapter:
        raise ConfigError("give at least one --adapter DIR (or NAME=DIR) to compare with its base")
    if args.lm_eval:  # fail before the model is loaded, not after the comparison
        from lorakit.eval.lmeval import require_lm_eval

        require_lm_eval()
    from lorakit.eval.compare import compare, format_table
    from lorakit.eval.report import write_report
    from lorakit.eval.sql import EXAMPLE_DB, EXAMPLE_DIR
    from lorakit.lora.io import read_adapter_folder
    from lorakit.models.load import inference_dtype, load_model

    data, metrics, sql_db = args.data, list(args.metric), args.sql_db
    if data is None:
        data = EXAMPLE_DIR / "eval.jsonl"
        metrics = metrics or ["sql"]
        sql_db = sql_db or EXAMPLE_DB
    metrics = metrics or (["sql"] if sql_db else ["exact"])
    spec = args.model
    if spec is None:
        spec = read_adapter_folder(_adapter_dir(args.adapter[0])).base_model
        if not spec:
            raise ConfigError(f"adapter {args.adapter[0]} records no base model; pass --model")
    few_shot, few_shot_data = _few_shot_settings(args)
    log = (lambda msg: print(msg, file=sys.stderr))
    log(f"loading {spec}")
    model, tokenizer = load_model(spec, dtype=args.dtype or inference_dtype()[0])
    result = compare(model, tokenizer, str(data), adapters=args.adapter, metrics=metrics,
                     max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                     limit=args.limit, sql_db=sql_db, forgetting=not args.no_forgetting,
                     probe_limit=args.probe_limit, safety=not args.no_safety, seed=args.seed,
                     few_shot=few_shot, few_shot_data=few_shot_data,
                     few_shot_select=args.few_shot_select, log=log)
    result["data"] = str(data)
    if args.lm_eval:
        from lorakit.eval.lmeval import run_lm_eval

        result["lm_eval"] = run_lm_eval(model, tokenizer, ["base", *result["adapters"]], args.lm_eval,
                                        limit=args.lm_eval_limit, batch_size=args.batch_size)
    out = Path(args.out) if args.out else _default_out(args.adapter)
    files = write_report(result, out)
    if args.human:
        from lorakit.eval.human import write_human_eval

        human = write_human_eval(result, out, args.human, seed=args.seed)
        files.update({f"human_{k}": v for k, v in human.items()})
    if args.json:
        print(json.dumps(json_summary(result), indent=2))
    else:
        print(format_table(result), end="")
    log(f"report: {files['html']}  (also report.md, results.json, plots"
        f"{', human_eval.csv' if args.human else ''})")
    return 0


def _few_shot_settings(args) -> tuple[int, str | None]:
    """``(K, source)``: ``--few-shot`` (default 3 when a training file is known, else 0) and
    ``--few-shot-data`` or the training file recorded in the first adapter's run folder."""
    from lorakit.errors import ConfigError
    from lorakit.eval.fewshot import DEFAULT_K, recorded_training_file

    if args.few_shot is not None and args.few_shot < 0:
        raise ConfigError(f"--few-shot must be >= 0, got {args.few_shot}")
    source = args.few_shot_data
    if source is None and args.few_shot != 0:
        found = recorded_training_file(_adapter_dir(args.adapter[0]))
        source = str(found) if found else None
    if args.few_shot is None:
        return (DEFAULT_K if source else 0), source
    if args.few_shot and source is None:
        raise ConfigError(f"--few-shot {args.few_shot} needs training examples to show: pass "
                          f"--few-shot-data FILE (the adapter records no training file)")
    return args.few_shot, source


def json_summary(result: dict) -> dict:
    """The ``--json`` object: headline per model, forgetting and safety per adapter."""
    models = {}
    for name, m in result["models"].items():
        entry = {"score": m["score"], "loss": m["loss"], "perplexity": m["perplexity"],
                 "score_ci": m["score_ci"], "scores": m["scores"]}
        if "delta" in m:  # an adapter (the base and the K-shot row are prompt baselines)
            entry.update({k: m[k] for k in ("wins", "ties", "losses", "delta", "delta_ci")})
            if "vs_prompt" in m:
                entry["vs_prompt"] = m["vs_prompt"]
        models[name] = entry
    forgetting = {n: {k: f[k] for k in ("kl", "ppl_delta", "ppl_delta_pct", "ppl_base", "ppl_tuned",
                                        "flagged")}
                  for n, f in result.get("forgetting", {}).items()}
    safety = {n: {k: v for k, v in s.items() if k != "answers"} for n, s in result.get("safety", {}).items()}
    out = {"metric": result["metric"], "metrics": result["metrics"], "model": result.get("model"),
           "examples": result["examples_count"], "models": models, "forgetting": forgetting,
           "safety": safety, "thresholds": result.get("thresholds")}
    if result.get("few_shot"):
        out["few_shot"] = result["few_shot"]
        out["verdict"] = result.get("verdict")
    if result.get("lm_eval"):
        out["lm_eval"] = result["lm_eval"]
    return out


def run_score_human(args) -> int:
    """``lorakit eval score-human FILE [--key KEY] [--json]``."""
    from lorakit.eval.human import score_human

    s = score_human(args.file, args.key, seed=args.seed)
    if args.json:
        print(json.dumps(s, indent=2))
        return 0
    if not s["rated"]:
        print(f"no rated items yet ({s['unrated']} blank); fill the choice column with A, B or tie")
        return 0
    lo, hi = s["ci"]
    print(f"{s['adapter']} vs base: win rate {100 * s['win_rate']:.1f}% (95% CI {100 * lo:.1f}–"
          f"{100 * hi:.1f}%) over {s['rated']} rated items: {s['wins']} wins, {s['ties']} ties, "
          f"{s['losses']} losses; {s['unrated']} unrated")
    return 0
