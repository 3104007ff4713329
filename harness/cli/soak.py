"""``afterclose soak``: rounds of the suite and generated scenarios until a violation or time."""

from __future__ import annotations

import argparse

from afterclose.harness.cli import common


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from afterclose.harness.campaign import soak

    p = sub.add_parser("soak", help="a long campaign: rounds on fresh targets, resumable")
    common.add_run_options(p, target=True)
    soak.add_arguments(p)
    p.set_defaults(func=run_soak)


def run_soak(args: argparse.Namespace) -> int:
    from afterclose.harness.campaign import soak

    return soak.command(args, common.settings(args.target, args))
