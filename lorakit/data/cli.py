"""``lorakit data ...`` sub-commands: ``data check`` validates files and prints a report;
``data replay`` makes or shows the self-generated replay set (``lorakit/data/replay.py``)."""

from __future__ import annotations

import argparse
import json

DEFAULT_MODEL = "smollm2-135m-instruct"
_MAX_ERRORS_SHOWN = 20


def add_parsers(subparsers) -> None:
    """Add the ``data`` command and its sub-commands to the ``lorakit`` parser."""
    data = subparsers.add_parser("data", help="check and inspect training data",
                                 description="Check and inspect training data.")
    sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 1)[1])

    check = sub.add_parser(
        "check", help="validate data files and report on their quality",
        description="Validate JSONL/JSON training files (errors name file, line and field) and "
                    "report lengths, truncation, supervised share, duplicates, conflicts, "
                    "diversity and train/eval leakage.")
    check.add_argument("files", nargs="+", metavar="FILE", help="training data (JSONL or a JSON list)")
    check.add_argument("--eval", dest="eval_files", action="append", metavar="FILE",
                       help="eval data, checked for leakage from the training files (repeatable)")
    check.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"model whose tokenizer and chat template to use (default {DEFAULT_MODEL}; "
                            "'none' counts words instead)")
    check.add_argument("--max-length", type=int, default=2048, metavar="N",
                       help="training sequence length, for the truncation count (default 2048)")
    check.add_argument("--format", default="auto",
                       help="force a format: prompt_completion, chat, instruction (alpaca), "
                            "sharegpt, text, preference, kto (default: detect per record)")
    check.add_argument("--train-on", default="all_assistant",
                       choices=["all_assistant", "last_turn", "everything"],
                       help="which tokens are supervised (default all_assistant)")
    check.add_argument("--preview", type=int, default=0, metavar="K",
                       help="print K rendered examples with the supervised tokens highlighted")
    check.add_argument("--strict", action="store_true", help="exit 1 if any record is bad")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    check.set_defaults(func=run_check)

    replay = sub.add_parser(
        "replay", help="make or inspect the self-generated replay set (data.replay)",
        description="The replay set `data.replay: {fraction: F, file: null}` mixes into training: "
                    "the base model's own greedy answers to lorakit's bundled general "
                    "instructions, generated once and cached per base model. Prints where it is "
                    "cached and a few examples; --out also writes it (or its first N) to FILE, "
                    "to edit and pass as data.replay.file.")
    replay.add_argument("--model", default=DEFAULT_MODEL, help=f"base model (default {DEFAULT_MODEL})")
    replay.add_argument("--n", type=int, default=None, metavar="N",
                        help="only the first N instructions (default all)")
    replay.add_argument("--out", default=None, metavar="FILE", help="also write the records to FILE")
    replay.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                        help="answer length (default 128, as data.replay uses)")
    replay.add_argument("--show", type=int, default=3, metavar="K", help="examples to print (default 3)")
    replay.add_argument("--json", action="store_true", help="print a JSON summary")
    replay.set_defaults(func=run_replay)


def _load_tokenizer(model: str):
    if model.lower() == "none":
        return None
    from lorakit.models.load import load_tokenizer

    return load_tokenizer(model)


def run_check(args: argparse.Namespace) -> int:
    """Run ``lorakit data check``; 0 when the data is usable, 1 when --strict finds errors
    or no valid example is left."""
    from lorakit.data.check import check_data

    tokenizer = _load_tokenizer(args.model)
    report = check_data(args.files, tokenizer=tokenizer, max_length=args.max_length,
                        eval_path=args.eval_files, format=args.format, train_on=args.train_on,
                        preview=args.preview)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print_report(report)
    if report["examples"] == 0 or (args.strict and report["errors"]):
        return 1
    return 0


