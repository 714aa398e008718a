"""``lorakit info`` and ``lorakit generate``: look at a base model, and try it.

Kept light to import: torch and transformers are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json

DEFAULT_MODEL = "smollm2-135m-instruct"  # same as lorakit.models.load.DEFAULT_MODEL

_MODEL_HELP = ("a built-in alias (smollm2-135m-instruct), a Hugging Face model folder, a .gguf "
               "file, or a hub id org/name (must be in the local HF cache when offline)")


def add_parsers(subparsers) -> None:
    """Add the ``info`` and ``generate`` sub-commands to the ``lorakit`` parser."""
    info = subparsers.add_parser(
        "info", help="describe a base model: size, dtype, LoRA target names, memory",
        description="Describe a base model without training anything: architecture, parameter "
                    "count, dtype, the linear-layer names usable in target_modules, whether it "
                    "has a chat template, and the memory its weights need at 32, 16 and 4 bits.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit info smollm2-135m-instruct\n"
               "  lorakit info ./my-model --json")
    info.add_argument("model", metavar="MODEL", help=_MODEL_HELP)
    info.add_argument("--json", action="store_true", help="print the facts as one JSON object")
    info.add_argument("--quantization", choices=["nf4", "fp4"], default=None,
                      help="also report the base-weight bytes once the decoder-block linear layers "
                           "are 4-bit (bitsandbytes layout, block size 64), computed exactly")
    info.add_argument("--no-double-quant", action="store_true",
                      help="with --quantization: without double quantization of the constants")
    info.set_defaults(func=run_info)

    gen = subparsers.add_parser(
        "generate", help="complete one prompt with a base model (optionally + an adapter)",
        description="Generate a completion for one prompt and print only the completion. The "
                    "model's chat template is applied when it has one. Greedy by default.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog='examples:\n  lorakit generate --prompt "What is the capital of France?"\n'
               "  lorakit generate --model ./base --adapter runs/demo/adapter --prompt Hi")
    gen.add_argument("--model", default=DEFAULT_MODEL, metavar="MODEL",
                     help=f"{_MODEL_HELP} (default: {DEFAULT_MODEL})")
    gen.add_argument("--adapter", metavar="DIR", help="a LoRA adapter folder to apply (PEFT format)")
    gen.add_argument("--prompt", required=True, metavar="TEXT", help="the user message")
    gen.add_argument("--system", metavar="TEXT", help="an optional system message")
    gen.add_argument("--max-tokens", type=int, default=128, metavar="N",
                     help="most new tokens to generate (default: 128)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T",
                     help="0 = greedy (default); above 0 samples")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P",
                     help="nucleus sampling mass when sampling (default: 1.0)")
    gen.add_argument("--dtype", default=None, metavar="DTYPE",
                     choices=["auto", "float32", "bfloat16", "float16"],
                     help="auto|float32|bfloat16|float16 (default: bfloat16 where the device runs "
                          "it natively: a GPU with bf16, a CPU with AVX512-BF16 or AMX; else "
                          "float32)")
    gen.set_defaults(func=run_generate)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run_info(args) -> int:
    """``lorakit info MODEL [--json]``."""
    from rich.console import Console
    from rich.table import Table

    from lorakit.models.load import model_info

    info = model_info(args.model)
    if args.quantization:
        from lorakit.models.load import meta_model, resolve_spec
        from lorakit.models.quantize import estimate_quantized_bytes

        meta, _ = meta_model(resolve_spec(args.model))
        info["quantized"] = {"type": args.quantization, "double_quant": not args.no_double_quant,
                             **estimate_quantized_bytes(meta, args.quantization,
                                                        not args.no_double_quant)}
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=f"model {info['spec']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    chat = {True: "yes", False: "no", None: "unknown (no tokenizer)"}[info["chat_template"]]
    rows = [("architecture", info["architecture"]),
            ("parameters", f"{info['parameters']:,} ({info['parameters'] / 1e6:.1f} M)"),
            ("dtype", str(info["dtype"])),
            ("layers / hidden / vocab",
             f"{info['num_layers']} / {info['hidden_size']} / {info['vocab_size']}"),
            ("tied embeddings", "yes" if info["tie_word_embeddings"] else "no"),
            ("target_modules", ", ".join(info["target_modules"]) or "(none found)"),
            ("chat template", chat)]
    for key, value in rows:
        table.add_row(key, value)
    mem = Table(title="weight memory", title_justify="left")
    mem.add_column("precision")
    mem.add_column("bytes", justify="right")
    for key, value in info["memory_bytes"].items():
        mem.add_row(key, _gib(value))
    console = Console()
    console.print(table)
    console.print(mem)
    console.print(info["memory_note"], style="dim", highlight=False)
    if "quantized" in info:
        q = info["quantized"]
        console.print(f"{q['type']}{' + double quant' if q['double_quant'] else ''}: quantized layers "
                      f"{_gib(q['quantized_bytes'])} ({q['bits_per_param']:.3f} bits/param, "
                      f"{q['ratio_vs_bf16']:.3f} x bf16), other weights {_gib(q['other_bytes'])}, "
                      f"total {_gib(q['total_bytes'])}", highlight=False)
    return 0


def run_generate(args) -> int:
    """``lorakit generate --prompt TEXT ...``: prints the completion only (on stdout)."""
    from lorakit.models.load import generate, inference_dtype, load_model

    model, tokenizer = load_model(args.model, dtype=args.dtype or inference_dtype()[0])
    if args.adapter:
        from lorakit.lora.io import load_adapter

        load_adapter(model, args.adapter, tokenizer=tokenizer)
    text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_tokens,
                    temperature=args.temperature, top_p=args.top_p, system=args.system)
    print(text)
    return 0
