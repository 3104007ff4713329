"""``afterclose kernels``: the kernels ``--kernel`` can boot."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sub.add_parser(
        "kernels", help="kernels --kernel can boot: versions apt offers, and cached ones"
    ).set_defaults(func=list_kernels)


def list_kernels(args: argparse.Namespace) -> int:
    from afterclose.harness.kernel import fetch

    for line in fetch.listing():
        print(line)
    print("use: pytest --target=NAME --kernel=6.1,6.12   (see docs/kernels.md)")
    return 0
