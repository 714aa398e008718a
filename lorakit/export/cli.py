"""``lorakit merge``, ``lorakit export ...`` and ``lorakit check-adapter``: leaving lorakit.

Kept light to import: torch, transformers and gguf are imported inside the command functions.
"""

from __future__ import annotations

import argparse
import json

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
           "float32": "float32", "float16": "float16", "bfloat16": "bfloat16"}
_MODEL_HELP = ("the base model (alias, Hugging Face folder, .gguf file or hub id); default: the "
               "base_model recorded in the adapter's lorakit.json / adapter_config.json")


def _read_prompts(path: str | None) -> list[str] | None:
    if not path:
        return None
    from pathlib import Path

    from lorakit.errors import ConfigError

    try:
        lines = [line.strip() for line in Path(path).read_text().splitlines()]
    except OSError as exc:
        raise ConfigError(f"cannot read --prompts file {path}: {exc}") from None
    prompts = [line for line in lines if line]
    if not prompts:
        raise ConfigError(f"--prompts file {path} holds no prompt (one prompt per line)")
    return prompts


def add_parsers(subparsers) -> None:
    """Add ``merge``, ``export`` and ``check-adapter`` to the ``lorakit`` parser."""
    merge = subparsers.add_parser(
        "merge", help="fold an adapter into its base and write a standard Hugging Face folder",
        description="Fold a LoRA adapter (plain, rsLoRA, DoRA, modules_to_save; QLoRA adapters "
                    "are folded into the dequantized base, never into 4-bit weights) into its "
                    "base model and write a standard Hugging Face folder: config.json, "
                    "model.safetensors (sharded with an index when large), generation_config."
                    "json, tokenizer files and chat template. transformers' "
                    "AutoModelForCausalLM.from_pretrained(OUT) loads it without lorakit.\n\n"
                    "Parity gate: the written folder is read back and compared with the adapter "
                    "on its base (and on the 4-bit base for QLoRA) on a fixed set of prompts: "
                    "max |logit diff|, mean KL, argmax and greedy-decoding agreement. When it is "
                    "worse than the thresholds for the dtype (docs/export.md) the command exits "
                    "with status 2 and nothing is written, unless --force.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit merge --adapter runs/demo/adapter --out merged/\n"
               "  lorakit merge --adapter runs/demo/adapter --out merged-bf16/ --dtype bf16")
    merge.add_argument("--adapter", required=True, metavar="DIR", help="the adapter folder")
    merge.add_argument("--model", metavar="MODEL", help=_MODEL_HELP)
    merge.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    merge.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                       help="dtype of the written weights (default: fp32)")
    merge.add_argument("--force", action="store_true",
                       help="keep the output even when the parity gate fails, and export even "
                            "when lorakit.json says the adapter was trained on another base")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace --out when it already exists")
    merge.add_argument("--prompts", metavar="FILE",
                       help="prompts for the parity check, one per line (default: 4 built-in)")
    merge.add_argument("--max-new-tokens", type=int, default=16, metavar="N",
                       help="greedy tokens decoded per prompt in the parity check (default: 16)")
    merge.add_argument("--max-shard-size", default="2GB", metavar="SIZE",
                       help="largest safetensors shard, e.g. 2GB or 500MB (default: 2GB)")
    merge.add_argument("--json", action="store_true", help="also print the result as JSON")
    merge.set_defaults(func=run_merge)


def run_merge(args) -> int:
    """``lorakit merge --adapter DIR --out DIR``."""
    import torch

    from lorakit.errors import ConfigError
    from lorakit.export.merge import merge_to_folder

    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    result = merge_to_folder(args.adapter, args.out, args.model,
                             dtype=getattr(torch, _DTYPES[args.dtype]), force=args.force,
                             overwrite=args.overwrite, prompts=_read_prompts(args.prompts),
                             max_new_tokens=args.max_new_tokens,
                             max_shard_size=args.max_shard_size)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']} (base {result['base']}, {result['dtype']})")
    return 0