def run_replay(args: argparse.Namespace) -> int:
    """``lorakit data replay``: the cached self-generated replay set (made on first use)."""
    import sys

    from lorakit.data import replay
    from lorakit.errors import ConfigError
    from lorakit.models.load import load_model

    if args.n is not None and args.n < 1:
        raise ConfigError(f"--n must be at least 1, got {args.n}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model)
    records, cached = replay.self_generated(model, tokenizer, max_new_tokens=args.max_new_tokens,
                                            log=lambda m: print(m, file=sys.stderr))
    records = records[:args.n] if args.n else records
    if args.out:
        replay.write_records(args.out, records)
    summary = {"model": args.model, "cache": str(cached), "out": args.out, "records": len(records),
               "instructions": len(replay.instructions()),
               "instruction_set": replay.instruction_set_hash(),
               "examples": records[:max(0, args.show)]}
    if args.json:
        print(json.dumps(summary, indent=2, ensure_ascii=False))
        return 0
    print(f"{len(records)} replay records for {args.model} (cached: {cached})"
          + (f", written to {args.out}" if args.out else ""))
    for r in summary["examples"]:
        print(f"- {r['prompt']}\n  -> {r['completion'][:200]}")
    return 0


def print_report(report: dict, console=None) -> None:
    """Print a check report with rich: summary table, errors, warnings, previews."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = console or Console()
    table = Table(title="lorakit data check", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("files", ", ".join(report["files"]))
    table.add_row("examples", f"{report['examples']} valid of {report['records']} records"
                  + (f" ({report['skipped']} skipped)" if report["skipped"] else ""))
    table.add_row("formats", ", ".join(f"{k} {v}" for k, v in sorted(report["formats"].items())) or "-")
    tok = report["tokens"]
    if tok.get("count"):
        table.add_row(f"length ({tok['unit']})",
                      f"min {tok['min']}  p50 {tok['p50']}  p90 {tok['p90']}  p95 {tok['p95']}  "
                      f"p99 {tok['p99']}  max {tok['max']}  mean {tok['mean']}")
    if report["truncated"] is not None:
        table.add_row("truncated", f"{report['truncated']} over max_length {report['max_length']}")
        table.add_row("supervised share", f"{100 * report['supervised_share']:.1f}% of tokens")
    dup = report["duplicates"]
    table.add_row("duplicates", f"{dup['exact']} exact, {dup['near']} near")
    conf = report["conflicts"]
    table.add_row("conflicts", f"{conf['prompts']} prompt(s) with different answers "
                  f"({conf['examples']} examples)")
    div = report["diversity"]
    table.add_row("diversity", f"distinct-1 {div['distinct_1']:.3f}  distinct-2 {div['distinct_2']:.3f}")
    if report["leakage"]:
        leak = report["leakage"]
        table.add_row("eval leakage", f"{leak['exact']} exact, {leak['near']} near "
                                      f"of {leak['eval_examples']} eval examples")
    console.print(table)

    errors = report["errors"]
    if errors:
        console.print(f"[bold red]{len(errors)} errors[/]")
        for e in errors[:_MAX_ERRORS_SHOWN]:
            field = f" {e['field']}:" if e["field"] else ""
            console.print(Text(f"  {e['file']}:{e['line']}:{field} {e['message']}", style="red"),
                          soft_wrap=True)
        if len(errors) > _MAX_ERRORS_SHOWN:
            console.print(f"  ... and {len(errors) - _MAX_ERRORS_SHOWN} more (--json lists all)")
    for warning in report["warnings"]:
        console.print(Text(f"warning: {warning}", style="yellow"), soft_wrap=True)

    for item in report.get("preview", []):
        console.rule(f"{item['file']}:{item['line']}")
        console.print(preview_text(item["segments"], color=console.is_terminal), soft_wrap=True)


def preview_text(segments, color: bool):
    """Rendered example with supervised runs highlighted (bold green) or bracketed ``[[...]]``."""
    from rich.text import Text

    text = Text()
    for piece, supervised in segments:
        if not supervised:
            text.append(piece, style="dim" if color else None)
        elif color:
            text.append(piece, style="bold green")
        else:
            text.append(f"[[{piece}]]")
    return text

