"""``afterclose targets``: the targets it can find, with their descriptions."""

from __future__ import annotations

import argparse
from pathlib import Path

from afterclose.harness.errors import AftercloseError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("targets", help="list targets").set_defaults(func=list_targets)


def list_targets(args: argparse.Namespace) -> int:
    from afterclose.harness.manifest import available_targets, load_manifest, resolve_target

    names = available_targets(Path.cwd())
    width = max((len(name) for name in names), default=0)
    for name in names:
        path = resolve_target(name, Path.cwd())
        try:
            description = load_manifest(path).description
        except AftercloseError as exc:
            description = f"(broken manifest: {exc.message})"
        print(f"{name:{width}}  {description}  [{path}]")
    return 0
