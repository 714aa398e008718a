"""``lorakit train`` and ``lorakit demo``."""

from __future__ import annotations

import argparse
import sys

TRAIN_HELP = """\
Fine-tune a model with LoRA, QLoRA or full fine-tuning, or align it with DPO.

  lorakit train                               # the bundled text-to-SQL example
  lorakit train run.yaml                      # your config
  lorakit train run.yaml train.lr=1e-4 lora.r=8 output_dir=runs/r8
  lorakit train run.yaml resume=true          # continue from the last checkpoint
  lorakit train run.yaml --nproc 4            # 4 processes (torchrun), train.strategy=ddp|fsdp
  lorakit train examples/dpo.yaml             # DPO on preference pairs (docs/dpo.md)

Config keys (YAML, or dotted key=value overrides):
  model, method (lora|qlora|full|dpo|orpo|simpo|kto), output_dir, resume, init_adapter (dpo: SFT adapter),
  lora.{r, alpha, dropout, target_modules, rslora, dora, bias, modules_to_save, init,
       lr_ratio (LoRA+)},
  quantization.{type, double_quant, compute_dtype},
  data.{train, eval, eval_fraction, format, max_length, packing, train_on,
       replay.{fraction, file, loss} (rehearsal against forgetting; SFT and dpo/orpo/simpo: docs/eval.md)},
  train.{epochs, max_steps, batch_size, grad_accum, lr, scheduler, warmup, weight_decay,
         max_grad_norm, precision, grad_checkpointing, activation_offload, optimizer
         (adamw|adamw8bit|paged_adamw8bit), seed, eval_every, save_every,
         keep_checkpoints, early_stopping_patience, log_every, report_to (tensorboard|wandb|
         mlflow), strategy, neftune_alpha},
  dpo.{beta, loss (sigmoid|ipo|hinge), label_smoothing, sft_weight, precompute_reference,
      simpo_gamma, desirable_weight, undesirable_weight}  (also orpo, simpo, kto: docs/dpo.md),
  model.{name, device_map}  (model: NAME is short for model.name)
The run folder gets config.yaml, adapter/, checkpoints/, metrics.jsonl, loss.png, summary.json.
"""


