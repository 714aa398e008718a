"""``lorakit estimate``: memory, GPU fit, time and cost of a run, before spending on it."""

from __future__ import annotations

import argparse
import json

HELP = """\
Estimate what a fine-tuning run needs before running it: memory per GPU (weights, adapter,
gradients, optimizer, activations, overhead), which GPU setups fit, the adapter's size on disk
(exact, from the shapes), and with --examples/--avg-tokens the training time and cost.
Every number is computed from the model's architecture; docs/estimate.md gives the formulas
and their sources, and how the estimate compares with measured runs.

  lorakit estimate --model llama3-8b --method qlora
  lorakit estimate --model mistral-7b --method lora --r 8 --seq-len 4096 --grad-checkpointing \\
      --examples 20000 --avg-tokens 600 --epochs 3 --gpu A100-80
  lorakit estimate --from-config run.yaml            # a lorakit run config
  lorakit estimate --from-config config.json --method full --json   # any HF config.json
  lorakit estimate --table                           # hardware guidance for the presets
  lorakit estimate --model smollm2-135m-instruct --seq-len 256 --measure   # check it here
"""


def add_parsers(subparsers) -> None:
    """Add ``estimate`` to the ``lorakit`` parser."""
    from lorakit.plan.estimate import DEFAULT_MFU, METHODS, OPTIMIZERS
    from lorakit.plan.presets import GPUS, PRESETS

    p = subparsers.add_parser("estimate", help="memory, GPU fit, time and cost of a run, before "
                              "running it", description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="MODEL|PRESET",
                   help=f"a preset ({', '.join(PRESETS)}), a model folder, a config.json, a "
                        ".gguf file or a hub id in the local cache (default: smollm2-135m)")
    p.add_argument("--from-config", metavar="FILE",
                   help="a lorakit run config (YAML: model, method, lora.r, data.max_length, "
                        "train.batch_size... fill the flags you leave out) or a Hugging Face "
                        "config.json (the model's architecture)")
    p.add_argument("--method", choices=METHODS, default=None, help="default: lora")
    p.add_argument("--r", type=int, default=None, help="LoRA rank (default: 16)")
    p.add_argument("--target-modules", default=None, metavar="NAMES",
                   help="all-linear (default), comma-separated layer names (q_proj,v_proj) or a "
                        "regex over module paths")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help="LoRA dropout (default 0.05); > 0 keeps a dropped copy of each input")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (default: 2048)")
    p.add_argument("--batch-size", type=int, default=None, help="rows per micro-batch and GPU "
                   "(default: 1)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None,
                   help="recompute activations in backward (less memory, one more forward)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                   help="adamw, adamw8bit, paged_adamw8bit, sgd (default: train.optimizer of "
                        "--from-config, else adamw, lorakit train's default)")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="compute dtype of the base and activations (default: bf16; fp32 with "
                        "--measure on a CPU, as lorakit trains there)")
    p.add_argument("--examples", type=int, default=None, metavar="N", help="training examples")
    p.add_argument("--avg-tokens", type=float, default=None, metavar="T",
                   help="average tokens per example")
    p.add_argument("--epochs", type=float, default=None, metavar="E", help="epochs (default: 1)")
    p.add_argument("--gpu", metavar="NAME",
                   help=f"card for time and cost ({', '.join(g.label for g in GPUS)}); default: "
                        "the cheapest setup that fits")
    p.add_argument("--price-per-hour", type=float, default=None, metavar="USD",
                   help="$ per GPU-hour instead of the built-in (dated) table")
    p.add_argument("--mfu", type=float, default=None,
                   help="model FLOPs utilisation, a fraction of the bf16 peak (default: "
                        + ", ".join(f"{k} {v}" for k, v in DEFAULT_MFU.items()) + ")")
    p.add_argument("--json", action="store_true", help="print one JSON object (fields in "
                   "docs/estimate.md)")
    p.add_argument("--table", action="store_true",
                   help="print the hardware guidance table (smallest fitting GPU setup for LoRA "
                        "and QLoRA per preset) with its assumptions")
    p.add_argument("--measure", action="store_true",
                   help="also run a few real training steps of this configuration here and print "
                        "predicted vs measured peak memory (needs a loadable model)")
    p.add_argument("--steps", type=int, default=2, help="steps for --measure (default: 2)")
    p.set_defaults(func=run_estimate)


