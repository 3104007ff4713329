"""The one function that writes every replay command a report prints.

A replay runs the same target with the same options and fault seed, so every test (or
``afterclose run``) gets the same client-side schedule as before: same parameters and seed
give a byte-identical schedule.  Which flags a command names, and how, comes from
:mod:`afterclose.harness.options`: only those whose value differs from the default.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

from afterclose.harness import options

if TYPE_CHECKING:
    from afterclose.harness.session import Settings

# pytest: a test of a pytest run; run: ``afterclose run`` (a fault or a scenario file);
# demo: ``afterclose demo``; explore: ``afterclose explore``.
Tool = Literal["pytest", "run", "demo", "explore"]


def command(
    settings: Settings, tool: Tool, select: Sequence[str] = (), *, seed: bool = True
) -> str:
    """The shell command that runs ``select`` again as ``settings`` ran it.

    ``select`` is what the tool runs: for pytest ``-k NAME`` or ``--no-builtin-suite NODEID``,
    for ``afterclose run`` the fault and its ``key=value`` parameters, or a scenario file.
    ``seed=False`` leaves the fault seed out (a scenario file that carries its own seed)."""
    if tool == "pytest":
        argv = ["pytest", f"--target={settings.target}"]
        flags: Sequence[options.Option[object]] = options.RUN_OPTIONS
    else:
        argv = ["afterclose", tool]
        if tool != "demo":  # the demo runs its two built-in targets
            argv.append(f"--target={settings.target}")
        flags = options.CLI_RUN_OPTIONS
    if seed:
        argv.append(f"{_spelling(options.FAULT_SEED, tool)}={settings.fault_seed}")
    for option in flags:
        value = getattr(settings, option.dest)
        if value is not None and value != option.default:
            argv.append(f"{_spelling(option, tool)}={value}")
    return shlex.join([*argv, *select])


def _spelling(option: options.Option[object], tool: Tool) -> str:
    return option.flag if tool == "pytest" else option.cli
