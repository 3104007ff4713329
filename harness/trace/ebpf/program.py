"""The bpftrace program's text: ``harness/trace/afterclose.bt`` with its placeholders filled.

The record constants it prints (op codes, kinds) are not spelt out in the ``.bt`` file: they
are generated from :mod:`afterclose.harness.trace.format` (:mod:`.codegen`), so the program and
the reader cannot disagree.  They go in as ``#define`` lines at the ``/*@FORMAT@*/`` mark, and
a line that starts with a constant's name (``printf("OP_FDNEW %d ...")``) gets its number
written into the format string here: bpftrace expands no macro inside a string, and passing it
as one more printf argument would take stack the exit probe does not have (BPF's 512 bytes).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from afterclose.harness.errors import TraceError
from afterclose.harness.trace.codegen import bpftrace_constants, bpftrace_defines

__all__ = ["BT_SOURCE", "DEDUP_MARK", "FORMAT_MARK", "SEED_MARK", "STOP_MARK", "program_text"]

BT_SOURCE = Path(__file__).resolve().parent.parent / "afterclose.bt"
SEED_MARK = "/*@SEED@*/"
DEDUP_MARK = "/*@DEDUP_IO@*/"
FORMAT_MARK = "/*@FORMAT@*/"
STOP_MARK = "/*@STOP@*/"
_LEADING_NAME = re.compile(r'printf\("([A-Z][A-Z0-9]*_[A-Z0-9_]+) ')


def program_text(
    pids: Iterable[int],
    source: Path = BT_SOURCE,
    *,
    dedup_io: bool = True,
    stop_token: int = 0,
) -> str:
    """``afterclose.bt`` with the record constants of the trace format, the traced pids seeded
    into its BEGIN block, its I/O de-duplication switched on or off and the token of its stop
    handshake (see the program's header; 0, the default: no handshake)."""
    text = source.read_text()
    for mark in (FORMAT_MARK, SEED_MARK, DEDUP_MARK, STOP_MARK):
        if mark not in text:
            raise TraceError(f"the eBPF program has no {mark} placeholder", where=source)
    constants = bpftrace_constants()

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in constants:
            raise TraceError(
                f"the eBPF program prints an unknown constant {m.group(1)}", where=source
            )
        return f'printf("{constants[m.group(1)]} '

    seeds = " ".join(f"@t[{int(p)}] = 1;" for p in sorted(set(pids)))
    return (
        _LEADING_NAME.sub(number, text)
        .replace(FORMAT_MARK, bpftrace_defines())
        .replace(SEED_MARK, seeds)
        .replace(DEDUP_MARK, "1" if dedup_io else "0")
        .replace(STOP_MARK, f"#define STOP_TOKEN {int(stop_token)}")
    )
