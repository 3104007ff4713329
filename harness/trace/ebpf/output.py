"""What bpftrace printed: the lines of ``afterclose.bt`` (see its header) parsed into raw
records and the counts every report states (lost events, truncated waits, execs), the
processes that exited, and whether every line the program printed reached the file."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from afterclose.harness.errors import TraceError
from afterclose.harness.trace.format import Op

__all__ = ["ParsedOutput", "RawRecord", "parse_output"]

_LOST_RE = re.compile(rb"^Lost (\d+) events")
_COUNT_RE = re.compile(rb"^@n: (\d+)$")
_ATTACHING = b"Attaching "

# Raw record: op, pid, tid, seq_in, seq_out, flags, fd, arg, data, events, ret (kernel result).
RawRecord = tuple[int, int, int, int, int, int, int, int, int, int, int]


@dataclass
class ParsedOutput:
    records: list[RawRecord] = field(default_factory=list)
    begin_ns: int = 0
    lost: int = 0
    truncated_waits: int = 0
    execs: list[tuple[int, int, int]] = field(default_factory=list)  # pid, tid, ns
    exits: dict[int, int] = field(default_factory=dict)  # pid -> ns its last thread exited
    malformed: int = 0
    lines: int = 0  # lines of the kinds the program counts in @n: records, T, X, E
    printed: int | None = None  # @n, which bpftrace prints at its exit (None: it did not)
    stopped_ns: int = 0  # the "S" line: when the program stopped printing records

    def unwritten(self) -> int:
        """How many lines the program printed that neither reached the file nor were counted
        lost (bpftrace discarded them); 0 when it did not say how many it printed."""
        if self.printed is None:
            return 0
        return max(self.printed - self.lines - self.lost, 0)


def parse_output(path: Path) -> ParsedOutput:
    """Parse the lines of ``afterclose.bt`` (see its header); records keep their print order."""
    out = ParsedOutput()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TraceError(f"cannot read the eBPF trace: {exc.strerror}", where=path) from exc
    append = out.records.append
    for line in raw.split(b"\n"):
        if not line:
            continue
        c = line[0]
        if 0x30 <= c <= 0x39:  # a digit: a record
            out.lines += 1
            parts = line.split()
            if len(parts) != 11:
                out.malformed += 1
                continue
            try:
                op, pid, tid, si, so, fl, fd, arg, data, ev, ret = map(int, parts)
            except ValueError:
                out.malformed += 1
                continue
            if op == Op.EPOLL_WAIT:
                # The wait line carries its first event (one perf-buffer write less).
                append((op, pid, tid, si, so, fl, fd, arg, 0, 0, ret))
                if ret > 0:
                    append((Op.EPOLL_EVENT, pid, tid, si, so, 0, fd, 0, data, ev, 0))
            else:
                append((op, pid, tid, si, so, fl, fd, arg, data, ev, ret))
        elif line.startswith(b"B "):
            out.begin_ns = int(line[2:])
        elif line.startswith(b"P "):
            continue  # padding that pushes the B line out of bpftrace's buffer
        elif line.startswith(b"Lost "):
            m = _LOST_RE.match(line)
            if m is not None:
                out.lost += int(m.group(1))
        elif line.startswith(b"T "):
            out.lines += 1
            out.truncated_waits += 1
        elif line.startswith(b"X "):
            out.lines += 1
            parts = line.split()
            if len(parts) == 4:
                out.execs.append((int(parts[1]), int(parts[2]), int(parts[3])))
        elif line.startswith(b"E "):
            out.lines += 1
            parts = line.split()
            if len(parts) == 3:
                out.exits[int(parts[1])] = int(parts[2])
            else:
                out.malformed += 1
        elif line.startswith(b"S "):
            out.stopped_ns = int(line[2:])
        elif line == b"K":
            continue  # a nudge for a bpftrace that missed its SIGINT (see stop())
        elif line.startswith(b"@n: "):
            m = _COUNT_RE.match(line)
            if m is None:
                out.malformed += 1
            else:
                out.printed = int(m.group(1))
        elif not line.startswith(_ATTACHING):
            out.malformed += 1
    return out
