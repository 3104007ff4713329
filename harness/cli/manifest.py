"""``afterclose manifest``: every key a target manifest may hold, or one manifest checked."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("manifest", help="explain the manifest keys, or check a manifest (--target)")
    p.add_argument("--explain", action="store_true", help="print every key (the default)")
    p.add_argument("--markdown", action="store_true", help="as the README's table")
    p.add_argument("--target", help="a manifest name or path to load and check")
    p.set_defaults(func=manifest)


def manifest(args: argparse.Namespace) -> int:
    from afterclose.harness import manifest_keys
    from afterclose.harness.manifest import load_manifest, resolve_target

    if args.target:
        path = resolve_target(args.target, Path.cwd())
        loaded = load_manifest(path)
        print(f"{path}: target {loaded.name!r} is a valid manifest")
        return 0
    print(manifest_keys.markdown_table() if args.markdown else manifest_keys.explain())
    return 0