def add_parsers(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a model (LoRA / QLoRA / full / DPO)",
                       description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("items", nargs="*", metavar="[CONFIG.yaml] [key=value ...]",
                   help="a YAML config file and/or dotted overrides")
    p.add_argument("--resume", action="store_true", help="same as resume=true")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a bar")
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train in N processes on this machine (runs torchrun for you: one per "
                        "GPU, or gloo on CPU); train.batch_size is per process, "
                        "train.strategy=ddp|fsdp. See docs/distributed.md")
    p.add_argument("--strict-memory", action="store_true",
                   help="refuse to start when the memory estimate (lorakit estimate) exceeds "
                        "the device's free memory; without it, a warning")
    p.set_defaults(func=_train)

    d = sub.add_parser("demo", help="the main job: base vs LoRA-tuned SmolLM2 on text-to-SQL",
                       description="Score the embedded SmolLM2-135M-Instruct on held-out text-to-SQL "
                                   "questions, fine-tune it with LoRA on the bundled example, and "
                                   "score it again (execution accuracy against a SQLite database).")
    d.add_argument("items", nargs="*", metavar="key=value", help="overrides of the example config")
    d.add_argument("--limit", type=int, default=None, help="score only the first N eval questions")
    d.set_defaults(func=_demo)


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    from lorakit.errors import ConfigError

    config, overrides = None, []
    for item in items:
        if "=" in item:
            overrides.append(item)
        elif config is None:
            config = item
        else:
            raise ConfigError(f"more than one config file given ({config}, {item}); "
                              f"overrides are written key=value")
    return config, overrides


def _train(args) -> int:
    from lorakit.config import load_config
    from lorakit.examples import example_config
    from lorakit.train.distributed import launched_rank
    from lorakit.train.sft import train

    path, overrides = _split(args.items)
    if args.resume:
        overrides.append("resume=true")
    base = None
    if not path:  # no config file: the bundled example, with the overrides on top
        base = example_config()
        keys = {o.split("=", 1)[0] for o in overrides}
        if "data.train" in keys and "data.eval" not in keys:
            # your own training file: the example's held-out SQL questions do not apply
            base["data"]["eval"] = None
            base.pop("eval", None)
    cfg = load_config(path, overrides, base=base)
    if cfg.method in ("dpo", "orpo", "simpo", "kto"):  # lorakit.config.PREFERENCE_METHODS
        from lorakit.errors import ConfigError
        from lorakit.train.dpo import train

        if args.nproc is not None and args.nproc > 1:
            raise ConfigError(f"method: {cfg.method} runs in one process; drop --nproc")
    if launched_rank() == 0:
        from lorakit.plan.preflight import preflight

        preflight(cfg, strict=args.strict_memory, log=lambda m: print(m, file=sys.stderr),
                  processes=args.nproc or 1)
    if args.nproc is not None:  # config checked above; now the same command in N processes
        from lorakit.train.distributed import launch

        return launch(args.nproc, ["train", *args.items, *(["--resume"] if args.resume else []),
                                   *(["--no-progress"] if args.no_progress else [])])
    result = train(cfg, progress=False if args.no_progress else None)
    if result.interrupted:
        return 130
    if launched_rank() == 0:
        _print_summary(result)
        if cfg.eval.after_train:
            eval_after_train(cfg, result)
    return 0


def eval_after_train(cfg, result, log=None) -> dict | None:
    """The base-vs-tuned table on ``data.eval`` (lorakit eval's), printed and written to RUN/eval.

    Only for adapters (lora / qlora) with a held-out file of prompt + reference answers; the
    base is the same loaded model with the adapter switched off. Returns the eval result.
    """
    from lorakit.eval.compare import compare, format_table
    from lorakit.eval.fewshot import config_few_shot
    from lorakit.eval.report import write_report
    from lorakit.train import common

    log = log or (lambda msg: print(msg, file=sys.stderr))
    if cfg.method not in ("lora", "qlora") or not cfg.data.eval:
        return None
    log(f"base vs tuned on {cfg.data.eval} (first {cfg.eval.limit or 'all'} examples, metric "
        f"{cfg.eval.metric}; eval.after_train=false skips this)")
    device = common.default_device()
    precision = common.resolve_precision(cfg.train.precision, device, cfg.quantized)
    # the base the run trained on: 4-bit when cfg.quantized (QLoRA), in the run's precision
    model, tokenizer = common.load_base_for_config(cfg, device, precision)
    # (name, folder): a bare name would be read as a folder when the working directory holds
    # one of that name (`lorakit train output_dir=myrun` run from where myrun/ is)
    adapter = (result.run_dir.name or "tuned", result.adapter_dir)
    outcome = compare(model, tokenizer, cfg.data.eval, adapters=[adapter], metrics=[cfg.eval.metric],
                      max_new_tokens=cfg.eval.max_new_tokens, limit=cfg.eval.limit,
                      sql_db=cfg.eval.sql_db, forgetting=cfg.eval.forgetting,
                      probe_limit=cfg.eval.probe_limit, safety=False, log=log,
                      **config_few_shot(cfg))  # + the base-<K>shot row (eval.few_shot)
    print(format_table(outcome))
    paths = write_report(outcome, result.run_dir / "eval")
    log(f"report: {paths.get('html', result.run_dir / 'eval')}")
    return outcome


def _print_summary(result) -> None:
    from rich.console import Console
    from rich.table import Table

    s = result.summary
    table = Table(title=f"run {result.run_dir}", show_header=False)
    table.add_row("steps / epochs", f"{s['steps']} / {s['epochs']}")
    table.add_row("wall time", f"{s['wall_time_s']:.1f} s")
    if "supervised_tokens_per_s" in s:
        table.add_row("supervised tokens/s", f"{s['supervised_tokens_per_s']:.0f}")
    if "pairs_per_s" in s:  # dpo
        table.add_row("pairs/s", f"{s['pairs_per_s']:.2f}")
    table.add_row("final train loss", f"{s['final_train_loss']:.4f}")
    if s.get("final_eval_loss") is not None:
        table.add_row("final eval loss", f"{s['final_eval_loss']:.4f}")
    if s.get("final_eval_reward_accuracy") is not None:
        table.add_row("eval reward accuracy", f"{s['final_eval_reward_accuracy']:.3f}")
    table.add_row("peak memory", f"{s['peak_memory_bytes'] / 2**30:.2f} GiB")
    table.add_row("adapter", str(result.adapter_dir))
    Console(stderr=False).print(table)


def _demo(args) -> int:
    from lorakit.examples import run_demo

    return run_demo(overrides=args.items, limit=args.limit, out=sys.stdout)
