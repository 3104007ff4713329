"""``afterclose faults``: every fault and its parameters."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser("faults", help="list faults").set_defaults(func=list_faults)


def list_faults(args: argparse.Namespace) -> int:
    from afterclose import faults

    for name in faults.available("all"):
        cls = faults.get_any(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        side = " (target-side)" if faults.kind(name) == "target" else ""
        print(f"{name}{side}: {doc[0] if doc else ''}")
        for line in cls.describe_params():
            print(f"    {line}")
    return 0
