"""``lorakit merge-adapters``: combine adapters into one (PEFT's ``add_weighted_adapter``)."""

from __future__ import annotations

import argparse
import json

HELP = """\
Combine LoRA adapters of one base model into a single PEFT adapter folder, with the maths of
PEFT's add_weighted_adapter (the folder equals what PEFT writes for the same adapters,
method, weights, density and torch seed):

  linear       weighted sum of the A matrices and of the B matrices (same rank; rough)
  cat          A's stacked, B's side by side: exactly sum_i w_i s_i B_i A_i (rank = sum)
  ties         TIES: keep the --density largest entries, elect signs, average agreeing ones
  dare_linear  DARE: drop entries at random (keep --density, rescale), then a weighted sum
  dare_ties    DARE drops, then the TIES sign election

The result loads anywhere a LoRA adapter does (lorakit, PEFT, vLLM, lorakit merge/export).
See docs/lora.md.
"""


def add_parsers(subparsers) -> None:
    """Add ``merge-adapters`` to the ``lorakit`` parser."""
    from lorakit.lora.combine import METHODS

    p = subparsers.add_parser(
        "merge-adapters", help="combine adapters into one (linear, cat, ties, dare_linear, "
        "dare_ties), as PEFT's add_weighted_adapter", description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  lorakit merge-adapters --adapter sql=runs/sql/adapter --adapter "
               "chat=runs/chat/adapter \\\n      --method cat --weights 0.6,0.4 --out merged-adapter/\n"
               "  lorakit merge-adapters --adapter a=A --adapter b=B --method dare_ties "
               "--weights 1,1 --density 0.5 --seed 0 --out AB/")
    p.add_argument("--adapter", required=True, action="append", metavar="NAME=DIR",
                   help="an adapter folder and its name (repeat, at least twice; order matters "
                        "for --weights)")
    p.add_argument("--method", required=True, metavar="METHOD",
                   help=f"one of {', '.join(METHODS)}")
    p.add_argument("--weights", required=True, metavar="W1,W2,...",
                   help="one weight per adapter, comma-separated, in the order of --adapter "
                        "(negative subtracts)")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="share of entries kept, 0 < D <= 1 (ties, dare_linear, dare_ties)")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="torch seed of the dare methods' random drops (default: 0)")
    p.add_argument("--model", metavar="MODEL",
                   help="the base model, for its layer order (default: the first adapter's "
                        "recorded base); only the dare draws depend on it")
    p.add_argument("--out", required=True, metavar="DIR", help="the adapter folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=run_merge_adapters)


def run_merge_adapters(args) -> int:
    """``lorakit merge-adapters``."""
    from lorakit.lora.combine import merge_adapters, parse_adapter_args, parse_weights

    result = merge_adapters(parse_adapter_args(args.adapter), args.out, method=args.method,
                            weights=parse_weights(args.weights), density=args.density,
                            seed=args.seed, model=args.model, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"wrote {result['out']} ({result['method']}, r={result['r']}, "
              f"{result['layers']} layers)")
    return 0
