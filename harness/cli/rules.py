"""``afterclose rules``: every rule of the registry, its name and what it means."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("rules", help="list the rules a verdict can name")
    p.add_argument("--markdown", action="store_true", help="print the README's rule table instead")
    p.set_defaults(func=list_rules)


def list_rules(args: argparse.Namespace) -> int:
    from afterclose.harness.oracle import registry

    print(registry.markdown_table() if args.markdown else registry.describe(), end="")
    return 0
