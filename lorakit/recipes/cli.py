"""``lorakit recipes``: list the bundled run configs, ``lorakit recipes copy NAME FILE``."""

from __future__ import annotations

import argparse
import json

HELP = """\
Bundled run configs for common setups, each with the planner's memory estimate for the card
it is meant for (computed now, by the same planner as `lorakit estimate`). Copy one, point
data.train / data.eval at your files, and train:

  lorakit recipes
  lorakit recipes copy llama3-8b-qlora-24gb run.yaml
  lorakit train run.yaml
"""


def add_parsers(subparsers) -> None:
    """Add ``recipes`` (and ``recipes copy``) to the ``lorakit`` parser."""
    p = subparsers.add_parser("recipes", help="bundled run configs for common setups, with "
                              "their memory estimates; `recipes copy NAME FILE`",
                              description=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    p.set_defaults(func=run_list)
    sub = p.add_subparsers(dest="recipes_action", metavar="ACTION")
    copy = sub.add_parser("copy", help="write a recipe to a file",
                          description="Write recipe NAME to FILE (or FOLDER/NAME.yaml). An "
                                      "existing file is kept unless --force.")
    copy.add_argument("name", metavar="NAME", help="the recipe (see `lorakit recipes`)")
    copy.add_argument("file", metavar="FILE", help="where to write it")
    copy.add_argument("--force", action="store_true", help="overwrite FILE when it exists")
    copy.set_defaults(func=run_copy)


def run_list(args) -> int:
    """``lorakit recipes``."""
    from lorakit.recipes import list_recipes

    rows = list_recipes()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['name']}: {row['title']}")
        print(f"  {row['model']}, method {row['method']}; meant for {row['setup']}")
        if row["per_gpu"]:
            on_card = [f for f in row["fits"] if f.split("x ", 1)[1] == row["setup"].split("x ", 1)[1]]
            print(f"  estimate: {row['memory_gib']:.1f} GiB on one GPU; fits "
                  f"{on_card[0] if on_card else 'not on this card'}"
                  f"{'' if row['fits_setup'] else ' (NOT the stated setup)'}")
        else:
            print(f"  estimate: {row['memory_gib']:.1f} GiB of RAM"
                  f"{'' if row['fits_setup'] else ' (more than the stated RAM)'}")
        print(f"  {row['estimate_command']}")
    print("copy one with: lorakit recipes copy NAME FILE")
    return 0


def run_copy(args) -> int:
    """``lorakit recipes copy NAME FILE``."""
    from lorakit.recipes import copy_recipe

    path = copy_recipe(args.name, args.file, force=args.force)
    print(f"wrote {path}; set data.train / data.eval, then: lorakit train {path}")
    return 0
