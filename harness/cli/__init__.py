"""``afterclose``: the command line for work outside pytest.

afterclose demo                      find the bug in seed-buggy, pass seed-fixed
afterclose targets                   list the targets it can find
afterclose faults                    list the faults and their parameters
afterclose kernels                   list the kernels --kernel can boot
afterclose run --target X FAULT k=v  run one fault against a target and judge it
afterclose run --target X FILE.toml  run a scenario file against a target and judge it
afterclose explore --target X        search fault sequences for a violation, shrink it
afterclose soak --target X --duration 8h   a long, resumable campaign of rounds
afterclose trace show DIR|FILE       print a saved trace's verdict and timelines
afterclose rules                     list the rules a verdict can name
afterclose manifest --explain        list every manifest key
afterclose protocols                 list the protocols a target may speak, and their keys

Each subcommand is one module here with an ``add_parser(sub)`` that registers it and sets
its ``func``; the options of those that start a target come from ``common`` (and so from
:mod:`afterclose.harness.options`, like pytest's).
"""

from __future__ import annotations

import argparse
import os
import sys

from afterclose.harness.cli import (
    demo,
    explore,
    faults,
    kernels,
    manifest,
    protocols,
    rules,
    run,
    soak,
    targets,
    trace,
)
from afterclose.harness.errors import AftercloseError

# The subcommands in the order ``afterclose --help`` lists them; a new one is a module with
# add_parser(), added here.
SUBCOMMANDS = (
    demo,
    targets,
    faults,
    kernels,
    run,
    explore,
    soak,
    trace,
    rules,
    manifest,
    protocols,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="afterclose", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except AftercloseError as exc:
        print(f"afterclose: error: {exc.render()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("afterclose: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`afterclose rules | head`): stop quietly, as `cat` would, and
        # keep Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