def _settings(args) -> dict:
    """Flags, then the run config given with --from-config, then defaults."""
    from lorakit.plan.estimate import config_from_json

    file_values: dict = {}
    hf_config = None
    if args.from_config:
        path = args.from_config
        if str(path).endswith(".json"):
            hf_config = config_from_json(path)
        else:
            from lorakit.config import load_config

            cfg = load_config(path)
            file_values = {"model": cfg.model, "method": cfg.method, "r": cfg.lora.r,
                           "target_modules": cfg.lora.target_modules,
                           "lora_dropout": cfg.lora.dropout, "use_dora": cfg.lora.dora,
                           "seq_len": cfg.data.max_length, "batch_size": cfg.train.batch_size,
                           "grad_checkpointing": cfg.train.grad_checkpointing,
                           "epochs": cfg.train.epochs, "optimizer": cfg.train.optimizer}
            if cfg.train.precision in ("bf16", "fp16", "fp32"):
                file_values["precision"] = cfg.train.precision
    defaults = {"model": "smollm2-135m", "method": "lora", "r": 16, "target_modules": "all-linear",
                "lora_dropout": 0.05, "seq_len": 2048, "batch_size": 1,
                "grad_checkpointing": False, "epochs": 1.0, "precision": None, "use_dora": False,
                "optimizer": "adamw"}
    out = {}
    for key, default in defaults.items():
        flag = getattr(args, key, None)
        out[key] = flag if flag is not None else file_values.get(key, default)
    if isinstance(out["target_modules"], str) and "," in out["target_modules"]:
        out["target_modules"] = [t.strip() for t in out["target_modules"].split(",") if t.strip()]
    out["config"] = hf_config
    if hf_config is not None and args.model is None:
        out["model"] = str(args.from_config)
    return out


def run_estimate(args) -> int:
    """``lorakit estimate ...``."""
    from lorakit.plan.estimate import estimate, hardware_table

    if args.table:
        return _print_table(hardware_table(), args.json)
    s = _settings(args)
    precision = s["precision"] or ("fp32" if args.measure and _cpu_run() else "bf16")
    device = "cpu" if args.measure and _cpu_run() else "cuda"
    est = estimate(s["model"], config=s["config"], method=s["method"], r=s["r"],
                   target_modules=s["target_modules"], seq_len=s["seq_len"],
                   batch_size=s["batch_size"], grad_checkpointing=s["grad_checkpointing"],
                   optimizer=s["optimizer"], precision=precision, lora_dropout=s["lora_dropout"],
                   use_dora=s["use_dora"], device=device, examples=args.examples,
                   avg_tokens=args.avg_tokens, epochs=s["epochs"], gpu=args.gpu,
                   price_per_hour=args.price_per_hour, mfu=args.mfu)
    out = est.to_json()
    if args.measure:
        out["measured"] = _measure(args, s, est)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        _print(est, out.get("measured"))
    return 0


def _cpu_run() -> bool:
    import torch

    return not torch.cuda.is_available()


