"""``afterclose explore``: search fault sequences for a violation and shrink it."""

from __future__ import annotations

import argparse

from afterclose.harness.cli import common
from afterclose.harness.errors import AftercloseError


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    explore = sub.add_parser("explore", help="search fault sequences for a violation")
    common.add_run_options(explore, target=True)
    explore.add_argument("--out", default="scenarios/found-{rule}.toml", help="scenario file")
    explore.add_argument("--max-examples", type=int, default=50)
    explore.add_argument("--budget-s", type=float, default=120.0)
    explore.add_argument("--runs-per-example", type=int, default=2, help="runs before a pass")
    explore.add_argument("--verify-runs", type=int, default=3, help="re-runs of the result")
    explore.add_argument("--faults", default="", help="comma-separated (default: all)")
    explore.add_argument("--max-phases", type=int, default=3)
    from afterclose.harness.campaign.shared_db import add_db_argument

    add_db_argument(explore)
    explore.set_defaults(func=run_explore)


def run_explore(args: argparse.Namespace) -> int:
    try:
        from afterclose.harness import explore
    except ImportError as exc:
        raise AftercloseError(
            f"afterclose explore needs Hypothesis ({exc})", hint="pip install hypothesis"
        ) from None
    return explore.command(args, common.settings(args.target, args))
