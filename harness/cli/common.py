"""What the subcommands that start a target share: their options and the session settings."""

from __future__ import annotations

import argparse
import json
import random
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from afterclose.harness import options
from afterclose.harness.errors import AftercloseError, OptionError

if TYPE_CHECKING:
    from afterclose.harness.session import Settings

T = TypeVar("T")


def _argparse_type(option: options.Option[T]) -> Callable[[str], T]:
    """``option``'s check as an argparse ``type``: a bad value is argparse's usage error."""

    def check(value: str) -> T:
        try:
            return option.check(value, option.cli)
        except OptionError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None

    check.__name__ = option.dest
    return check


def add_run_options(parser: argparse.ArgumentParser, *, target: bool) -> None:
    """The options of a subcommand that starts a target, with pytest's choices and defaults
    (``--seed`` is pytest's ``--fault-seed``)."""
    if target:
        parser.add_argument(
            options.TARGET.cli,
            required=True,
            type=_argparse_type(options.TARGET),
            help=options.TARGET.help,
        )
    for option in options.CLI_RUN_OPTIONS:
        parser.add_argument(
            option.cli,
            dest=option.dest,
            default=option.default,
            type=_argparse_type(option),
            metavar="LEVEL"
            if option is options.CHAOS
            else "{" + ",".join(option.choices) + "}"
            if option.choices
            else "SECONDS",
            help=option.help,
        )
    keep = options.KEEP_ARTIFACTS
    parser.add_argument(keep.cli, dest=keep.dest, action="store_true", help=keep.help)
    seed = options.FAULT_SEED
    parser.add_argument(
        seed.cli,
        dest=seed.dest,
        default=None,
        type=_argparse_type(seed),
        metavar="N",
        help=seed.help,
    )


def settings(target: str, args: argparse.Namespace) -> Settings:
    """The session settings of ``target`` from ``args`` (see :func:`add_run_options`)."""
    from afterclose.harness.session import Settings

    return Settings(
        target=target,
        rootdir=Path.cwd(),
        run_id=uuid.uuid4().hex,
        runner=args.runner,
        tracer=args.tracer,
        sanitize=args.sanitize,
        fault_seed=args.fault_seed if args.fault_seed is not None else random.randrange(2**32),
        chaos=args.chaos,
        storm_duration=args.storm_duration,
    )


def parse_params(items: list[str]) -> dict[str, object]:
    """``key=value`` words as fault parameters (values read as JSON when they are JSON)."""
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise AftercloseError(
                f"parameter {item!r} is not key=value", hint="e.g. connections=50"
            )
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def drop_artifacts(folder: Path, args: argparse.Namespace) -> bool:
    """Delete a passing run's artifacts (a trace is a large sparse file per traced process)
    unless ``--keep-artifacts``; True when they are gone."""
    if getattr(args, options.KEEP_ARTIFACTS.dest, False):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    return not folder.exists()
