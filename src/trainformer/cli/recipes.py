"""`trainformer recipes`: list the built-in recipes, or print one resolved."""

from __future__ import annotations

import yaml

from trainformer.cli.common import add_overrides
from trainformer.config import load_recipe, read_yaml, recipe_names, resolve_recipe, to_dict


def add_parser(sub) -> None:
    p = sub.add_parser("recipes", help="list built-in recipes or show one, resolved")
    p.add_argument("recipe", nargs="?", help="a recipe name or YAML path to print in full")
    add_overrides(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.recipe:
        cfg = load_recipe(args.recipe, args.overrides)
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    for name in recipe_names():
        desc = read_yaml(resolve_recipe(name)).get("description", "")
        print(f"{name:28s} {desc}")
    return 0