def _measure(args, s: dict, est) -> dict:
    from lorakit.errors import ConfigError
    from lorakit.plan.measure import MeasureSpec, measure_in_subprocess
    from lorakit.plan.presets import PRESETS

    if s["config"] is not None or s["model"].lower() in PRESETS:
        raise ConfigError(f"--measure needs a model it can load (an alias such as "
                          f"smollm2-135m-instruct, a model folder, a .gguf file); "
                          f"{s['model']!r} is only an architecture here")
    if s["optimizer"] != "adamw":
        raise ConfigError("--measure runs lorakit's own optimizer (AdamW); drop --optimizer")
    spec = MeasureSpec(model=s["model"], method=s["method"], r=s["r"],
                       target_modules=s["target_modules"], lora_dropout=s["lora_dropout"],
                       seq_len=s["seq_len"], batch_size=s["batch_size"],
                       grad_checkpointing=s["grad_checkpointing"], steps=args.steps,
                       precision=est.settings["precision"])
    result = measure_in_subprocess(spec)
    predicted = est.memory_bytes["total"]
    result["predicted_bytes"] = int(predicted)
    result["error"] = round(predicted / result["peak_delta_bytes"] - 1, 4)
    return result


def _print(est, measured: dict | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    gib = est.memory_gib()
    st = est.settings
    head = (f"{est.method} on {est.model}: {est.parameters:,} parameters, "
            f"{est.trainable_parameters:,} trainable; seq_len {st['seq_len']} x batch "
            f"{st['batch_size']}, {st['precision']}, {st['optimizer']}"
            + (", gradient checkpointing" if st["grad_checkpointing"] else ""))
    console.print(head, highlight=False)
    table = Table(title="memory per GPU", title_justify="left")
    table.add_column("part")
    table.add_column("GiB", justify="right")
    for key in ("weights", "adapter", "gradients", "optimizer", "activations", "overhead"):
        table.add_row(key, f"{gib[key]:.2f}")
    table.add_row("[bold]total[/bold]", f"[bold]{gib['total']:.2f}[/bold]")
    console.print(table)
    if est.adapter_parameters:
        console.print(f"adapter: {est.adapter_parameters:,} parameters, adapter_model.safetensors "
                      f"{est.adapter_bytes:,} bytes ({est.adapter_bytes / 2**20:.1f} MiB)",
                      highlight=False)
    console.print("fits: " + (", ".join(est.fits) or "no known setup of up to 8 GPUs"),
                  highlight=False)
    if est.hours is not None:
        console.print(f"time: {est.tokens:,} tokens, {est.flops:.3g} FLOPs -> {est.hours:.2f} h on "
                      f"{est.time_gpu} at MFU {st['mfu']}; cost ${est.cost_usd:,.2f} "
                      f"(prices {st['prices'].split(':')[0]}; --price-per-hour to override)",
                      highlight=False)
    for note in est.notes:
        console.print(f"note: {note}", style="yellow", highlight=False)
    if measured:
        console.print(f"measured here ({measured['kind']}, {measured['steps']} steps, "
                      f"{measured['precision']}): {measured['peak_delta_bytes'] / 2**30:.3f} GiB; "
                      f"predicted {measured['predicted_bytes'] / 2**30:.3f} GiB "
                      f"({measured['error']:+.1%})", highlight=False)


def _print_table(rows: list[dict], as_json: bool) -> int:
    from lorakit.plan.estimate import TABLE_ASSUMPTIONS

    if as_json:
        print(json.dumps({"assumptions": TABLE_ASSUMPTIONS, "rows": rows}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="smallest GPU setup that fits", title_justify="left")
    for col in ("model", "params", "LoRA GiB", "LoRA on", "QLoRA GiB", "QLoRA on", "adapter"):
        table.add_column(col)
    for row in rows:
        lo, q = row["lora"], row["qlora"]
        table.add_row(row["model"], f"{row['parameters'] / 1e9:.2f} B", f"{lo['total_gib']:.1f}",
                      lo["smallest"] or "-", f"{q['total_gib']:.1f}", q["smallest"] or "-",
                      f"{lo['adapter_mib']:.0f} MiB")
    console = Console()
    console.print(table)
    console.print(f"assumptions: {TABLE_ASSUMPTIONS}", highlight=False)
    return 0
