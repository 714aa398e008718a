"""The ``lorakit`` command: builds the parser and dispatches.

Every area (models, data, train, ...) adds its sub-commands through ``add_parsers(subparsers)``
in its own ``cli`` module, named in ``_COMMAND_MODULES``; the commands' work lives there. This
file only joins ``key=value`` overrides written after options, and turns a
:class:`~lorakit.errors.LorakitError` into ``error: ...`` and exit code 2 (Ctrl-C: 130).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lorakit import __version__

# modules that define add_parsers(subparsers); each sub-parser sets func=callable(args) -> int
_COMMAND_MODULES = [
    "lorakit.models.cli",
    "lorakit.data.cli",
    "lorakit.train.cli",
    "lorakit.eval.cli",
    "lorakit.export.cli",
    "lorakit.serve.cli",
    "lorakit.jobs.cli",  # adds --state-dir to `serve`: after lorakit.serve.cli
    "lorakit.plan.cli",
    "lorakit.lora.cli",
    "lorakit.recipes.cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit",
        description="LoRA and QLoRA fine-tuning of open language models, end to end.",
    )
    parser.add_argument("--version", action="version", version=f"lorakit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # an area this install leaves out: no commands
            if exc.name != name:
                raise
            continue
        module.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorakit.errors import LorakitError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `lorakit train run.yaml --no-progress train.lr=1e-4`: key=value overrides may follow options
    if extra and isinstance(getattr(args, "items", None), list) and all(
            "=" in e and not e.startswith("-") for e in extra):
        args.items.extend(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except LorakitError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
